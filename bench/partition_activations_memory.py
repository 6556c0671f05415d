#!/usr/bin/env python
"""What --partition-activations (recompute.distribute_saved_activations) saves, side by side with plain full
recompute, at tp 2 on 2 gloo ranks.

Each case runs in its own 2-rank fork world (the tests' ``run_world``): Megatron-Core's GPT as zeromega builds
it (``model.build_gpt``), full recompute in uniform chunks of one layer, dropout 0.1, random tokens, fp32.
One step is measured with ``seq_common.TensorBytes`` (tensor storage created in the step and alive at once):

- ``kept``: bytes alive when the forward ends (what waits for backward: each recomputed chunk's input, the
  logits' loss inputs); partitioning keeps 1/tp of each chunk's input;
- ``peak``: the most bytes alive at once over the step (backward recomputes one layer at a time).

Ratios are to the same case without partitioning, measured in the same run (rank 0's figures).

    python bench/partition_activations_memory.py                 # seq 1024, hidden 256, 8 layers
    python bench/partition_activations_memory.py --seq 2048 --layers 4
"""

from __future__ import annotations

import argparse

from seq_common import TensorBytes, run_world


def one_case(distribute: bool, shape: dict, micro: int) -> dict:
    import torch

    from zeromega.config.schema import RunConfig
    from zeromega.integrations.megatron import model, parallel

    cfg = RunConfig.model_validate({"precision": "fp32", "parallel": {"tp": 2}, "batch": {"micro": micro,
                                    "global": micro}, "recompute": {"granularity": "full", "method": "uniform",
                                    "num_layers": 1, "distribute_saved_activations": distribute}})
    parallel.initialize(cfg, seed=1)
    gpt_shape = model.GPTShape(**shape)
    gpt = model.build_gpt(gpt_shape, cfg)
    generator = torch.Generator().manual_seed(0)
    positions = torch.arange(gpt_shape.seq_length).expand(micro, -1)
    tokens = torch.randint(0, gpt_shape.vocab_size, (micro, gpt_shape.seq_length), generator=generator)
    gpt(tokens, positions, None, labels=tokens.roll(-1, 1)).mean().backward()  # warm-up: grads allocated
    with TensorBytes() as meter:
        loss = gpt(tokens, positions, None, labels=tokens.roll(-1, 1)).mean()
        meter._sweep()
        kept = meter.current
        loss.backward()
    parallel.shutdown()
    return {"kept": kept, "peak": meter.peak}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--micro", type=int, default=2)
    args = p.parse_args()
    import zeromega.integrations.megatron.model  # noqa: F401  (imported once, before the cases fork)
    import megatron.core.models.gpt  # noqa: F401

    shape = dict(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                 seq_length=args.seq, vocab_size=256, hidden_dropout=0.1, attention_dropout=0.1)
    got = {name: run_world(2, one_case, distribute, shape, args.micro, timeout=1800)[0]
           for name, distribute in (("full", False), ("full + partitioned", True))}
    mib, base = 2.0**20, got["full"]
    print(f"GPT {args.layers} layers, hidden {args.hidden}, seq {args.seq}, micro-batch {args.micro}, fp32, tp 2 "
          f"(2 gloo ranks), full recompute (chunks of 1 layer); rank 0, MiB (ratio to full)")
    print(f"{'case':>20} {'kept MiB':>16} {'peak MiB':>16}")
    for name, row in got.items():
        print(f"{name:>20} " + " ".join(f"{row[k] / mib:8.1f} ({row[k] / base[k]:4.2f})" for k in ("kept", "peak")))


if __name__ == "__main__":
    main()
