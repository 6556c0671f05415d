#!/usr/bin/env python
"""Tokens/s of each hybrid layout against dp-only, on the same processes, in one run.

Every layout trains the same GPT (MoE layouts against a dp-only MoE GPT)
as a whole ``zeromega.Run`` on the project's corpus, same global batch,
ZeRO-1: the engine is the one the run picks (DeepSpeed's for dense pp 1,
Megatron-Core's with its distributed optimizer for pp > 1 and MoE; printed
per layout), the step times are the run's step records after one warm-up
step. Rounds alternate over the layouts so that machine noise (2 shared
cores: 4 ranks oversubscribe them) hits all alike; printed is the median
step time and tokens/s per layout and its ratio to dp-only.
On CPU the ratio says what each layout's communication and schedule cost
here, not what it buys on GPUs, where tp/pp exist to fit larger models.

    python bench/hybrid_throughput.py                 # forks 4 ranks per layout and round
"""

from __future__ import annotations

import argparse
import statistics

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


def run_config(args, par: dict, is_moe: bool, vpp) -> dict:
    """The zeromega run of one layout: ZeRO-1 (DeepSpeed's at pp 1, Megatron-Core's distributed optimizer on
    its engine), the same GPT (MoE: 4 experts, top-2), 1 warm-up + 2 timed steps."""
    model = {"num_layers": args.num_layers, "hidden_size": args.hidden_size, "num_attention_heads": 8,
             "seq_length": args.seq_length, "vocab_size": 257, "hidden_dropout": 0.0, "attention_dropout": 0.0}
    return {"parallel": {**par, **({"vpp": vpp} if vpp else {})}, "zero": {"stage": 1}, "precision": "fp32",
            "batch": {"micro": args.micro_batch_size, "global": args.global_batch_size},
            "moe": {"num_experts": 4, "topk": 2, "aux_loss_coeff": 1e-2} if is_moe else {},
            "model": model, "scheduler": {"train_iters": 3, "decay_style": "constant"},
            "logging": {"progress": False}, "seed": 1}


def layout_steps(cfg: dict) -> tuple[list[float], str]:
    """One rank of a layout's world: zeromega.Run's step seconds after the warm-up step, and its engine."""
    from zeromega.config import validate
    from zeromega.run import Run

    run = Run(validate(cfg), log=lambda line: None)
    records = run.train()
    return [r.step_time_s for r in records[1:]], run.engine.name


def main():
    """Each (round, layout) is a fresh world of ``--nproc`` forked ranks (a process runs one zeromega.Run)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from distributed import run_world

    import deepspeed  # noqa: F401  (imported once here, not in every forked rank)
    import megatron.core  # noqa: F401

    from zeromega.integrations.megatron import data

    args = parse_args()
    data.build_corpus(data.default_corpus_prefix())
    tokens_per_step = args.global_batch_size * args.seq_length
    times = {name: [] for name, *_ in LAYOUTS}
    engines = {}
    for round_ in range(args.rounds):
        order = LAYOUTS if round_ % 2 == 0 else LAYOUTS[::-1]
        for name, par, is_moe, vpp in order:
            step_s, engines[name] = run_world(args.nproc, layout_steps, run_config(args, par, is_moe, vpp),
                                              timeout=1800)[0]
            times[name] += step_s
    base = {False: statistics.median(times["dp4"]), True: statistics.median(times["moe dp4"])}
    print(f"world {args.nproc}, {args.num_layers} layers x hidden {args.hidden_size}, seq "
          f"{args.seq_length}, global batch {args.global_batch_size}; median of {2 * args.rounds} steps")
    print(f"{'layout':<20}{'engine':>10}{'step ms':>9}{'tokens/s':>10}{'vs dp-only':>12}")
    for name, _, is_moe, _ in LAYOUTS:
        t = statistics.median(times[name])
        print(f"{name:<20}{engines[name]:>10}{t * 1e3:>9.1f}{tokens_per_step / t:>10,.0f}{base[is_moe] / t:>12.2f}")


if __name__ == "__main__":
    main()
