#!/usr/bin/env python
"""Bytes each rank moves per training step, per collective, against ZeRO's theory.

Method: 2 CPU ranks (gloo), a Megatron-Core GPT, fp32; zeromega's counter
(:mod:`zeromega.integrations.comm`) records the bytes of every tensor handed
to a collective over dp; one warm-up step, then the mean of ``--steps``.
Theory is stated as ring *wire volume* per rank: an all-reduce of S bytes
moves 2(N-1)/N S, an all-gather (S = output) or reduce-scatter (S = input)
(N-1)/N S, a reduce or broadcast of S about (N-1)/N S. With Psi the
parameter bytes: DDP (ZeRO-0) and ZeRO-1/2 2 Psi (N-1)/N, ZeRO-3 3 Psi (N-1)/N
(Rajbhandari et al. 2020, section 7). Goal: ratio within 5% of 1.

    python bench/zero_comm.py           # ~1-2 min on 2 cores
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    from zeromega.integrations.megatron import data

    corpus = str(data.build_corpus(os.path.join(tempfile.mkdtemp(prefix="zero_comm-"), "stdlib"), max_bytes=300_000))
    shape = dict(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.hidden // 64,
                 seq_length=64, vocab_size=257, hidden_dropout=0.0, attention_dropout=0.0)
    n = 2
    print(f"GPT {args.layers} layers, hidden {args.hidden}, fp32, dp {n}; bytes per rank per step as multiples "
          "of the parameter bytes Psi")
    print(f"{'stage':<8} {'counted per collective (x Psi)':<52} {'wire (x Psi)':>12} {'theory':>7} {'ratio':>6}")
    cases = [(0, {}), (1, {}), (2, {}), (3, {}),
             # DeepSpeed keeps gathered parameters for backward within its reuse distance (1e9): with
             # reuse 0 and no persistent parameters every layer is gathered again for backward.
             (3, {"stage3_max_reuse_distance": 0, "stage3_param_persistence_threshold": 0})]
    for stage, zero_extra in cases:
        cfg = {"zero": {"stage": stage}, "precision": "fp32", "batch": {"micro": 2, "global": 4},
               "optimizer": {"lr": 1e-3}, "deepspeed_extra": {"zero_optimization": dict(zero_extra)}}
        results = run_world(n, comm_per_step, cfg, shape, corpus, args.steps)
        r = results[0]
        psi = r["param_bytes"]
        counted = ", ".join(f"{k} {v / psi:.3f}" for k, v in sorted(r["bytes"].items()) if v / psi >= 0.0005)
        wire = sum(WIRE.get(k, 1.0) * v for k, v in r["bytes"].items()) * (n - 1) / n
        theory = THEORY[stage] * psi * (n - 1) / n
        label = f"ZeRO-{stage}" + ("*" if zero_extra else "")
        print(f"{label:<8} {counted:<52} {wire / psi:>12.3f} {theory / psi:>7.3f} {wire / theory:>6.3f}",
              flush=True)
    print("* stage3_max_reuse_distance 0, stage3_param_persistence_threshold 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
