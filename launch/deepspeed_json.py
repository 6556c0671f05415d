"""The DeepSpeed JSON dialect: reading it as real projects publish it, writing what DeepSpeed accepts.

Reading mirrors DeepSpeed itself: files are parsed the way
``DeepSpeedConfig`` parses them (Hjson, so ``//``, ``#`` and ``/* */``
comments and trailing commas are fine; duplicate keys are an error), and
legacy spellings DeepSpeed still accepts are understood (``cpu_offload``,
``cpu_offload_param``, ``cpu_offload_use_pin_memory``, ``bfloat16``,
``zero_optimization: true`` with ``allgather_size``, ``max_grad_norm``, and
the ``stage3_*`` / plain aliases of the ZeRO-3 knobs). The blocks DeepSpeed
models with pydantic (``zero_optimization``, ``fp16``, ``bf16``) are checked
by DeepSpeed's own models, an unknown key refused with the nearest name
(:func:`check_with_deepspeed`); a top-level key close to one DeepSpeed knows
is refused, since DeepSpeed would silently ignore it. A file read alone must
give ``train_batch_size`` or ``train_micro_batch_size_per_gpu``, as DeepSpeed
asserts; a ``sequence_parallel`` block is Ulysses of its size.

``"auto"`` means what it means to the HuggingFace Trainer integration:
"fill this in from the rest of the configuration". Here the rest is the
other sources (Megatron flags, the ``"zeromega"`` block) and the world
size: batch sizes follow ``train_batch_size = micro x accumulation x dp``,
``warmup_max_lr`` is the optimizer's lr, ``total_num_steps`` the run's
steps, and the ZeRO-3 bucket sizes come from the model's hidden size
(``h*h``, ``0.9*h*h``, ``10*h`` as in the Trainer); an ``"auto"`` nothing can
fill is a ConfigError naming the key.
"""

from __future__ import annotations

import copy
import difflib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from pydantic import TypeAdapter, ValidationError

from zeromega.config.schema import AioConfig, RunConfig, coerce
from zeromega.config.errors import ConfigError
from zeromega.plugins.zero.ds_config import (  # noqa: F401 (the writer half of this dialect, re-exported)
    CPU_ZERO_DEFAULTS, FP16_KEYS, SCHEDULERS, _batch_keys, deepspeed_scheduler, reduce_dtype_keys, to_deepspeed)

from . import limits
from .partial import check_keys, flatten, merge, set_path

AUTO = "auto"

# Top-level DeepSpeed keys -> unified field path.
TOP_LEVEL: dict[str, str] = {
    "train_micro_batch_size_per_gpu": "batch.micro",
    "train_batch_size": "batch.global",
    "gradient_accumulation_steps": "batch.accumulation",
    "gradient_clipping": "optimizer.clip_grad",
}
OFFLOAD_KEYS = ("device", "nvme_path", "pin_memory")
AIO_KEYS = tuple(AioConfig.model_fields)
OPTIMIZER_PARAMS: dict[str, str] = {
    "lr": "optimizer.lr",
    "weight_decay": "optimizer.weight_decay",
    "eps": "optimizer.eps",
    "max_grad_norm": "optimizer.clip_grad",  # legacy spelling of gradient_clipping
}
# Both spellings DeepSpeedZeroConfig accepts -> the one we write (its alias).
ZERO_ALIASES: dict[str, str] = {
    "prefetch_bucket_size": "stage3_prefetch_bucket_size",
    "param_persistence_threshold": "stage3_param_persistence_threshold",
    "model_persistence_threshold": "stage3_model_persistence_threshold",
    "max_live_parameters": "stage3_max_live_parameters",
    "max_reuse_distance": "stage3_max_reuse_distance",
    "gather_16bit_weights_on_model_save": "stage3_gather_16bit_weights_on_model_save",
    "stage3_gather_fp16_weights_on_model_save": "stage3_gather_16bit_weights_on_model_save",
    "module_granularity_threshold": "stage3_module_granularity_threshold",
    "use_all_reduce_for_fetch_params": "stage3_use_all_reduce_for_fetch_params",
    "allgather_sequential": "stage3_allgather_sequential",
}
# ZeRO keys whose "auto" the HF Trainer fills from the model's hidden size h.
ZERO_AUTO_FROM_HIDDEN: dict[str, Callable[[int], int]] = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}
RATIOS = "_deepspeed_ratios"
"""Partial key for WarmupCosineLR's ratios, made absolute once the lr is known (:func:`finish`)."""
DEFAULTS = "_deepspeed_defaults"
"""Partial key for DeepSpeed's own defaults of what the file leaves unstated (filled by :func:`finish`)."""
ALONE_DEFAULTS = "_deepspeed_alone_defaults"
"""Partial key for DeepSpeed's defaults of what Megatron-LM's flags own when they are present (the
optimizer and schedule a Megatron-DeepSpeed script builds itself); filled only without Megatron flags."""
AUTOS = "_deepspeed_autos"
"""Partial key: the DeepSpeed keys the file gives as "auto" (nested like the file), each resolved by
:func:`finish` from the run's other sources or the dialect's defaults, and reported."""
NO_BATCH = "_deepspeed_no_batch"
"""Partial key: the DeepSpeed file gives neither train_batch_size nor train_micro_batch_size_per_gpu, which
DeepSpeed refuses; :func:`finish` refuses it too unless another source states a batch size, or Megatron
flags are among the sources (they own the batch then)."""


# ------------------------------------------------------------------ reading


