#!/usr/bin/env python
"""Measured pipeline bubble per stage, 1F1B and interleaved, against (p-1)/(m+p-1) and (p-1)/(v m+p-1).

Method (plugins/megatron/pipeline.py): Megatron-Core's schedules report
their phases to ``config.timers``; per stage and step, idle = 1 - (forward
+ backward compute) / (schedule wall time without the gradient reduction).
Each (v, m) point is the median over steps after a warm-up. On a shared
2-core machine the absolute numbers carry noise (and a stage's p2p time
counts as idle); the printed measured/theory ratios are the result.

    python bench/pipeline_bubble.py                 # re-launches itself on 2 ranks (pp 2)
    python bench/pipeline_bubble.py --nproc 4 --micro-batches 4 8 16
"""

from __future__ import annotations

import argparse
import os
import statistics


from launch_self import run_on_ranks

def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2, help="pipeline stages (pp = nproc, dp = 1)")
    p.add_argument("--micro-batches", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--virtual-stages", type=int, nargs="+", default=[1, 2])
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    return p.parse_args()


def worker(args):
    import torch.distributed as dist

    from zeromega.integrations.megatron import model, parallel
    from zeromega.config.schema import RunConfig
    from zeromega.plugins.megatron.measure import random_batches
    from zeromega.plugins.megatron.pipeline import MegatronTrainer, theoretical_bubble

    p = dist.get_world_size() if dist.is_initialized() else int(os.environ["WORLD_SIZE"])
    shape = model.GPTShape(num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=8,
                           seq_length=args.seq_length, vocab_size=257, hidden_dropout=0.0, attention_dropout=0.0)
    rows = []
    for v in args.virtual_stages:
        for m in args.micro_batches:
            cfg = RunConfig.model_validate({"parallel": {"pp": p}, "precision": "fp32",
                                            "batch": {"micro": args.micro_batch_size,
                                                      "global": args.micro_batch_size * m}})
            layout = parallel.initialize(cfg, seed=1)
            trainer = MegatronTrainer(shape, cfg, layout, virtual_stages=v)
            batches = random_batches(shape.vocab_size, shape.seq_length, layout.micro, m)
            trainer.train_step(batches)  # warm-up
            idle = [trainer.train_step(batches).idle for _ in range(args.steps)]
            per_stage = [statistics.median(step[s] for step in idle) for s in range(p)]
            rows.append((v, m, per_stage, theoretical_bubble(p, m, v)))
    if dist.get_rank() == 0:
        print(f"pp {p}, {args.num_layers} layers x hidden {args.hidden_size}, seq {args.seq_length}, "
              f"micro-batch {args.micro_batch_size}; median of {args.steps} steps")
        print(f"{'schedule':<16}{'m':>4}  {'measured idle per stage':<28}{'mean':>7}{'theory':>8}{'ratio':>7}")
        for v, m, per_stage, theory in rows:
            mean = sum(per_stage) / len(per_stage)
            name = "1F1B" if v == 1 else f"interleaved v={v}"
            stages = " ".join(f"{x:.3f}" for x in per_stage)
            print(f"{name:<16}{m:>4}  {stages:<28}{mean:>7.3f}{theory:>8.3f}{mean / theory:>7.2f}")
    parallel.shutdown()


def main():
    args = parse_args()
    run_on_ranks(__file__, args.nproc, worker, args)


if __name__ == "__main__":
    main()
