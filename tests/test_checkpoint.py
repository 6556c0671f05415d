"""Checkpoints through the real ``examples/pretrain_gpt.py``: exact resume, atomic saves, verified loads,
resharding and export.

Exact resume: a run of 6 steps that saves after step 3, and a second run that
loads that checkpoint and trains steps 4-6, report the same losses bit for
bit (CPU, fp32, dropout on, so the RNG states must come back too).
Resharding and export compare against the original layout's curve with
dropout off (RNG streams belong to ranks) within a relative 1e-5, far below
the step-to-step change of the loss (>1e-2).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from ckpt_workers import pretrain, read_curve
from distributed import run_world
from zeromega.checkpoint import CheckpointError, files, reshard, resolve_load, tag_for

STEPS, HALF = 6, 3
SHAPE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64"]


def argv(corpus: str, *extra: str, dropout: bool = True) -> list[str]:
    args = ["--data-path", corpus, "--split", "1,0,0", *SHAPE, "--micro-batch-size", "2",
            "--global-batch-size", "8", "--lr", "3e-3", "--lr-warmup-iters", "2", "--train-iters", str(STEPS),
            "--no-progress", "--distributed-timeout-minutes", "2"]
    if not dropout:
        args += ["--hidden-dropout", "0", "--attention-dropout", "0"]
    return args + list(extra)


def run(world: int, args: list[str]) -> None:
    results = run_world(world, pretrain, args)
    errors = [r["error"] for r in results if r["error"]]
    assert not errors, errors[0]


def run_expecting_error(world: int, args: list[str], *fault) -> str:
    """The first error a rank reported; ``fault`` = (point, rank, complete saves before it) to inject one."""
    errors = [r["error"] for r in run_world(world, pretrain, args, *fault) if r["error"]]
    assert errors, "the run was expected to fail"
    return errors[0]


def full_then_resumed(tmp: Path, corpus: str, world: int, layout: list[str], dropout: bool = True,
                      resume_world: int | None = None, resume_layout: list[str] | None = None):
    """(curve of the 6-step run that saved after step 3, curve of the run resumed from that save)."""
    save = tmp / "ckpt"
    run(world, argv(corpus, *layout, "--save", str(save), "--save-interval", str(HALF),
                    "--metrics-out", str(tmp / "full.jsonl"), dropout=dropout))
    run(resume_world or world, argv(corpus, *(resume_layout or layout), "--load", str(save / tag_for(HALF)),
                                    "--metrics-out", str(tmp / "resumed.jsonl"), dropout=dropout))
    return read_curve(tmp / "full.jsonl"), read_curve(tmp / "resumed.jsonl")


# ---------------------------------------------------------------- exact resume

LAYOUTS = {
    "dp2-zero1": (2, ["--zero-stage", "1"]),
    "dp2-zero2": (2, ["--zero-stage", "2"]),
    "dp2-zero3": (2, ["--zero-stage", "3"]),
    "tp2-zero1": (2, ["--zero-stage", "1", "--tensor-model-parallel-size", "2"]),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_resume_reproduces_the_loss_curve_bit_for_bit(name, tmp_path, small_corpus):
    world, layout = LAYOUTS[name]
    full, resumed = full_then_resumed(tmp_path, small_corpus, world, layout)
    assert sorted(full) == list(range(1, STEPS + 1))
    assert sorted(resumed) == list(range(HALF + 1, STEPS + 1)), "the resumed run must start after the saved step"
    for step in resumed:
        assert resumed[step] == full[step], f"{name} step {step}: resumed {resumed[step]!r} vs {full[step]!r}"
    manifest = files.read_manifest(tmp_path / "ckpt" / tag_for(STEPS))
    assert manifest["step"] == STEPS and manifest["consumed_samples"] == STEPS * 8
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == tag_for(STEPS)  # saved again at the end


@pytest.mark.parametrize("how", ["--exit-interval", "--exit-signal-handler"])
def test_a_run_told_to_stop_saves_and_the_same_command_line_finishes_it(how, tmp_path, small_corpus):
    """Megatron's --exit-interval N (stop after a step divisible by N) and --exit-signal-handler (SIGTERM
    to one rank, e.g. a preemption notice: every rank stops after the same step): the run saves, exits
    cleanly, and the same command line without the stop finishes the uninterrupted curve bit for bit."""
    from ckpt_workers import pretrain_sigterm_at

    layout = ["--zero-stage", "1", "--train-iters", "4"]
    run(2, argv(small_corpus, *layout, "--metrics-out", str(tmp_path / "full.jsonl")))
    save = tmp_path / "ckpt"
    common = [*layout, "--save-interval", "1000", "--save", str(save), "--load", str(save), "--metrics-out", str(tmp_path / "stopped.jsonl")]
    if how == "--exit-interval":
        run(2, argv(small_corpus, *common, "--exit-interval", "2"))
    else:
        results = run_world(2, pretrain_sigterm_at, argv(small_corpus, *common, "--exit-signal-handler"), 1, 2)
        assert [r["error"] for r in results] == [None, None], results
    assert sorted(read_curve(tmp_path / "stopped.jsonl")) == [1, 2]
    assert (save / "latest").read_text().strip() == tag_for(2)
    run(2, argv(small_corpus, *common))
    assert read_curve(tmp_path / "stopped.jsonl") == read_curve(tmp_path / "full.jsonl")


# ---------------------------------------------------------------- atomic saves


@pytest.mark.parametrize("point,rank", [("after_write", 1), ("before_latest", 0)])
def test_save_that_dies_halfway_leaves_the_previous_checkpoint_latest(point, rank, tmp_path, small_corpus):
    # Checkpoints every 2 steps; the save after step 4 dies at `point` on `rank`.
    save = tmp_path / "ckpt"
    args = argv(small_corpus, "--zero-stage", "2", "--train-iters", "4", "--save", str(save), "--save-interval", "2",
                "--metrics-out", str(tmp_path / "m.jsonl"), dropout=False)
    error = run_expecting_error(2, args, point, rank, 1)
    assert "injected fault" in error or "Connection" in error or "closed" in error.lower() or "Timed out" in error, error
    assert (save / "latest").read_text().strip() == tag_for(2)
    ckpt = resolve_load(save)
    assert ckpt == save / tag_for(2)
    assert files.verify_files(ckpt, files.read_manifest(ckpt)) == []
    if point == "before_latest":  # renamed into place, but never named by 'latest'
        assert (save / tag_for(4) / files.MANIFEST).is_file()
    # The same command line resumes from step 2 and finishes.
    run(2, args[:-2] + ["--load", str(save), "--metrics-out", str(tmp_path / "m2.jsonl")])
    assert sorted(read_curve(tmp_path / "m2.jsonl")) == [3, 4]
    assert (save / "latest").read_text().strip() == tag_for(4)


def test_a_full_disk_during_a_save_names_the_path_the_bytes_and_the_intact_checkpoint(tmp_path, small_corpus):
    """ENOSPC while writing the second checkpoint (every rank): one CheckpointError naming the --save path, the
    bytes needed and free, and that the previous checkpoint is intact; 'latest' still names it, the partial
    save is gone. Before: torch's "unexpected pos" or the raw OSError from deep inside DeepSpeed's save."""
    from ckpt_workers import pretrain_on_a_full_disk

    save = tmp_path / "ckpt"
    args = argv(small_corpus, "--zero-stage", "1", "--train-iters", "4", "--save", str(save), "--save-interval", "2",
                dropout=False)
    errors = [r["error"] for r in run_world(2, pretrain_on_a_full_disk, args, 1) if r["error"]]
    assert errors, "the run was expected to fail"
    error = errors[0]
    assert error.startswith("CheckpointError: ") and "\n" not in error, error
    assert f"--save {save}: the disk filled up while rank " in error and f"checkpoint {tag_for(4)}" in error, error
    assert re.search(r"it needs about \d+ bytes, \d+ bytes were free", error), error
    assert f"the previous checkpoint {save / tag_for(2)} is intact and still 'latest'" in error, error
    assert "fix: free space on that drive" in error, error
    assert (save / "latest").read_text().strip() == tag_for(2)
    assert not (save / files.STAGING / tag_for(4)).exists() and not (save / tag_for(4)).exists()


def test_a_refusal_inside_a_rank_is_one_line_shown_once_by_the_launcher(tmp_path, monkeypatch, capsys):
    """A CheckpointError / ConfigError inside a rank: exit code 2 and no traceback. Under a launcher (torchrun's
    TORCHELASTIC_ERROR_FILE) the line goes to the error file only, and zeromega launch shows it once; alone,
    the rank prints it (before, every rank printed a full traceback, then the launcher the last line)."""
    from zeromega.launch import script_args
    from zeromega.launch.launcher import RankFailure, _recorded_error

    message = f"checkpoint {tmp_path} failed verification: a.pt: sha256 differs\n(corrupted); fix: load an older one"
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    with pytest.raises(SystemExit) as stop:
        script_args._refuse_in_rank("pretrain_gpt.py", message)
    assert stop.value.code == 2 and capsys.readouterr().err == ""
    line = f"pretrain_gpt.py: error: checkpoint {tmp_path} failed verification: a.pt: sha256 differs (corrupted); " \
           "fix: load an older one"
    assert _recorded_error(str(error_file)) == line
    assert RankFailure(1, 2, _recorded_error(str(error_file))).describe() == f"rank 1 failed (exit code 2): {line}"
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")
    with pytest.raises(SystemExit):
        script_args._refuse_in_rank("pretrain_gpt.py", message)
    assert capsys.readouterr().err == line + "\n"


def test_a_stopped_rank_is_reported_as_hung_not_as_killed():
    """torchrun's agent stops a job by SIGTERM, then SIGKILL after its grace; a SIGSTOPped (or hung) rank only
    dies of that SIGKILL. The launcher notes such ranks while the agent closes them and says "hung", keeps
    "killed by SIGKILL" for a kill from outside, and "crashed" for a fatal signal of the rank's own."""
    import signal
    import subprocess
    import sys
    import time
    import types

    from torch.distributed.elastic.multiprocessing.api import SubprocessContext

    from zeromega.launch.launcher import RankFailure, _note_unresponsive_ranks, _proc_state

    # A rank with a SIGTERM handler (a default-action SIGTERM would end even a stopped process): stopped,
    # the signal stays pending, and only the SIGKILL after the grace ends it.
    stopped = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                                "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\nprint('ready', flush=True)\n"
                                "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    polite = subprocess.Popen(["sleep", "60"])
    assert stopped.stdout.readline() == "ready\n"
    os.kill(stopped.pid, signal.SIGSTOP)
    for _ in range(600):  # on a loaded machine the stop takes effect once the process is scheduled
        if _proc_state(stopped.pid) == "T":
            break
        time.sleep(0.05)

    def handler(proc):
        return types.SimpleNamespace(proc=proc, close=lambda death_sig: proc.send_signal(death_sig))

    context = types.SimpleNamespace(subprocess_handlers={0: handler(stopped), 1: handler(polite)})
    with _note_unresponsive_ranks() as noted:
        SubprocessContext._close(context, signal.SIGTERM, timeout=1)
    assert stopped.returncode == -signal.SIGKILL and polite.returncode == -signal.SIGTERM
    assert noted == {stopped.pid: "stopped"}
    hung = RankFailure(1, -9, None, noted[stopped.pid]).describe()
    assert hung.startswith("rank 1 hung: it was stopped (SIGSTOP)") and "killed by SIGKILL after the grace" in hung
    assert RankFailure(1, -9).describe() == "rank 1 failed (killed by SIGKILL)"
    assert RankFailure(0, -11).describe() == "rank 0 failed (crashed: SIGSEGV)"