def load_file(path: str | Path) -> dict:
    """A DeepSpeed config file parsed exactly as ``DeepSpeedConfig`` parses it (Hjson, unique keys)."""
    import hjson

    path = Path(path)
    text = read_text(path, "--config")
    try:
        data = limits.load_json(text, str(path), hjson=True, object_pairs_hook=_unique_keys)
    except hjson.HjsonDecodeError as err:
        raise ConfigError("--config", str(path), f"not valid JSON ({err.msg} at line {err.lineno} "
                          f"column {err.colno})", "fix the JSON syntax at that place") from None
    except IndexError:  # hjson reads past the end of a /* comment or ''' string that is never closed
        raise ConfigError("--config", str(path), "not valid JSON (the text ends inside a /* comment or a ''' "
                          "string)", "close it with */ or '''") from None
    except _DuplicateKey as err:
        raise ConfigError("--config", str(path), f"duplicate key {err.args[0]!r} (DeepSpeed rejects it)",
                          "keep one of them") from None
    if not isinstance(data, dict):
        raise ConfigError("--config", str(path), "top level is not a JSON object", "wrap the keys in {...}")
    if not data and "{" not in text:  # comments only: as empty as an empty file ({} states it on purpose)
        raise ConfigError("--config", str(path), "holds no keys (only comments)", "write the config into it")
    return data


def read_text(path: Path, field: str) -> str:
    """The file's text: refused when missing, unreadable, empty or over the size limit (:mod:`.limits`)."""
    if not path.is_file():
        raise ConfigError(field, str(path), "no such file", "pass the path of an existing config")
    try:
        limits.check_size(path, field)
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(field, str(path), f"cannot read it ({err})", "check the file") from None
    limits.check_size(path, field, text)
    return text


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _flag(value: Any, key: str) -> bool:
    """A JSON boolean (or "true"/"false", as pydantic reads them) named ``key`` in errors."""
    try:
        return TypeAdapter(bool).validate_python(value)
    except ValidationError:
        raise ConfigError(key, value, "cannot read it: expected true or false", f"write {key}: true or false") from None


def _object(value: Any, where: str) -> dict:
    """``value`` as a dict copy ({} for None); anything else is a ConfigError naming ``where``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(where, value, "cannot read it: expected a JSON object {...}",
                          f"write {where} as an object of keys, as DeepSpeed documents it")
    return dict(value)


# ------------------------------------------------------------------ DeepSpeed's own validation

# Top-level keys DeepSpeed 0.19 reads that its modules spell only inline (the rest is collected from
# DeepSpeed's own constants and config sources by :func:`deepspeed_names`), and the blocks zeromega adds.
EXTRA_TOP_LEVEL = ("compile", "tensor_parallel", "weight_quantization", "checkpoint", "zeromega",
                   "sequence_parallel")
# DeepSpeed's modules whose constants and config code name its keys (the data for "did you mean").
_NAME_MODULES = (
    "deepspeed.runtime.config", "deepspeed.runtime.constants", "deepspeed.runtime.precision_config",
    "deepspeed.runtime.zero.config", "deepspeed.monitor.config", "deepspeed.profiling.constants",
    "deepspeed.profiling.config", "deepspeed.runtime.activation_checkpointing.config",
    "deepspeed.compile.config", "deepspeed.runtime.tensor_parallel.config", "deepspeed.comm.config",
    "deepspeed.comm.constants", "deepspeed.runtime.swap_tensor.constants", "deepspeed.autotuning.constants",
    "deepspeed.utils.config", "deepspeed.runtime.model_checkpointing.constants", "deepspeed.datastates.config",
    "deepspeed.inference.config", "deepspeed.runtime.data_pipeline.constants")


@functools.lru_cache(maxsize=1)
def deepspeed_names() -> frozenset[str]:
    """Every key name DeepSpeed 0.19 knows: its string constants and the key literals of its config code."""
    import importlib
    import inspect
    import re

    names = set(EXTRA_TOP_LEVEL)
    for module_name in _NAME_MODULES:
        try:
            module = importlib.import_module(module_name)
            source = inspect.getsource(module)
        except Exception:  # noqa: BLE001 (a module this DeepSpeed lacks adds no names)
            continue
        names |= {value for name, value in vars(module).items() if name.isupper() and isinstance(value, str)
                  and re.fullmatch(r"[a-z][a-z0-9_]*", value)}
        names |= set(re.findall(r'"([a-z][a-z0-9_]*)"', source))
    return frozenset(names)


def _did_you_mean(key: str, names) -> Optional[str]:
    by_lower = {name.lower(): name for name in names}
    close = difflib.get_close_matches(key.lower(), list(by_lower), n=1, cutoff=0.8)
    if close:
        return by_lower[close[0]]
    words = sorted(key.lower().split("_"))  # the same words in another order (comm_overlap)
    return next((name for low, name in sorted(by_lower.items()) if sorted(low.split("_")) == words), None)


def _shown(key: str) -> str:
    """A key as an error message names it: itself, or its repr where it holds a newline or the like."""
    return key if key.isprintable() else repr(key)


def _model_names(model) -> set[str]:
    """A pydantic model's field names and their aliases (both spellings DeepSpeed accepts)."""
    names = set(model.model_fields)
    names |= {field.alias for field in model.model_fields.values() if field.alias}
    return names


def _submodel(model, name: str):
    """The DeepSpeed config model of field (or alias) ``name`` of ``model``, if it is one."""
    import typing

    from pydantic import BaseModel

    for field_name, field in model.model_fields.items():
        if name in (field_name, field.alias):
            for candidate in (field.annotation, *typing.get_args(field.annotation)):
                if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                    return candidate
    return None


def _deepspeed_models() -> dict[str, Any]:
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return {"zero_optimization": DeepSpeedZeroConfig, "fp16": DeepSpeedFP16Config, "bf16": DeepSpeedBF16Config,
            "bfloat16": DeepSpeedBF16Config}


