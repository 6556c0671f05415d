"""Readers and writers between the config dialects and :class:`RunConfig`.

Each reader turns one dialect into a *partial* nested dict holding only the
values that dialect states explicitly; :func:`merge` joins partials and
refuses a field that two dialects set to different values. The dialects
live in their own modules, table-driven so every mapping can be tested both
ways: :mod:`.deepspeed_json`, :mod:`.megatron_args` (with
:mod:`.shell_script` for bash launch scripts), and the unified file here.

Which dialect a file is (:func:`detect`): ``.yaml``/``.yml`` and JSON whose
top-level keys are all unified sections are the unified file; other JSON
objects are DeepSpeed configs; anything else with ``--`` flags is a
Megatron launch script or argument list.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

from . import deepspeed_json, limits, megatron_args, shell_script
from zeromega.config.schema import Layout, RunConfig, coerce, validate
from .deepspeed_json import CPU_ZERO_DEFAULTS, from_deepspeed, to_deepspeed  # noqa: F401 (public API)
from zeromega.config.errors import ConfigError
from .partial import check_keys, flatten, merge, same, set_path

# Tables under their historical names (the mappings themselves live with their dialect).
MEGATRON_ARGS = megatron_args.FLAGS
ZEROMEGA_BLOCK = deepspeed_json.BLOCK_KEYS
DEEPSPEED_KEYS = deepspeed_json.TOP_LEVEL

DIALECTS = ("deepspeed", "zeromega", "megatron")


# ------------------------------------------------------------------ reading


def from_megatron_args(argv: list[str]) -> tuple[dict, list[str]]:
    """Partial config from Megatron-LM arguments; also returns the arguments it did not map."""
    args = megatron_args.parse(argv)
    return args.partial, args.unknown


def read_config_file(path: str | Path) -> dict:
    """Partial config from a DeepSpeed JSON file; a missing or malformed file is a ConfigError."""
    return from_deepspeed(deepspeed_json.load_file(path))


def detect(path: str | Path) -> str:
    """'deepspeed', 'zeromega' or 'megatron' for the file at ``path`` (see the module docstring)."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        return "zeromega"
    if path.suffix in (".sh", ".bash", ".args"):
        return "megatron"
    text = deepspeed_json.read_text(path, "--config").lstrip()
    if not text.startswith("{") and ("--" in text or text.startswith("#!")):
        return "megatron"
    if not text.startswith("{"):
        return "deepspeed"  # hjson allows a braceless object; load_file reports what is wrong
    try:
        data = limits.load_json(text, str(path))
    except json.JSONDecodeError:
        return "deepspeed"  # comments, trailing commas: only DeepSpeed's Hjson reads those
    return "zeromega" if _is_unified(data) else "deepspeed"


def _is_unified(data: Any) -> bool:
    if not isinstance(data, dict) or not data or not set(data) <= set(RunConfig.model_fields):
        return False
    optimizer = data.get("optimizer")
    return not (isinstance(optimizer, dict) and ({"type", "params"} & set(optimizer)))


def read_unified(path: str | Path) -> dict:
    """The unified file (YAML or JSON) as a nested dict; syntax errors name the line and column."""
    path = Path(path)
    text = deepspeed_json.read_text(path, "--config")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError("--config", str(path), "YAML needs PyYAML, which is not installed",
                              "pip install pyyaml, or write the config as JSON") from None
        try:
            data = limits.load_yaml(text, str(path))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
            problem = " ".join(str(getattr(err, "problem", None) or err).split())  # PyYAML's can span lines
            raise ConfigError("--config", str(path), f"not valid YAML ({problem}{where})",
                              "fix the YAML syntax at that place") from None
    else:
        try:
            data = limits.load_json(text, str(path), object_pairs_hook=_unique)
        except json.JSONDecodeError as err:
            raise ConfigError("--config", str(path), f"not valid JSON ({err.msg} at line {err.lineno} "
                              f"column {err.colno})", "fix the JSON syntax at that place") from None
    if not isinstance(data, dict):
        raise ConfigError("--config", str(path), "top level is not a mapping", "write the sections as keys")
    check_keys(data)
    return data