@pytest.mark.slow
def test_zeromega_launch_names_a_sigstopped_rank_hung(tmp_path, small_corpus):
    """End to end: rank 1 SIGSTOPs itself after step 2; rank 0's collective times out (6 s), torchrun
    SIGTERMs the job and SIGKILLs the frozen rank after its grace. The launcher's last line says rank 1 hung
    (it said "rank 1 failed (killed by SIGKILL)")."""
    import subprocess
    import sys

    worker = str(Path(__file__).resolve().parent / "ckpt_workers.py")
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 1}, "zeromega": {"distributed_timeout_minutes": 0.1}}))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "ZEROMEGA_CONFIG")}
    env.update(ZEROMEGA_TEST_STOP="1:2", ZEROMEGA_TEST_KILL_MARK=str(tmp_path / "mark"))
    args = argv(small_corpus)
    at = args.index("--distributed-timeout-minutes")  # the config's 6 s timeout instead
    args = args[:at] + args[at + 2:]
    proc = subprocess.run([sys.executable, "-m", "zeromega", "launch", "--nproc-per-node", "2", "--config", str(config),
                           worker, *args], env=env, capture_output=True, text=True, timeout=400)
    assert (tmp_path / "mark").read_text().startswith("1:2:"), proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("zeromega launch: rank 1 hung: it was stopped (SIGSTOP)"), last


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory, small_corpus) -> Path:
    """A 3-step dp2 ZeRO-1 run's --save directory, shared by the read-only tests below."""
    save = tmp_path_factory.mktemp("shared") / "ckpt"
    run(2, argv(small_corpus, "--zero-stage", "1", "--train-iters", "3", "--save-interval", "1000", "--save", str(save), dropout=False))
    return save


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage", ["flip a byte", "truncate"])
def test_damaged_file_is_named_and_never_loaded(damage, checkpoint_dir, tmp_path):
    save = _copy(checkpoint_dir, tmp_path / "ckpt")
    ckpt = resolve_load(save)
    victim = next(ckpt.glob("zero_pp_rank_1_*optim_states.pt"))
    data = bytearray(victim.read_bytes())
    if damage == "flip a byte":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    victim.write_bytes(bytes(data))
    problems = files.verify_files(ckpt, files.read_manifest(ckpt))
    assert len(problems) == 1 and str(victim) in problems[0]
    assert ("corrupted" if damage == "flip a byte" else "truncated") in problems[0]