def check_with_deepspeed(ds: dict) -> None:
    """Refuse what DeepSpeed 0.19 refuses, and a top-level typo it would silently ignore.

    Blocks DeepSpeed models with pydantic (``zero_optimization`` with its offload
    sub-blocks, ``fp16``, ``bf16``) are validated by DeepSpeed's own models, so
    their aliases, deprecated spellings (DeepSpeed warns, and so do they here),
    types and refusals are the engine's; an unknown key in them is refused with
    the closest field name or alias. DeepSpeed ignores unknown top-level keys:
    one close to a key DeepSpeed knows is refused (a ``zero_optimisation``
    block would otherwise silently mean ZeRO-0), the others pass through.
    """
    from deepspeed.runtime import config as ds_config

    for key, message in getattr(ds_config, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {}).items():
        if key in ds:
            raise ConfigError(key, ds[key], f"DeepSpeed 0.19 refuses it: {message}", f"remove {key}")
    zero = ds.get("zero_optimization")
    for key, message in getattr(ds_config, "_REMOVED_ZERO_CONFIG_KEYS", {}).items():
        if isinstance(zero, dict) and key in zero:
            raise ConfigError(f"zero_optimization.{key}", zero[key], f"DeepSpeed 0.19 refuses it: {message}",
                              f"remove zero_optimization.{key}")
    known = deepspeed_names()
    for key in ds:
        if key not in known and isinstance(key, str):
            close = _did_you_mean(key, known)
            if close is not None:
                raise ConfigError(_shown(key), "{...}" if isinstance(ds[key], dict) else ds[key],
                                  "not a DeepSpeed key (DeepSpeed ignores unknown top-level keys, so this would "
                                  "silently have no effect)", f"did you mean {close!r}?")
    for name, model in _deepspeed_models().items():
        block = ds.get(name)
        if isinstance(block, dict):
            _validate_block(name, block, model)


def _validate_block(name: str, block: dict, model) -> None:
    try:
        model(**block)
    except ValidationError as err:
        first = err.errors()[0]
        loc = [_shown(str(part)) for part in first["loc"]]
        where = ".".join([name, *loc])
        if first["type"] == "extra_forbidden":
            owner = model
            for part in loc[:-1]:
                owner = _submodel(owner, part) if owner is not None else None
            names = _model_names(owner) if owner is not None else set()
            close = _did_you_mean(loc[-1], names) if names else None
            fix = f"did you mean {close!r}?" if close else f"use one of {sorted(names)}"
            raise ConfigError(where, first.get("input"), f"not a key of DeepSpeed's {name} block "
                              "(DeepSpeed 0.19 refuses it)", fix) from None
        raise ConfigError(where, first.get("input"), f"DeepSpeed 0.19 refuses it: {' '.join(first['msg'].split())}",
                          f"give {where} a value DeepSpeed accepts") from None
    except (AssertionError, ValueError) as err:
        raise ConfigError(name, "{...}", f"DeepSpeed 0.19 refuses the block: {err}",
                          "fix the block as the message says") from None


class _Reader:
    """Collects (unified path, value) from one DeepSpeed dict, per source, checking each value's type."""

    def __init__(self):
        self.sources: dict[str, dict] = {"DeepSpeed config": {}}

    def put(self, key: str, path: str, value: Any, source: str = "DeepSpeed config") -> None:
        if value is None or value == AUTO:
            return
        set_path(self.sources.setdefault(source, {}), path, coerce(path, value, key))


def from_deepspeed(ds: dict) -> dict:
    """Partial config from a DeepSpeed JSON dict (with an optional "zeromega" block)."""
    if not isinstance(ds, dict):
        raise ConfigError("config", type(ds).__name__, "top level is not a JSON object", "wrap the keys in {...}")
    check_with_deepspeed(ds)
    no_batch = "train_batch_size" not in ds and "train_micro_batch_size_per_gpu" not in ds  # "auto" is stated
    autos = _auto_keys(ds)
    ds, reader = copy.deepcopy(ds), _Reader()
    for key, path in TOP_LEVEL.items():
        reader.put(key, path, ds.pop(key, None))
    _read_precision(ds, reader)
    zero = ds.get("zero_optimization")
    stage = int(zero) if isinstance(zero, bool) else zero.get("stage", 0) if isinstance(zero, dict) else 0
    _read_zero(ds, reader)
    _read_data_parallel(ds, reader, stage)
    aio = _object(ds.pop("aio", None), "aio")
    for key in AIO_KEYS:
        reader.put(f"aio.{key}", f"zero.aio.{key}", aio.pop(key, None))
    if aio:
        ds["aio"] = aio
    had_optimizer, had_scheduler = "optimizer" in ds, "scheduler" in ds
    _read_optimizer(ds, reader)
    _read_scheduler(ds, reader)
    _read_sequence_parallel(ds, reader)
    block = ds.pop("zeromega", None)
    if block is not None:
        reader.sources["zeromega block"] = read_block(block)
    partial = merge((name, tree) for name, tree in reader.sources.items() if name != RATIOS)
    ratios = reader.sources.get(RATIOS)
    if ratios:
        partial[RATIOS] = ratios
    printing = ds.get("steps_per_print")  # stays for DeepSpeed; also the run's interval when read alone
    printing = None if printing in (None, AUTO) else coerce("logging.interval", printing, "steps_per_print")
    partial[DEFAULTS], partial[ALONE_DEFAULTS] = _unstated(had_optimizer, had_scheduler, printing)
    if no_batch:
        partial[NO_BATCH] = True
    if autos:
        tree: dict = {}
        for key in autos:
            set_path(tree, key, True)
        partial[AUTOS] = tree
    if ds:
        partial["deepspeed_extra"] = ds
    return partial


SEQUENCE_PARALLEL_SIZE_KEYS = ("sequence_parallel_size", "size", "sp_size")
"""Spellings of the Ulysses size inside a ``sequence_parallel`` block: DeepSpeed's own top-level key (and
``register_with_transformers``' argument), the short form, and Accelerate's ``sp_size``."""


