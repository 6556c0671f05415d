"""Every config reader, fuzzed through the command line (issue 18): a result or one clean line, quickly.

Generators build inputs shaped like the real thing (DeepSpeed JSON/Hjson with
its known keys, unified YAML, ``zeromega`` blocks, Megatron argument files,
bash launch scripts with the constructs published scripts use, ``plan``
flags) but with values of random types, random nesting and unknown keys.
Each input goes through ``zeromega check``, ``translate`` and ``plan`` in
process, and must end with exit code 0 or 2, no traceback, exactly one line
on stderr for exit 2, and within ``TIME_BOUND`` seconds.

Deterministic (``derandomize=True``, no example database) and bounded: about
two thousand inputs in all, well under a minute on two cores. Below the
fuzzers, one test per defect the issue lists, each of which failed before
its fix.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zeromega.config.schema import RunConfig
from zeromega.launch import cli, limits, megatron_args
from zeromega.launch.deepspeed_json import BLOCK_KEYS, SCHEDULERS, TOP_LEVEL

TIME_BOUND = 5.0
"""Seconds one CLI call may take (the ones here take milliseconds; the unbounded inputs took minutes)."""

FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=list(HealthCheck))
COUNTS: dict[str, int] = {}


@pytest.fixture(scope="module")
def workdir():
    """A scratch folder, after one call of each command: the time bound is for reading an input, not for
    importing Megatron-Core (translate --to megatron-core) or the ZeRO planner (plan) the first time."""
    with tempfile.TemporaryDirectory(prefix="zeromega-fuzz-") as path:
        warm = Path(path) / "warm.json"
        warm.write_text('{"train_micro_batch_size_per_gpu": 1}')
        for argv in (["translate", "--to", "megatron-core"], ["plan", "--params", "1e6"], ["check"]):
            run_cli(argv[0], str(warm), *argv[1:], "--world-size", "1")
        yield Path(path)


def run_cli(*argv: str) -> tuple[int, str, str, float]:
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue(), time.perf_counter() - start


def assert_clean(*argv: str) -> tuple[int, str]:
    """Exit 0 or 2, no traceback, one stderr line with exit 2, within TIME_BOUND; (code, stderr)."""
    code, out, err, elapsed = run_cli(*argv)
    shown = f"{argv[:2]} -> {code}: {err[-2000:]!r}"
    assert code in (0, 2), shown
    assert "Traceback" not in out + err, shown
    if code == 2:
        lines = err.rstrip("\n").split("\n")
        assert len(lines) == 1 and "error: " in lines[0] and "; fix: " in lines[0], shown
    assert elapsed < TIME_BOUND, f"{shown} took {elapsed:.1f} s"
    return code, err


def every_command(path: Path, kind: str, data, dialect: str | None = None) -> None:
    """check, translate (to a dialect ``data`` picks) and plan on ``path``."""
    COUNTS[kind] = COUNTS.get(kind, 0) + 1
    given_dialect = ["--from", dialect] if dialect else []
    world = ["--world-size", str(data.draw(st.sampled_from([1, 2, 4, 8, 16])))]
    assert_clean("check", str(path), *given_dialect, *world)
    target = data.draw(st.sampled_from(["deepspeed", "megatron", "megatron-core", "zeromega"]))
    assert_clean("translate", str(path), "--to", target, *given_dialect, *world)
    assert_clean("plan", str(path), *given_dialect, *world, "--params", "1e6")


# ------------------------------------------------------------------ values

# Placeholders replaced in the JSON text by what json.dumps cannot write: a float beyond range, an
# integer beyond Python's 4,300-digit parsing limit.
RAW = {"@@1e400@@": "1e400", "@@-1e400@@": "-1e400", "@@digits@@": "9" * 5000, "@@int70@@": str(2**70)}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 9), st.integers(-2**80, 2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(sorted(RAW)),
    st.sampled_from(["auto", "cpu", "nvme", "none", "AdamW", "WarmupLR", "WarmupCosineLR", "ring", "usp",
                     "1", "2.5", "true", "", "inf", "nan", "1e400", "${TP}", "/tmp/x"]),
    st.text(max_size=6),
)
keys = st.one_of(st.sampled_from(["enabled", "stage", "lr", "tp", "device", "params", "type", "a.b", "zeromega",
                                  "model", "parallel", "deepspeed_extra", "<<", "1"]), st.text(max_size=5))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
                      max_leaves=6)


def plausible(*examples):
    """A key's value: mostly plausible, sometimes anything."""
    return st.one_of(st.sampled_from(examples), st.sampled_from(examples), values)


