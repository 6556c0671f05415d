"""Readers and writers between the config dialects and :class:`RunConfig`.

Each reader turns one dialect into a *partial* nested dict holding only the
values that dialect states explicitly; :func:`merge` joins partials and
refuses a field that two dialects set to different values. Tables, not
branches, hold the name mappings so every mapping can be tested both ways.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Iterable, Optional

from .config import Layout, RunConfig
from .errors import ConfigError

# Megatron-LM flag -> (unified field path, type). Flags with type None are switches.
MEGATRON_ARGS: dict[str, tuple[str, Any]] = {
    "--tensor-model-parallel-size": ("parallel.tp", int),
    "--pipeline-model-parallel-size": ("parallel.pp", int),
    "--context-parallel-size": ("parallel.cp", int),
    "--expert-model-parallel-size": ("parallel.ep", int),
    "--sequence-parallel": ("parallel.sequence_parallel", None),
    "--micro-batch-size": ("batch.micro", int),
    "--global-batch-size": ("batch.global", int),
    "--zero-stage": ("zero.stage", int),
    "--lr": ("optimizer.lr", float),
    "--weight-decay": ("optimizer.weight_decay", float),
    "--clip-grad": ("optimizer.clip_grad", float),
    "--adam-beta1": ("optimizer.beta1", float),
    "--adam-beta2": ("optimizer.beta2", float),
    "--adam-eps": ("optimizer.eps", float),
}
_PRECISION_SWITCHES = {"--bf16": "bf16", "--fp16": "fp16"}

# The "zeromega" block of a DeepSpeed JSON: key -> unified field path.
ZEROMEGA_BLOCK: dict[str, str] = {
    "tp": "parallel.tp",
    "pp": "parallel.pp",
    "cp": "parallel.cp",
    "ep": "parallel.ep",
    "sequence_parallel": "parallel.sequence_parallel",
    "device": "device",
}

# Top-level DeepSpeed keys -> unified field path ("auto" leaves the field to be derived).
DEEPSPEED_KEYS: dict[str, str] = {
    "train_micro_batch_size_per_gpu": "batch.micro",
    "train_batch_size": "batch.global",
    "gradient_accumulation_steps": "batch.accumulation",
    "gradient_clipping": "optimizer.clip_grad",
}

# Defaults where DeepSpeed's own are wrong for a CPU device: its 5e8-element
# buckets allocate ~2 GB fp32 per bucket (../shared/notes/deepspeed-on-cpu.md).
CPU_ZERO_DEFAULTS = {
    "reduce_bucket_size": int(2e7),
    "allgather_bucket_size": int(2e7),
    "stage3_prefetch_bucket_size": int(2e7),
    "sub_group_size": int(2e7),
}


def _set(tree: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and key != "deepspeed_extra":
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def merge(partials: Iterable[tuple[str, dict]]) -> dict:
    """Join (source name, partial) pairs; a field set differently by two sources is an error."""
    merged: dict = {}
    origin: dict[str, tuple[str, Any]] = {}
    for source, partial in partials:
        for path, value in _flatten(partial).items():
            if path in origin and origin[path][1] != value and path != "deepspeed_extra":
                first, old = origin[path]
                raise ConfigError(path, value, f"{source} sets {value!r} but {first} sets {old!r}",
                                  "state the value in one place only, or make them agree")
            origin[path] = (source, value)
            _set(merged, path, value)
    return merged


def _is_adamw(optimizer: dict) -> bool:
    """DeepSpeed's "Adam"/"AdamW" types are decoupled-decay Adam unless adam_w_mode is false."""
    kind = str(optimizer.get("type", "")).lower()
    params = optimizer.get("params") or {}
    return kind == "adamw" or (kind == "adam" and params.get("adam_w_mode", True) is not False)