def test_damaged_checkpoint_stops_the_run_with_the_file_named(checkpoint_dir, tmp_path, small_corpus):
    save = _copy(checkpoint_dir, tmp_path / "ckpt")
    victim = next(resolve_load(save).glob("mp_rank_00_model_states.pt"))
    victim.write_bytes(victim.read_bytes()[:-100])
    error = run_expecting_error(2, argv(small_corpus, "--zero-stage", "1", "--load", str(save), dropout=False))
    assert "CheckpointError" in error and str(victim) in error and "truncated" in error


def test_a_pickle_with_code_is_refused_even_with_a_matching_manifest(checkpoint_dir, tmp_path):
    save = _copy(checkpoint_dir, tmp_path / "ckpt")
    ckpt = resolve_load(save)
    victim = next(ckpt.glob("mp_rank_00_model_states.pt"))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    victim.write_bytes(pickle.dumps({"module": Payload()}))
    manifest = files.read_manifest(ckpt)  # an attacker who also rewrites the manifest
    record = files.hash_file(victim, ckpt)
    manifest["files"][record.path] = {"size": record.size, "sha256": record.sha256}
    (ckpt / files.MANIFEST).write_text(json.dumps(manifest))
    assert files.verify_files(ckpt, manifest) == []
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        files.safe_load(victim)
    assert not marker.exists()


