#!/usr/bin/env python
"""What the zeromega path costs over calling DeepSpeed and Megatron-Core directly.

Both paths train the same Megatron-Core GPT (same init, same data, same
DeepSpeed config) in the same processes; rounds alternate between them so
machine noise hits both alike. Printed: the median step time of each path
and their ratio, and the bytes each rank moved per step (as counted by
zeromega's torch.distributed counter) against the theory for data-parallel
training, 2x the parameter bytes per rank (ZeRO paper, section 7: a
reduce-scatter plus an all-gather, or one all-reduce, of every gradient).

    python bench/overhead.py                   # re-launches itself on 2 ranks
    python bench/overhead.py --zero-stage 2 --rounds 6
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace


from launch_self import run_on_ranks

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


def worker(args):
    import torch
    import torch.distributed as dist

    from zeromega.integrations import comm
    from zeromega.plugins.zero.engine import build_engine
    from zeromega.integrations.megatron import data, model, parallel
    from zeromega.config.schema import RunConfig
    from zeromega.plugins.zero.ds_config import to_deepspeed
    from zeromega.run.loop import _reduce_step_stats, train_step

    comm.install()
    cfg = RunConfig.model_validate({"zero": {"stage": args.zero_stage}, "batch": {"micro": args.micro_batch_size},
                                    "optimizer": {"lr": 1e-3}})
    layout = parallel.initialize(cfg, seed=1)
    args.seed_for_both = 1
    rank0 = dist.get_rank() == 0
    shape = model.GPTShape(num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=8,
                           seq_length=args.seq_length, vocab_size=257, hidden_dropout=0.0, attention_dropout=0.0)
    prefix = data.default_corpus_prefix()
    if rank0:
        data.build_corpus(prefix)
    dist.barrier()
    steps = args.rounds * args.steps_per_round
    ds, _, _ = data.build_gpt_datasets(prefix, args.seq_length, 1, (2 * steps * layout.global_batch, 0, 0))
    batches = data.sample_batches(ds, layout.micro, dp_rank=dist.get_rank(), dp_size=layout.dp)

    torch.manual_seed(1)
    ours = build_engine(model.build_gpt(shape, cfg), cfg, layout)
    theirs = direct_engine(args, shape, to_deepspeed(cfg, layout, "cpu"))
    param_bytes = sum(p.numel() * p.element_size() for p in ours.module.parameters())

    def ours_step():
        loss = train_step(ours, batches, layout.accumulation)
        local = comm.take()
        _reduce_step_stats(loss, 0, None)
        comm.summed_over_ranks(local)
        return local

    times = {"zeromega": [], "direct": []}
    per_step_bytes = []
    for round_ in range(args.rounds):
        order = ("zeromega", "direct") if round_ % 2 == 0 else ("direct", "zeromega")
        for name in order:
            for _ in range(args.steps_per_round):
                dist.barrier()
                start = time.perf_counter()
                if name == "zeromega":
                    per_step_bytes.append(ours_step())
                else:
                    direct_step(theirs, next(batches))
                    comm.take()
                times[name].append(time.perf_counter() - start)
    if rank0:
        med = {k: statistics.median(v[1:]) for k, v in times.items()}
        bytes_per_step = statistics.median(sum(b.values()) for b in per_step_bytes)
        kinds = {k: v for k, v in per_step_bytes[-1].items()}
        print(f"world {layout.world}, ZeRO-{args.zero_stage}, {param_bytes / 2**20:.2f} MiB of fp32 parameters")
        print(f"step time, median of {len(times['direct']) - 1}: zeromega {med['zeromega'] * 1e3:.1f} ms, "
              f"direct DeepSpeed + Megatron-Core {med['direct'] * 1e3:.1f} ms, "
              f"ratio zeromega/direct = {med['zeromega'] / med['direct']:.3f}")
        print(f"bytes handed to collectives per step by rank 0: {bytes_per_step:,} {kinds}")
        print(f"theory (data parallel, 2 x parameter bytes): {2 * param_bytes:,}; "
              f"measured/theory = {bytes_per_step / (2 * param_bytes):.4f}")
    parallel.shutdown()


def main():
    args = parse_args()
    run_on_ranks(__file__, args.nproc, worker, args)


if __name__ == "__main__":
    main()
