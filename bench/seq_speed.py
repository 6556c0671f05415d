#!/usr/bin/env python
"""Forward+backward time of each sequence-parallel mode against one process doing the same work.

One attention layer (b=1, h=8, d=32, fp32, causal, full sequence ``--seq``).
In the same run: one process with one thread times the whole sequence
(``T1``); each mode runs on a fork world whose ranks use one thread each and
reports the slowest rank's median time (``TP``). With ``c`` cores the best a
world of ``P`` ranks can do is ``T1 / min(P, c)``, so the printed overhead is
``TP / (T1 / min(P, c))`` (1.0 = perfect scaling; on this 2-core machine
4 ranks share 2 cores). Balance: each rank's CPU time inside the attention
kernels (thread time, so time-sharing does not inflate it), slowest over
fastest rank; zigzag's goal is under 1.1 (a contiguous causal split would
give about 2P-1).

    python bench/seq_speed.py                 # about a minute on 2 cores
    python bench/seq_speed.py --seq 4096 --reps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from seq_common import MODES, full_fn, init_world, inputs, mode_fn, run_world

B, H, KV, D = 1, 8, 8, 32


def timed(fn, s_l: int, reps: int, barrier=lambda: None) -> float:
    q, k, v, dout = inputs(B, s_l, H, KV, D)
    times = []
    for rep in range(reps + 1):  # the first is warm-up
        barrier()
        start = time.perf_counter()
        fn(q, k, v, True).backward(dout)
        barrier()
        if rep:
            times.append(time.perf_counter() - start)
        q.grad = k.grad = v.grad = None
    return statistics.median(times)


def _count_kernel_time():
    """Wrap the ring's kernel calls (in this child only) to add up their thread CPU time."""
    from zeromega.plugins.sequence import ring

    busy = [0.0]

    def wrap(fn):
        def inner(*args, **kwargs):
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                busy[0] += time.thread_time() - start
        return inner

    ring.attention_forward = wrap(ring.attention_forward)
    ring.attention_backward = wrap(ring.attention_backward)
    return busy


def rank_time(name: str, seq: int, reps: int) -> tuple[float, float]:
    dist = init_world()
    busy = _count_kernel_time()
    median = timed(mode_fn(name), seq // dist.get_world_size(), reps, barrier=dist.barrier)
    return median, busy[0]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(1)
    print(f"attention fwd+bwd, s={args.seq} b={B} h={H} d={D} fp32 causal, 1 thread per rank, {cores} cores, "
          f"load average {os.getloadavg()[0]:.1f} before the run")
    print(f"{'mode':>9} {'ranks':>5} {'1p ms':>8} {'ms':>8} {'overhead':>9} {'kernel balance':>15}")
    for name, (world, _) in MODES.items():
        t1 = timed(full_fn, args.seq, args.reps)  # re-measured next to each mode: the machine is shared
        results = run_world(world, rank_time, name, args.seq, args.reps)
        tp = max(r[0] for r in results)
        busy = [r[1] for r in results]
        balance = f"{max(busy) / min(busy):.3f}" if min(busy) > 0 else "-"
        ideal = t1 / min(world, cores)
        print(f"{name:>9} {world:>5} {t1 * 1e3:8.1f} {tp * 1e3:8.1f} {tp / ideal:9.2f} {balance:>15}", flush=True)


if __name__ == "__main__":
    main()
