#!/usr/bin/env python
"""Tokens/s of each hybrid layout against dp-only, on the same processes, in one run.

Every layout trains the same GPT (MoE layouts against a dp-only MoE GPT)
through Megatron-Core's engine with the distributed optimizer, same global
batch, random tokens. Rounds alternate over the layouts so that machine
noise (2 shared cores: 4 ranks oversubscribe them) hits all alike; printed
is the median step time and tokens/s per layout and its ratio to dp-only.
On CPU the ratio says what each layout's communication and schedule cost
here, not what it buys on GPUs, where tp/pp exist to fit larger models.

    python bench/hybrid_throughput.py                 # re-launches itself on 4 ranks
"""

from __future__ import annotations

import argparse
import statistics
import time

from launch_self import run_on_ranks

LAYOUTS = [  # name, parallel, moe, virtual stages
    ("dp4", {}, False, None),
    ("tp2-sp x dp2", {"tp": 2, "sequence_parallel": True}, False, None),
    ("pp2 x dp2 (1F1B)", {"pp": 2}, False, None),
    ("pp2 x dp2 (vpp2)", {"pp": 2}, False, 2),
    ("tp2-sp x pp2", {"tp": 2, "pp": 2, "sequence_parallel": True}, False, None),
    ("moe dp4", {}, True, None),
    ("moe ep2 x dp2", {"ep": 2}, True, None),
    ("moe ep4", {"ep": 4}, True, None),
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    return p.parse_args()


def worker(args):
    import torch.distributed as dist

    from zeromega.integrations.megatron import model, parallel
    from zeromega.config.schema import RunConfig
    from zeromega.plugins.megatron.measure import random_batches
    from zeromega.plugins.megatron.pipeline import MegatronTrainer

    dense = model.GPTShape(num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=8,
                           seq_length=args.seq_length, vocab_size=257, hidden_dropout=0.0, attention_dropout=0.0)
    moe = model.GPTShape(**{**dense.__dict__, "num_experts": 4, "moe_router_topk": 2, "moe_aux_loss_coeff": 1e-2})
    tokens_per_step = args.global_batch_size * args.seq_length
    times = {name: [] for name, *_ in LAYOUTS}
    for round_ in range(args.rounds):
        order = LAYOUTS if round_ % 2 == 0 else LAYOUTS[::-1]
        for name, par, is_moe, vpp in order:
            cfg = RunConfig.model_validate({"parallel": par, "precision": "fp32",
                                            "batch": {"micro": args.micro_batch_size,
                                                      "global": args.global_batch_size}})
            layout = parallel.initialize(cfg, seed=1)
            shape = moe if is_moe else dense
            trainer = MegatronTrainer(shape, cfg, layout, virtual_stages=vpp)
            batches = random_batches(shape.vocab_size, shape.seq_length, layout.micro, layout.accumulation)
            trainer.train_step(batches)  # warm-up
            for _ in range(2):
                dist.barrier()
                start = time.perf_counter()
                trainer.train_step(batches)
                times[name].append(time.perf_counter() - start)
            del trainer
    if dist.get_rank() == 0:
        base = {False: statistics.median(times["dp4"]), True: statistics.median(times["moe dp4"])}
        print(f"world {dist.get_world_size()}, {args.num_layers} layers x hidden {args.hidden_size}, seq "
              f"{args.seq_length}, global batch {args.global_batch_size}; median of {2 * args.rounds} steps")
        print(f"{'layout':<20}{'step ms':>9}{'tokens/s':>10}{'vs dp-only':>12}")
        for name, _, is_moe, _ in LAYOUTS:
            t = statistics.median(times[name])
            print(f"{name:<20}{t * 1e3:>9.1f}{tokens_per_step / t:>10,.0f}{base[is_moe] / t:>12.2f}")
    parallel.shutdown()


def main():
    args = parse_args()
    run_on_ranks(__file__, args.nproc, worker, args)


if __name__ == "__main__":
    main()
