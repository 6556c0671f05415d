"""Seeded generators of hostile config inputs for tests/test_fuzz.py (issue 18).

Each generator takes a :class:`Draw` (a ``random.Random`` seeded from the
category and the input's index, so input ``i`` of a category is the same on
every machine and every run, whatever the other counts) and returns one
:class:`Input`: the file's text, its suffix and extra command-line words.
The inputs are shaped like the real thing (the schema's sections and
fields, DeepSpeed's keys, Megatron-LM's flags, the bash constructs published
launch scripts use) with values of random types, random nesting, unknown
keys and the spellings each syntax has for numbers (Hjson's quoteless
values, YAML's sexagesimal, hex and octal integers, ``.inf``, dates).

A hand-written generator rather than hypothesis: hypothesis spent 20-30 ms
drawing one nested config (measured), as long as the three commands that read
it; this one takes well under a millisecond, so the same minute holds
several times the inputs.
"""

from __future__ import annotations

import json
import random
import shlex
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from zeromega.config.schema import RunConfig
from zeromega.launch import megatron_args
from zeromega.launch.deepspeed_json import BLOCK_KEYS, SCHEDULERS, TOP_LEVEL


@dataclass
class Input:
    """One generated input: a file (``text`` with ``suffix``) and the command-line words that go with it."""

    text: str
    suffix: str
    argv: list[str] = field(default_factory=list)
    dialect: str | None = None

    def key(self) -> tuple:
        """What makes two inputs the same input (for counting distinct ones)."""
        return self.text, self.suffix, tuple(self.argv), self.dialect