def test_deepspeed_files_load_weights_only(checkpoint_dir):
    ckpt = resolve_load(checkpoint_dir)
    for path in ckpt.rglob("*.pt"):
        files.safe_load(path)  # raises if a file needs a class outside the allowlist


# ---------------------------------------------------------------- bad --load


def test_bad_load_paths_are_refused_with_a_fix(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_load(tmp_path / "missing")
    assert resolve_load(tmp_path / "missing", allow_empty=True) is None  # --load == --save, first attempt
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"no 'latest' file.*notes\.txt.*fix: "):
        resolve_load(foreign, allow_empty=True)
    partial = tmp_path / "partial" / tag_for(2)
    partial.mkdir(parents=True)
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half")
    with pytest.raises(CheckpointError, match="no manifest.json"):
        files.read_manifest(partial)
    (tmp_path / "dangling").mkdir()
    (tmp_path / "dangling" / "latest").write_text(tag_for(9))
    with pytest.raises(CheckpointError, match="iter_0000009.*not a directory"):
        resolve_load(tmp_path / "dangling")


def _manifest(**change) -> dict:
    good = {"format": files.FORMAT, "tag": tag_for(4), "step": 4, "consumed_samples": 32,
            "layout": {"world": 2, "tp": 1, "pp": 1, "cp": 1, "ep": 1, "dp": 2, "micro": 2, "accumulation": 2,
                       "global_batch": 8, "zero_stage": 1, "precision": "fp32"},
            "params": {}, "files": {"a.pt": {"size": 3, "sha256": "00"}}}
    return {**good, **change}


