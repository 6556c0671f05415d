#!/usr/bin/env python
"""Train a GPT whose parameters, gradients and Adam states do not fit in this machine's RAM.

ZeRO-3 (ZeRO-Infinity) with parameters and optimizer states offloaded to an
nvme directory, fp32 (see --precision), one process by default (``--nproc N`` forks N CPU
ranks, each with its own share). Before the model is built the script
prints the memory plan and runs the pre-flight checks (nvme path, free
space, aio/CPU Adam ops, locked memory); after the last step it prints, for
each rank, the peak resident memory, the bytes read from and written to
storage during training (``/proc/self/io``, which counts the O_DIRECT
requests of DeepSpeed's aio threads), the swap files' size, and the ratio

    model states (16 bytes/param: params, grads, Adam m and v in fp32, or
                  bf16 params and grads with an fp32 master, m and v)
    ----------------------------------------------------------------------  (goal >= 3)
               peak resident memory of the training process

    python examples/large_model/train_large.py --preset 1b --nvme-path /work/nvme --steps 3
    python examples/large_model/train_large.py --num-layers 4 --hidden-size 1024 --steps 3   # quick

The presets (``--preset``) are shapes measured on this machine; the
README's table has their numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

PRESETS = {
    "tiny": dict(num_layers=4, hidden_size=1024, num_attention_heads=16),      # 50M
    "350m": dict(num_layers=24, hidden_size=1024, num_attention_heads=16),     # 302M
    "600m": dict(num_layers=20, hidden_size=1536, num_attention_heads=12),     # 567M
    "1b": dict(num_layers=20, hidden_size=2048, num_attention_heads=16),       # 1.0B
    "2b": dict(num_layers=40, hidden_size=2048, num_attention_heads=16),       # 2.0B
    "3b": dict(num_layers=30, hidden_size=2816, num_attention_heads=22),       # 2.9B
}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=PRESETS, help="a model shape (overridden by the shape flags)")
    p.add_argument("--num-layers", type=int)
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--num-attention-heads", type=int)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--lr-warmup-steps", type=int, default=2,
                   help="linear warmup (Megatron's OptimizerParamScheduler): Adam's first full-size steps "
                        "on a wide model without it raised the loss (6.29 -> 11.40 at 567M, lr 5e-5)")
    p.add_argument("--nvme-path", default="/work/nvme_offload", help="directory for the swap files")
    p.add_argument("--offload", choices=("nvme", "cpu", "none"), default="nvme",
                   help="where params and optimizer states go (default nvme)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32 by default: on this CPU torch's bf16 matmul ran 7x slower than fp32 "
                        "(2.5 vs 17 GFLOP/s measured), though bf16 halves the gradient buffer")
    p.add_argument("--param-buffers", type=int, help="offload_param.buffer_count (default: zeromega's correction)")
    p.add_argument("--same-batch", action="store_true",
                   help="train every step on the first batch: with 1-2 samples per step and no warmup the loss "
                        "of fresh batches is noise, the loss on one batch must fall if the updates are right")
    p.add_argument("--nproc", type=int, default=1, help="CPU ranks to fork (each trains its share)")
    p.add_argument("--json-out", help="write the per-rank results here")
    args = p.parse_args(argv)
    shape = dict(PRESETS.get(args.preset, PRESETS["tiny"]))
    for key in ("num_layers", "hidden_size", "num_attention_heads"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    args.shape = {**shape, "seq_length": args.seq_length, "vocab_size": 257, "hidden_dropout": 0.0,
                  "attention_dropout": 0.0}
    return args


def run_config(args, corpus: str) -> dict:
    zero: dict = {"stage": 3}
    if args.offload != "none":
        block = {"device": args.offload, "pin_memory": False}
        if args.offload == "nvme":
            block["nvme_path"] = args.nvme_path
        zero.update(offload_optimizer=dict(block), offload_param=dict(block))
    extra: dict = {}
    if args.param_buffers:
        # Release each layer's parameters as soon as it is done, so few swap buffers suffice.
        extra = {"zero_optimization": {"offload_param": {"buffer_count": args.param_buffers},
                                       "stage3_max_reuse_distance": 0}}
    shape = {k: v for k, v in args.shape.items() if k != "vocab_size"}
    return {"zero": zero, "precision": args.precision, "deepspeed_extra": extra,
            "batch": {"micro": args.micro_batch_size, "global": args.micro_batch_size * args.nproc},
            "optimizer": {"lr": args.lr, "weight_decay": 0.01, "clip_grad": 1.0},
            # linear warmup from lr / warmup (step 1 learns), then constant
            "scheduler": {"train_iters": args.steps, "decay_style": "constant", "warmup_iters": args.lr_warmup_steps,
                          "warmup_init_lr": args.lr / max(1, args.lr_warmup_steps)},
            "model": shape, "data": {"path": corpus, "split": "1,0,0"}, "seed": 1234,
            "logging": {"progress": False, "interval": 1}}


def same_batch(corpus: str, seq_length: int):
    """``batches`` for zeromega.Run that repeat this rank's first micro-batch (``--same-batch``)."""
    def batches(start_sample: int, dp_rank: int, dp_size: int, micro: int):
        from zeromega.integrations.megatron import data

        train_ds, _, _ = data.build_gpt_datasets(corpus, seq_length, 1234, (micro * dp_size, 0, 0), split="1,0,0")
        first = next(data.sample_batches(train_ds, micro, dp_rank=dp_rank, dp_size=dp_size))
        while True:
            yield first

    return batches


