#!/usr/bin/env python
"""Long-context demo: a sequence whose attention does not fit one process's memory budget trains on 4 ranks.

Every run below is ``examples/pretrain_gpt.py`` started by ``zeromega launch``
and watched by the same guard: this script samples each rank's resident
memory (``VmRSS`` / ``VmHWM`` in ``/proc/PID/status``) every 20 ms and kills
the run (SIGKILL, by pid) as soon as one rank crosses the budget B. The guard
lives outside the ranks, so it needs no GIL and cannot be starved by a
kernel that allocates gigabytes in one call; it also keeps the shared machine
from running out of memory.

1. Plan. One process with Megatron-Core's unfused ``DotProductAttention``
   holds ``[b, h, s, s]`` fp32 scores (and their softmax, gradients ...).
   How many such buffers are alive at the peak is measured, not assumed:
   one-process runs of the same model at s/16, s/8, s/4 (default) give peak
   RSS values that are fitted by least squares to
   ``peak(s) = a + k * (b*h*s*s*4)`` (``a``: the process without attention);
   ``k`` is the number of s x s buffers alive at once, and the fit
   extrapolated to s is the plan.
2. One process at s, guarded: it is stopped when it crosses B (it is never
   allowed to reach the planned peak, which may exceed the machine).
3. The same model and s with 4 ranks (ring cp=4, USP 2x2 ...): 5 steps, loss
   from rank 0's ``--metrics-out``, peak RSS per rank from the guard.

    python examples/long_context/run.py                     # ~8 min on 2 cores
    python examples/long_context/run.py --budget-gib 3 --seq-length 16384 --modes ring usp
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

GiB = 2**30
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PRETRAIN = os.path.join(REPO, "examples", "pretrain_gpt.py")
# mode -> pretrain_gpt.py flags that select it (Megatron-LM's names), with cp = 4
MODES = {
    "ring": ["--cp-comm-type", "p2p"],
    "usp": ["--cp-comm-type", "a2a+p2p", "--hierarchical-context-parallel-sizes", "2", "2"],
    "ulysses": ["--cp-comm-type", "a2a"],
}
MODE_LABEL = {"ring": "ring cp=4", "usp": "USP 2x2 (a2a x p2p)", "ulysses": "Ulysses cp=4"}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-gib", type=float, default=3.0, help="memory budget B of one process (GiB)")
    p.add_argument("--seq-length", type=int, default=16384, help="s; a multiple of 8 (zigzag over 4 ranks)")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="training steps of the 4-rank runs")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--modes", nargs="*", choices=list(MODES), default=["ring", "usp"],
                   help="4-rank modes to train (default: ring usp)")
    p.add_argument("--probe-divisors", type=int, nargs="*", default=[16, 8, 4],
                   help="one-process probes at s/d (at least 3: 2 unknowns and a residual; none: skip the plan)")
    p.add_argument("--probe-limit-gib", type=float, default=8.0,
                   help="the probes measure rather than test B, so they run under this safety limit instead")
    p.add_argument("--skip-single", action="store_true", help="skip the guarded one-process run at s")
    p.add_argument("--work-dir", default="/tmp/zeromega_long_context", help="logs, metrics, results.json")
    p.add_argument("--poll-ms", type=float, default=20.0, help="guard sampling interval")
    args = p.parse_args(argv)
    if args.seq_length % 8:
        p.error(f"--seq-length {args.seq_length}: must be a multiple of 8 (2 x 4 ranks for zigzag)")
    if args.probe_divisors and len(args.probe_divisors) < 3:
        p.error("--probe-divisors: give at least 3 (2 unknowns and a residual) or none")
    return args


# ------------------------------------------------------------------ processes


def _ppids() -> dict[int, int]:
    """pid -> parent pid for every process (this kernel has no /proc/PID/task/TID/children)."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
                out[int(name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError):
                pass
    return out


def descendants(root: int) -> list[int]:
    ppids, found, frontier = _ppids(), [], [root]
    while frontier:
        parent = frontier.pop()
        kids = [pid for pid, pp in ppids.items() if pp == parent]
        found += kids
        frontier += kids
    return found


def rank_of(pid: int) -> Optional[int]:
    """The rank a process runs, if it is a pretrain_gpt.py rank (not the launcher, not a compiler it forked)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        if not any(a.endswith(b"pretrain_gpt.py") for a in argv[:3]) or b"launch" in argv[:4]:
            return None
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        return int(env[b"RANK"]) if b"RANK" in env else None
    except (OSError, ValueError, KeyError):
        return None


def memory_bytes(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid``: resident memory now, and the kernel's high-water mark of it."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return rss, hwm


@dataclass
class Run:
    """What a guarded run leaves: exit, peaks per rank, whether the guard stopped it, rank 0's metrics."""

    name: str
    ranks: int
    seq: int
    rc: Optional[int] = None
    wall_s: float = 0.0
    rank_peak: dict = field(default_factory=dict)  # rank -> max VmHWM seen (bytes)
    stopped: Optional[dict] = None  # {"rank", "rss", "after_s"} when the guard killed it
    metrics: list = field(default_factory=list)
    log: str = ""

    @property
    def peak(self) -> int:
        return max(self.rank_peak.values(), default=0)


def guarded(run: Run, cmd: list[str], limit: int, poll_s: float, metrics: Optional[str]) -> Run:
    """Run ``cmd``; kill it (every process of its tree, by pid) once any rank's RSS exceeds ``limit``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    with open(run.log, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                start_new_session=True)
    ranks: dict[int, int] = {}  # pid -> rank
    next_scan = 0.0
    try:
        while proc.poll() is None:
            now = time.monotonic()
            if now >= next_scan:  # new rank processes appear only at start-up: rescan the tree twice a second
                for pid in descendants(proc.pid):
                    if pid not in ranks and (r := rank_of(pid)) is not None:
                        ranks[pid] = r
                next_scan = now + 0.5
            for pid, r in list(ranks.items()):
                try:
                    rss, hwm = memory_bytes(pid)
                except OSError:
                    del ranks[pid]
                    continue
                run.rank_peak[r] = max(run.rank_peak.get(r, 0), hwm)
                if rss > limit:
                    run.stopped = {"rank": r, "rss": rss, "after_s": now - t0}
                    _kill_tree(proc)
                    break
            if run.stopped:
                break
            time.sleep(poll_s)
    finally:
        if proc.poll() is None and not run.stopped:
            _kill_tree(proc)  # interrupted: leave nothing running
        run.rc = proc.wait()
    run.wall_s = time.monotonic() - t0
    if metrics and os.path.exists(metrics):
        with open(metrics) as f:
            run.metrics = [json.loads(line) for line in f if line.strip()]
    return run


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher first (so its elastic agent cannot restart a rank), then its descendants."""
    pids = descendants(proc.pid)
    for pid in [proc.pid, *pids]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------ the runs


def command(args, seq: int, nproc: int, mode: Optional[str], steps: int, metrics: str) -> list[str]:
    """The pretrain_gpt.py command line. The position table is sized for the full s in every run,
    so a probe differs from the run at s only in the sequence length."""
    cmd = [sys.executable, "-m", "zeromega", "launch", "--nproc-per-node", str(nproc), PRETRAIN,
           "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
           "--num-attention-heads", str(args.num_attention_heads),
           "--seq-length", str(seq), "--max-position-embeddings", str(args.seq_length),
           "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", str(steps),
           "--lr", str(args.lr), "--hidden-dropout", "0", "--attention-dropout", "0",
           "--no-progress", "--metrics-out", metrics]
    if mode:
        cmd += ["--context-parallel-size", str(nproc), *MODES[mode]]
    return cmd


def score_bytes(seq: int, heads: int, batch: int = 1) -> int:
    """One fp32 ``[b, h, s, s]`` attention-score buffer."""
    return batch * heads * seq * seq * 4


def fit_plan(probes: list[Run], heads: int) -> tuple[float, float, list[float]]:
    """Least squares ``peak = a + k * score_bytes(s)`` over the probes: (a, k, residuals).

    No term linear in s: this model's per-token activations are tens of KiB,
    below the RSS noise at the probe lengths, and a fit with one came out
    negative (unphysical). The residuals show whether two terms suffice.
    """
    x = np.array([[1.0, score_bytes(r.seq, heads)] for r in probes])
    y = np.array([r.peak for r in probes], dtype=np.float64)
    (a, k), *_ = np.linalg.lstsq(x, y, rcond=None)
    return float(a), float(k), [float(v) for v in x @ (a, k) - y]


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv=None) -> int:
    args = parse(argv)
    budget, s, poll = int(args.budget_gib * GiB), args.seq_length, args.poll_ms / 1000
    os.makedirs(args.work_dir, exist_ok=True)
    if budget * 1.2 > mem_available():  # the guarded run climbs to B: leave the shared machine its headroom
        print(f"run.py: error: --budget-gib {args.budget_gib} is near or above this machine's available "
              f"memory ({mem_available() / GiB:.1f} GiB); pick a smaller budget", file=sys.stderr)
        return 2
    gib = lambda n: f"{n / GiB:.2f} GiB"  # noqa: E731
    t_start = time.monotonic()
    print(f"model: {args.num_layers} layers, hidden {args.hidden_size}, {args.num_attention_heads} heads, fp32, "
          f"micro batch 1; s = {s}; budget B = {args.budget_gib:g} GiB per process; logs in {args.work_dir}")

    def start(name, seq, nproc, mode, steps, limit):
        tag = name.split()[0].lower() + (f"_{mode}" if mode else "") + f"_{seq}"
        metrics = os.path.join(args.work_dir, f"{tag}.jsonl")
        if os.path.exists(metrics):
            os.remove(metrics)
        run = Run(name, nproc, seq, log=os.path.join(args.work_dir, f"{tag}.log"))
        print(f"  {name} at s={seq} ...", end=" ", flush=True)
        guarded(run, command(args, seq, nproc, mode, steps, metrics), limit, poll, metrics)
        state = (f"stopped at {gib(run.stopped['rss'])} after {run.stopped['after_s']:.0f} s" if run.stopped
                 else f"exit {run.rc}")
        print(f"{state}, peak {gib(run.peak)}, {run.wall_s:.0f} s", flush=True)
        if not run.stopped and run.rc != 0:
            print(f"run.py: error: {name} failed (exit {run.rc}); see {run.log}", file=sys.stderr)
            raise SystemExit(1)
        return run

    rows, plan = [], None
    if args.probe_divisors:
        print("1. one process, unfused attention, at smaller s (the plan's fit):")
        probes = [start("1p probe", s // d, 1, None, 2, int(args.probe_limit_gib * GiB))
                  for d in args.probe_divisors]
        a, k, residuals = fit_plan(probes, args.num_attention_heads)
        plan = a + k * score_bytes(s, args.num_attention_heads)
        for r, e in zip(probes, residuals):
            rows.append(("1p unfused, measured", 1, r.seq, r.peak, r.peak <= budget, f"fit {e / 2**20:+.1f} MiB"))
        print(f"   fit: peak(s) = {a / 2**20:.0f} MiB + {k:.2f} x (b*h*s*s*4 B), residuals "
              + ", ".join(f"{e / 2**20:+.1f}" for e in residuals) + f" MiB; at s={s}: {k:.2f} x "
              f"{gib(score_bytes(s, args.num_attention_heads))} of scores -> planned peak {gib(plan)}")
        rows.append(("1p unfused, planned", 1, s, plan, plan <= budget, f"{k:.2f} s x s buffers"))
    single = None
    if not args.skip_single:
        print(f"2. one process, unfused attention, at s={s}, stopped when it crosses B:")
        single = start("1p at-s", s, 1, None, args.steps, budget)
        note = (f"stopped at {gib(single.stopped['rss'])} after {single.stopped['after_s']:.0f} s"
                if single.stopped else "finished")
        rows.append(("1p unfused, guarded run", 1, s, single.peak, single.stopped is None, note))
    print(f"3. {len(args.modes)} mode(s) with 4 ranks, {args.steps} steps each:")
    cp_runs = []
    for mode in args.modes:
        run = start(f"4r {MODE_LABEL[mode]}", s, 4, mode, args.steps, budget)
        cp_runs.append((mode, run))
        losses = [m["loss"] for m in run.metrics]
        note = f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "no metrics"
        rows.append((MODE_LABEL[mode], 4, s, run.peak, run.stopped is None and run.peak <= budget, note))

    fits_head = f"fits in {args.budget_gib:g} GiB?"
    print(f"\n{'mode':<26} {'ranks':>5} {'s':>6} {'peak/rank':>10}  {fits_head:<15} note")
    for name, ranks, seq, peak, fits, note in rows:
        shown = (">" if name.endswith("guarded run") and not fits else "") + gib(peak)
        print(f"{name:<26} {ranks:>5} {seq:>6} {shown:>10}  {'yes' if fits else 'no':<15} {note}")
    for mode, run in cp_runs:
        per_rank = ", ".join(f"r{r} {gib(v)}" for r, v in sorted(run.rank_peak.items()))
        metric_peak = max((m["peak_mem_bytes"] for m in run.metrics), default=0)
        print(f"  {MODE_LABEL[mode]}: {per_rank}; pretrain_gpt.py's peak_mem_bytes (ru_maxrss, max over ranks) "
              f"{gib(metric_peak)}; {run.wall_s:.0f} s")
    print(f"total {time.monotonic() - t_start:.0f} s")

    ok = all(run.stopped is None and run.peak <= budget and len(run.metrics) == args.steps
             and run.metrics[-1]["loss"] < run.metrics[0]["loss"] for _, run in cp_runs)
    ok &= (plan is None or plan > budget) and (single is None or single.stopped is not None)
    results = {
        "budget_bytes": budget, "seq_length": s, "args": vars(args), "planned_peak_bytes": plan, "ok": ok,
        "rows": [dict(mode=n, ranks=rk, seq=sq, peak_bytes=int(pk), fits=bool(f), note=nt)
                 for n, rk, sq, pk, f, nt in rows],
        "runs": {run.name: dict(rank_peak=run.rank_peak, stopped=run.stopped, metrics=run.metrics, wall_s=run.wall_s)
                 for _, run in cp_runs + ([("1p", single)] if single else [])},
    }
    with open(os.path.join(args.work_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    if not ok:
        print("run.py: the demo's claims do not hold with these settings (see the table)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
