#!/usr/bin/env python
"""What the zeromega path costs over calling DeepSpeed and Megatron-Core directly.

Both paths train the same Megatron-Core GPT (same shape, data and DeepSpeed
config) in the same processes: the zeromega path is a whole ``zeromega.Run``
per round (its step times, per-step comm bytes and memory come from the
run's step records: the engine's step, not the loop's metric reductions
after it), the direct path TransformerConfig + GPTModel +
``deepspeed.initialize`` by hand. Rounds alternate between them so machine
noise hits both alike; each round builds its engine afresh and its first
step is left out. Printed: the median step time of each path and their
ratio, and the bytes each rank moved per step (zeromega's torch.distributed
counter, as the run's records carry them) against the theory for
data-parallel training, 2x the parameter bytes per rank (ZeRO paper,
section 7: a reduce-scatter plus an all-gather, or one all-reduce, of every
gradient).

    python bench/overhead.py                   # forks 2 ranks per round
    python bench/overhead.py --zero-stage 2 --rounds 6
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-round", type=int, default=4)
    return p.parse_args()


def direct_engine(args, shape, ds_config):
    """What a user writes without zeromega: TransformerConfig, GPTModel, deepspeed.initialize."""
    import deepspeed
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    torch.manual_seed(args.seed_for_both)
    config = TransformerConfig(num_layers=shape.num_layers, hidden_size=shape.hidden_size,
                               num_attention_heads=shape.num_attention_heads, hidden_dropout=0.0,
                               attention_dropout=0.0, use_cpu_initialization=True,
                               bias_activation_fusion=False, bias_dropout_fusion=False,
                               masked_softmax_fusion=False, gradient_accumulation_fusion=False)
    gpt = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=384,
                   max_sequence_length=shape.seq_length)
    mpu = SimpleNamespace(
        get_model_parallel_group=ps.get_tensor_model_parallel_group,
        get_model_parallel_rank=ps.get_tensor_model_parallel_rank,
        get_model_parallel_world_size=ps.get_tensor_model_parallel_world_size,
        get_data_parallel_group=ps.get_data_parallel_group,
        get_data_parallel_rank=ps.get_data_parallel_rank,
        get_data_parallel_world_size=ps.get_data_parallel_world_size,
    )
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=gpt, optimizer=optimizer, config=ds_config, mpu=mpu,
                                      dist_init_required=False)
    return engine


def direct_step(engine, batch):
    per_token = engine(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    loss = (per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    engine.backward(loss)
    engine.step()


def run_config(args) -> dict:
    """The zeromega run both paths train: the GPT's shape, the batch, ZeRO stage, constant lr 1e-3 (no clip
    or decay: the direct path's plain AdamW), the project's corpus, one round of steps."""
    return {"zero": {"stage": args.zero_stage}, "batch": {"micro": args.micro_batch_size},
            "optimizer": {"lr": 1e-3, "weight_decay": 0.0, "clip_grad": 0.0},
            "scheduler": {"train_iters": args.steps_per_round, "decay_style": "constant"},
            "model": {"num_layers": args.num_layers, "hidden_size": args.hidden_size, "num_attention_heads": 8,
                      "seq_length": args.seq_length, "vocab_size": 257, "hidden_dropout": 0.0,
                      "attention_dropout": 0.0},
            "logging": {"progress": False}, "seed": 1}


def zeromega_round(args) -> tuple[list[float], list[int], int, dict]:
    """One round through ``zeromega.Run`` (its own groups, model, engine, schedule, loop): step seconds and
    bytes per rank per step after the round's first step, and the parameter bytes of a rank."""
    import os

    from zeromega.config import validate
    from zeromega.run import Run

    run = Run(validate(run_config(args)), log=lambda line: None)
    records = run.train()[1:]  # the first step of a fresh engine warms up
    world = int(os.environ.get("WORLD_SIZE", "1"))
    param_bytes = sum(p.numel() * p.element_size() for p in run.engine.modules[0].parameters())
    return ([r.step_time_s for r in records], [sum(r.comm_bytes.values()) // world for r in records],
            param_bytes, records[-1].comm_bytes if records else {})


def direct_round(args) -> list[float]:
    """One round of the same model and config built by hand: step seconds after the round's first step."""
    import torch.distributed as dist

    from zeromega.config import validate
    from zeromega.integrations import comm
    from zeromega.integrations.megatron import data, parallel
    from zeromega.plugins.zero.ds_config import to_deepspeed
    from zeromega.run.gpt import shape as gpt_shape

    cfg = validate(run_config(args))
    layout = parallel.initialize(cfg, seed=1)
    shape = gpt_shape(cfg, 257)
    prefix = data.default_corpus_prefix()
    ds, _, _ = data.build_gpt_datasets(prefix, args.seq_length, 1, (args.steps_per_round * layout.global_batch, 0, 0))
    batches = data.sample_batches(ds, layout.micro, dp_rank=dist.get_rank(), dp_size=layout.dp)
    engine = direct_engine(args, shape, to_deepspeed(cfg, layout, "cpu"))
    times = []
    for _ in range(args.steps_per_round):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(layout.accumulation):
            direct_step(engine, next(batches))
        times.append(time.perf_counter() - start)
    comm.take()
    parallel.shutdown()
    return times[1:]


def main():
    """Rounds alternate between the paths; each round is a fresh world of ``--nproc`` forked ranks (a process
    runs one zeromega.Run: the run owns, then destroys, the default process group)."""
    import os
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from distributed import run_world

    import deepspeed  # noqa: F401  (imported once here, not in every forked rank)
    import megatron.core  # noqa: F401

    from zeromega.integrations.megatron import data

    args = parse_args()
    args.seed_for_both = 1
    data.build_corpus(data.default_corpus_prefix())  # before any rank reads it
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    times = {"zeromega": [], "direct": []}
    per_step_bytes, param_bytes, kinds = [], 0, {}
    for round_ in range(args.rounds):
        order = ("zeromega", "direct") if round_ % 2 == 0 else ("direct", "zeromega")
        for name in order:
            if name == "zeromega":
                step_s, step_bytes, param_bytes, kinds = run_world(args.nproc, zeromega_round, args, timeout=1800)[0]
                times[name] += step_s
                per_step_bytes += step_bytes
            else:
                times[name] += run_world(args.nproc, direct_round, args, timeout=1800)[0]
    med = {k: statistics.median(v) for k, v in times.items()}
    bytes_per_step = statistics.median(per_step_bytes)
    print(f"world {args.nproc}, ZeRO-{args.zero_stage}, {param_bytes / 2**20:.2f} MiB of fp32 parameters per rank")
    print(f"step time, median of {len(times['direct'])} (after each round's first step): zeromega.Run "
          f"{med['zeromega'] * 1e3:.1f} ms, direct DeepSpeed + Megatron-Core {med['direct'] * 1e3:.1f} ms, "
          f"ratio zeromega/direct = {med['zeromega'] / med['direct']:.3f}")
    print(f"bytes handed to collectives per step, mean over ranks: {bytes_per_step:,.0f} "
          f"(all ranks, by kind: {kinds})")
    print(f"theory (data parallel, 2 x parameter bytes): {2 * param_bytes:,}; "
          f"measured/theory = {bytes_per_step / (2 * param_bytes):.4f}")


if __name__ == "__main__":
    main()