def train(args, corpus: str) -> dict:
    """One rank: plan and pre-flight (before anything is built), then zeromega.Run, then measure."""
    import torch

    from zeromega.config import validate
    from zeromega.plugins.zero import engine as zengine
    from zeromega.plugins.zero import plan as zplan
    from zeromega.plugins.zero import preflight, report
    from zeromega.run import Run

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.nproc))
    cfg = validate(run_config(args, corpus))
    layout = cfg.layout(args.nproc)

    def plan_fn(d):
        return zplan.for_run(d, layout, shape=args.shape)

    ds, notes = zengine.zero_config(cfg, layout, "cpu", plan_fn)
    if args.offload == "nvme":
        os.makedirs(args.nvme_path, exist_ok=True)
    plan = preflight.preflight(ds, plan_fn, device_type="cpu", local_ranks=args.nproc).plan  # raises on a problem
    io = report.IOWatch().start()
    run = Run(cfg, batches=same_batch(corpus, args.seq_length) if args.same_batch else None)
    records = run.train()  # prints the memory plan (offload), then a line per step
    io.stop()
    rank = int(os.environ.get("RANK", 0))
    steps = [{"step": r.step, "loss": r.loss, "s": r.step_time_s, "read": r.storage_read_bytes,
              "written": r.storage_write_bytes} for r in records]
    s = zplan.ZeroSetup.from_deepspeed(ds)
    paths = [p for p, d in ((s.optimizer_nvme_path, s.optimizer_device), (s.param_nvme_path, s.param_device))
             if d == "nvme"]
    measured = report.measure(paths, io)
    total = plan.model.total_params
    if rank == 0:
        print(f"built in {run.setup_seconds:.0f} s; wrote {run.setup_storage_write_bytes / 2**30:.2f} GiB during init")
    return {"rank": rank, "params": total, "shape": args.shape, "steps": steps, "init_s": run.setup_seconds,
            "measured": report.as_dict(measured), "plan_peak": plan.peak("cpu"), "plan_nvme": plan.nvme_bytes,
            "model_state_bytes": 16 * total, "init_write_bytes": run.setup_storage_write_bytes, "notes": notes}


def main(argv=None) -> int:
    args = parse(argv)
    from zeromega.integrations.megatron import data

    corpus = str(data.build_corpus(os.path.join(os.path.dirname(os.path.abspath(args.nvme_path)) or ".",
                                                "zeromega_corpus", "stdlib"), max_bytes=2_000_000))
    if args.nproc == 1:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        results = [train(args, corpus)]
    else:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
        from distributed import run_world

        results = run_world(args.nproc, _rank, args, corpus, timeout=36000)
    gib = 2**30
    print(f"\nGPT {results[0]['params'] / 1e9:.2f}B params; model states (16 B/param) "
          f"{results[0]['model_state_bytes'] / gib:.1f} GiB")
    for r in results:
        m = r["measured"]
        losses = [s["loss"] for s in r["steps"]]
        per_step = [s["s"] for s in r["steps"]]
        print(f"rank {r['rank']}: peak RSS {m['peak_bytes'] / gib:.2f} GiB (plan {r['plan_peak'] / gib:.2f}); "
              f"states / peak = {r['model_state_bytes'] / m['peak_bytes']:.1f}x; "
              f"losses {' '.join(f'{x:.3f}' for x in losses)}; step {min(per_step):.0f}-{max(per_step):.0f} s; "
              f"training read {m['read_bytes'] / gib:.1f} GiB, wrote {m['write_bytes'] / gib:.1f} GiB; "
              f"swap files {m['nvme_bytes'] / gib:.1f} GiB (plan {r['plan_nvme'] * len(results) / gib:.1f})")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def _rank(args, corpus):
    return train(args, corpus)


if __name__ == "__main__":
    sys.exit(main())