def _read_sequence_parallel(ds: dict, reader: _Reader) -> None:
    """DeepSpeed Ulysses: the top-level ``sequence_parallel_size`` and a ``sequence_parallel`` block.

    DeepSpeed 0.19's JSON has only the top-level key (it divides the world by it
    for the data-parallel size); the Ulysses/ALST integrations that put the size
    in a ``sequence_parallel`` block are read the same way: Ulysses over that
    many ranks. A block that says anything else is refused, never dropped.
    """
    top = ds.pop("sequence_parallel_size", None)
    if "sequence_parallel" not in ds:
        size, field = top, "sequence_parallel_size"
    else:
        block = _object(ds.pop("sequence_parallel"), "sequence_parallel")
        given = [key for key in SEQUENCE_PARALLEL_SIZE_KEYS if key in block]
        for key in set(block) - {"enabled", *SEQUENCE_PARALLEL_SIZE_KEYS}:
            raise ConfigError(f"sequence_parallel.{_shown(key)}", block[key], "not a key zeromega reads in the "
                              "sequence_parallel block (DeepSpeed Ulysses: a size, optionally enabled)",
                              f"give the Ulysses size as sequence_parallel.sequence_parallel_size, or remove {_shown(key)}")
        if len(given) > 1:
            raise ConfigError(f"sequence_parallel.{given[1]}", block[given[1]], f"given together with {given[0]}, "
                              "another spelling of the Ulysses size", f"keep sequence_parallel.{given[0]} only")
        enabled = block.get("enabled", True)
        if enabled != AUTO and not _flag(enabled, "sequence_parallel.enabled"):
            size, field = 1, "sequence_parallel.enabled"
        elif given:
            size, field = block[given[0]], f"sequence_parallel.{given[0]}"
        elif top is not None:
            size, field = top, "sequence_parallel_size"
        else:
            raise ConfigError("sequence_parallel", block, "says nothing of the Ulysses size",
                              'add "sequence_parallel_size": N (the ranks one sequence is split over)')
        if top not in (None, AUTO) and size != AUTO and top != size:
            raise ConfigError(field, size, f"disagrees with the top-level sequence_parallel_size={top!r}",
                              "state the Ulysses size once")
    if size not in (None, AUTO) and coerce("sequence.ulysses", size, field) > 1:
        reader.put(field, "sequence.ulysses", size)
        reader.put(field, "sequence.mode", "ulysses")


def _unstated(had_optimizer: bool, had_scheduler: bool, steps_per_print=None) -> tuple[dict, dict]:
    """DeepSpeed 0.19's defaults where they differ from the schema's (Megatron-LM's).

    Always: ``gradient_clipping`` 0 and ``fp16.initial_scale_power`` 16. An
    ``optimizer`` block's Adam/AdamW decays by 0 unless told (FusedAdam and
    DeepSpeedCPUAdam default ``weight_decay`` 0). Without Megatron flags the
    optimizer and schedule are DeepSpeed's too: no decay, no scheduler block
    means a constant lr, and the run logs every ``steps_per_print`` (10)
    steps. With Megatron flags ``--log-interval`` is the run's and
    ``steps_per_print`` stays DeepSpeed's own print interval, as in
    Megatron-DeepSpeed.
    """
    always = {"optimizer": {"clip_grad": 0.0}, "loss_scaling": {"initial_scale_power": 16}}
    alone = {"optimizer": {"weight_decay": 0.0}, "logging": {"interval": steps_per_print or 10}}
    if had_optimizer:
        always["optimizer"]["weight_decay"] = 0.0
    if not had_scheduler:
        alone["scheduler"] = {"decay_style": "constant"}
    return always, alone


def _read_precision(ds: dict, reader: _Reader) -> None:
    fp16 = _object(ds.pop("fp16", None), "fp16")
    if "bf16" in ds and "bfloat16" in ds:
        raise ConfigError("bfloat16", ds["bfloat16"], "given together with bf16 (DeepSpeed reads only bf16)",
                          "keep the bf16 block only")
    bf16 = _object(ds.pop("bf16", ds.pop("bfloat16", None)), "bf16")
    enabled = {name: block.pop("enabled", None) for name, block in (("fp16", fp16), ("bf16", bf16))}
    on = [name for name, value in enabled.items()
          if value not in (None, AUTO) and _flag(value, f"{name}.enabled")]
    if len(on) == 2:
        raise ConfigError("fp16.enabled", True, "fp16 and bf16 are both enabled", "enable one of them")
    if on:
        reader.put(f"{on[0]}.enabled", "precision", on[0])
    for key, path in FP16_KEYS.items():
        reader.put(f"fp16.{key}", path, fp16.pop(key, None))
    for name, block in (("fp16", fp16), ("bf16", bf16)):
        if block:
            ds[name] = block


def _read_zero(ds: dict, reader: _Reader) -> None:
    zero = ds.pop("zero_optimization", None)
    if isinstance(zero, bool):  # DeepSpeed's oldest format
        zero = {"stage": int(zero)}
        if "allgather_size" in ds:
            zero["allgather_bucket_size"] = ds.pop("allgather_size")
    zero = _object(zero, "zero_optimization")
    for old, new in ZERO_ALIASES.items():
        if old in zero:
            value = zero.pop(old)
            if new in zero and zero[new] != value:
                raise ConfigError(f"zero_optimization.{old}", value, f"disagrees with {new}={zero[new]!r}, "
                                  "another spelling of the same setting", f"keep only {new}")
            zero[new] = value
    reader.put("zero_optimization.stage", "zero.stage", zero.pop("stage", None))
    pin = zero.pop("cpu_offload_use_pin_memory", None)
    for legacy, name in (("cpu_offload", "offload_optimizer"), ("cpu_offload_param", "offload_param")):
        if legacy not in zero:
            continue
        if name in zero:
            raise ConfigError(f"zero_optimization.{legacy}", zero[legacy], f"given together with {name}",
                              f"use {name} only ({legacy} is its deprecated spelling)")
        if _flag(zero.pop(legacy), f"zero_optimization.{legacy}"):
            zero[name] = {"device": "cpu", **({"pin_memory": pin} if pin is not None else {})}
    for name in ("offload_optimizer", "offload_param"):
        block = _object(zero.pop(name, None), f"zero_optimization.{name}")
        for key in OFFLOAD_KEYS:
            reader.put(f"zero_optimization.{name}.{key}", f"zero.{name}.{key}", block.pop(key, None))
        if block:
            zero[name] = block
    if zero:
        ds["zero_optimization"] = zero