def maybe(mapping: dict) -> st.SearchStrategy:
    """A dict with any subset of ``mapping``'s keys (each drawn from its strategy) and maybe unknown keys."""
    return st.builds(lambda known, extra: {**extra, **known}, st.fixed_dictionaries({}, optional=mapping),
                     st.dictionaries(keys, values, max_size=1))


def dump_json(data) -> str:
    text = json.dumps(data, allow_nan=True)
    for marker, raw in RAW.items():
        text = text.replace(json.dumps(marker), raw)
    return text


# ------------------------------------------------------------------ DeepSpeed JSON / Hjson and zeromega blocks

sections = {name: info.annotation for name, info in RunConfig.model_fields.items()}


def model_strategy(model) -> st.SearchStrategy:
    """Any subset of a section's fields (nested sections too), each mostly plausible, and unknown keys."""
    fields = getattr(model, "model_fields", None)
    if not fields:
        return values

    def field_values(info):
        if hasattr(info.annotation, "model_fields"):
            return st.one_of(model_strategy(info.annotation), values)
        default = info.default if isinstance(info.default, (int, float, str)) else 1
        return plausible(default, 1, 2, 4, 0.5, 0, -1, "auto", True)

    return maybe({info.alias or field: field_values(info) for field, info in fields.items()})


def section_strategy(name: str) -> st.SearchStrategy:
    return model_strategy(sections[name])


unified = maybe({name: section_strategy(name) for name in sections})
block = st.one_of(
    maybe({**{key: plausible(1, 2, 4, 0, True, 10.0) for key in BLOCK_KEYS},
           **{name: section_strategy(name) for name in sections}}),
    values,
)
offload = maybe({"device": plausible("cpu", "nvme", "none"), "nvme_path": plausible("/tmp", None),
                 "pin_memory": plausible(True, False)})