@pytest.mark.parametrize("damage,says", [
    (b"\xff\xfe{not text", r"damaged \(byte 0 is not UTF-8 text\)"),
    (b'{"format": "zeromega-checkpoint/1", "files": {', r"damaged \(not valid JSON"),
    (b"[1, 2]", r"damaged \(a JSON list, not an object\)"),
    (json.dumps(_manifest(files=None)).encode(), r"damaged \(no 'files' table\)"),
    (json.dumps(_manifest(files={"a.pt": {"size": "3"}})).encode(), r"entry for 'a\.pt' lacks"),
    (json.dumps(_manifest(step=None)).encode(), r"'step' is None, not a count"),
    (json.dumps({k: v for k, v in _manifest().items() if k != "consumed_samples"}).encode(), "consumed_samples"),
    (json.dumps(_manifest(layout={"tp": 1})).encode(), r"layout 'world' is None"),
])
def test_a_damaged_manifest_is_one_line_naming_the_file_and_the_fix(damage, says, tmp_path):
    """A manifest with bytes that are not text, broken JSON or a field of the wrong kind: one CheckpointError
    naming the file and what to do (it used to surface as UnicodeDecodeError / KeyError / TypeError)."""
    ckpt = tmp_path / tag_for(4)
    ckpt.mkdir()
    (ckpt / files.MANIFEST).write_bytes(json.dumps(_manifest()).encode())
    assert files.read_manifest(ckpt)["step"] == 4  # the undamaged one reads
    (ckpt / files.MANIFEST).write_bytes(damage)
    with pytest.raises(CheckpointError) as err:
        files.read_manifest(ckpt)
    line = str(err.value)
    assert "\n" not in line and str(ckpt / files.MANIFEST) in line and "; fix: " in line
    assert re.search(says, line), line


def test_a_damaged_latest_file_is_one_line_naming_it_and_the_fix(tmp_path):
    """'latest' holding bytes that are not text (UnicodeDecodeError before) or a NUL-bearing tag is refused,
    naming the file and the tag of a checkpoint that exists."""
    good = tmp_path / tag_for(4)
    good.mkdir()
    (good / files.MANIFEST).write_text(json.dumps(_manifest()))
    (tmp_path / "latest").write_bytes(b"\x89iter\xff\x00")
    with pytest.raises(CheckpointError, match=r"latest is damaged \(7 bytes, not a UTF-8 tag\).*fix: .*"
                                              r"echo iter_0000004 > "):
        resolve_load(tmp_path)
    (tmp_path / "latest").write_bytes(b"iter_0000004\x00")
    with pytest.raises(CheckpointError, match=r"names 'iter_0000004\\x00', which is not a directory"):
        resolve_load(tmp_path)
    (tmp_path / "latest").write_text(tag_for(4) + "\n")
    assert resolve_load(tmp_path) == good


def test_a_refusal_inside_torch_distributed_checkpoint_comes_out_as_itself(tmp_path):
    """torch.distributed.checkpoint wraps every rank's error in CheckpointException, a BaseException that
    torch's @record does not record (the launcher said "no exception recorded" for a refused malicious
    .metadata); the load unwraps it to the refusal itself."""
    from torch.distributed.checkpoint.api import CheckpointException

    from zeromega.checkpoint.megatron import _first_failure

    refusal = CheckpointError(f"{tmp_path}/.metadata: cannot be loaded safely (UnpicklingError: global "
                              "'builtins.exec' is not allowed in a checkpoint's metadata)", "load an older one")
    wrapped = CheckpointException("load", {1: (refusal, None), 0: (RuntimeError("peer gone\nmore"), None)})
    assert not isinstance(wrapped, Exception)
    assert _first_failure(wrapped, tmp_path) is refusal
    other = _first_failure(CheckpointException("load", {0: (KeyError("decoder.x"), None)}), tmp_path)
    assert "(rank 0): KeyError: 'decoder.x'" in str(other) and "fix: " in str(other)


def test_foreign_load_dir_fails_the_run_and_is_left_untouched(tmp_path, small_corpus):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    before = {p: p.stat().st_mtime_ns for p in foreign.rglob("*")}
    error = run_expecting_error(1, argv(small_corpus, "--load", str(foreign), "--save", str(foreign),
                                        "--save-interval", "1", dropout=False))
    assert "no zeromega checkpoint" in error and "notes.txt" in error
    assert {p: p.stat().st_mtime_ns for p in foreign.rglob("*")} == before


# ---------------------------------------------------------------- reshard