def _unique(pairs):
    keys = [key for key, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise ConfigError("--config", key, "duplicate key", "keep one of them")
    return dict(pairs)


def sources(path: str | Path, env: Optional[dict[str, str]] = None,
            dialect: Optional[str] = None, run_script: bool = False,
            notes: Optional[list[str]] = None) -> tuple[list[tuple[str, dict]], list[str]]:
    """(source name, partial) pairs a file states, and the Megatron arguments nothing mapped.

    A launch script is read statically, or run under bash with its launchers recorded when ``run_script``
    (:mod:`.shell_script`); what the reader wants said (the line it read) is appended to ``notes``."""
    dialect = dialect or detect(path)
    if dialect == "deepspeed":
        return [(f"DeepSpeed config {path}", read_config_file(path))], []
    if dialect == "zeromega":
        return [(f"config {path}", read_unified(path))], []
    script = shell_script.read(deepspeed_json.read_text(Path(path), "--config"), env, name=str(path),
                               base=Path(path).parent, run=run_script)
    if notes is not None:
        notes.extend(script.notes)
    if not script.argv and not script.launcher and not script.line:  # "echo hi", a comment, YAML read as bash
        raise ConfigError("--config", str(path), "states no Megatron-LM arguments (no training command "
                          "'python *.py --...' and no line starting with --), so every value would be a default",
                          "write the training command's flags into it; for another dialect pass --from deepspeed or "
                          "--from zeromega")
    launcher: dict = {}
    for field, value in script.launcher.items():
        set_path(launcher, field, coerce(field, value, f"launcher flag for {field}"))
    found = [(f"launcher flags in {path}", launcher)] if launcher else []
    argv, config = shell_script.config_flag(script.argv)
    more, unknown = _megatron(argv, f"Megatron arguments in {path}", script.files, Path(path).parent)
    if config:
        more += _script_config(config, script.files, Path(path).parent, env)
    return found + more, unknown


def _script_config(config: str, files: dict[str, str], base: Path, env: Optional[dict[str, str]]) -> list:
    """The ``--config FILE`` a launch script passes its training script (zeromega's pretrain_gpt.py reads it):
    a file the script writes (JSON: unified or DeepSpeed) or one on disk (DeepSpeed JSON or unified file)."""
    if files.get(config) is not None:
        try:
            data = limits.load_json(files[config], config, field="--config", hjson=True)
        except ConfigError:
            raise
        except Exception as err:  # hjson raises several kinds
            raise ConfigError("--config", config, f"the file the script writes is not valid JSON ({err})",
                              "fix the JSON the script writes") from None
        if _is_unified(data):
            check_keys(data)
            return [(f"config {config} (written by the script)", data)]
        return [(f"DeepSpeed config {config} (written by the script)", from_deepspeed(data))]
    existing = next((p for p in (Path(config), base / config) if p.is_file()), None)
    if existing is None:
        raise ConfigError("--config", config, "no such file (the launch script passes it to the training script)",
                          "pass the path of the config file, or write it in the script")
    if detect(existing) == "megatron":
        raise ConfigError("--config", config, "is itself a launch script or argument list",
                          "pass a DeepSpeed JSON or a unified config with --config")
    return sources(existing, env)[0]


def _megatron(argv: list[str], name: str, files: Optional[dict[str, str]] = None,
              base: Optional[Path] = None, skip: Optional[str] = None) -> tuple[list[tuple[str, dict]], list[str]]:
    args = megatron_args.parse(argv)
    found = [(name, args.partial)]
    ds_path = args.deepspeed_config
    if ds_path and (files or {}).get(ds_path) is not None:
        text = files[ds_path]
        try:
            data = limits.load_json(text, ds_path, field="--deepspeed_config", hjson=True)
        except ConfigError:
            raise
        except Exception as err:  # hjson raises several kinds
            raise ConfigError("--deepspeed_config", ds_path, f"the heredoc that writes it is not valid JSON ({err})",
                              "fix the JSON the script writes") from None
        found.append((f"DeepSpeed config {ds_path} (written by the script)", from_deepspeed(data)))
    elif ds_path and (skip is None or Path(ds_path).resolve() != Path(skip).resolve()):
        candidates = [Path(ds_path)] + ([base / ds_path] if base is not None else [])
        existing = next((p for p in candidates if p.is_file()), None)
        if existing is None:
            raise ConfigError("--deepspeed_config", ds_path, "no such file", "pass the path of the DeepSpeed JSON")
        found.append((f"DeepSpeed config {ds_path}", read_config_file(existing)))
    return found, args.unknown


def resolve(partials: Iterable[tuple[str, dict]], megatron: bool = False,
            filled: Optional[list[str]] = None) -> RunConfig:
    """The validated RunConfig from (source, partial) pairs: merged, unstated values given their dialect's
    defaults (``megatron``: Megatron-LM flags are among the sources), "auto"s filled (one line each in
    ``filled``: the value and where it came from), rules checked."""
    partials = _vocabulary_padding_across_sources(list(partials))
    origin = {path: source for source, partial in partials for path in flatten(partial)}
    merged = deepspeed_json.finish(merge(partials), megatron=megatron, origin=origin, filled=filled)
    _static_scale_against_a_dynamic_one(merged, origin)
    _rampup_ends_at_the_global_batch(merged)
    if megatron:
        _megatron_turns_off_sequence_parallel_without_tp(merged)
        _megatron_checkpoint_flags(merged)
    return validate(merged)


PADDING = "model.make_vocab_size_divisible_by"


def _vocabulary_padding_across_sources(partials: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """Megatron flags state the unified multiple as Megatron-LM's product, --make-vocab-size-divisible-by x tp
    (``megatron_args._vocabulary_padding``); another source (a unified config) states the field itself, which
    zeromega pads to lcm(field, tp). Compared as the user wrote them: the flags' implied default (no
    --make-vocab-size-divisible-by) yields to a source that states the field; a typed flag agrees when it pads
    to the same multiple at the run's tp (which a config may state), else one line names both values."""
    others = [(source, flatten(partial)) for source, partial in partials
              if not isinstance(partial, megatron_args.FlagPartial)]
    stated = next(((source, flat[PADDING]) for source, flat in others if PADDING in flat), None)
    config_tp = next((flat["parallel.tp"] for _, flat in others if "parallel.tp" in flat), None)
    out = []
    for source, partial in partials:
        if not isinstance(partial, megatron_args.FlagPartial) or PADDING not in flatten(partial):
            out.append((source, partial))
            continue
        own, tp = partial.divisible_by, partial.tp
        if "parallel" not in partial or "tp" not in partial["parallel"]:  # the run's tp is the config's
            tp = config_tp if isinstance(config_tp, int) and not isinstance(config_tp, bool) and config_tp > 0 else tp
        value = flatten(partial)[PADDING] if own is None else own * tp  # implied: Megatron's 128 x the flags' tp
        if stated is not None and isinstance(stated[1], int) and not isinstance(stated[1], bool) and stated[1] > 0:
            where, theirs = stated
            if own is None or math.lcm(theirs, tp) == value:
                value = theirs  # Megatron's default yields, or the same padded vocabulary
            else:
                raise ConfigError("--make-vocab-size-divisible-by", own, f"at tp {tp} pads the vocabulary to a "
                                  f"multiple of {value} (Megatron-LM multiplies it by tp), but {where} sets "
                                  f"{PADDING} {theirs} (a multiple of lcm({theirs}, tp {tp}) = "
                                  f"{math.lcm(theirs, tp)})", f"state it in one place only, or make them agree: "
                                  f"--make-vocab-size-divisible-by {math.lcm(theirs, tp) // tp} or {PADDING} {value}")
        copied = copy.deepcopy(dict(partial))  # a plain copy: the caller's partial stays as read
        model = copied.setdefault("model", {})
        model["make_vocab_size_divisible_by"] = value
        out.append((source, copied))
    return out


DYNAMIC_SCALE = {"initial_scale_power": "fp16.initial_scale_power", "window": "fp16.loss_scale_window",
                 "hysteresis": "fp16.hysteresis", "min_scale": "fp16.min_loss_scale"}


def _static_scale_against_a_dynamic_one(merged: dict, origin: dict) -> None:
    """``--loss-scale N`` (static) next to a config that sets up dynamic scaling: a conflict, not a silent
    replacement (with a static scale every dynamic setting is dead)."""
    scaling = merged.get("loss_scaling")
    if not isinstance(scaling, dict) or not scaling.get("loss_scale"):
        return
    static_from = origin.get("loss_scaling.loss_scale", "")
    for leaf, key in DYNAMIC_SCALE.items():
        source = origin.get(f"loss_scaling.{leaf}")
        if source and source != static_from and leaf in scaling:
            flag = "--loss-scale" if "Megatron" in static_from or "command-line" in static_from else \
                "loss_scaling.loss_scale"
            raise ConfigError(flag, scaling["loss_scale"], f"sets a static loss scale, but {source} sets up dynamic "
                              f"scaling ({key if 'DeepSpeed' in source else 'loss_scaling.' + leaf}="
                              f"{scaling[leaf]!r}), which a static scale would silently switch off",
                              f"drop {flag} to keep the dynamic scale, or state the static scale in {source} "
                              "(fp16.loss_scale) and drop its dynamic keys")


def _rampup_ends_at_the_global_batch(merged: dict) -> None:
    """Megatron-Core's ramp-up calculator asserts the schedule ends at the global batch: start <= global and
    the increment divides global - start (num_microbatches_calculator.py)."""
    batch = merged.get("batch")
    if not isinstance(batch, dict) or not batch.get("rampup") or batch.get("global") is None:
        return
    try:
        start, increment, _ = (int(v) for v in batch["rampup"])
        glob = int(batch["global"])
    except (TypeError, ValueError):
        return  # validation names the field
    if start > glob or increment <= 0 or (glob - start) % increment:
        raise ConfigError("--rampup-batch-size", f"{start} {increment} {batch['rampup'][2]}",
                          f"ramps from {start} by {increment}, which never ends at the global batch {glob} "
                          "(Megatron-Core asserts global - start >= 0 and divisible by the increment)",
                          f"choose a start <= {glob} whose difference to {glob} the increment divides, or another "
                          "--global-batch-size")


def _megatron_checkpoint_flags(merged: dict) -> None:
    """Megatron-LM's semantics of --save / --save-interval. --save-interval without --save: Megatron-LM
    never saves (save_checkpoint needs args.save), so the interval is dropped with a warning where
    zeromega's own dialect refuses it. --save without --save-interval: Megatron-LM's validate_args asserts
    a save interval, so it is refused here too, before any rank starts."""
    c = merged.get("checkpoint")
    if not isinstance(c, dict):
        return
    if c.get("interval") is not None and not c.get("save"):
        warnings.warn(f"--save-interval {c['interval']} without --save: nothing is saved, as in Megatron-LM; add "
                      "--save DIR to save", UserWarning, stacklevel=3)
        del c["interval"]
    elif c.get("save") and c.get("interval") is None:
        iters = (merged.get("scheduler") or {}).get("train_iters")
        raise ConfigError("--save", c["save"], "is given without --save-interval, which Megatron-LM refuses "
                          "(validate_args asserts a save interval)",
                          f"add --save-interval N (N = --train-iters{'' if iters is None else f', {iters},'} "
                          "saves only at the end)")


def _megatron_turns_off_sequence_parallel_without_tp(merged: dict) -> None:
    """Megatron-LM's validate_args: ``--sequence-parallel`` at tp 1 is switched off with a warning (so the
    numerics do not change), not refused; zeromega's own dialect still refuses it (``rules``)."""
    parallel = merged.get("parallel")
    if isinstance(parallel, dict) and parallel.get("sequence_parallel") is True and parallel.get("tp", 1) == 1:
        warnings.warn("--sequence-parallel: disabling sequence parallelism because tensor model parallelism is "
                      "disabled (tp 1), as Megatron-LM does", UserWarning, stacklevel=3)
        parallel["sequence_parallel"] = False


CONFIG_ENV = "ZEROMEGA_CONFIG_ENV"
"""JSON {name: value}: the variables ``zeromega launch --env`` pins in a launch-script config, for the ranks."""


def build(config_path: Optional[str] = None, megatron_argv: Optional[list[str]] = None,
          env: Optional[dict[str, str]] = None, run_script: bool = False,
          notes: Optional[list[str]] = None) -> RunConfig:
    """The RunConfig from a config file (any dialect) and/or Megatron arguments (conflicts are errors).

    ``megatron_argv`` (even empty) says the run is a Megatron-LM-style script: the optimizer and schedule
    a DeepSpeed JSON leaves unstated take Megatron-LM's defaults, as in Megatron-DeepSpeed.
    """
    partials: list[tuple[str, dict]] = []
    megatron = megatron_argv is not None
    if config_path:
        megatron = megatron or detect(config_path) == "megatron"
        found, unknown = sources(config_path, env, run_script=run_script, notes=notes)
        if unknown:  # a launch script that trains: each of its flags is read or refused, never dropped
            raise megatron_args.unknown_flags_error(unknown, str(config_path))
        partials += found
    if megatron_argv:
        partials += _megatron(megatron_argv, "command-line arguments", skip=config_path)[0]
    return resolve(partials, megatron=megatron)


# ------------------------------------------------------------------ writing


def to_unified(cfg: RunConfig, layout: Optional[Layout] = None) -> dict:
    """The unified file's content: every field that differs from its default (batch resolved with a layout)."""
    data = cfg.model_dump(by_alias=True, exclude_defaults=True, mode="json")
    if layout is not None:
        data["batch"] = {"micro": layout.micro, "global": layout.global_batch, "accumulation": layout.accumulation}
    return data


def to_deepspeed_file(cfg: RunConfig, layout: Optional[Layout] = None) -> dict:
    """A standalone DeepSpeed JSON; what DeepSpeed has no key for goes in its "zeromega" block.

    The block holds exactly the fields a DeepSpeed-only reading would lose,
    so reading the file back gives the same RunConfig.
    """
    device_type = "cpu" if cfg.device == "cpu" else None
    ds = to_deepspeed(cfg, layout, device_type, standalone=True)
    block = lost_fields(cfg, resolve([("DeepSpeed", from_deepspeed(ds))]))
    if block:
        ds["zeromega"] = block
    return ds


def to_megatron_argv(cfg: RunConfig) -> list[str]:
    """Megatron-LM arguments for the config (see :func:`lost_fields` for what they cannot carry)."""
    return megatron_args.to_argv(cfg)


def to_megatron(cfg: RunConfig, layout: Optional[Layout] = None, target: str = "megatron",
                deepspeed_config: Optional[str] = None) -> tuple[list[str], Optional[dict], list[str]]:
    """(arguments, DeepSpeed JSON or None, notes) for ``target`` ``megatron`` (Megatron-LM core 0.16) or
    ``megatron-deepspeed`` (its arguments, and the DeepSpeed JSON ``--deepspeed_config`` names).

    The notes name what the output cannot say: values the target has no flag for
    (:func:`~zeromega.launch.megatron_args.write_argv`), and fields a reading of the output back would lose.
    """
    argv, lost = megatron_args.write_argv(cfg, target, layout, deepspeed_config)
    ds = to_deepspeed_file(cfg, layout) if target == "megatron-deepspeed" else None
    name = megatron_args.TARGET_NAMES[target]
    notes = [f"not expressible as {name} flags: {', '.join(lost)}"] if lost else []
    back = [("arguments", megatron_args.parse(argv).partial)] + ([("DeepSpeed", from_deepspeed(ds))] if ds else [])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unread = lost_fields(cfg, resolve(back, megatron=True))
    except ConfigError as err:
        notes.append(f"the output does not read back: {err}")
        unread = {}
    named = {line.split(" ")[0] for line in lost}  # a field write_argv already named is not named twice
    paths = sorted(path for path in flatten(unread) if not path.startswith("batch.") and path not in named)
    if paths:
        notes.append(f"not expressible as {name} flags: {', '.join(paths)} (no flag carries them)")
    return argv, ds, notes


def lost_fields(cfg: RunConfig, back: RunConfig) -> dict:
    """Nested dict of the fields of ``cfg`` that ``back`` (a round trip through a dialect) lost."""
    want = flatten(cfg.model_dump(by_alias=True, mode="json"))
    got = flatten(back.model_dump(by_alias=True, mode="json"))
    lost: dict = {}
    for path, value in want.items():
        if value is not None and not path.startswith("deepspeed_extra") and not same(value, got.get(path)):
            set_path(lost, path, value)
    return lost


def dumps(data: Any, fmt: str = "json") -> str:
    """``data`` as JSON (indented) or YAML text."""
    if fmt == "yaml":
        try:
            import yaml
        except ImportError:
            raise ConfigError("--format", "yaml", "PyYAML is not installed", "pip install pyyaml, or use json") from None
        return yaml.safe_dump(data, sort_keys=False)
    return json.dumps(data, indent=2)