deepspeed = maybe({
    **{key: plausible(1, 2, 8, 16, "auto", 1.0) for key in TOP_LEVEL},
    "fp16": maybe({"enabled": plausible(True, False, "auto"), "initial_scale_power": plausible(16, 32, -1),
                   "loss_scale": plausible(0, 128), "loss_scale_window": plausible(1000),
                   "hysteresis": plausible(2), "min_loss_scale": plausible(1)}),
    "bf16": maybe({"enabled": plausible(True, False, "auto")}),
    "bfloat16": maybe({"enabled": plausible(True)}),
    "zero_optimization": st.one_of(st.booleans(), maybe({
        "stage": plausible(0, 1, 2, 3, True, "3"), "offload_optimizer": offload, "offload_param": offload,
        "reduce_bucket_size": plausible("auto", 500000000), "stage3_prefetch_bucket_size": plausible("auto"),
        "prefetch_bucket_size": plausible("auto", 1000), "cpu_offload": plausible(True, False),
        "cpu_offload_param": plausible(True), "allgather_bucket_size": plausible(500000000)})),
    "optimizer": maybe({"type": plausible("AdamW", "Adam", "Lamb"), "params": maybe({
        "lr": plausible(1e-4, "auto", 0), "betas": plausible([0.9, 0.999], "auto", [0.9]),
        "eps": plausible(1e-8, 0.0), "weight_decay": plausible(0.01, "auto"), "adam_w_mode": plausible(False)})}),
    "scheduler": maybe({"type": plausible(*SCHEDULERS, "OneCycle"), "params": maybe({
        "warmup_num_steps": plausible(100, "auto"), "warmup_max_lr": plausible(1e-3, "auto"),
        "warmup_min_lr": plausible(0), "total_num_steps": plausible(1000, "auto"),
        "warmup_min_ratio": plausible(0.1), "cos_min_ratio": plausible(0.01), "warmup_type": plausible("linear")})}),
    "aio": maybe({"block_size": plausible(1048576), "queue_depth": plausible(8), "use_gds": plausible(False)}),
    "sequence_parallel_size": plausible(1, 2, 4),
    "zeromega": block,
})
# Hjson as DeepSpeed reads it: comments, trailing commas, a cut-off file.
hjson_edits = st.sampled_from([
    lambda text: text,
    lambda text: "// a comment\n" + text.replace(", ", ",\n# another\n"),
    lambda text: text[:-1] + ",}" if text.endswith("}") else text,
    lambda text: text[: len(text) // 2],
    lambda text: text.replace('"', "", 4),
])


@settings(FUZZ, max_examples=200)
@given(data=st.data(), config=deepspeed, edit=hjson_edits)
def test_fuzzed_deepspeed_json(workdir, data, config, edit):
    path = workdir / "ds_config.json"
    path.write_text(edit(dump_json(config)))
    every_command(path, "DeepSpeed JSON/Hjson", data, data.draw(st.sampled_from([None, "deepspeed"])))


@settings(FUZZ, max_examples=120)
@given(data=st.data(), config=block)
def test_fuzzed_zeromega_block(workdir, data, config):
    path = workdir / "block.json"
    path.write_text(dump_json({"train_micro_batch_size_per_gpu": 1, "zeromega": config}))
    every_command(path, "zeromega block", data)


# ------------------------------------------------------------------ unified YAML / JSON


def alias_chain(levels: int, width: int) -> str:
    """A "billion laughs": each level names the one below ``width`` times, under deepspeed_extra (passed
    through whole, so every reader and writer walks it)."""
    lines = ["deepspeed_extra:", "  l0: &l0 [1, 2]"]
    for i in range(1, levels + 1):
        lines.append(f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


@settings(FUZZ, max_examples=150)
@given(data=st.data(), config=unified, style=st.sampled_from(["block", "flow", "json", "aliases", "cut"]))
def test_fuzzed_unified_yaml(workdir, data, config, style):
    import yaml

    if style == "json":
        path, text = workdir / "unified.json", dump_json(config)
    else:
        text = yaml.safe_dump(config, default_flow_style=style == "flow", allow_unicode=True)
        if style == "aliases":
            chain = alias_chain(data.draw(st.integers(1, 40)), data.draw(st.integers(1, 9)))
            text = text.replace("deepspeed_extra:", "extra_was:") + chain  # one deepspeed_extra key
        if style == "cut":
            text = text[: data.draw(st.integers(0, len(text)))]
        path = workdir / "unified.yaml"
    path.write_text(text)
    every_command(path, "unified YAML/JSON", data)


# ------------------------------------------------------------------ Megatron argument files and launch scripts

FLAGS = sorted({*megatron_args.TABLE, *megatron_args.SPECIAL, *megatron_args.NEGATIONS})
flag_values = st.one_of(
    st.sampled_from(["1", "2", "4", "8", "0", "-1", "0.1", "1e-4", "3e-4", "inf", "-inf", "nan", "1e400",
                     "9" * 30, "9" * 5000, "true", "", "x", "p2p", "a2a", "a2a+p2p", "selective", "full",
                     "uniform", "cosine", "rope", "$UNSET", "${TP:-2}", "$((2**63))", "1_000", "0x10",
                     "ds_config.json", "65536"]),
    st.text(max_size=6),
)
arguments = st.lists(st.tuples(st.one_of(st.sampled_from(FLAGS), st.sampled_from(["--foo", "--use-flash-attn"])),
                               st.lists(flag_values, max_size=2)), max_size=12)


@settings(FUZZ, max_examples=200)
@given(data=st.data(), argv=arguments)
def test_fuzzed_megatron_argument_file(workdir, data, argv):
    path = workdir / "train.args"
    text = "\n".join(shlex.join([flag, *vals]) for flag, vals in argv)
    path.write_text(text + data.draw(st.sampled_from(["", "\n", " \\\n", "\n--lr 1e-4\n"])))
    every_command(path, "Megatron argument file", data)


names = st.sampled_from(["TP", "PP", "LR", "N", "GPUS", "ARGS", "A", "DS"])
arith = st.recursive(st.one_of(st.integers(-3, 99).map(str), names, st.sampled_from(["9**9**9", "2**63", "1/0"])),
                     lambda inner: st.builds(lambda a, op, b, paren: f"({a}{op}{b})" if paren else f"{a}{op}{b}",
                                             inner, st.sampled_from(["+", "-", "*", "/", "%", "**"]), inner,
                                             st.booleans()), max_leaves=8)
word = st.one_of(flag_values, st.builds("${}".format, names), st.builds("${{{}}}".format, names),
                 st.builds("${{{}:-{}}}".format, names, flag_values), st.builds("$(({}))".format, arith))
script_lines = st.one_of(
    st.builds("{}={}".format, names, word),
    st.builds("export {}={}".format, names, word),
    st.builds("{0}=${0}${0}".format, names),
    st.builds(lambda name, ws: f"{name}=(\n" + "\n".join(f"  {w}" for w in ws) + "\n)", names,
              st.lists(st.one_of(st.sampled_from(FLAGS), word), max_size=6)),
    st.builds(lambda body: f"cat <<EOT > ds_config.json\n{body}\nEOT", st.one_of(
        deepspeed.map(dump_json), st.sampled_from(["{", "[" * 40 + "]" * 40, "{\"train_batch_size\": 1e400}"]))),
    st.builds(lambda launcher, pairs: f"{launcher} pretrain_gpt.py \\\n" + " \\\n".join(
        f"    {flag} {' '.join(vals)}" for flag, vals in pairs), st.sampled_from(
        ["python", "torchrun --nproc_per_node $GPUS --nnodes 1", "deepspeed --num_gpus 2", "python -u"]),
        st.lists(st.tuples(st.sampled_from(FLAGS + ["${ARGS[@]}", "--deepspeed_config"]),
                           st.lists(word, max_size=2)), max_size=10)),
    st.sampled_from(["#!/bin/bash", "set -ex", "# comment", "", "echo 'unterminated", "if [ -z $A ]; then",
                     "fi", "$(command)"]),
)


@settings(FUZZ, max_examples=200)
@given(data=st.data(), lines=st.lists(script_lines, max_size=10), env=st.lists(names, max_size=2))
def test_fuzzed_launch_script(workdir, data, lines, env):
    path = workdir / "train.sh"
    path.write_text("\n".join(lines) + "\n")
    COUNTS["launch script"] = COUNTS.get("launch script", 0) + 1
    env_args = [arg for name in env for arg in ("--env", f"{name}=2")]
    world = ["--world-size", str(data.draw(st.sampled_from([1, 2, 8])))]
    assert_clean("check", str(path), *env_args, *world)
    assert_clean("translate", str(path), "--to", data.draw(st.sampled_from(["deepspeed", "megatron"])), *env_args,
                 *world)
    assert_clean("plan", str(path), *env_args, *world)


# ------------------------------------------------------------------ plan flags

number_text = st.one_of(st.integers(-2, 2**70).map(str), st.sampled_from(
    ["1e400", "nan", "inf", "1.3e9", "0", "9" * 5000, "x", "", "64", "128", "4"]))
SHAPE = ["--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length", "--vocab-size",
         "--ffn-hidden-size", "--num-query-groups", "--params", "--micro-batch-size", "--world-size"]


@settings(FUZZ, max_examples=200)
@given(config=st.sampled_from([{"train_micro_batch_size_per_gpu": 1},
                               {"train_batch_size": 8, "zero_optimization": {"stage": 3}, "zeromega": {"tp": 2}},
                               {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2, "offload_optimizer": {
                                   "device": "cpu"}}, "zeromega": {"model": {"num_layers": 4}}}]),
       flags=st.lists(st.tuples(st.sampled_from(SHAPE), number_text), max_size=8),
       extra=st.lists(st.sampled_from(["--json", "--device", "cpu", "cuda", "--check"]), max_size=2))
def test_fuzzed_plan_flags(workdir, config, flags, extra):
    path = workdir / "plan.json"
    path.write_text(json.dumps(config))
    COUNTS["plan flags"] = COUNTS.get("plan flags", 0) + 1
    assert_clean("plan", str(path), *[word for pair in flags for word in pair], *extra)


def test_fuzz_counts_reported(capsys):
    """Runs last in this file: how many inputs the fuzzers above generated (visible with ``pytest -s``)."""
    with capsys.disabled():
        print(f"\nfuzzed inputs: {sum(COUNTS.values())} ({', '.join(f'{k} {v}' for k, v in COUNTS.items())})")


# ------------------------------------------------------------------ one test per defect of issue 18

DEFECTS = {
    # name: (file name, text, extra argv, what the one line must say)
    "dotted YAML key under a scalar section": ("a.yaml", "parallel: 3\nparallel.tp: 2\n", [], "dotted key"),
    "dotted YAML key alone": ("a.yaml", "parallel.tp: 2\n", [], "dotted key"),
    "zeromega-block section given a scalar": (
        "b.json", '{"train_batch_size": 8, "zeromega": {"parallel": 3, "tp": 2}}', [], "parallel=3"),
    "non-numeric model value feeding a ZeRO auto size": (
        "c.json", '{"train_batch_size": 8, "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}, '
                  '"zeromega": {"model": {"hidden_size": "abc"}}}', [], "model.hidden_size='abc'"),
    "huge model value feeding a ZeRO auto size": (
        "c.json", '{"train_batch_size": 8, "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": '
                  '"auto"}, "zeromega": {"model": {"hidden_size": 1e300}}}', [], "model.hidden_size"),
    "zeromega-block model given a scalar": (
        "c.json", '{"train_batch_size": 8, "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}, '
                  '"zeromega": {"model": 5}}', [], "reduce_bucket_size"),
    "zeromega-block optimizer given a scalar": (
        "c.json", '{"train_batch_size": 8, "scheduler": {"type": "WarmupCosineLR"}, "zeromega": {"optimizer": 5}}',
        [], "optimizer=5"),
    "scalar deepspeed_extra": ("e.json", '{"train_batch_size": 8, "zeromega": {"deepspeed_extra": 5}}', [],
                               "deepspeed_extra=5"),
    "nesting 2,000 deep (JSON)": ("f.json", '{"zeromega": ' + "[" * 2000 + "]" * 2000 + "}", [],
                                  f"deeper than {limits.MAX_DEPTH} levels"),
    "nesting 2,000 deep (YAML)": ("f.yaml", "a: " + "[" * 2000 + "]" * 2000 + "\n", [],
                                  f"deeper than {limits.MAX_DEPTH} levels"),
    "nesting 2,000 deep (heredoc)": ("f.sh", "cat <<EOT > ds.json\n" + "[" * 2000 + "]" * 2000 + "\nEOT\n"
                                     "python p.py --lr 0.1 --deepspeed_config ds.json\n", [],
                                     f"deeper than {limits.MAX_DEPTH} levels"),
    "1e400 in DeepSpeed JSON": ("g.json", '{"train_batch_size": 8, "gradient_clipping": 1e400}', [],
                                "1e400 is beyond the range of a float"),
    "1e400 in unified JSON": ("g.json", '{"optimizer": {"lr": 1e400}}', [], "1e400 is beyond the range"),
    "5,000-digit integer (JSON)": ("h.json", '{"train_batch_size": ' + "9" * 5000 + "}", [], "64-bit limit"),
    "5,000-digit integer (YAML)": ("h.yaml", "seed: " + "9" * 5000 + "\n", [], "64-bit limit"),
    "5,000-digit integer (flag)": ("h.args", "--lr 0.1 --seed " + "9" * 5000 + "\n", [], "--seed"),
    "--initial-loss-scale 1e400": ("i.args", "--lr 0.1 --initial-loss-scale 1e400\n", [], "--initial-loss-scale"),
    "YAML alias chain": ("k.yaml", alias_chain(24, 2), [], f"more than {limits.MAX_VALUES:,} values"),
    "recursive YAML alias": ("k.yaml", "a: &a [*a]\n", [], "deeper than"),
    "$((9**9**9)) in a launch script": ("l.sh", "X=$((9**9**9))\npython pretrain_gpt.py --lr 0.1 --num-layers $X\n",
                                        [], "--num-layers=-2123029214124047543"),  # bash's wrapped value
    "a 1 MB word in an argument file": ("m.args", "--lr 0.1 --save " + "a" * 1_000_000 + "\n", [],
                                        "limit of one command line"),
    "a 2 MB argument file": ("m.args", "--lr 0.1 --save " + "a" * 2_000_000 + "\n", [], "limit of a config file"),
    "a doubling variable": ("n.sh", "A=xx\n" + "A=$A$A\n" * 40 + "python p.py --lr 0.1 --save $A\n", [],
                            "expands to more than"),
    "100,000 continuation lines": ("o.args", "--lr 0.1 \\\n" * 80_000 + "\n", [], "limit of one command line"),
    "a long arithmetic expression": ("x.sh", "X=$((" + "1+" * 30_000 + "1))\npython p.py --lr 0.1 --seed $X\n", [],
                                     "--seed"),
    # silently accepted before
    "infinite lr (JSON Infinity)": ("p.json", '{"optimizer": {"type": "AdamW", "params": {"lr": Infinity}}}', [],
                                    "optimizer.params.lr=inf"),
    "infinite lr (YAML .inf)": ("p.yaml", "optimizer: {lr: .inf}\n", [], "optimizer.lr=inf"),
    "infinite lr (YAML 1e400 string)": ("p.yaml", "optimizer: {lr: 1e400}\n", [], "optimizer.lr"),
    "NaN eps (YAML)": ("p.yaml", "optimizer: {eps: .nan}\n", [], "optimizer.eps=nan"),
    "infinite weight decay (flag)": ("p.args", "--lr 0.1 --weight-decay inf\n", [], "--weight-decay"),
    "infinite lr (flag)": ("p.args", "--lr inf\n", [], "--lr"),
    "NaN timeout (flag)": ("p.args", "--lr 0.1 --distributed-timeout-minutes nan\n", [],
                           "--distributed-timeout-minutes"),
    "infinite timeout (zeromega block)": (
        "p.json", '{"train_batch_size": 8, "zeromega": {"distributed_timeout_minutes": Infinity}}', [],
        "distributed_timeout_minutes"),
    "duplicate YAML keys": ("q.yaml", "zero: {stage: 1}\nzero: {stage: 2}\n", [], "duplicate key 'zero'"),
    "duplicate nested YAML keys": ("q.yaml", "zero:\n  stage: 1\n  stage: 3\n", [], "duplicate key 'stage'"),
    "conflicting values in one zeromega block": (
        "r.json", '{"train_batch_size": 8, "zeromega": {"parallel": {"tp": 4}, "tp": 2}}', [], "parallel.tp"),
    "stage: true (DeepSpeed JSON)": ("s.json", '{"train_batch_size": 8, "zero_optimization": {"stage": true}}', [],
                                     "zero_optimization.stage=True"),
    "stage: true (YAML)": ("s.yaml", "zero: {stage: true}\n", [], "zero.stage=True"),
    "tp: true (YAML)": ("s.yaml", "parallel: {tp: true}\n", [], "parallel.tp=True"),
    "lr: true (YAML)": ("s.yaml", "optimizer: {lr: true}\n", [], "optimizer.lr=True"),
    "tp: true (zeromega block)": ("s.json", '{"train_batch_size": 8, "zeromega": {"tp": true}}', [], "zeromega.tp"),
    "empty JSON file": ("t.json", "", [], "is empty"),
    "empty YAML file": ("t.yaml", "  \n", [], "is empty"),
    "empty argument file": ("t.args", "\n", [], "is empty"),
    "comment-only Hjson file": ("t.json", "// nothing here\n# nor here\n", [], "holds no keys"),
    "field doc with a line break in the fix": ("u.args", "--lr 0.1 --distributed-timeout-minutes 0\n", [],
                                               "--distributed-timeout-minutes"),
    "world size beyond the rank limit": ("v.json", '{"train_micro_batch_size_per_gpu": 1}',
                                         ["--world-size", str(10**12)], "over the limit"),
}


@pytest.mark.parametrize("name", sorted(DEFECTS))
def test_each_defect_is_one_clean_line(workdir, name):
    filename, text, extra, expected = DEFECTS[name]
    path = workdir / filename
    path.write_text(text)
    argv = ["--world-size", "8"] if not extra else extra
    for command in (["check"], ["translate", "--to", "deepspeed"], ["plan", "--params", "1e6"]):
        code, err = assert_clean(command[0], str(path), *command[1:], *argv)
        assert code == 2 and expected in err, f"{command[0]}: {err!r}"


PLAN_DEFECTS = {
    "--params 1e400": (["--params", "1e400"], "'1e400' is not a finite number"),
    "--micro-batch-size beyond 64 bits": (["--params", "1", "--micro-batch-size", "9" * 30], "64-bit limit"),
    "shape flags break the layout rules": (
        ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "3", "--seq-length", "16",
         "--vocab-size", "100"], "model.num_attention_heads=3"),
    "shape flags out of range for the model section": (
        ["--num-layers", "3", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
         "--vocab-size", "100"], "model.num_layers=3"),
}


