#!/usr/bin/env python
"""Measured peak memory per rank against the memory plan, for ZeRO 0-3 with and without offload.

Method: 2 CPU ranks (gloo), a Megatron-Core GPT, a few steps through the
DeepSpeed engine with zeromega's tuned defaults and corrections; each rank
reports its peak (``ru_maxrss`` on CPU; ``torch.cuda.max_memory_allocated``
on CUDA) and the plan (:func:`zeromega.plugins.zero.plan.for_run`) is built
for the same DeepSpeed dict. The plan's process baseline is measured in the
same run (a rank that only joins the job), so the ratio compares what the
plan models: model states, buffers, activations. Goal: 0.9-1.1.

    python bench/zero_memory.py                       # ~3-5 min on 2 shared cores
    python bench/zero_memory.py --layers 8 --hidden 512 --only z3 z3-nvme-opt
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from distributed import run_world  # noqa: E402
from zero_workers import baseline_peak, train_offload  # noqa: E402


def cases(nvme: str) -> dict:
    nv = {"device": "nvme", "nvme_path": nvme, "pin_memory": False}
    return {
        "z0": (0, {}),
        "z1": (1, {}),
        "z2": (2, {}),
        "z3": (3, {}),
        "z2-cpu-opt": (2, {"offload_optimizer": {"device": "cpu"}}),
        "z3-cpu-opt+param": (3, {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}),
        "z3-nvme-opt": (3, {"offload_optimizer": nv}),
        "z3-nvme-opt+param": (3, {"offload_optimizer": nv, "offload_param": nv}),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--only", nargs="*", help="case names to run")
    p.add_argument("--nvme", default=None, help="directory for nvme swap files (default: a temp dir under /work)")
    args = p.parse_args()

    from zeromega.integrations.megatron import data
    from zeromega.plugins.zero.plan import MiB

    work = tempfile.mkdtemp(prefix="zero_memory-", dir=args.nvme or "/work" if os.path.isdir("/work") else None)
    corpus = str(data.build_corpus(os.path.join(work, "corpus", "stdlib"), max_bytes=300_000))
    shape = dict(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.hidden // 64,
                 seq_length=args.seq, vocab_size=257, hidden_dropout=0.0, attention_dropout=0.0)
    base = {"precision": args.precision, "batch": {"micro": args.micro, "global": 2 * args.micro},
            "optimizer": {"lr": 1e-3, "weight_decay": 0.01, "clip_grad": 1.0}}
    baseline = max(run_world(2, baseline_peak, base))
    print(f"GPT {args.layers} layers, hidden {args.hidden}, seq {args.seq}, micro {args.micro}, {args.precision}, "
          f"2 ranks; process baseline {baseline / MiB:,.0f} MiB (measured)")
    print(f"{'case':<20} {'measured MiB':>13} {'plan MiB':>10} {'ratio':>6} {'states+buffers':>15}  "
          f"{'nvme files MiB (plan)':>22}  {'s':>5}")
    for name, (stage, zero) in cases(os.path.join(work, "nvme")).items():
        if args.only and name not in args.only:
            continue
        for block in zero.values():
            if block.get("device") == "nvme":
                os.makedirs(block["nvme_path"], exist_ok=True)
        cfg = {**base, "zero": {"stage": stage, **zero}}
        t = time.time()
        results = run_world(2, train_offload, cfg, shape, corpus, args.steps, timeout=900)
        took = time.time() - t
        peak = max(r["measured"]["peak_bytes"] for r in results)
        plan = results[0]["plan_peak"] - results[0].get("plan_baseline", 0)
        from zeromega.plugins.zero.plan import PROCESS_BASELINE_BYTES

        plan = plan - PROCESS_BASELINE_BYTES + baseline
        states = plan - baseline
        nv = results[0]["measured"]["nvme_bytes"]
        nvme = f"{nv / MiB:,.0f} ({2 * results[0]['plan_nvme'] / MiB:,.0f})" if nv else "-"
        print(f"{name:<20} {peak / MiB:>13,.0f} {plan / MiB:>10,.0f} {peak / plan:>6.2f} {states / MiB:>15,.0f}  "
              f"{nvme:>22}  {took:>5.0f}", flush=True)
        import shutil

        shutil.rmtree(os.path.join(work, "nvme"), ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