def _read_data_parallel(ds: dict, reader: _Reader, stage: Any) -> None:
    """The ``ddp`` fields DeepSpeed's keys state with the same meaning, read exactly as
    :func:`~zeromega.plugins.zero.ds_config.to_deepspeed` writes them (so a file reads back to its keys):
    ZeRO 1-3's ``overlap_comm`` (its default differs by stage, so unstated stays unstated; ZeRO-0 has none);
    the reduce dtype when ``communication_data_type`` (and ``data_types``) are exactly what
    ``ddp.grad_reduce_in_fp32`` writes at this stage and precision. Anything else stays DeepSpeed's, and so
    does ``reduce_bucket_size``: an "auto" one is filled later (the HF Trainer's h x h) and an unset
    ``ddp.bucket_size`` is written as zeromega's CPU default, so a stated number does not say which it was."""
    if not isinstance(stage, int) or isinstance(stage, bool):
        return  # "auto", or a bad value DeepSpeed's own check reports
    zero = ds.get("zero_optimization", {})
    if stage >= 1:
        if zero.get("overlap_comm", AUTO) != AUTO:
            reader.put("zero_optimization.overlap_comm", "ddp.overlap_grad_reduce", zero.pop("overlap_comm"))
        if not zero:
            ds.pop("zero_optimization", None)
    precision = reader.sources["DeepSpeed config"].get("precision")
    types = ds.get("data_types")
    stated = {key: ds[key] for key in ("communication_data_type", "data_types") if key in ds}
    if precision not in ("bf16", "fp16") or "communication_data_type" not in stated \
            or types is not None and (not isinstance(types, dict) or set(types) != {"grad_accum_dtype"}):
        return
    for fp32 in (True, False):
        if stated == reduce_dtype_keys(stage, precision, fp32):
            for key in stated:
                del ds[key]
            reader.put("communication_data_type", "ddp.grad_reduce_in_fp32", fp32)


def _is_adamw(optimizer: dict) -> bool:
    """DeepSpeed's "Adam"/"AdamW" types are decoupled-decay Adam unless adam_w_mode is false."""
    kind = str(optimizer.get("type", "")).lower()
    params = optimizer.get("params") or {}
    return kind == "adamw" or (kind == "adam" and params.get("adam_w_mode", True) is not False)


def _read_optimizer(ds: dict, reader: _Reader) -> None:
    if "optimizer" not in ds:
        return
    optimizer = _object(ds["optimizer"], "optimizer")
    params = _object(optimizer.get("params"), "optimizer.params")
    for key, path in OPTIMIZER_PARAMS.items():
        reader.put(f"optimizer.params.{key}", path, params.pop(key, None))
    betas = params.pop("betas", None)
    if betas not in (None, AUTO):
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise ConfigError("optimizer.params.betas", betas, "cannot read it: expected a list [beta1, beta2] "
                              "of two numbers", 'write "betas": [0.9, 0.999]')
        reader.put("optimizer.params.betas[0]", "optimizer.beta1", betas[0])
        reader.put("optimizer.params.betas[1]", "optimizer.beta2", betas[1])
    if _is_adamw(optimizer) and not params and set(optimizer) <= {"type", "params"}:
        del ds["optimizer"]  # zeromega builds this AdamW itself (no JIT-built fused op)
        if optimizer.get("type") != "AdamW":  # "Adam" is DeepSpeed's AdamW too; a written file keeps the word
            reader.put("optimizer.type", "optimizer.deepspeed_type", optimizer.get("type"))
    else:
        ds["optimizer"] = {**optimizer, "params": params}


def _read_scheduler(ds: dict, reader: _Reader) -> None:
    """DeepSpeed's warmup schedulers as the unified schedule; others stay in deepspeed_extra."""
    scheduler = _object(ds.get("scheduler"), "scheduler")
    kind = scheduler.get("type")
    if not isinstance(kind, str) or kind not in SCHEDULERS:
        return
    del ds["scheduler"]
    params = _object(scheduler.pop("params", None), "scheduler.params")
    for key in set(scheduler) - {"type"}:
        raise ConfigError(f"scheduler.{_shown(key)}", scheduler[key], "not a key of DeepSpeed's scheduler block",
                          "move it into scheduler.params or remove it")

    def put(key, path, default=None):
        value = params.pop(key, None)
        reader.put(f"scheduler.params.{key}", path, default if value is None else value, "scheduler block")

    reader.put("scheduler.type", "scheduler.decay_style", SCHEDULERS[kind], "scheduler block")
    reader.put("scheduler.type", "scheduler.deepspeed_type", kind, "scheduler block")
    put("warmup_num_steps", "scheduler.warmup_iters", 1000)  # DeepSpeed's defaults where absent
    put("warmup_type", "scheduler.warmup_style", "log")
    if kind == "WarmupCosineLR":
        put("total_num_steps", "scheduler.train_iters")
        ratios = {key: params.pop(key, default) for key, default in
                  (("warmup_min_ratio", 0.0), ("cos_min_ratio", 0.0001))}
        reader.sources[RATIOS] = {k: coerce("scheduler.min_lr", v, f"scheduler.params.{k}")
                                  for k, v in ratios.items() if v != AUTO}
    else:
        init = params.get("warmup_min_lr")
        put("warmup_min_lr", "scheduler.warmup_init_lr")
        put("warmup_max_lr", "optimizer.lr")
        if kind == "WarmupDecayLR":  # decays back down to warmup_min_lr
            reader.put("scheduler.params.warmup_min_lr", "scheduler.min_lr", 0.0 if init is None else init,
                       "scheduler block")
            put("total_num_steps", "scheduler.train_iters")
    for key, value in params.items():
        raise ConfigError(f"scheduler.params.{_shown(key)}", value, f"not a parameter zeromega reads for {kind}",
                          "remove it, or give the schedule in the zeromega block")


def read_block(block: Any) -> dict:
    """Partial from a "zeromega" block: flat size keys (tp, pp, cp, ep, ...) or unified sections."""
    block = _object(block, "zeromega")
    check_keys(block, "zeromega")
    parts: list[tuple[str, dict]] = []
    for key, value in block.items():
        part: dict = {}
        if key in BLOCK_KEYS:
            set_path(part, BLOCK_KEYS[key], coerce(BLOCK_KEYS[key], value, f"zeromega.{key}"))
        elif key in RunConfig.model_fields:
            part[key] = value
        else:
            raise ConfigError(f"zeromega.{_shown(key)}", value, "unknown key in the zeromega block",
                              f"use one of {sorted(BLOCK_KEYS)} or a section of the unified config "
                              f"{sorted(RunConfig.model_fields)}")
        parts.append((f"zeromega.{key}", part))
    return merge(parts)  # {"parallel": {"tp": 4}, "tp": 2} states tp twice: refused, not last-wins