class Draw(random.Random):
    """``random.Random`` with the draws the generators share."""

    def __init__(self, *seed: object):
        super().__init__("/".join(map(str, seed)))  # a str seed hashes with SHA-512: stable across runs
        self.wild = self.pick([0.0, 0.0, 0.03, 0.1, 0.3])
        """How often a key gets any value instead of a plausible one: one input in four or so is valid
        throughout, so the writers and the planner see inputs too, not only the first refusal."""

    def pick(self, options):
        return options[self.randrange(len(options))]

    def chance(self, p: float) -> bool:
        return self.random() < p

    def text(self, max_size: int = 6) -> str:
        return "".join(self.pick(ALPHABET) for _ in range(self.randint(0, max_size)))

    def scalar(self) -> Any:
        kind = self.randrange(8)
        if kind == 0:
            return self.pick([None, True, False])
        if kind == 1:
            return self.randint(-3, 9)
        if kind == 2:
            return self.pick([-2**80, -2**63 - 1, -2**63, 2**63 - 1, 2**63, 2**80, 2**31, self.randint(-2**70, 2**70)])
        if kind == 3:
            return self.pick([0.0, -0.0, 0.5, 1e-300, 5e-324, 1.7976931348623157e308, float("inf"), float("-inf"),
                              float("nan"), self.uniform(-1e6, 1e6)])
        if kind == 4:
            return self.pick(sorted(RAW))
        if kind in (5, 6):
            return self.pick(WORDS)
        return self.text()

    def value(self, leaves: int = 6) -> Any:
        """A scalar, or lists and mappings of them nested a few levels (at most ``leaves`` scalars)."""
        if leaves <= 1 or self.chance(0.55):
            return self.scalar()
        if self.chance(0.5):
            return [self.value(leaves // 3) for _ in range(self.randint(0, 3))]
        return {self.key(): self.value(leaves // 3) for _ in range(self.randint(0, 3))}

    def key(self) -> str:
        return self.pick(KEYS) if self.chance(0.7) else self.text(5)

    def plausible(self, *examples: Any) -> Any:
        """A key's value: one of ``examples``, or (at the input's ``wild`` rate) anything."""
        return self.value() if self.chance(self.wild) else self.pick(examples)

    def maybe(self, fields: dict[str, Callable[["Draw"], Any]], p: float = 0.4) -> dict:
        """A mapping with a random subset of ``fields`` (each value drawn by its function) and maybe an unknown
        key, in a random order."""
        out = {self.key(): self.value()} if self.chance(self.wild) else {}
        p = p if self.wild else min(p, 0.12)  # a tame input states few keys, as real configs do
        names = list(fields)
        self.shuffle(names)
        for name in names:
            if self.chance(p):
                out[name] = fields[name](self)
        return out


ALPHABET = list("abcxyzAZ019_-.:,;=+*/\\'\"`$#!?%&|<>()[]{}~^@ \t\n\r") + \
    ["\x00", "\x0b", "\x1b", "\u00e9", "\u00a0", "\u2028", "\u3000", "\ufeff", "\U0001f642", "\u0663"]
WORDS = ["auto", "cpu", "nvme", "none", "cuda", "AdamW", "Adam", "WarmupLR", "WarmupCosineLR", "ring", "usp",
         "ulysses", "selective", "full", "uniform", "block", "1", "2.5", "-1", "true", "false", "", " ", "inf", "nan",
         "1e400", "0x10", "1_000", "${TP}", "$(id)", "`id`", "/tmp/x", "../../etc/passwd", "a.b", "~", "null",
         "yes", "2001-12-14", "\u0663", "4\n", "bf16", "fp16", "fp32"]
KEYS = ["enabled", "stage", "lr", "tp", "pp", "device", "params", "type", "a.b", "zeromega", "model", "parallel",
        "deepspeed_extra", "<<", "1", "", "zero", "optimizer", "batch", "micro", "global", "seed"]

# Placeholders replaced in the JSON text by what json.dumps cannot write.
RAW = {"@@1e400@@": "1e400", "@@-1e400@@": "-1e400", "@@digits@@": "9" * 5000, "@@int70@@": str(2**70),
       "@@int64@@": "9223372036854775808", "@@neg64@@": "-9223372036854775808", "@@tiny@@": "1e-400",
       "@@long_float@@": "0." + "0" * 400 + "1", "@@exp@@": "1E+00000000000000000000309", "@@lead0@@": "01",
       "@@minus0@@": "-0", "@@frac@@": "1." + "9" * 5000}


def dump_json(data: Any, indent: int | None = None) -> str:
    text = json.dumps(data, allow_nan=True, indent=indent, ensure_ascii=False)
    for marker, raw in RAW.items():
        text = text.replace(json.dumps(marker), raw)
    return text


# ------------------------------------------------------------------ schema-driven sections


def _choices(annotation) -> list:
    """The literal values an annotation allows (Literal, Optional[Literal], ...)."""
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return [c for arg in typing.get_args(annotation) for c in _choices(arg)]


def _typed(annotation) -> list:
    """Values of the annotation's type a run config might hold (beside the field's default)."""
    text = str(annotation)
    choices = _choices(annotation)
    if choices:
        return choices
    if annotation is bool:
        return [True, False]
    if annotation is float or "float" in text:
        return [0.1, 1e-4, 0.0, 1.0, 2]
    if "list[str]" in text or annotation is str or "[str]" in text:
        return ["x", "/tmp/zeromega-fuzz", "a b"]
    if "dict" in text:
        return [{}, {"steps_per_print": 5}]
    if "tuple" in text:
        return [[1, 1, 8], [2, 2, 0]]
    if "list" in text:
        return [[0, 1], [1]]
    if annotation is int or "int" in text:
        return [1, 2, 4, 8, 16, 0]
    return [None]


def _field_value(info) -> Callable[[Draw], Any]:
    if hasattr(info.annotation, "model_fields"):
        section = info.annotation
        return lambda d: d.value() if d.chance(d.wild) else section_of(d, section)
    examples = _typed(info.annotation)
    if isinstance(info.default, (int, float, str, list, tuple)):
        examples.append(info.default)
    nasty = [1, 2, 4, 0.5, 0, -1, "auto", True, None, "", 2**63]
    return lambda d: d.pick(nasty) if d.chance(d.wild) else d.plausible(*examples)


def section_of(d: Draw, model) -> dict:
    fields = {info.alias or name: _field_value(info) for name, info in model.model_fields.items()}
    return d.maybe(fields)


SECTIONS = {name: info for name, info in RunConfig.model_fields.items()}


def unified_config(d: Draw) -> dict:
    return d.maybe({name: _field_value(info) for name, info in SECTIONS.items()}, p=0.25)


# ------------------------------------------------------------------ DeepSpeed JSON / Hjson and the zeromega block


def _offload(d: Draw) -> dict:
    return d.maybe({"device": lambda d: d.plausible("cpu", "nvme", "none"), "nvme_path": lambda d: d.plausible(
        "/tmp", None, "/nonexistent"), "pin_memory": lambda d: d.plausible(True, False),
        "buffer_count": lambda d: d.plausible(4, 5), "ratio": lambda d: d.plausible(0.3, 1.0)})


def _zero(d: Draw) -> Any:
    if d.chance(0.1):
        return d.pick([True, False, 0, 3])
    return d.maybe({
        "stage": lambda d: d.plausible(0, 1, 2, 3, True, "3", 3.0), "offload_optimizer": _offload,
        "offload_param": _offload, "reduce_bucket_size": lambda d: d.plausible("auto", 500000000, 5e8),
        "stage3_prefetch_bucket_size": lambda d: d.plausible("auto", 1000),
        "prefetch_bucket_size": lambda d: d.plausible("auto", 1000), "cpu_offload": lambda d: d.plausible(True, False),
        "cpu_offload_param": lambda d: d.plausible(True), "allgather_bucket_size": lambda d: d.plausible(500000000),
        "stage3_param_persistence_threshold": lambda d: d.plausible("auto", 0),
        "overlap_comm": lambda d: d.plausible(True, False), "contiguous_gradients": lambda d: d.plausible(True),
        "sub_group_size": lambda d: d.plausible(1e9, 1000000000), "round_robin_gradients": lambda d: d.plausible(True),
        "stage3_gather_16bit_weights_on_model_save": lambda d: d.plausible(True)})


def _optimizer(d: Draw) -> dict:
    return d.maybe({"type": lambda d: d.plausible("AdamW", "Adam", "Lamb", "OneBitAdam", "adamw", "SGD"),
                    "params": lambda d: d.maybe({
                        "lr": lambda d: d.plausible(1e-4, "auto", 0, 3e-4), "betas": lambda d: d.plausible(
                            [0.9, 0.999], "auto", [0.9], [0.9, 1.5], [1, 2, 3]),
                        "eps": lambda d: d.plausible(1e-8, 0.0, "auto"), "weight_decay": lambda d: d.plausible(
                            0.01, "auto", -1), "adam_w_mode": lambda d: d.plausible(False, True),
                        "torch_adam": lambda d: d.plausible(True)})})


def _scheduler(d: Draw) -> dict:
    return d.maybe({"type": lambda d: d.plausible(*SCHEDULERS, "OneCycle", "LRRangeTest", "warmuplr"),
                    "params": lambda d: d.maybe({
                        "warmup_num_steps": lambda d: d.plausible(100, "auto", 0, -5),
                        "warmup_max_lr": lambda d: d.plausible(1e-3, "auto"),
                        "warmup_min_lr": lambda d: d.plausible(0, "auto"),
                        "total_num_steps": lambda d: d.plausible(1000, "auto", 10),
                        "warmup_min_ratio": lambda d: d.plausible(0.1), "cos_min_ratio": lambda d: d.plausible(0.01),
                        "warmup_type": lambda d: d.plausible("linear", "log", "cubic"),
                        "last_batch_iteration": lambda d: d.plausible(-1, 5)})})


def zeromega_block(d: Draw) -> Any:
    if d.chance(0.1):
        return d.value()
    fields: dict[str, Callable[[Draw], Any]] = {
        key: (lambda d: d.pick([0, True, 10.0, -1, "2", 3]) if d.chance(d.wild) else d.plausible(1, 2, 4))
        for key in BLOCK_KEYS}
    fields.update({name: _field_value(info) for name, info in SECTIONS.items()})
    return d.maybe(fields, p=0.3)


def deepspeed_config(d: Draw, block: bool = True) -> dict:
    fields: dict[str, Callable[[Draw], Any]] = {
        key: (lambda d: d.plausible(1, 2, 8, 16, "auto", 1.0, 0, 3)) for key in TOP_LEVEL}
    fields.update({
        "fp16": lambda d: d.maybe({"enabled": lambda d: d.plausible(True, False, "auto"),
                                   "initial_scale_power": lambda d: d.plausible(16, 32, -1, 0),
                                   "loss_scale": lambda d: d.plausible(0, 128, 0.5),
                                   "loss_scale_window": lambda d: d.plausible(1000),
                                   "hysteresis": lambda d: d.plausible(2), "min_loss_scale": lambda d: d.plausible(1),
                                   "auto_cast": lambda d: d.plausible(False)}),
        "bf16": lambda d: d.maybe({"enabled": lambda d: d.plausible(True, False, "auto")}),
        "bfloat16": lambda d: d.maybe({"enabled": lambda d: d.plausible(True)}),
        "zero_optimization": _zero, "optimizer": _optimizer, "scheduler": _scheduler,
        "aio": lambda d: d.maybe({"block_size": lambda d: d.plausible(1048576), "queue_depth": lambda d: d.plausible(8),
                                  "use_gds": lambda d: d.plausible(False), "thread_count": lambda d: d.plausible(1)}),
        "activation_checkpointing": lambda d: d.maybe({
            "partition_activations": lambda d: d.plausible(True), "cpu_checkpointing": lambda d: d.plausible(True),
            "number_checkpoints": lambda d: d.plausible(4)}),
        "sequence_parallel_size": lambda d: d.plausible(1, 2, 4), "steps_per_print": lambda d: d.plausible(10, 0),
        "wall_clock_breakdown": lambda d: d.plausible(False), "zero_allow_untested_optimizer": lambda d: d.plausible(
            True), "prescale_gradients": lambda d: d.plausible(False),
        "gradient_predivide_factor": lambda d: d.plausible(1.0),
        "communication_data_type": lambda d: d.plausible("fp32", "bf16", "fp16"),
        "tensorboard": lambda d: d.maybe({"enabled": lambda d: d.plausible(True), "output_path": lambda d: d.plausible(
            "/tmp/tb")}),
    })
    if d.wild:  # DeepSpeed 0.19 refuses an "amp" block in any form
        fields["amp"] = lambda d: d.maybe({"enabled": lambda d: d.plausible(True, False)})
    if block:
        fields["zeromega"] = zeromega_block
    return d.maybe(fields, p=0.3)


def _duplicate_a_key(d: Draw, text: str) -> str:
    """The JSON text with a key written twice at the top (or in the first nested object)."""
    opening = [i for i, c in enumerate(text) if c == "{"]
    if not opening:
        return text
    at = d.pick(opening[:3]) + 1
    key = d.pick(["train_batch_size", "zero_optimization", "zeromega", "stage", "lr", "tp"])
    pair = f'"{key}": {d.pick(["1", "2", "{}", "true"])}, '
    return text[:at] + pair + pair + text[at:]


HJSON_EDITS: list[Callable[[Draw, str], str]] = [
    lambda d, t: t,
    lambda d, t: t,
    lambda d, t: "// a comment\n" + t.replace(", ", ",\n# another\n"),
    lambda d, t: t[:-1] + ",}" if t.endswith("}") else t,
    lambda d, t: t[: d.randint(0, len(t))],
    lambda d, t: t.replace('"', "", d.randint(1, 8)),
    lambda d, t: t.replace('"', ""),  # quoteless keys and values, as Hjson allows
    lambda d, t: t[1:-1] if t.startswith("{") else t,  # a braceless root object
    lambda d, t: t.replace(", ", "\n"),  # newline as separator
    lambda d, t: "/* block\ncomment */" + t + "\n/* unterminated",
    lambda d, t: t.replace('"', "'", 2),
    lambda d, t: t + "\n" + t,  # two documents
    lambda d, t: "\ufeff" + t,
    _duplicate_a_key,
    lambda d, t: t.replace(": ", ": '''\n  multi\n  '''\n", 1),
    lambda d, t: t.replace(": ", ": '''never closed ", 1),  # hjson's multi-line string, open to the end
    lambda d, t: t.replace("1", d.pick(["1e400", "9" * 30, "0x1F", "NaN", "-Infinity", "+1", ".5", "1."]), 1),
]


def _with_batch(d: Draw, config: dict) -> dict:
    """A tame input states its batch (a config without one is refused, which the wild ones cover)."""
    if not d.wild and not any(k in config for k in ("train_batch_size", "train_micro_batch_size_per_gpu")):
        config["train_micro_batch_size_per_gpu"] = d.pick([1, 2, "auto"])
    return config


def deepspeed_input(d: Draw) -> Input:
    text = dump_json(_with_batch(d, deepspeed_config(d)), indent=d.pick([None, None, 2]))
    text = d.pick(HJSON_EDITS if d.wild else HJSON_EDITS[:4] + HJSON_EDITS[6:9])(d, text)
    return Input(text, ".json", dialect=d.pick([None, None, "deepspeed"]))


def block_input(d: Draw) -> Input:
    base = deepspeed_config(d, block=False) if d.chance(0.3) else {}
    if not any(k in base for k in ("train_batch_size", "train_micro_batch_size_per_gpu")):
        base["train_micro_batch_size_per_gpu"] = d.pick([1, 2, "auto"])
    base["zeromega"] = zeromega_block(d)
    text = dump_json(base)
    if d.chance(0.1):
        text = _duplicate_a_key(d, text)
    return Input(text, ".json")


# ------------------------------------------------------------------ unified YAML / JSON

# YAML's own spellings, written into the text raw (safe_dump would quote them).
YAML_RAW = ["0x1F", "0o17", "017", "0b101", "1_000", "190:20:30", "1:30", "-1:30", "9" * 5000 + ":30",
            "1" + ":30" * 50, "1" + ":59" * 20, "0x" + "f" * 40, "0b" + "1" * 80, "0" + "7" * 30, "9_" * 30 + "9",
            ".inf", "-.inf", ".NaN", "~", "null", "yes", "No", "on", "OFF", "2001-12-14",
            "2001-12-14t21:59:43.10-05:00",
            "!!binary aGVsbG8=", "!!set {a, b}", "!!python/object/apply:os.system ['id']", "!!str 3", "!!int '3'",
            "!!float 1e400", "!!int 99999999999999999999", "1e400", "-1e400", "1.5e308", "&a 1", "*undefined",
            "'unterminated", "\"\\u0000\"", "[1, [2, [3]]]", "{a: {b: {c: 1}}}", "!!timestamp 2001-12-14",
            "!!omap [{a: 1}, {a: 2}]", "!!pairs [{a: 1}, {a: 2}]", "?", "- 1", "|\n  block", ">-\n  folded",
            "1e+3", "+4", "4.", ".5", "1:30.5", "190:20:30.15", "'" + "\\" * 5 + "'", "0." + "0" * 500 + "1",
            "!!int abc", "!!int ''", "!!int 0x", "!!float x", "!!bool maybe", "!!timestamp x", "!!null x",
            "!!int 1:2:3:4:5:6:7:8:9:10:11:12:13", "!!map [1]", "!!seq {a: 1}", "!!str [1]", "!<tag:x> 1", "!local 1"]


def alias_chain(levels: int, width: int) -> str:
    """A "billion laughs" under deepspeed_extra (passed through whole, so every reader and writer walks it):
    each level names the one below ``width`` times."""
    lines = ["deepspeed_extra:", "  l0: &l0 [1, 2]"]
    for i in range(1, levels + 1):
        lines.append(f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def _sections_with_fields() -> list[tuple[str, list[str]]]:
    return [(name, list(info.annotation.model_fields)) for name, info in SECTIONS.items()
            if hasattr(info.annotation, "model_fields")]


SECTION_FIELDS = _sections_with_fields()


def _yaml_value(d: Draw) -> str:
    if not d.wild:
        return d.pick(["1", "2", "4", "0.5", "true", "0x2", "1_0", "1:0"])
    return d.pick(YAML_RAW) if d.chance(0.5) else json.dumps(d.scalar(), allow_nan=True, ensure_ascii=False)


def unified_input(d: Draw) -> Input:
    import yaml

    config = unified_config(d)
    style = d.pick(["block", "flow", "json", "aliases", "merge", "dotted", "duplicate", "raw", "cut", "anchors"]
                   if d.wild else ["block", "flow", "json", "merge", "dotted"])
    if style == "json":
        text = dump_json(config)
        if d.chance(0.3):
            text = _duplicate_a_key(d, text)
        return Input(text, ".json")
    text = yaml.safe_dump(config, default_flow_style=style == "flow", allow_unicode=True)
    text = "" if text.strip() == "{}" and d.chance(0.5) else text
    section, fields = d.pick(SECTION_FIELDS)
    name = d.pick(fields)
    if style == "aliases":  # a billion laughs, small or large
        text = text.replace("deepspeed_extra:", "extra_was:") + alias_chain(d.randint(1, 40), d.randint(1, 9))
    elif style == "anchors":  # a section anchored and used elsewhere, maybe recursive
        other, _ = d.pick(SECTION_FIELDS)
        text += f"{section}: &s {{{name}: {_yaml_value(d)}}}\n{other}: {d.pick(['*s', '[*s]', '{x: *s}', '*t'])}\n"
        if d.chance(0.2):
            text += "seed: &r [*r]\n"
    elif style == "merge":  # '<<' merge keys: allowed to be overridden, unlike a duplicate
        base = {n: d.plausible(1, 2, "auto") for n in fields[:3]}
        text += (f"{section}: &base {json.dumps(base)}\n" if section not in config else "") + \
            f"{d.pick([s for s, _ in SECTION_FIELDS])}:\n  <<: {d.pick(['*base', '[*base, *base]', '1', '*none'])}\n" \
            f"  {name}: {_yaml_value(d)}\n"
    elif style == "dotted":  # dotted keys beside (or instead of) their sections
        for _ in range(d.randint(1, 4)):
            sec, flds = d.pick(SECTION_FIELDS) if not d.chance(d.wild) else (d.text(4), ["x"])
            dotted = f"{sec}.{d.pick(flds)}" + (f".{d.pick(flds)}" if d.chance(0.1) else "")
            text += f"{dotted}: {_yaml_value(d)}\n"
        if d.chance(d.wild):
            text += f"{section}: {d.pick(['3', '[1]', 'null', '{}', 'x'])}\n"
    elif style == "duplicate":  # a key twice, at the top or nested
        if d.chance(0.5):
            text += f"{section}: {{{name}: 1}}\n{section}: {{{name}: 2}}\n"
        else:
            text += f"{section}:\n  {name}: {_yaml_value(d)}\n  {name}: {_yaml_value(d)}\n"
    elif style == "raw":  # YAML's own scalar spellings in a field
        text += f"{section}:\n  {name}: {_yaml_value(d)}\n" if section not in config else ""
        text += f"seed: {d.pick(YAML_RAW)}\n" if "seed" not in config else ""
    elif style == "cut":
        text = text[: d.randint(0, len(text))]
    return Input(text, d.pick([".yaml", ".yaml", ".yml"]))


# ------------------------------------------------------------------ Megatron argument files and launch scripts

FLAGS = sorted({*megatron_args.TABLE, *megatron_args.SPECIAL, *megatron_args.NEGATIONS})
FLAG_VALUES = ["1", "2", "4", "8", "0", "-1", "0.1", "1e-4", "3e-4", "inf", "-inf", "nan", "1e400", "9" * 30,
               "9" * 5000, "true", "", "x", "p2p", "a2a", "a2a+p2p", "selective", "full", "uniform", "block",
               "cosine", "linear", "WSD", "rope", "learned_absolute", "none", "$UNSET", "${TP:-2}", "$((2**63))",
               "1_000", "0x10", "+4", " 4", "4.0", "1e3", "-0", "\u0663", "ds_config.json", "65536", "GPT2BPETokenizer",
               "NullTokenizer", "bf16", "/tmp/ckpt", "1 2 3", "0.9", "1e-8", "1.5", "-1e-4", "1000000000000"]


def flag_value(d: Draw) -> str:
    if not d.chance(d.wild * 3):
        return d.pick(["1", "2", "4", "8", "0.1", "1e-4", "128", "selective", "cosine", "rope", "bf16"])
    return d.pick(FLAG_VALUES) if d.chance(0.85) else d.text(6)


def argument_file_input(d: Draw) -> Input:
    words = []
    for _ in range(d.randint(0, 14)):
        flag = d.pick(FLAGS) if d.chance(0.9) else d.pick(["--foo", "--use-flash-attn", "-x", "--", "---lr", "--lr="])
        switch = megatron_args.TABLE.get(flag, (None, 1))[1] == megatron_args.SWITCH or flag in megatron_args.NEGATIONS
        count = d.pick([0, 1, 1, 1, 2]) if d.wild else 0 if switch else 1
        values = [flag_value(d) for _ in range(count)]
        if values and d.chance(0.1):
            words.append(shlex.quote(f"{flag}={values[0]}"))
        else:
            words.append(shlex.join([flag, *values]))
    sep = d.pick([" ", "\n", " \\\n", "\n\n", "\t"])
    text = sep.join(words)
    if d.chance(0.15):
        text = d.pick(["# comment\n", "#!/bin/bash\n", "python pretrain_gpt.py \\\n", ""]) + text
    if d.chance(0.1):
        at = d.randint(0, len(text))
        text = text[:at] + d.pick(["'", '"', "\\", "#", "$(", "`", "\n", "\x00"]) + text[at:]
    if d.chance(0.02):
        text += " --save " + "a" * d.pick([70_000, 200_000])  # beyond one command line
    text += d.pick(["", "\n", " \\\n", "\n--lr 1e-4\n", " --lr 1e-4"])
    return Input(text, ".args")


NAMES = ["TP", "PP", "LR", "N", "GPUS", "ARGS", "A", "DS", "i", "UNSET"]


def arith(d: Draw, leaves: int = 8) -> str:
    if leaves <= 1 or d.chance(0.4):
        return d.pick([str(d.randint(-3, 99)), d.pick(NAMES), "$" + d.pick(NAMES), d.pick(
            ["9**9**9", "2**63", "1/0", "2**-1", "0x7fffffffffffffff", "08", "1<<70", "~0", "!0",
             "-(-9223372036854775808)",
             "1" * 30, "64#zZ", "3#9", "A++", "--A", "A=5", "A?1:2", "(1,2)", "1 && 0 || 1", "A+=2**62"])])
    a, b = arith(d, leaves // 2), arith(d, leaves // 2)
    op = d.pick(["+", "-", "*", "/", "%", "**", "<<", ">>", "&", "|", "^", "<", "==", "&&", ","])
    return f"({a}{op}{b})" if d.chance(0.5) else f"{a}{op}{b}"


def word(d: Draw) -> str:
    n = d.pick(NAMES)
    return d.pick([
        lambda: flag_value(d), lambda: f"${n}", lambda: f"${{{n}}}", lambda: f"${{{n}:-{flag_value(d)}}}",
        lambda: f"$(({arith(d)}))", lambda: f"${{{n}:={flag_value(d)}}}", lambda: f"${{{n}:+x}}", lambda: f"${{#{n}}}",
        lambda: f"${{{n}%%.*}}", lambda: f"${{{n}/a/b}}", lambda: f"${{{n}[@]}}", lambda: f'"${{{n}[@]}}"',
        lambda: f"${{{n}:1:2}}", lambda: f"${{!{n}}}", lambda: f"${{{n}^^}}", lambda: f"$'\\x41\\n'",
        lambda: f'"{flag_value(d)} ${n}"', lambda: f"'{flag_value(d)}'", lambda: "{1..3}", lambda: "{a,b}",
        lambda: "$(cat f)", lambda: "`date`", lambda: "$RANDOM", lambda: "$$", lambda: "$@", lambda: "$1", lambda: "*",
        lambda: "~", lambda: f"${{{n}:?unset}}", lambda: f"${{{n}:-${{{n}:-${{{n}}}}}}}",
    ])()


def _command(d: Draw) -> str:
    launcher = d.pick(["python", "torchrun --nproc_per_node $GPUS --nnodes 1", "deepspeed --num_gpus 2",
                       "python -u", "torchrun --nproc-per-node=4", "deepspeed --hostfile=h --num_nodes 2",
                       "srun python", "python3 -m torch.distributed.run --nproc_per_node 2"])
    pairs = [f"    {d.pick(FLAGS + ['${ARGS[@]}', '--deepspeed_config', '--config', '$A'])} "
             f"{' '.join(word(d) for _ in range(d.pick([0, 1, 1, 2])))}" for _ in range(d.randint(0, 10))]
    return f"{launcher} {d.pick(['pretrain_gpt.py', 'train.py', '$SCRIPT', 'pretrain_gpt.py'])} \\\n" + \
        " \\\n".join(pairs)


def _heredoc(d: Draw) -> str:
    body = d.pick([lambda: dump_json(deepspeed_config(d)), lambda: "{", lambda: "[" * 40 + "]" * 40,
                   lambda: '{"train_batch_size": 1e400}', lambda: '{"train_batch_size": $TP}',
                   lambda: dump_json(unified_config(d))])()
    name = d.pick(["ds_config.json", "$DS", "cfg.json"])
    quote = d.pick(["EOT", "'EOT'", "-EOT"])
    return f"cat <<{quote} > {name}\n{body}\nEOT"


def script_line(d: Draw) -> str:
    n = d.pick(NAMES)
    return d.pick([
        lambda: f"{n}={word(d)}", lambda: f"export {n}={word(d)}", lambda: f"{n}=${n}${n}", lambda: f"{n}+={word(d)}",
        lambda: f"{n}=(\n" + "\n".join(f"  {d.pick(FLAGS) if d.chance(0.5) else word(d)}"
                                       for _ in range(d.randint(0, 6))) + "\n)",
        lambda: f"{n}+=({word(d)} {word(d)})", lambda: f"{n}[{d.randint(0, 3)}]={word(d)}",
        lambda: _heredoc(d), lambda: _command(d), lambda: _command(d),
        lambda: f"if [ \"${n}\" = {word(d)} ]; then\n  {n}={word(d)}\nelif [[ ${n} -gt 2 ]]; then\n  {n}=1\n"
                f"else\n  {n}={word(d)}\nfi",
        lambda: f"for {n} in {' '.join(word(d) for _ in range(d.randint(0, 4)))}; do\n  A=$A${n}\ndone",
        lambda: f"for (({n}=0; {n}<{d.pick(['3', '100000', '$N'])}; {n}++)); do A=$A.; done",
        lambda: d.pick(["while true; do A=1; done", "while :; do :; done", "until false; do A=$A; done",
                        "while [ $A -lt 5 ]; do A=$((A+1)); done"]),
        lambda: f"case ${n} in\n  1) {n}=2 ;;\n  *) {n}={word(d)} ;;\nesac",
        lambda: d.pick(["f() { f; }; f", "f() { A=$1; }; f 3", "g() { g & }", "source ./other.sh", ". $A",
                        "eval \"A=$A\"", "eval \"$A\"", "A=$(eval echo $A)", "shift", "set -- --lr 1",
                        "exec python pretrain_gpt.py --lr 0.1", "exit 0", "return", "cd /tmp", "unset A",
                        "readonly A=1", "declare -i A=2**3", "local A=1", "trap 'echo' EXIT", "echo {1..99999999}",
                        "A=({1..100000})", "echo $A > ds_config.json", "sed -i s/x/y/ ds_config.json",
                        "sed -e 's/TP/'$TP'/' tpl.json > ds_config.json", "cp a.json ds_config.json",
                        "printf '%s' \"$A\" > f", "A=$(<file)", "read A < f", "A=`cat x`", "mapfile -t A < f",
                        "let A=2**64", "(( A = 9**9**9 ))", "[[ $A =~ (a+)+b ]] && A=1", "A=${A//?/$A$A}",
                        "IFS=, read -ra A <<< \"1,2,3\"", "A=$'\\u0041'", "set -u", "shopt -s extglob",
                        "alias p=python", "p pretrain_gpt.py --lr 1"]),
        lambda: d.pick(["#!/bin/bash", "set -ex", "# comment", "", "echo 'unterminated", "if [ -z $A ]; then",
                        "fi", "$(command)", "done", "esac", "}", "((", "[[", "<<EOT", "a && b || c | d &", ";;",
                        "\\", "A=\"multi\nline\""]),
    ])()


def _tame_script(d: Draw) -> str:
    """A script as published ones are written: variables, an if, an array of flags, one training command."""
    tp, layers = d.pick(["1", "2"]), d.pick(["2", "4"])
    lines = [d.pick(["#!/bin/bash", "set -ex", ""]), f"TP={tp}", f"LAYERS=${{LAYERS:-{layers}}}",
             f"GPUS={d.pick(['1', '2', '4'])}", 'if [ "$TP" -gt 1 ]; then\n  SP=--sequence-parallel\nfi',
             "ARGS=(\n  --num-layers $LAYERS\n  --hidden-size 64\n  --num-attention-heads 4\n)"]
    typed = {int: ["1", "2", "8"], float: ["0.1", "0.01"], megatron_args.SWITCH: [""]}
    flags = [f"{flag} {d.pick(typed[kind])}" for flag, (_, kind) in d.sample(sorted(megatron_args.TABLE.items()), 3)
             if kind in typed and flag not in ("--tensor-model-parallel-size", "--lr")]
    launcher = d.pick(["python", "torchrun --nproc_per_node $GPUS", "deepspeed --num_gpus $GPUS"])
    lines.append(f"{launcher} pretrain_gpt.py \\\n    --tensor-model-parallel-size $TP $SP \\\n"
                 f"    \"${{ARGS[@]}}\" \\\n    --lr {d.pick(['1e-4', '$((1+2))e-4'])} " + " ".join(flags))
    return "\n".join(lines) + "\n"


def launch_script_input(d: Draw) -> Input:
    if not d.wild:
        return Input(_tame_script(d), ".sh")
    text = "\n".join(script_line(d) for _ in range(d.randint(0, 10))) + "\n"
    env = [arg for name in d.sample(NAMES, d.randint(0, 2)) for arg in ("--env", f"{name}={d.pick(['2', '', 'x'])}")]
    return Input(text, ".sh", env)


# ------------------------------------------------------------------ plan flags

PLAN_CONFIGS = [
    {"train_micro_batch_size_per_gpu": 1},
    {"train_batch_size": 8, "zero_optimization": {"stage": 3}, "zeromega": {"tp": 2}},
    {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
     "zeromega": {"model": {"num_layers": 4}}},
    {"train_batch_size": 16, "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}},
     "zeromega": {"pp": 2, "model": {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
                                     "vocab_size": 128}}},
    {"train_micro_batch_size_per_gpu": 2, "fp16": {"enabled": True}, "zeromega": {"ep": 2, "moe": {
        "num_experts": 4, "topk": 2}, "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                                                "seq_length": 32, "vocab_size": 128}}},
]
SHAPE_FLAGS = ["--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length", "--vocab-size",
               "--ffn-hidden-size", "--num-query-groups", "--params", "--micro-batch-size", "--global-batch-size",
               "--world-size", "--tokens", "--gpu-memory", "--intra-node-bw", "--inter-node-bw", "--host-bw", "--top",
               "--nodes-of"]
PLAN_SWITCHES = [["--json"], ["--device", "cpu"], ["--device", "cuda"], ["--check"], ["--gpu", "h100"],
                 ["--gpu", "a100-40"], ["--attention", "flash"], ["--attention", "unfused"], ["--from", "deepspeed"],
                 ["--device"], ["--gpu", "H100"], ["--gpu-memory", "80"]]


def number_text(d: Draw) -> str:
    if not d.chance(d.wild * 2):
        return d.pick(["1", "2", "4", "8", "16", "32", "64", "128", "256", "1e6", "1.3e9"])
    if d.chance(0.3):
        return str(d.randint(-2, 2**70))
    return d.pick(["1e400", "nan", "inf", "-inf", "1.3e9", "0", "9" * 5000, "x", "", "64", "128", "4", "2", "8", "1",
                   "32", "0.5", "1e-300", "9223372036854775807", "9223372036854775808", "-1", "1e6", "7", "3",
                   "\u0663", "1_000", " 8", "0x10", "1e18", "1e19"])


def _shape_flags(d: Draw) -> list[str]:
    """A consistent model for plan: a parameter count, or a shape whose heads divide the hidden size."""
    if d.chance(0.3):
        return ["--params", d.pick(["1e6", "1.3e9", "7e9", "70e9", "125000000"])]
    heads = d.pick([4, 8, 16, 32])
    shape = ["--num-layers", d.pick(["2", "4", "8", "24", "80"]), "--hidden-size", str(heads * d.pick([16, 64, 128])),
             "--num-attention-heads", str(heads), "--seq-length", d.pick(["32", "512", "2048", "8192"]),
             "--vocab-size", d.pick(["128", "32000", "50257", "128256"])]
    if d.chance(0.3):
        shape += ["--num-query-groups", str(heads // d.pick([1, 2, 4]))]
    if d.chance(0.3):
        shape += ["--ffn-hidden-size", str(heads * d.pick([16, 64, 128]) * 4)]
    return shape


def plan_flags_input(d: Draw) -> Input:
    config = d.pick(PLAN_CONFIGS) if not d.chance(d.wild) else deepspeed_config(d)
    argv = ["--world-size", d.pick(["2", "4", "8"])] + (_shape_flags(d) if not d.chance(d.wild * 2) else [])
    if d.chance(0.3):
        argv += [d.pick(["--micro-batch-size", "--global-batch-size"]), d.pick(["1", "2", "8", "64"])]
    argv += [w for _ in range(d.randint(0, 8) if d.wild else 0) for w in (d.pick(SHAPE_FLAGS), number_text(d))]
    for _ in range(d.pick([0, 0, 1, 2])):
        argv += d.pick(PLAN_SWITCHES if d.wild else PLAN_SWITCHES[:8])
    if d.chance(0.05):
        argv += ["--gpus", d.pick(["1", "8", "64", "4096"]), "--gpu", "h100"]
    return Input(dump_json(config), ".json", argv)


GENERATORS: dict[str, Callable[[Draw], Input]] = {
    "DeepSpeed JSON/Hjson": deepspeed_input,
    "zeromega block": block_input,
    "unified YAML/JSON": unified_input,
    "Megatron argument file": argument_file_input,
    "launch script": launch_script_input,
    "plan flags": plan_flags_input,
}