def test_unsupported_reshards_are_refused_naming_what_works():
    saved = {"tp": 1, "pp": 1, "cp": 1, "ep": 1, "dp": 2, "zero_stage": 2}
    assert not reshard.plan(saved, dict(saved)).universal
    assert reshard.plan(saved, dict(saved, dp=1, zero_stage=1)).universal
    assert reshard.plan(dict(saved, tp=2, dp=1), dict(saved, dp=1)).universal
    assert reshard.plan(saved, dict(saved, zero_stage=3, tp=2, dp=1)).universal
    zero3_tp2 = dict(saved, zero_stage=3, tp=2, dp=1)
    assert reshard.plan(zero3_tp2, dict(zero3_tp2, dp=2)).universal
    assert reshard.plan(zero3_tp2, dict(zero3_tp2, tp=1, dp=2)).universal  # tp slices merged (and checked)
    assert reshard.plan(zero3_tp2, dict(zero3_tp2, zero_stage=1)).universal
    zero0 = dict(saved, zero_stage=0)
    assert not reshard.plan(zero0, dict(zero0)).resharded
    dp_change = reshard.plan(zero0, dict(zero0, dp=1))  # native: every tp rank's file holds the whole state
    assert dp_change.resharded and not dp_change.universal
    for was, now, reason in [(saved, dict(saved, zero_stage=0), "ZeRO-0"),
                             (zero3_tp2, dict(zero3_tp2, zero_stage=0), "ZeRO-0"),
                             (zero0, dict(zero0, tp=2, dp=1), "ZeRO-0 at the same tp"),
                             (saved, dict(saved, pp=2, dp=1), "pipeline or expert")]:
        with pytest.raises(CheckpointError, match=reason) as err:
            reshard.plan(was, now)
        assert "supported: " in str(err.value) and "fix: " in str(err.value)


def test_a_tp_change_that_changes_the_padded_vocabulary_is_refused_before_loading(checkpoint_dir, tmp_path,
                                                                                  small_corpus):
    """A tp1 checkpoint (257 tokens padded to 384) resumed with Megatron-LM's flags at tp 2 (384 -> 512 rows, as
    Megatron-LM pads) is refused in one line naming both sizes and the flag value that keeps 384; before, every
    rank stopped inside DeepSpeed's universal load ("full param numel 24576 != ...")."""
    load = _copy(checkpoint_dir, tmp_path / "ckpt")
    tp2 = argv(small_corpus, "--zero-stage", "1", "--train-iters", "4", "--tensor-model-parallel-size", "2",
               "--load", str(load), dropout=False)
    error = run_expecting_error(2, tp2)
    assert "CheckpointError" in error and "padded to 384" in error and "to 512" in error, error
    assert "--make-vocab-size-divisible-by 192" in error and "numel" not in error, error
    with pytest.raises(CheckpointError, match=r"padded to 512 .*multiple 256 at tp 2.*to 384 .*multiple 128 at tp 1"):
        reshard.check_shape({"tp": 2}, {"tp": 1}, {"vocab_size": 257, "make_vocab_size_divisible_by": 256},
                            {"vocab_size": 257, "make_vocab_size_divisible_by": 128})
    reshard.check_shape({"tp": 2}, {"tp": 1}, {"vocab_size": 500, "make_vocab_size_divisible_by": 256},
                        {"vocab_size": 500, "make_vocab_size_divisible_by": 128})  # 512 rows on both sides


def test_zero3_universal_states_must_hold_the_whole_parameter(tmp_path):
    """A ZeRO-3 source's per-parameter universal files are checked against the manifest's tp split:
    DeepSpeed's merged tp slices pass (and get the step), a lone tp slice or a flat tensor at tp > 1 is refused."""
    split, step = {"shape": [3, 4], "partition_dim": 1}, torch.tensor(3.0)
    whole = torch.arange(24.0).reshape(3, 8)
    for state in ("fp32", "exp_avg", "exp_avg_sq"):
        torch.save({"param": whole, "cat_dim": 1}, tmp_path / f"{state}.pt")
    reshard._zero3_per_parameter_states(tmp_path, "w", split, 2, step)
    assert torch.equal(files.safe_load(tmp_path / "step.pt"), step)
    assert torch.equal(files.safe_load(tmp_path / "fp32.pt")["param"], whole)
    for bad in ({"param": whole[:, :4], "cat_dim": 1}, {"param": whole.reshape(6, 4), "cat_dim": 0}, whole.flatten()):
        torch.save(bad, tmp_path / "exp_avg.pt")
        with pytest.raises(CheckpointError, match=r"w \(exp_avg\).*whole parameter \[3, 8\]"):
            reshard._zero3_per_parameter_states(tmp_path, "w", split, 2, step)
    # tp 1: DeepSpeed's flat tensors are shaped and split from the manifest
    for state in ("fp32", "exp_avg", "exp_avg_sq"):
        torch.save(whole[:, :4].flatten(), tmp_path / f"{state}.pt")
    reshard._zero3_per_parameter_states(tmp_path, "w", split, 1, step)
    shaped = files.safe_load(tmp_path / "exp_avg.pt")
    assert torch.equal(shaped["param"], whole[:, :4]) and shaped["cat_dim"] == 1


