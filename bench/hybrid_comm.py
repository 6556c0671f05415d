#!/usr/bin/env python
"""Bytes each rank hands to each collective in one step, per hybrid layout, against the theory.

Every layout trains the same GPT (MoE layouts: the same MoE GPT) through
Megatron-Core's engine (plugins.megatron.pipeline) in the same processes,
one after another; zeromega's counter (integrations.comm) sees every
torch.distributed call of a step after one warm-up step. The theory per kind
(tp-sp all-gather / reduce-scatter per layer, pp activations per
micro-batch, dp ZeRO-1 reduce-scatter + all-gather of the parameters, ep
all-to-all of routed tokens) is in plugins/megatron/measure.py; printed are
measured/theory per kind and rank. Small kinds theory leaves out (the
grad-norm and cross-entropy all-reduces, MoE split metadata) show as bytes.

    python bench/hybrid_comm.py                 # re-launches itself on 4 ranks
"""

from __future__ import annotations

import argparse

from launch_self import run_on_ranks

LAYOUTS = [  # name, parallel, moe, virtual stages
    ("dp4", {}, False, None),
    ("tp2 x dp2", {"tp": 2}, False, None),
    ("tp2-sp x dp2", {"tp": 2, "sequence_parallel": True}, False, None),
    ("pp2 x dp2 (1F1B)", {"pp": 2}, False, None),
    ("pp2 x dp2 (vpp2)", {"pp": 2}, False, 2),
    ("tp2-sp x pp2", {"tp": 2, "pp": 2, "sequence_parallel": True}, False, None),
    ("moe ep2 x dp2", {"ep": 2}, True, None),
    ("moe ep4", {"ep": 4}, True, None),
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--num-experts", type=int, default=4)
    p.add_argument("--moe-router-topk", type=int, default=2)
    return p.parse_args()


def worker(args):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from zeromega.integrations import comm
    from zeromega.integrations.megatron import model, parallel
    from zeromega.config.schema import RunConfig
    from zeromega.plugins.megatron.measure import comm_theory, random_batches, ratio_line
    from zeromega.plugins.megatron.pipeline import MegatronTrainer

    comm.install()
    dense = model.GPTShape(num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=4,
                           seq_length=args.seq_length, vocab_size=257, hidden_dropout=0.0, attention_dropout=0.0)
    moe = model.GPTShape(**{**dense.__dict__, "num_experts": args.num_experts,
                            "moe_router_topk": args.moe_router_topk, "moe_aux_loss_coeff": 1e-2})
    for name, par, is_moe, vpp in LAYOUTS:
        cfg = RunConfig.model_validate({"parallel": par, "precision": "fp32", "optimizer": {"clip_grad": 1.0},
                                        "batch": {"micro": args.micro_batch_size, "global": args.global_batch_size}})
        layout = parallel.initialize(cfg, seed=1)
        shape = moe if is_moe else dense
        trainer = MegatronTrainer(shape, cfg, layout, virtual_stages=vpp)
        batches = random_batches(shape.vocab_size, shape.seq_length, layout.micro, layout.accumulation)
        trainer.train_step(batches)
        comm.take()
        trainer.train_step(batches)
        measured = comm.take()
        params = [p for c in trainer.chunks for p in c.module.parameters()]
        expert = [p for p in params if not getattr(p, "allreduce", True)]
        stage_layers = sum(len(c.module.decoder.layers) for c in trainer.chunks)
        theory = comm_theory(
            layers=stage_layers, seq=shape.seq_length, micro=layout.micro, hidden=shape.hidden_size,
            m=layout.accumulation, tp=layout.tp, sp=cfg.parallel.sequence_parallel, pp=layout.pp,
            pp_rank=ps.get_pipeline_model_parallel_rank(), dp=layout.dp,
            param_bytes=sum(p.numel() * 4 for p in params), expert_param_bytes=sum(p.numel() * 4 for p in expert),
            edp=ps.get_expert_data_parallel_world_size(), ep=layout.ep, topk=shape.moe_router_topk,
            moe_layers=stage_layers if is_moe else 0, virtual=trainer.virtual_stages,
            first_stage=ps.is_pipeline_first_stage(), last_stage=ps.is_pipeline_last_stage())
        rows = [None] * dist.get_world_size()
        with comm.paused():
            dist.all_gather_object(rows, (measured, theory))
        if dist.get_rank() == 0:
            print(f"\n{name}: world {layout.world} = tp {layout.tp} x pp {layout.pp} x dp {layout.dp}"
                  f" (ep {layout.ep}), m = {layout.accumulation} micro-batches of {layout.micro}")
            for rank, (got, want) in enumerate(rows):
                total = sum(got.values())
                print(f"  rank {rank}: {total / 2**20:7.2f} MiB; measured/theory: {ratio_line(got, want)}")
    parallel.shutdown()


def main():
    args = parse_args()
    run_on_ranks(__file__, args.nproc, worker, args)


if __name__ == "__main__":
    main()
