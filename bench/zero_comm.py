#!/usr/bin/env python
"""Bytes each rank moves per training step, per collective, against ZeRO's theory.

Method: 2 CPU ranks (gloo), a Megatron-Core GPT, fp32; zeromega's counter
(:mod:`zeromega.integrations.comm`) records the bytes of every tensor handed
to a collective over dp; one warm-up step, then the mean of ``--steps``.
Theory is stated as ring *wire volume* per rank: an all-reduce of S bytes
moves 2(N-1)/N S, an all-gather (S = output) or reduce-scatter (S = input)
(N-1)/N S, a reduce of S (N-1)/N S. With Psi the parameter bytes: DDP
(ZeRO-0) and ZeRO-1/2 2 Psi (N-1)/N, ZeRO-3 3 Psi (N-1)/N (Rajbhandari et
al. 2020, section 7). Goal: ratio within 5% of 1.

Each stage runs twice, side by side: as DeepSpeed 0.19.8 does it by default
and with the one setting that gives the paper's schedule, with the step
time of both, so the price of the extra bytes can be read off:

- ZeRO-1/2: ``use_multi_rank_bucket_allreduce`` (default true) all-reduces
  every gradient bucket and keeps the owner's slice: 2 Psi on the wire for
  the gradients instead of the Psi a reduce-scatter moves; false reduces each
  slice to its owner.
- ZeRO-3: a parameter that backward will reuse within
  ``stage3_max_reuse_distance`` (1e9 elements) stays gathered while fewer than
  ``stage3_max_live_parameters`` (1e9) are live, so a model under 1e9
  elements is gathered once per step (2 Psi); a reuse distance of 0 and a
  live budget smaller than the model give the paper's forward + backward
  gathers (3 Psi), at the memory cost the plan states.

    python bench/zero_comm.py           # ~2-3 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from distributed import run_world  # noqa: E402
from zero_workers import comm_per_step  # noqa: E402

WIRE = {"all_reduce": 2.0, "all_gather": 1.0, "reduce_scatter": 1.0, "reduce": 1.0, "broadcast": 1.0,
        "all_to_all": 1.0}
THEORY = {0: 2.0, 1: 2.0, 2: 2.0, 3: 3.0}
PAPER_SCHEDULE = {
    1: {"use_multi_rank_bucket_allreduce": False},
    2: {"use_multi_rank_bucket_allreduce": False},
    3: {"stage3_max_reuse_distance": 0, "stage3_max_live_parameters": 0, "stage3_prefetch_bucket_size": 0,
        "stage3_param_persistence_threshold": 0},
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    from zeromega.integrations.megatron import data

    corpus = str(data.build_corpus(os.path.join(tempfile.mkdtemp(prefix="zero_comm-"), "stdlib"), max_bytes=300_000))
    shape = dict(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.hidden // 64,
                 seq_length=64, vocab_size=257, hidden_dropout=0.0, attention_dropout=0.0)
    n = 2
    print(f"GPT {args.layers} layers, hidden {args.hidden}, fp32, dp {n}; bytes per rank per step as multiples "
          "of the parameter bytes Psi; time relative to the same stage's DeepSpeed default")
    print(f"{'stage':<9} {'counted per collective (x Psi)':<44} {'wire':>6} {'theory':>7} {'ratio':>6} "
          f"{'time':>6}")
    cases = [(0, None)] + [(stage, sched) for stage in (1, 2, 3) for sched in (None, PAPER_SCHEDULE[stage])]
    default_time = {}
    for stage, zero_extra in cases:
        cfg = {"zero": {"stage": stage}, "precision": "fp32", "batch": {"micro": 2, "global": 4},
               "optimizer": {"lr": 1e-3}, "deepspeed_extra": {"zero_optimization": dict(zero_extra or {})}}
        results = run_world(n, comm_per_step, cfg, shape, corpus, args.steps)
        r = results[0]
        psi = r["param_bytes"]
        step_s = max(x["step_s"] for x in results)
        default_time.setdefault(stage, step_s)
        counted = ", ".join(f"{k} {v / psi:.3f}" for k, v in sorted(r["bytes"].items()) if v / psi >= 0.0005)
        wire = sum(WIRE.get(k, 1.0) * v for k, v in r["bytes"].items()) * (n - 1) / n
        theory = THEORY[stage] * psi * (n - 1) / n
        label = f"ZeRO-{stage}" + ("" if zero_extra is None else " paper")
        print(f"{label:<9} {counted:<44} {wire / psi:>6.3f} {theory / psi:>7.3f} {wire / theory:>6.3f} "
              f"{step_s / default_time[stage]:>6.2f}", flush=True)
    print("paper: ZeRO-1/2 use_multi_rank_bucket_allreduce false; ZeRO-3 stage3_max_reuse_distance 0, "
          "stage3_max_live_parameters 0, stage3_prefetch_bucket_size 0, stage3_param_persistence_threshold 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