# The "zeromega" block's short keys -> unified field path.
BLOCK_KEYS: dict[str, str] = {
    "tp": "parallel.tp",
    "pp": "parallel.pp",
    "cp": "parallel.cp",
    "ep": "parallel.ep",
    "vpp": "parallel.vpp",
    "sequence_parallel": "parallel.sequence_parallel",
    "distributed_timeout_minutes": "launch.distributed_timeout_minutes",
}


def finish(merged: dict, megatron: bool = False, origin: Optional[dict[str, str]] = None,
           filled: Optional[list[str]] = None) -> dict:
    """Resolve what needs every source: the file's "auto"s (:func:`resolve_autos`; ``filled`` gets one line
    per filled auto, ``origin`` names the source of each stated field), DeepSpeed's defaults for what is
    unstated (``megatron``: Megatron flags are among the sources, and own the optimizer and schedule),
    cosine ratios into lrs."""
    defaults = [merged.pop(DEFAULTS, None)] + [merged.pop(ALONE_DEFAULTS, None) if not megatron else None]
    merged.pop(ALONE_DEFAULTS, None)
    if not megatron and isinstance(merged.get("deepspeed_extra"), dict):
        merged["deepspeed_extra"].pop("steps_per_print", None)  # read alone it is the run's log interval
    batch = _section(merged, "batch")
    no_batch = merged.pop(NO_BATCH, None)
    # Read alone, the file is DeepSpeed's to size: it asserts a micro or a global batch. With Megatron flags
    # among the sources (a training script's ARGS, `zeromega launch`), Megatron-LM's rule: its
    # validate_args asserts --micro-batch-size (the global batch defaults to micro x dp, not the reverse).
    if no_batch and not megatron and batch.get("micro") is None \
            and batch.get("global") is None and batch.get("global_") is None:
        raise ConfigError("train_micro_batch_size_per_gpu", None, "neither it nor train_batch_size is given, "
                          "and no other source states a batch size (DeepSpeed refuses such a config: 'Either "
                          "train_batch_size or train_micro_batch_size_per_gpu needs to be provided')",
                          'add "train_micro_batch_size_per_gpu": N (or "train_batch_size", or "auto" for the '
                          "HF Trainer), or pass --micro-batch-size / --global-batch-size")
    flags_given = any("Megatron" in source or "command-line" in source for source in (origin or {}).values())
    if no_batch and megatron and flags_given and batch.get("micro") is None:
        raise ConfigError("--micro-batch-size", None, "is not given, and the DeepSpeed JSON states neither "
                          "train_micro_batch_size_per_gpu nor train_batch_size (Megatron-LM asserts "
                          "args.micro_batch_size is not None)", "pass --micro-batch-size N")
    resolve_autos(merged, megatron, origin or {}, filled if filled is not None else [])
    for tree in filter(None, defaults):
        for path, value in flatten(tree).items():
            section, _, leaf = path.partition(".")
            current = merged.get(section, {})
            if isinstance(current, dict) and leaf not in current:  # a non-section: validation reports it
                set_path(merged, path, value)
    if megatron and defaults[0] is None and merged.get("precision") == "bf16":
        # Megatron-LM flags without a DeepSpeed JSON (which would own the gradients, as in Megatron-DeepSpeed):
        # core_v0.16.1's validate_args accumulates and reduces bf16 gradients in fp32 unless --grad-reduce-in-bf16
        ddp = merged.setdefault("ddp", {})
        if isinstance(ddp, dict):  # another type: validation reports it
            ddp.setdefault("grad_reduce_in_fp32", True)
    if megatron and defaults[0] is None:
        # and --check-for-nan-in-loss-and-grad, on by default except under fp16's dynamic loss scaling
        scaling = merged.get("loss_scaling")
        dynamic = merged.get("precision") == "fp16" and not (isinstance(scaling, dict) and scaling.get("loss_scale"))
        scheduler = merged.setdefault("scheduler", {})
        if isinstance(scheduler, dict) and not dynamic:
            scheduler.setdefault("check_for_nan_in_loss_and_grad", True)
    ratios = merged.pop(RATIOS, None)
    if ratios:
        lr = coerce("optimizer.lr", _section(merged, "optimizer").get("lr", RunConfig().optimizer.lr), "optimizer.lr")
        sources = [("the rest of the config", {k: v for k, v in merged.items() if k != "deepspeed_extra"})]
        scaled = {}
        if "warmup_min_ratio" in ratios:
            set_path(scaled, "scheduler.warmup_init_lr", ratios["warmup_min_ratio"] * lr)
        if "cos_min_ratio" in ratios:
            set_path(scaled, "scheduler.min_lr", ratios["cos_min_ratio"] * lr)
        extra = merged.get("deepspeed_extra")
        merged = merge(sources + [("WarmupCosineLR ratios x lr", scaled)])
        if extra is not None:
            merged["deepspeed_extra"] = extra
    return merged


# ------------------------------------------------------------------ "auto"

_NO = object()
"""No default in that dialect: the auto is filled from a source or not at all."""
DERIVED = "derived"
"""The value follows from others (the batch arithmetic) and is left for the layout to compute."""


@dataclass(frozen=True)
class AutoRule:
    """How one DeepSpeed "auto" key is filled: the unified fields it mirrors, the flag that states them,
    the HF Trainer's (or Accelerate's) default and Megatron-LM's default (``_NO``: none)."""

    paths: tuple[str, ...]
    flag: str
    trainer: Any = _NO
    trainer_name: str = ""
    megatron: Any = _NO