# Megatron-LM pads the vocabulary to --make-vocab-size-divisible-by x tp: at tp 2 the flag 64 keeps tp 1's
# 384 rows (257 tokens), the same model on both sides of a tp change (test_a_tp_change_that_changes_the_padded_...)
TP2 = ["--tensor-model-parallel-size", "2", "--make-vocab-size-divisible-by", "64"]
RESHARDS = {
    "dp2-zero2 -> dp1-zero1": (2, ["--zero-stage", "2"], 1, ["--zero-stage", "1"]),
    "tp2-zero1 -> tp1-dp2-zero1": (2, ["--zero-stage", "1", *TP2], 2, ["--zero-stage", "1"]),
    # across ZeRO families, with a tp change on each side (ZeRO-3's tp slicing comes from zeromega's hints)
    "dp2-zero1 -> tp2-zero3": (2, ["--zero-stage", "1"], 2, ["--zero-stage", "3", *TP2]),
    "dp2-zero3 -> tp2-zero1": (2, ["--zero-stage", "3"], 2, ["--zero-stage", "1", *TP2]),
    # ZeRO-3's tp slices merged into whole tensors (DeepSpeed's converter, checked against Megatron's partition_dim)
    "tp2-zero3 -> tp1-zero1": (2, ["--zero-stage", "3", *TP2], 1, ["--zero-stage", "1"]),
    # ZeRO-0 keeps the whole optimizer state in each tp rank's file: a dp change loads natively
    "dp2-zero0 -> dp1-zero0": (2, ["--zero-stage", "0"], 1, ["--zero-stage", "0"]),
}


@pytest.mark.parametrize("name", RESHARDS)
def test_reshard_continues_the_original_curve(name, tmp_path, small_corpus):
    world, layout, new_world, new_layout = RESHARDS[name]
    full, resumed = full_then_resumed(tmp_path, small_corpus, world, layout, dropout=False,
                                      resume_world=new_world, resume_layout=new_layout)
    assert sorted(resumed) == list(range(HALF + 1, STEPS + 1))
    for step in resumed:
        assert abs(resumed[step] - full[step]) <= 1e-5 * abs(full[step]), f"{name} step {step}"
    if name.startswith("tp2"):
        export_matches_training(tmp_path, small_corpus, full)


# ---------------------------------------------------------------- export


