"""Every config reader, fuzzed through the command line (issue 18): a result or one clean line, quickly.

tests/fuzz_inputs.py generates the inputs from a fixed seed (input ``i`` of
a category is ``GENERATORS[kind](Draw(kind, i))``, the same on every run):
DeepSpeed JSON/Hjson, ``zeromega`` blocks, unified YAML/JSON (dotted keys,
aliases, merge keys, duplicates, YAML's own number spellings), Megatron
argument files, bash launch scripts (read statically, never run) and
``plan`` flags. Two inputs in five are tame (plausible keys and values
only), so the writers and the planner see accepted configs too; the others
get any value at a rate of 3 to 30% per key. Each input goes through
``zeromega check`` in process; the inputs it accepts also through
``translate`` (to a dialect the seed picks) and ``plan``. A refused input is
refused by ``_read_input`` or the layout, which translate and plan share
with check, so only every ``REREAD``-th refused input goes through them
again (and must be refused by them too). Every call must end with exit code
0 or 2, no traceback, exactly one ``error: ...; fix: ...`` line on stderr
for exit 2, within ``TIME_BOUND`` seconds, with the process's data segment
bounded (``MEMORY_BOUND`` over what it held before).

The parser is built once per module (``build_parser`` reads three packages'
metadata: two thirds of a call's time, and nothing a fuzzed input can reach).
Run with ``pytest -s tests/test_fuzz.py`` to see the number of inputs per
category; each category asserts its own minimum of distinct inputs. A failure
names the category and index, so ``GENERATORS[kind](Draw(kind, index))``
gives the input back. Below the fuzzers, one test per defect the issue
lists and one per defect these fuzzers found, each of which failed before
its fix.
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import shlex
import signal
import tempfile
import time
import traceback
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_inputs import GENERATORS, Draw, Input, alias_chain
from zeromega.launch import cli, limits

TIME_BOUND = 5.0
"""CPU seconds one CLI call may take (the ones here take milliseconds; the unbounded inputs took minutes). CPU,
not wall time: on a loaded CI machine a call that needs 20 ms can wait seconds for a core."""
HANG_BOUND = 30
"""Seconds after which a call is stopped and reported as a hang (so one bad input cannot stall CI)."""
MEMORY_BOUND = 1 << 30
"""Bytes of data segment a category may add (RLIMIT_DATA): beyond it an allocation fails, reported."""
REREAD = 4
"""Every REREAD-th input check refuses also goes through translate and plan."""

MINIMUM = {"DeepSpeed JSON/Hjson": 600, "zeromega block": 450, "unified YAML/JSON": 650,
           "Megatron argument file": 550, "launch script": 500, "plan flags": 500}
"""Distinct inputs each category generates; the test fails when a category runs fewer."""
COUNTS: dict[str, dict[str, int]] = {}
CALLS = [0]

FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=list(HealthCheck))
TARGETS = ["deepspeed", "megatron", "megatron-core", "zeromega", "megatron-deepspeed"]
WORLDS = ["1", "2", "4", "8", "16", "3", "64", "6"]


@pytest.fixture(scope="module")
def workdir():
    """A scratch folder, after one call of each command (the time bound is for reading an input, not for
    importing Megatron-Core or the ZeRO planner the first time), with the parser built once."""
    parser = cli.build_parser()
    original = cli.build_parser
    cli.build_parser = lambda: parser
    try:
        with tempfile.TemporaryDirectory(prefix="zeromega-fuzz-") as path:
            warm = Path(path) / "warm.json"
            warm.write_text('{"train_micro_batch_size_per_gpu": 1}')
            search = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
                      "--vocab-size", "128", "--gpus", "8", "--gpu", "h100", "--global-batch-size", "8"]  # the search
            for argv in (["translate", "--to", "megatron-core"], ["translate", "--to", "deepspeed"],
                         ["plan", "--params", "1e6"], ["plan", *search], ["check"]):
                run_cli(argv[0], str(warm), *argv[1:], "--world-size", "1")
            yield Path(path)
    finally:
        cli.build_parser = original


class Hang(BaseException):
    """Raised by the alarm inside a call that runs past HANG_BOUND (a BaseException: no reader catches it)."""


def _alarm(signum, frame):
    raise Hang()


def run_cli(*argv: str) -> tuple[int, str, str, float]:
    """(exit code, stdout, stderr, CPU seconds) of one in-process call."""
    out, err = io.StringIO(), io.StringIO()
    start = time.process_time()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue(), time.process_time() - start


def assert_clean(*argv: str) -> tuple[int, str]:
    """Exit 0 or 2, no traceback, one stderr line with exit 2, within TIME_BOUND; (code, stderr)."""
    code, out, err, elapsed = run_cli(*argv)
    CALLS[0] += 1
    shown = f"{argv[:2]} -> {code}: {err[-2000:]!r}"
    assert code in (0, 2), shown
    assert "Traceback" not in out + err, shown
    if code == 2:
        lines = err.rstrip("\n").split("\n")
        assert len(lines) == 1 and "error: " in lines[0] and "; fix: " in lines[0], shown
    assert elapsed < TIME_BOUND, f"{shown} took {elapsed:.1f} s of CPU"
    return code, err


def _commands(kind: str, path: Path, inp: Input, d: Draw) -> None:
    """check, and for an accepted input (or every REREAD-th refused one) translate and plan."""
    given_ = [*(["--from", inp.dialect] if inp.dialect else []), *inp.argv]
    if kind == "plan flags":
        code, _ = assert_clean("plan", str(path), *given_)
        COUNTS[kind]["refused"] += code == 2
        return
    world = ["--world-size", d.pick(WORLDS)]
    code, err = assert_clean("check", str(path), *given_, *world)
    reread = COUNTS[kind]["refused"] % REREAD == 0 if code == 2 else True
    COUNTS[kind]["refused"] += code == 2
    if not reread:
        return
    target = d.pick(TARGETS)
    out = ["--deepspeed-out", str(path.with_suffix(".out.json"))] if target == "megatron-deepspeed" else []
    code_t, err_t = assert_clean("translate", str(path), "--to", target, *out, *given_, *world)
    code_p, err_p = assert_clean("plan", str(path), *given_, *world, *d.pick([["--params", "1e6"], []]))
    if code == 2:  # the same refusal: the three read IN the same way
        assert code_t == code_p == 2, f"check refused ({err!r}) but translate gave {code_t}, plan {code_p}"
    path.with_suffix(".out.json").unlink(missing_ok=True)


def _data_limit():
    """The data-segment limit for one category: what the process holds now plus MEMORY_BOUND."""
    with open("/proc/self/status") as status:
        held = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmData:"))
    return held + MEMORY_BOUND


@pytest.mark.parametrize("kind", list(GENERATORS))
def test_fuzzed_inputs(workdir, kind):
    """MINIMUM[kind] distinct generated inputs, each through the commands; every failure listed with the
    index that regenerates it."""
    COUNTS[kind] = {"generated": 0, "distinct": 0, "refused": 0, "calls": 0}
    slowest = 0.0
    calls_before, wall, cpu = CALLS[0], time.perf_counter(), time.process_time()
    seen: set = set()
    failures: dict[str, list[str]] = {}  # cause -> the inputs that showed it
    path = workdir / "input"
    old_limit = resource.getrlimit(resource.RLIMIT_DATA)
    old_handler = signal.signal(signal.SIGALRM, _alarm)
    resource.setrlimit(resource.RLIMIT_DATA, (_data_limit(), old_limit[1]))
    try:
        index = 0
        while len(seen) < MINIMUM[kind] and index < 3 * MINIMUM[kind]:
            d = Draw(kind, index)
            inp = GENERATORS[kind](d)
            index += 1
            if inp.key() in seen:
                continue
            seen.add(inp.key())
            path = path.with_suffix(inp.suffix)
            path.write_text(inp.text, encoding="utf-8")
            signal.setitimer(signal.ITIMER_REAL, HANG_BOUND)
            start = time.process_time()
            try:
                _commands(kind, path, inp, d)
                slowest = max(slowest, time.process_time() - start)
            except (AssertionError, Exception, Hang) as err:  # noqa: B014 (the three kinds, said plainly)
                if isinstance(err, (AssertionError, Hang)):
                    what = cause = "hang" if isinstance(err, Hang) else str(err)[:600]
                else:
                    frame = traceback.extract_tb(err.__traceback__)[-1]
                    cause = f"{type(err).__name__} at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
                    what = f"{''.join(traceback.format_exception_only(err)).strip()[:400]} ({cause})"
                failures.setdefault(cause[:80], []).append(
                    f"{kind} #{index - 1} (argv {inp.argv}, {len(inp.text)} chars {inp.text[:300]!r}): {what}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        COUNTS[kind].update(generated=index, distinct=len(seen), slowest_ms=round(slowest * 1000))
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, old_limit)
        signal.signal(signal.SIGALRM, old_handler)
    COUNTS[kind].update(calls=CALLS[0] - calls_before, wall_s=round(time.perf_counter() - wall, 1),
                        cpu_s=round(time.process_time() - cpu, 1))
    assert not failures, f"{sum(map(len, failures.values()))} of {len(seen)} inputs failed, {len(failures)} " \
        "causes; the first input of each:\n" + "\n".join(f"[{len(v)}x] {v[0]}" for v in list(failures.values())[:15])
    assert len(seen) >= MINIMUM[kind], f"only {len(seen)} distinct inputs of {index} generated"


def test_fuzz_counts_reported(capsys):
    """Runs after the fuzzers: how many inputs they generated (visible with ``pytest -s``), and no fewer
    than MINIMUM (3,000 or more in all)."""
    assert sum(MINIMUM.values()) >= 3000
    total = sum(c["distinct"] for c in COUNTS.values())
    with capsys.disabled():
        print(f"\nfuzzed inputs: {total} distinct, {sum(c['calls'] for c in COUNTS.values())} CLI calls")
        for k, c in COUNTS.items():
            print(f"  {k}: {c['distinct']} distinct of {c['generated']} generated, {c['refused']} refused, "
                  f"{c['calls']} calls, {c['wall_s']} s ({c['cpu_s']} s CPU), slowest input {c['slowest_ms']} ms CPU")
    assert total >= sum(MINIMUM[k] for k in COUNTS)
    assert all(COUNTS[k]["distinct"] >= MINIMUM[k] for k in COUNTS)


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


# ------------------------------------------------------------------ what the seeded fuzzers found

OK = (0, None)
FOUND = {
    # name: (file name, text, other files, {command: (exit code, what the output must say)}); every one failed
    # before its fix (a traceback, two lines, or 10 s); "translate" is to deepspeed
    "Hjson /* comment never closed": ("a.json", '{"train_batch_size": 8}\n/* unterminated', {},
                                      dict.fromkeys(("check", "translate", "plan"), (2, "ends inside a /* comment"))),
    "Hjson ''' string never closed": ("a.json", '{"train_batch_size": 8, "a": \'\'\'open', {},
                                      dict.fromkeys(("check", "translate", "plan"), (2, "or a ''' string"))),
    "aio.thread_count (not a DeepSpeed 0.19 key) given a mapping": (
        "b.json", '{"train_micro_batch_size_per_gpu": 1, "aio": {"thread_count": {}}}', {},
        dict.fromkeys(("check", "translate", "plan"), OK)),
    "a YAML reader error whose message spans lines": (
        "c.yaml", "seed: 1\x00\n", {}, dict.fromkeys(("check", "translate", "plan"), (2, "special characters are "
                                                                                        "not allowed in"))),
    "a dotted YAML key holding a line break": ('d.yaml', '"model.a\\nb": 1\n', {},
                                              dict.fromkeys(("check", "translate", "plan"), (2, "model.a\\nb"))),
    "YAML !!int on a word": ("e.yaml", "seed: !!int abc\n", {},
                             dict.fromkeys(("check", "translate", "plan"), (2, "int 'abc' at line 1 cannot be read"))),
    "YAML !!bool on a word": ("e.yaml", "zero: {stage: !!bool maybe}\n", {},
                              dict.fromkeys(("check", "translate", "plan"), (2, "bool 'maybe' at line 1"))),
    "YAML !!timestamp on a word": ("e.yaml", "data: {path: !!timestamp x}\n", {},
                                   dict.fromkeys(("check", "translate", "plan"), (2, "timestamp 'x' at line 1"))),
    "YAML base-60 integer with a 5,000-digit part": (
        "f.yaml", "seed: " + "9" * 5000 + ":30\n", {}, dict.fromkeys(("check", "translate", "plan"), (2, "64-bit"))),
    "YAML base-60 integer of 100,000 parts (quadratic: 30 s)": (
        "f.yaml", "seed: 1" + ":30" * 100_000 + "\n", {}, dict.fromkeys(("check", "translate", "plan"), (2, "64-bit"))),
    "return outside a function": ("g.sh", "return\npython pretrain_gpt.py --lr 0.1 --num-layers 2\n", {},
                                  dict.fromkeys(("check", "translate", "plan"), OK)),
    "return in a sourced file": (
        "h.sh", "source ./lib.sh\npython pretrain_gpt.py --lr 0.1 --num-layers $L\n",
        {"lib.sh": "L=2\nreturn\nL=3\n"}, {"check": OK, "translate --to megatron": (0, "--num-layers 2"), "plan": OK}),
    "an unclosed ' inside ${X:=...}": ("i.sh", "python pretrain_gpt.py --lr 0.1 --seed ${A:='x}\n", {},
                                       dict.fromkeys(("check", "translate", "plan"), (2, "quote is not closed"))),
    "an argument file holding only a comment (all defaults)": (
        "k.args", "# nothing but a comment\n", {},
        dict.fromkeys(("check", "translate", "plan"), (2, "states no Megatron-LM arguments"))),
    "a launch script that starts no training command (all defaults)": (
        "k.sh", "echo hi\n", {}, dict.fromkeys(("check", "translate", "plan"), (2, "states no Megatron-LM arguments"))),
    "a YAML config read with --from megatron (all defaults)": (
        "k.yaml", "zero: {stage: 2}\nbatch: {micro: 1}\n", {},
        dict.fromkeys(("check --from megatron", "translate --to deepspeed --from megatron",
                       "plan --params 1e6 --from megatron"), (2, "for another dialect pass --from"))),
    "--min-loss-scale 0.0001 written as DeepSpeed JSON": (
        "j.args", "--lr 0.1 --min-loss-scale 0.0001\n", {},
        {"check": OK, "translate": (2, "fp16.min_loss_scale=0.0001: DeepSpeed 0.19 refuses it"), "plan": OK}),
}


@pytest.mark.parametrize("name", sorted(FOUND))
def test_each_fuzzer_finding_is_fixed(workdir, name):
    filename, text, others, expected = FOUND[name]
    folder = workdir / name.replace(" ", "_").replace("/", "_")[:40]
    folder.mkdir(exist_ok=True)
    for other, content in others.items():
        (folder / other).write_text(content)
    path = folder / filename
    path.write_text(text)
    for command, (code, message) in expected.items():
        argv = {"translate": ["translate", "--to", "deepspeed"], "plan": ["plan", "--params", "1e6"]}.get(
            command, command.split())
        got, err = assert_clean(argv[0], str(path), *argv[1:], "--world-size", "1")
        out = run_cli(argv[0], str(path), *argv[1:], "--world-size", "1")[1] if message and got == 0 else ""
        assert got == code and (message is None or message in err + out), f"{command}: {got} {err!r} {out[:300]!r}"


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