# The keys TrainingArguments / Accelerate's DeepSpeedPlugin fill (transformers' trainer_config_process and
# trainer_config_finalize, Accelerate's plugin_to_config_mapping), with their defaults (transformers 5.x).
AUTO_RULES: dict[str, AutoRule] = {
    "train_micro_batch_size_per_gpu": AutoRule(("batch.micro",), "--micro-batch-size", 8,
                                               "per_device_train_batch_size"),
    "gradient_accumulation_steps": AutoRule(("batch.accumulation",), "--global-batch-size", 1,
                                            "gradient_accumulation_steps", DERIVED),
    "train_batch_size": AutoRule(("batch.global",), "--global-batch-size", DERIVED, "", DERIVED),
    "gradient_clipping": AutoRule(("optimizer.clip_grad",), "--clip-grad", 1.0, "max_grad_norm", 1.0),
    "optimizer.params.lr": AutoRule(("optimizer.lr",), "--lr", 5e-5, "learning_rate"),
    "optimizer.params.betas": AutoRule(("optimizer.beta1", "optimizer.beta2"), "--adam-beta1/--adam-beta2",
                                       (0.9, 0.999), "adam_beta1, adam_beta2", (0.9, 0.999)),
    "optimizer.params.eps": AutoRule(("optimizer.eps",), "--adam-eps", 1e-8, "adam_epsilon", 1e-8),
    "optimizer.params.weight_decay": AutoRule(("optimizer.weight_decay",), "--weight-decay", 0.0, "weight_decay",
                                              0.01),
    "scheduler.params.warmup_min_lr": AutoRule(("scheduler.warmup_init_lr",), "--lr-warmup-init", 0.0,
                                               "0, not a Trainer argument", 0.0),
    "scheduler.params.warmup_max_lr": AutoRule(("optimizer.lr",), "--lr", 5e-5, "learning_rate"),
    "scheduler.params.warmup_num_steps": AutoRule(("scheduler.warmup_iters",), "--lr-warmup-iters", 0,
                                                  "warmup_steps", 0),
    "scheduler.params.total_num_steps": AutoRule(("scheduler.train_iters",), "--train-iters"),
    "fp16.enabled": AutoRule(("precision",), "--fp16/--bf16", "fp32", "fp16", "fp32"),
    "bf16.enabled": AutoRule(("precision",), "--fp16/--bf16", "fp32", "bf16", "fp32"),
    "zero_optimization.stage": AutoRule(("zero.stage",), "--zero-stage", 2, "Accelerate's zero_stage"),
    "zero_optimization.offload_optimizer.device": AutoRule(
        ("zero.offload_optimizer.device",), "zeromega block zero.offload_optimizer.device", "none",
        "Accelerate's offload_optimizer_device"),
    "zero_optimization.offload_param.device": AutoRule(
        ("zero.offload_param.device",), "zeromega block zero.offload_param.device", "none",
        "Accelerate's offload_param_device"),
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": AutoRule(
        (), "true or false", False, "Accelerate's zero3_save_16bit_model"),
}
HIDDEN_RULE_TEXT = {"reduce_bucket_size": "h*h", "stage3_prefetch_bucket_size": "int(0.9*h*h)",
                    "stage3_param_persistence_threshold": "10*h"}


def _auto_keys(ds: dict, where: str = "") -> list[str]:
    """The dotted keys whose value is "auto" (ZeRO aliases as :data:`ZERO_ALIASES` spells them)."""
    keys = []
    for key, value in ds.items():
        if not isinstance(key, str):
            continue
        if where == "zero_optimization." and key in ZERO_ALIASES:
            key = ZERO_ALIASES[key]
        if isinstance(value, dict):
            keys += _auto_keys(value, f"{where}{key}.")
        elif isinstance(value, str) and value == AUTO:
            keys.append(f"{where}{key}")
    return keys


def _stated(merged: dict, path: str) -> Any:
    tree: Any = merged
    for part in path.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _source_of(path: str, origin: dict[str, str]) -> str:
    """'--lr (command-line arguments)' for a field a Megatron flag stated, else the source's name."""
    from .megatron_args import TABLE

    source = origin.get(path, "another source")
    flag = next((flag for flag, (field, _) in TABLE.items() if field == path), None)
    if flag and ("Megatron" in source or "command-line" in source or "command line" in source):
        return f"from {flag} ({source})"
    return f"from {source}"


def _shown_value(value: Any) -> str:
    import json

    return json.dumps(list(value) if isinstance(value, tuple) else value)