def from_deepspeed(ds: dict) -> dict:
    """Partial config from a DeepSpeed JSON dict (with an optional "zeromega" block)."""
    ds = dict(ds)
    partial: dict = {}
    for key, path in DEEPSPEED_KEYS.items():
        value = ds.pop(key, None)
        if value is not None and value != "auto":
            _set(partial, path, value)
    zero = dict(ds.pop("zero_optimization", {}) or {})
    if "stage" in zero:
        _set(partial, "zero.stage", zero.pop("stage"))
    enabled = [name for name in ("bf16", "fp16") if (ds.get(name) or {}).get("enabled") in (True, "true")]
    if len(enabled) == 2:
        raise ConfigError("fp16.enabled", True, "fp16 and bf16 are both enabled",
                          "enable one of them")
    if enabled:
        _set(partial, "precision", enabled[0])
        ds.pop(enabled[0])
    optimizer = ds.get("optimizer") or {}
    params = dict(optimizer.get("params") or {})
    for key, path in (("lr", "optimizer.lr"), ("weight_decay", "optimizer.weight_decay"), ("eps", "optimizer.eps")):
        value = params.pop(key, None)
        if value is not None and value != "auto":
            _set(partial, path, value)
    betas = params.pop("betas", None)
    if betas not in (None, "auto"):
        _set(partial, "optimizer.beta1", betas[0])
        _set(partial, "optimizer.beta2", betas[1])
    if _is_adamw(optimizer) and not params:
        ds.pop("optimizer")  # zeromega builds this AdamW itself (no JIT-built fused op)
    block = ds.pop("zeromega", {}) or {}
    for key, value in block.items():
        if key not in ZEROMEGA_BLOCK:
            raise ConfigError(f"zeromega.{key}", value, "unknown key in the zeromega block",
                              f"use one of {sorted(ZEROMEGA_BLOCK)}")
        _set(partial, ZEROMEGA_BLOCK[key], value)
    if zero:
        ds["zero_optimization"] = zero
    if ds:
        partial["deepspeed_extra"] = ds
    return partial


def read_config_file(path: str | Path) -> dict:
    """Partial config from a DeepSpeed JSON file; a missing or malformed file is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--config", str(path), "no such file", "pass the path of an existing JSON config")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError("--config", str(path), f"not valid JSON ({err.msg} at line {err.lineno})",
                          "fix the JSON syntax") from None
    if not isinstance(data, dict):
        raise ConfigError("--config", str(path), "top level is not a JSON object", "wrap the keys in {...}")
    return from_deepspeed(data)


def from_megatron_args(argv: list[str]) -> tuple[dict, list[str]]:
    """Partial config from Megatron-LM arguments; also returns the arguments it did not map."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag, (_, kind) in MEGATRON_ARGS.items():
        if kind is None:
            parser.add_argument(flag, action="store_true", default=None)
        else:
            parser.add_argument(flag, type=kind, default=None)
    for flag in _PRECISION_SWITCHES:
        parser.add_argument(flag, action="store_true", default=None)
    known, unknown = parser.parse_known_args(argv)
    partial: dict = {}
    for flag, (path, _) in MEGATRON_ARGS.items():
        value = getattr(known, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            _set(partial, path, value)
    chosen = [name for flag, name in _PRECISION_SWITCHES.items() if getattr(known, flag.lstrip("-"))]
    if len(chosen) == 2:
        raise ConfigError("--fp16", True, "--fp16 and --bf16 are both given", "pass one of them")
    if chosen:
        _set(partial, "precision", chosen[0])
    return partial, unknown


def build(config_path: Optional[str] = None, megatron_argv: Optional[list[str]] = None) -> RunConfig:
    """The RunConfig from a config file and/or Megatron arguments (conflicts are errors)."""
    partials = []
    if config_path:
        partials.append((f"config {config_path}", read_config_file(config_path)))
    if megatron_argv:
        partials.append(("command-line arguments", from_megatron_args(megatron_argv)[0]))
    merged = merge(partials)
    from pydantic import ValidationError

    try:
        return RunConfig.model_validate(merged)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ConfigError(field, first.get("input"), first["msg"], "see the field's description in launch/config.py") from None


def to_deepspeed(cfg: RunConfig, layout: Layout, device_type: str = "cpu") -> dict:
    """The dict ``deepspeed.initialize(config=...)`` takes for this config and layout."""
    ds = json.loads(json.dumps(cfg.deepspeed_extra))
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = cfg.zero.stage
    if device_type == "cpu":
        for key, value in CPU_ZERO_DEFAULTS.items():
            zero.setdefault(key, value)
    ds.update(
        train_micro_batch_size_per_gpu=layout.micro,
        gradient_accumulation_steps=layout.accumulation,
        train_batch_size=layout.global_batch,
        gradient_clipping=cfg.optimizer.clip_grad,
    )
    ds["bf16"] = {"enabled": cfg.precision == "bf16"}
    ds["fp16"] = {"enabled": cfg.precision == "fp16", **({"loss_scale": 0} if cfg.precision == "fp16" else {})}
    ds.setdefault("steps_per_print", 10**9)
    return ds
