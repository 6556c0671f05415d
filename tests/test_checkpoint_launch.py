"""A rank dies mid-run under ``zeromega launch --max-restarts 1``: the job restarts, resumes from the
latest checkpoint and ends with the loss curve of a run that never failed.

The killed rank and step are drawn at random (the seed is in the failure
message, so a failing draw can be replayed); the kill is a SIGKILL, which
no Python handler can soften. Both engines: DeepSpeed's (dp2, ZeRO-2) and
Megatron-Core's (pp2, dist checkpointing). The test also bounds the whole job's time:
a rank left hanging would show up as a timeout here.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckpt_workers import read_curve

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(Path(__file__).resolve().parent / "ckpt_workers.py")
SCRIPT = str(ROOT / "examples" / "pretrain_gpt.py")
STEPS = 6
JOB_DEADLINE_S = 280
# The launcher itself must set TORCH_DISABLE_SHARE_RDZV_TCP_STORE for restarts (launch/launcher.py):
# the test removes it from the environment so it proves that.


def launch(script: str, args: list[str], env: dict | None = None, launcher_args: tuple = ("--max-restarts", "1"),
           ) -> tuple[subprocess.CompletedProcess, float]:
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("OMP_NUM_THREADS", "ZEROMEGA_CONFIG", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE")}
    full_env.update(env or {})
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "zeromega", "launch", "--nproc-per-node", "2", *launcher_args,
                           script, *args], env=full_env, capture_output=True, text=True, timeout=JOB_DEADLINE_S)
    return proc, time.monotonic() - start


LAYOUTS = {
    "dp2-zero2": ["--zero-stage", "2"],
    # One layer per stage: the layout whose resume Megatron-Core 0.16.1's misplaced optimizer offsets broke.
    "pp2-megatron": ["--zero-stage", "1", "--pipeline-model-parallel-size", "2"],
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_killed_rank_restarts_and_resumes_to_the_same_curve(name, tmp_path, small_corpus):
    seed = random.randrange(10**6)
    draw = random.Random(seed)
    rank, step = draw.randrange(2), draw.randrange(1, STEPS)
    common = ["--data-path", small_corpus, "--split", "1,0,0", "--num-layers", "2", "--hidden-size", "64",
              "--num-attention-heads", "4", "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "8",
              "--train-iters", str(STEPS), "--lr", "3e-3", "--no-progress", *LAYOUTS[name],
              "--distributed-timeout-minutes", "2", "--save-interval", "2"]
    clean, _ = launch(SCRIPT, common + ["--save", str(tmp_path / "a"), "--load", str(tmp_path / "a"),
                                        "--metrics-out", str(tmp_path / "clean.jsonl")])
    assert clean.returncode == 0, clean.stderr[-2000:]
    mark = tmp_path / "killed"
    faulty, seconds = launch(WORKER, common + ["--save", str(tmp_path / "b"), "--load", str(tmp_path / "b"),
                                               "--metrics-out", str(tmp_path / "faulty.jsonl")],
                             env={"ZEROMEGA_TEST_KILL": f"{rank}:{step}", "ZEROMEGA_TEST_KILL_MARK": str(mark)})
    where = f"({name}, seed {seed}: rank {rank} killed after step {step}; job took {seconds:.0f} s)"
    assert faulty.returncode == 0, f"{where}\n{faulty.stderr[-3000:]}"
    # The worker marks the kill itself: torchrun's "exitcode: -9" line names whichever failed
    # rank it polls first, which under load can be the survivor whose collective broke.
    assert mark.read_text().startswith(f"{rank}:{step}:"), f"{where}: no rank was killed"
    assert "exitcode: " in faulty.stderr, f"{where}: the launcher saw no failed rank"
    if step >= 2:  # a checkpoint existed when the rank died (one every 2 steps)
        assert f"resumed at step {step - step % 2}" in faulty.stdout, where
    want, got = read_curve(tmp_path / "clean.jsonl"), read_curve(tmp_path / "faulty.jsonl")
    assert sorted(got) == list(range(1, STEPS + 1)), where
    assert got == want, f"{where}: {got} vs {want}"


def test_a_hung_rank_ends_the_job_and_is_named(tmp_path, small_corpus):
    """Rank 1 stops answering after step 2 (it sleeps; the others wait in step 3's collectives). The
    timeout comes from the config file's zeromega block; the job must end soon after it, and the
    launcher's line must name the rank that hung, not only the rank whose collective gave up."""
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 1}, "zeromega": {"distributed_timeout_minutes": 0.1}}))
    args = ["--data-path", small_corpus, "--split", "1,0,0", "--num-layers", "2", "--hidden-size", "64",
            "--num-attention-heads", "4", "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "8",
            "--train-iters", str(STEPS), "--lr", "3e-3", "--no-progress"]
    mark = tmp_path / "hung"
    proc, seconds = launch(WORKER, args, env={"ZEROMEGA_TEST_HANG": "1:2", "ZEROMEGA_TEST_KILL_MARK": str(mark)},
                           launcher_args=("--config", str(config)))
    assert mark.read_text().startswith("1:2:"), proc.stderr[-2000:]
    assert proc.returncode != 0, proc.stdout[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    print(f"hung rank -> job over in {seconds:.0f} s: {last}")
    assert last.startswith("zeromega launch: rank 0 failed"), last
    assert "CollectiveTimeout" in last and "a collective of step 3 timed out after 6 s" in last, last
    assert "rank(s) 1 never reached step 3: rank 1 last began step 2" in last, last
    assert seconds < 120, f"the job took {seconds:.0f} s to end after a 6 s collective timeout"
