#!/usr/bin/env python
"""Peak memory and step time of activation recomputation (none / selective / full), side by side.

Each case runs in its own fresh process (the tests' fork world, one rank):
Megatron-Core's GPT as zeromega builds it (``model.build_gpt``: local spec,
CPU patches, ``recompute`` from the RunConfig), dropout 0.1, random tokens,
fp32; a training step is forward, backward and an SGD step. Columns:

- ``rss``: how much the process's peak resident set (``ru_maxrss``, what
  ``accelerator.peak_memory_bytes`` and pretrain_gpt's ``peak_mem_bytes``
  report on CPU) grew over ``--steps`` steps; a forked process starts from
  its parent's current resident set, and the peak never falls, so one
  process per case;
- ``tensor``: the most tensor bytes alive at once during one more step
  (``seq_common.TensorBytes``: activations, autograd's saved tensors, grads);
- ``step``: the fastest step after the first, over ``--rounds`` rounds that
  run the cases in turn (other work on shared cores only adds time, so the
  minimum is the least disturbed figure; still noisy on 2 shared cores).

Ratios are to no recompute, measured in the same run. Full is ``uniform``
with one layer per chunk (every layer's input kept, the layer recomputed in
backward); selective recomputes the core attention (scores, softmax, dropout).

    python bench/recompute_memory.py                    # s = 1024 and 2048, about 6 minutes on 2 cores
    python bench/recompute_memory.py --seq 4096 --micro 1
"""

from __future__ import annotations

import argparse
import resource
import time

from seq_common import TensorBytes, run_world

CASES = {"none": {}, "selective": {"granularity": "selective"},
         "full": {"granularity": "full", "method": "uniform", "num_layers": 1}}


def one_case(recompute: dict, shape: dict, micro: int, steps: int) -> dict:
    import torch

    from zeromega.config.schema import RunConfig
    from zeromega.integrations.megatron import model, parallel

    cfg = RunConfig.model_validate({"precision": "fp32", "batch": {"micro": micro, "global": micro},
                                    "recompute": recompute})
    parallel.initialize(cfg, seed=1)
    gpt_shape = model.GPTShape(**shape)
    gpt = model.build_gpt(gpt_shape, cfg)
    optimizer = torch.optim.SGD(gpt.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    positions = torch.arange(gpt_shape.seq_length).expand(micro, -1)

    def step() -> float:
        tokens = torch.randint(0, gpt_shape.vocab_size, (micro, gpt_shape.seq_length), generator=generator)
        loss = gpt(tokens, positions, None, labels=tokens.roll(-1, 1)).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(steps):
        begin = time.perf_counter()
        step()
        times.append(time.perf_counter() - begin)
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) * 1024
    with TensorBytes() as meter:
        step()
    parallel.shutdown()
    return {"rss": rss, "tensor": meter.peak, "step": min(times[1:] or times)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2, help="times each case runs (memory from the first)")
    args = p.parse_args()
    import zeromega.integrations.megatron.model  # noqa: F401  (imported once, before the cases fork)
    import megatron.core.models.gpt  # noqa: F401

    mib = 2.0**20
    print(f"GPT {args.layers} layers, hidden {args.hidden}, {args.heads} heads, micro-batch {args.micro}, fp32, "
          f"dropout 0.1, 1 process; MiB (ratio to none), step s (ratio)")
    print(f"{'seq':>5} {'recompute':>10} {'rss MiB':>15} {'tensor MiB':>15} {'step s':>14}")
    for seq in args.seq:
        shape = dict(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                     seq_length=seq, vocab_size=257, hidden_dropout=0.1, attention_dropout=0.1)
        got = {name: run_world(1, one_case, recompute, shape, args.micro, args.steps, timeout=1800)[0]
               for name, recompute in CASES.items()}
        for _ in range(args.rounds - 1):
            for name, recompute in CASES.items():
                again = run_world(1, one_case, recompute, shape, args.micro, args.steps, timeout=1800)[0]
                got[name]["step"] = min(got[name]["step"], again["step"])
        base = got["none"]
        for name, row in got.items():
            print(f"{seq:>5} {name:>10} " + " ".join(
                f"{row[k] / (mib if k != 'step' else 1):{8 if k != 'step' else 7}.{0 if k != 'step' else 2}f} "
                f"({row[k] / base[k]:4.2f})" for k in ("rss", "tensor", "step")), flush=True)


if __name__ == "__main__":
    main()
