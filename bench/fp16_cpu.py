#!/usr/bin/env python
"""fp16 on this CPU: matmul speed and a tiny GPT's training step, fp16 beside fp32 and bf16.

Part 1 times one square matmul per dtype (one thread, best of ``--repeat``).
Part 2 trains zeromega's GPT through ``zeromega.Run`` on DeepSpeed's engine
(one process, ZeRO-``--zero-stage``), same seed and data in each precision:
median step time after the first two steps, the loss curve and, for fp16,
DeepSpeed's loss-scale trace (dynamic: ``--initial-loss-scale``, window
``--loss-scale-window``, hysteresis 2, DeepSpeed's default). Ratios are to
fp32.

    python bench/fp16_cpu.py
    python bench/fp16_cpu.py --hidden-size 256 --num-layers 4 --seq-length 256 --steps 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from distributed import run_world  # noqa: E402

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def matmul_seconds(n: int, dtype: str, repeat: int) -> float:
    import torch

    torch.set_num_threads(1)
    a = torch.randn(n, n).to(getattr(torch, dtype))
    b = torch.randn(n, n).to(getattr(torch, dtype))
    a @ b
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def train(argv: list[str]) -> dict:
    from zeromega.launch import script_args
    from zeromega.run import Run

    records = Run(script_args.read(argv, "pretrain_gpt.py"), log=lambda line: None).train()
    return {"loss": [r.loss for r in records], "step_s": [r.step_time_s for r in records],
            "scale": [r.loss_scale for r in records], "skipped": [r.skipped for r in records]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--matmul", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--initial-loss-scale", type=float, default=2.0 ** 16)
    p.add_argument("--loss-scale-window", type=int, default=4)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    import torch

    out: dict = {"mkldnn_fp16": bool(torch.ops.mkldnn._is_mkldnn_fp16_supported()),
                 "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "matmul": {}, "gpt": {}}
    print(f"oneDNN native fp16: {out['mkldnn_fp16']}, native bf16: {out['mkldnn_bf16']}; 1 thread")
    print(f"{'matmul n':>9} " + " ".join(f"{name + ' ms':>16}" for name in DTYPES))
    for n in args.matmul:
        times = {name: run_world(1, matmul_seconds, n, dtype, args.repeat)[0] for name, dtype in DTYPES.items()}
        out["matmul"][n] = times
        print(f"{n:>9} " + " ".join(f"{times[name] * 1e3:9.2f} ({times[name] / times['fp32']:4.1f}x)"
                                    for name in DTYPES), flush=True)

    from zeromega.integrations.megatron import data

    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(data.build_corpus(Path(tmp) / "stdlib", max_bytes=300_000))
        base = ["--data-path", prefix, "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
                "--num-attention-heads", str(args.heads), "--seq-length", str(args.seq_length),
                "--micro-batch-size", str(args.micro), "--global-batch-size", str(args.micro), "--split", "1,0,0",
                "--hidden-dropout", "0", "--attention-dropout", "0", "--lr", "1e-3", "--lr-decay-style",
                "constant", "--train-iters", str(args.steps), "--zero-stage", str(args.zero_stage),
                "--no-progress"]
        flags = {"fp32": [], "bf16": ["--bf16"],
                 "fp16": ["--fp16", "--initial-loss-scale", str(args.initial_loss_scale), "--loss-scale-window",
                          str(args.loss_scale_window)]}
        for name, extra in flags.items():
            out["gpt"][name] = run_world(1, train, base + extra, timeout=1800)[0]
    gpt = out["gpt"]
    median = {name: statistics.median(r["step_s"][2:] or r["step_s"]) for name, r in gpt.items()}
    print(f"\nGPT {args.num_layers} layers, hidden {args.hidden_size}, seq {args.seq_length}, micro {args.micro}, "
          f"ZeRO-{args.zero_stage}, DeepSpeed's engine, 1 process, {args.steps} steps")
    print(f"{'':>6} {'step ms (median)':>22} {'first loss':>11} {'last loss':>10}")
    for name, r in gpt.items():
        print(f"{name:>6} {median[name] * 1e3:12.1f} ({median[name] / median['fp32']:4.2f}x) "
              f"{r['loss'][0]:11.5f} {r['loss'][-1]:10.5f}")
    print("loss  " + " ".join(f"{name}: " + ",".join(f"{x:.4f}" for x in r["loss"]) for name, r in gpt.items()))
    print("fp16 loss scale after each step: " + ",".join(f"{s:g}" for s in gpt["fp16"]["scale"]))
    print("fp16 skipped: " + ",".join(str(int(s)) for s in gpt["fp16"]["skipped"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