def _loss_of_exported(path: str, corpus: str, step: int) -> float:
    """A fresh 1-process GPTModel with the exported weights: loss on the global batch of ``step``."""
    from zeromega.checkpoint.export import load_safetensors
    from zeromega.integrations.megatron import data, model, parallel
    from zeromega.config.schema import RunConfig
    from zeromega.run.loop import gpt_loss

    cfg = RunConfig.model_validate({"batch": {"micro": 8, "global": 8}})
    parallel.initialize(cfg, seed=7)  # a different seed: every weight must come from the file
    shape = model.GPTShape(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64, vocab_size=257,
                           hidden_dropout=0.0, attention_dropout=0.0)
    gpt = model.build_gpt(shape, cfg)
    missing, unexpected = gpt.load_state_dict(load_safetensors(path), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    train_ds, _, _ = data.build_gpt_datasets(corpus, 64, 1234, (STEPS * 8, 0, 0), split="1,0,0")
    batch = next(data.sample_batches(train_ds, 8, start_sample=(step - 1) * 8))
    gpt.eval()
    with torch.no_grad():
        loss = float(gpt_loss(gpt, batch))
    parallel.shutdown()
    return loss


def export_matches_training(tmp: Path, corpus: str, full: dict[int, float]) -> None:
    """`zeromega export` of the tp2 checkpoint after step 3 scores step 4's batch as training did."""
    from zeromega.launch import cli
    from zeromega.launch.export import _add_export

    parser = cli._Parser(prog="zeromega")
    _add_export(parser.add_subparsers(dest="command", required=True))
    out = tmp / "model.safetensors"
    args = parser.parse_args(["export", str(tmp / "ckpt" / tag_for(HALF)), "--to", "torch", str(out)])
    assert args.handler(args) == 0
    loss = run_world(1, _loss_of_exported, str(out), corpus, HALF + 1)[0]
    assert abs(loss - full[HALF + 1]) <= 1e-5 * full[HALF + 1], (loss, full[HALF + 1])
    hf = parser.parse_args(["export", str(tmp / "ckpt"), "--to", "hf", str(tmp / "hf")])
    assert hf.handler(hf) == 0
    config = json.loads((tmp / "hf" / "config.json").read_text())
    assert config["n_layer"] == 2 and config["n_head"] == 4 and config["vocab_size"] == 384


# ---------------------------------------------------------------- weights-only loads (--no-load-optim, --finetune)


@pytest.fixture(scope="module")
def zero1_run(tmp_path_factory, small_corpus):
    """(--save directory, curve) of a 6-step ZeRO-1 dp2 run that saved after step 3, dropout off."""
    tmp = tmp_path_factory.mktemp("zero1")
    run(2, argv(small_corpus, "--zero-stage", "1", "--save", str(tmp / "ckpt"), "--save-interval", str(HALF),
                "--metrics-out", str(tmp / "full.jsonl"), dropout=False))
    return tmp / "ckpt", read_curve(tmp / "full.jsonl")


WEIGHTS_ONLY = {  # into Megatron-Core's engine, into ZeRO-3's partitions, into tp shards
    "pp2": (2, ["--pipeline-model-parallel-size", "2", "--zero-stage", "1"]),
    "dp2-zero3": (2, ["--zero-stage", "3"]),
    "tp2-zero2": (2, [*TP2, "--zero-stage", "2"]),
}


def test_no_load_optim_moves_the_weights_to_any_layout_and_restarts_adam(zero1_run, tmp_path, small_corpus):
    """Step 4's loss is the saved weights on step 4's data: the uninterrupted run's, whichever engine
    and layout loads them; step 5 differs by far more than reordering could, since Adam starts over."""
    save, full = zero1_run
    for name, (world, layout) in WEIGHTS_ONLY.items():
        metrics = tmp_path / f"{name}.jsonl"
        run(world, argv(small_corpus, *layout, "--load", str(save / tag_for(HALF)), "--no-load-optim",
                        "--metrics-out", str(metrics), dropout=False))
        got = read_curve(metrics)
        assert sorted(got) == list(range(HALF + 1, STEPS + 1)), (name, got)
        assert abs(got[HALF + 1] - full[HALF + 1]) <= 1e-5 * full[HALF + 1], (name, got, full)
        assert abs(got[HALF + 2] - full[HALF + 2]) > 1e-3 * full[HALF + 2], (name, got, full)


def test_finetune_starts_at_step_1_from_the_saved_weights_in_any_layout(zero1_run, tmp_path, small_corpus):
    save, full = zero1_run
    curves = {}
    for name in ("pp2", "dp2-zero3"):
        world, layout = WEIGHTS_ONLY[name]
        run(world, argv(small_corpus, *layout, "--load", str(save), "--finetune",
                        "--metrics-out", str(tmp_path / f"{name}.jsonl"), dropout=False))
        curves[name] = read_curve(tmp_path / f"{name}.jsonl")
    first, second = curves.values()
    assert sorted(first) == list(range(1, STEPS + 1))  # step 0, fresh scheduler and data position
    assert first[1] < full[1] - 0.1, (first, full)  # a trained model on the first batch, not a fresh one
    assert all(abs(first[s] - second[s]) <= 1e-5 * first[s] for s in first), curves


def test_weights_only_loads_refuse_what_cannot_work(zero1_run, tmp_path, small_corpus, capfd):
    save, _ = zero1_run
    other_shape = argv(small_corpus, "--zero-stage", "1", "--hidden-size", "128", "--load", str(save), "--finetune")
    error = run_expecting_error(1, other_shape)
    assert "CheckpointError" in error and "embedding.word_embeddings.weight is [384, 64]" in error, error
    assert "this model's is [384, 128]" in error and "fix: " in error, error
    capfd.readouterr()
    same = tmp_path / "ckpt"
    assert run_expecting_error(1, argv(small_corpus, "--load", str(same), "--save-interval", "1000", "--save", str(same), "--finetune")) \
        == "SystemExit: 2"
    assert "every restart would fine-tune again from step 0" in capfd.readouterr().err


def test_no_load_rng_resumes_everything_but_the_random_streams(tmp_path, small_corpus):
    """Dropout on: the same resume is bit for bit with the RNGs (test above) and leaves the curve without."""
    full, resumed = full_then_resumed(tmp_path, small_corpus, 2, ["--zero-stage", "1", "--no-load-rng"])
    assert sorted(resumed) == list(range(HALF + 1, STEPS + 1))
    assert resumed[HALF + 1] != full[HALF + 1], (resumed, full)
    assert abs(resumed[HALF + 1] - full[HALF + 1]) < 0.05 * full[HALF + 1], (resumed, full)  # same weights