@pytest.mark.parametrize("name", sorted(PLAN_DEFECTS))
def test_each_plan_defect_is_one_clean_line(workdir, name):
    flags, expected = PLAN_DEFECTS[name]
    path = workdir / "plan_defect.json"
    path.write_text(json.dumps({"train_batch_size": 8, "zeromega": {"tp": 2, "pp": 2}}))
    code, err = assert_clean("plan", str(path), "--world-size", "4", *flags)
    assert code == 2 and expected in err, err


def test_bash_arithmetic_wraps_at_64_bits_like_bash():
    from zeromega.launch.shell_script import _arith

    # Values printed by bash 5 for the same expressions.
    assert _arith("9**9**9") == -2123029214124047543
    assert _arith("2**63") == _arith("9223372036854775807+1") == -9223372036854775808
    assert (_arith("-7/2"), _arith("-7%3"), _arith("7/-2")) == (-3, -1, -3)
    assert _arith("2**-1") is None and _arith("1/0") is None


def test_limits_leave_real_configs_alone(workdir):
    """Every example config still reads: the limits are far above what real configs hold."""
    examples = Path(__file__).resolve().parent.parent / "examples"
    paths = sorted(p for p in examples.rglob("*") if p.suffix in (".json", ".yaml", ".yml", ".sh", ".args"))
    assert paths
    for path in paths:
        code, err = assert_clean("check", str(path), "--world-size", "64")
        if code == 2 and "--world-size" in err:  # a layout for another world size: try the config's own
            code, err = assert_clean("check", str(path))
        assert "limit" not in err and "deeper than" not in err and "is empty" not in err, (path, err)


@settings(FUZZ, max_examples=200)
@given(text=st.text(alphabet=st.sampled_from(list(" \t\nab-=$#'\"\\\x0b\u3000")), max_size=20))
def test_fast_word_split_agrees_with_shlex(text):
    from zeromega.launch.shell_script import _split

    try:
        expected = shlex.split(text, comments=True)
    except ValueError:
        with pytest.raises(ValueError):
            _split(text)
        return
    assert _split(text) == expected