def resolve_autos(merged: dict, megatron: bool, origin: dict[str, str], filled: list[str]) -> None:
    """Fill every "auto" the DeepSpeed file gave, as the HF Trainer (with Accelerate) fills it.

    A value another source states (a Megatron flag, the zeromega block, the unified file) fills it. Else,
    read alone (no Megatron flags: an HF Trainer config), TrainingArguments' defaults (lr 5e-5, betas
    (0.9, 0.999), eps 1e-8, weight decay 0, max_grad_norm 1, per-device batch 8, accumulation 1, fp32)
    and Accelerate's (ZeRO stage 2, no offload, no 16-bit gather on save); next to Megatron flags,
    Megatron-LM's defaults for the flags it has defaults for. The bucket sizes come from the model's
    hidden size h (h*h; at ZeRO-3 also int(0.9*h*h) and 10*h, as trainer_config_finalize). Each fill is
    one line in ``filled``; every auto nothing fills goes into one ConfigError, with the flag that fills it.
    """
    autos = list(flatten(merged.pop(AUTOS, None) or {}))
    extra = merged.get("deepspeed_extra") if isinstance(merged.get("deepspeed_extra"), dict) else {}
    dialect = "Megatron-LM default" if megatron else "HF Trainer default"
    unfilled: list[tuple[str, str]] = []
    reasons: dict[str, str] = {}  # fields filled here from a default, for the autos that share them

    def say(key: str, value: Any, why: str) -> None:
        filled.append(f"{key} = {_shown_value(value)}  <- auto, {why}")

    batch = _section(merged, "batch")
    ordered = sorted(autos, key=lambda k: (k == "train_batch_size", k.startswith("scheduler.params.warmup_max"), k))
    for key in ordered:
        rule = AUTO_RULES.get(key)
        if rule is None or not rule.paths:
            continue
        values = [_stated(merged, path) for path in rule.paths]
        if key in ("fp16.enabled", "bf16.enabled"):
            kind = key.split(".")[0]
            if values[0] is None:
                set_path(merged, "precision", "fp32")
                reasons["precision"] = f"no --fp16/--bf16 given ({dialect})"
            source = origin.get("precision", "")
            why = reasons.get("precision") or (f"from --{values[0]} ({source})" if values[0] not in (None, "fp32") and
                                               ("Megatron" in source or "command-line" in source)
                                               else _source_of("precision", origin))
            say(key, _stated(merged, "precision") == kind, why)
            continue
        if all(v is not None for v in values):
            shown = values[0] if len(values) == 1 else values
            if key == "scheduler.params.warmup_num_steps" and values[0] < 1:
                set_path(merged, rule.paths[0], 1)
                say(key, 1, f"{_source_of(rule.paths[0], origin)} says {values[0]}; DeepSpeed 0.19.6+ refuses a "
                    "warmup below 1 step, so 1, as the HF Trainer clamps it")
                continue
            say(key, shown, reasons.get(rule.paths[0]) or _source_of(rule.paths[0], origin))
            continue
        default = rule.megatron if megatron else rule.trainer
        if key == "train_micro_batch_size_per_gpu" and not megatron and batch.get("global") is not None:
            say(key, "global / (accumulation x dp)", "derived from the stated global batch")
            continue
        if key == "gradient_accumulation_steps" and not megatron and batch.get("global") is not None \
                and batch.get("micro") is not None:
            default = DERIVED
        if default is DERIVED:
            what = {"train_batch_size": "micro x accumulation x dp", "gradient_accumulation_steps":
                    "global / (micro x dp)"}[key]
            say(key, what, "derived, as DeepSpeed and " + ("Megatron-LM do" if megatron else "the HF Trainer do"))
            continue
        if default is _NO:
            unfilled.append((key, rule.flag))
            continue
        if key == "scheduler.params.warmup_num_steps":
            set_path(merged, rule.paths[0], max(1, default))
            say(key, max(1, default), f"no {rule.flag} given: {dialect} {default}; DeepSpeed 0.19.6+ refuses a "
                "warmup below 1 step, so 1, as the HF Trainer clamps it")
            continue
        defaults = default if len(rule.paths) > 1 else (default,)
        name = f" {rule.trainer_name}" if not megatron and rule.trainer_name else ""
        for path, value in zip(rule.paths, defaults):
            set_path(merged, path, value)
            reasons[path] = f"no {rule.flag} given ({dialect}{name})"
        say(key, default, reasons[rule.paths[0]])
    zero = extra.get("zero_optimization") if isinstance(extra.get("zero_optimization"), dict) else {}
    hidden_keys = [key for key in HIDDEN_RULE_TEXT if zero.get(key) == AUTO]
    if hidden_keys:
        hidden = _section(merged, "model").get("hidden_size")
        if hidden is None:
            unfilled += [(f"zero_optimization.{key}", "--hidden-size") for key in hidden_keys]
        else:
            h = coerce("model.hidden_size", hidden, "model.hidden_size")
            stage = _stated(merged, "zero.stage") or 0
            for key in hidden_keys:
                if key != "reduce_bucket_size" and stage != 3:
                    del zero[key]  # the Trainer fills these at ZeRO-3 only; DeepSpeed drops an "auto" it meets
                    filled.append(f"zero_optimization.{key} = DeepSpeed's default  <- auto, left unfilled below "
                                  f"ZeRO-3 as the HF Trainer leaves it")
                    continue
                zero[key] = ZERO_AUTO_FROM_HIDDEN[key](h)
                say(f"zero_optimization.{key}", zero[key], f"{HIDDEN_RULE_TEXT[key]} with the hidden size h = {h} "
                    f"{_source_of('model.hidden_size', origin)}")
    gather = "stage3_gather_16bit_weights_on_model_save"
    if zero.get(gather) == AUTO:  # only the HF Trainer's save_model reads it
        zero[gather] = False
        say(f"zero_optimization.{gather}", False, "DeepSpeed's default (its config model drops an 'auto')"
            if megatron else "Accelerate's zero3_save_16bit_model default (HF Trainer)")
    # "auto" anywhere else (a key no rule fills, in a block passed through or read): nothing fills it.
    handled = {key for key, rule in AUTO_RULES.items() if rule.paths} | {f"zero_optimization.{k}" for k in
                                                                         (*HIDDEN_RULE_TEXT, gather)}
    for key in autos:
        if key not in handled and key not in {k for k, _ in unfilled}:
            unfilled.append((key, "a value"))
    if unfilled:
        keys = [key for key, _ in unfilled]
        by_fix: dict[str, list[str]] = {}
        for key, fix in unfilled:
            by_fix.setdefault(fix, []).append(key)
        fixes = []
        for fix, ks in by_fix.items():
            path = next((rule.paths[0] for k in ks for rule in [AUTO_RULES.get(k)] if rule and rule.paths), None)
            if fix == "--hidden-size":
                path = "model.hidden_size"
            if fix.startswith("--"):
                block = f" or the zeromega block's {path}" if path else ""
                what = "the model's hidden size h, which " if fix == "--hidden-size" else ""
                fixes.append(f"pass {fix}{block} ({what}fills {', '.join(ks)})")
            else:
                fixes.append(f"give {', '.join(ks)} {fix}")
        one = len(keys) == 1
        raise ConfigError(", ".join(keys), AUTO, f"nothing in the run fills {'this' if one else 'these'} 'auto' "
                          f"{'value' if one else f'values ({len(keys)})'} (as the HF Trainer, zeromega fills 'auto' "
                          "from the run: its flags, the zeromega block, the model shape)",
                          "; ".join(fixes) + f"; or write the value{'' if one else 's'} into the file")


def _section(merged: dict, name: str) -> dict:
    """``merged[name]`` when it is a section of keys, else {} (validation reports a section of another type)."""
    value = merged.get(name)
    return value if isinstance(value, dict) else {}
