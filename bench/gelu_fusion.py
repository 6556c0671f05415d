#!/usr/bin/env python
"""What Megatron-LM's default --bias-gelu-fusion changes, and what torch.compile would cost on a CPU rank.

1. The function: Megatron-Core's fused bias + GELU (``bias_gelu_impl``) is GELU's tanh approximation; the
   largest gap to erf GELU over x in [-8, 8], and its gradient's.
2. The run: a small GPT from Megatron flags with biases (1 process, mock data, dropout 0), trained
   ``--steps`` steps with Megatron-LM's default (tanh GELU) and with ``--no-bias-gelu-fusion`` (erf GELU):
   the loss curves side by side and their largest relative gap.
3. The compile: the first call (forward and backward) of the fused function under Megatron-Core's
   ``jit_fuser`` (torch.compile) against the eager function zeromega's CPU ranks run (``cpu_patches``).

    python bench/gelu_fusion.py --steps 30
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def function_gap() -> tuple[float, float]:
    import torch

    from megatron.core.fusions import fused_bias_gelu

    tanh_fn = getattr(fused_bias_gelu.bias_gelu, "_torchdynamo_orig_callable", fused_bias_gelu.bias_gelu)
    back_fn = getattr(fused_bias_gelu.bias_gelu_back, "_torchdynamo_orig_callable", fused_bias_gelu.bias_gelu_back)
    x = torch.linspace(-8, 8, 160001, dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    erf = x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
    erf_grad = 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return (float((tanh_fn(zero, x) - erf).abs().max()),
            float((back_fn(torch.ones_like(x), zero, x) - erf_grad).abs().max()))


def train(argv: list[str]) -> list[float]:
    from run_workers import run_logging

    return [r["loss"] for r in run_logging(argv)["records"]]


def compile_cost() -> tuple[float, float]:
    import torch

    from megatron.core.fusions import fused_bias_gelu

    x = torch.randn(64, 4, 256, requires_grad=True)
    b = torch.zeros(256, requires_grad=True)
    start = time.perf_counter()
    fused_bias_gelu.bias_gelu_impl(x, b).sum().backward()  # still the jit_fuser wrapper: no patch applied here
    compiled = time.perf_counter() - start
    eager = fused_bias_gelu.GeLUFunction  # the same autograd function with the unwrapped bodies
    saved = fused_bias_gelu.bias_gelu, fused_bias_gelu.bias_gelu_back
    fused_bias_gelu.bias_gelu = saved[0]._torchdynamo_orig_callable
    fused_bias_gelu.bias_gelu_back = saved[1]._torchdynamo_orig_callable
    start = time.perf_counter()
    eager.apply(x, b).sum().backward()
    plain = time.perf_counter() - start
    fused_bias_gelu.bias_gelu, fused_bias_gelu.bias_gelu_back = saved
    return compiled, plain


def cpu_speed(repeats: int = 20) -> tuple[float, float]:
    """ms per forward + backward on a (1024, 1024) activation: Megatron-Core's fused bias + GELU run eagerly
    (its jit_fuser taken off, as cpu_patches does) against torch's own tanh GELU after the bias add, which is
    what zeromega's CPU ranks compute (integrations/megatron/model.py)."""
    import torch
    import torch.nn.functional as F

    from megatron.core.fusions import fused_bias_gelu

    for name in ("bias_gelu", "bias_gelu_back"):
        fn = getattr(fused_bias_gelu, name)
        setattr(fused_bias_gelu, name, getattr(fn, "_torchdynamo_orig_callable", fn))
    x = torch.randn(1024, 1024, requires_grad=True)
    b = torch.randn(1024, requires_grad=True)

    def per_call(fn) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return 1000 * (time.perf_counter() - start) / repeats

    times = [(per_call(lambda: fused_bias_gelu.bias_gelu_impl(x, b).sum().backward()),
              per_call(lambda: F.gelu(x + b, approximate="tanh").sum().backward())) for _ in range(3)]
    return min(t[0] for t in times), min(t[1] for t in times)


def main() -> int:
    from distributed import run_world

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    value, grad = function_gap()
    print(f"tanh-GELU vs erf GELU on [-8, 8]: max |f| gap {value:.3e}, max |f'| gap {grad:.3e}")
    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
            "--max-position-embeddings", "64", "--micro-batch-size", "4", "--global-batch-size", "4",
            "--train-iters", str(args.steps), "--lr", "3e-3", "--mock-data", "--hidden-dropout", "0",
            "--attention-dropout", "0", "--no-progress", "--log-interval", "1000", "--seed", "7"]
    tanh_curve = run_world(1, train, base, timeout=600)[0]
    erf_curve = run_world(1, train, base + ["--no-bias-gelu-fusion"], timeout=600)[0]
    print(f"{'step':>5}  {'tanh (default)':>15}  {'erf (--no-bias-gelu-fusion)':>28}  {'rel gap':>9}")
    for step, (t, e) in enumerate(zip(tanh_curve, erf_curve), 1):
        if step in (1, 2, 5) or step % 10 == 0 or step == len(tanh_curve):
            print(f"{step:>5}  {t:>15.6f}  {e:>28.6f}  {abs(t - e) / abs(e):>9.2e}")
    worst = max(abs(t - e) / abs(e) for t, e in zip(tanh_curve, erf_curve))
    print(f"largest relative loss gap over {len(tanh_curve)} steps: {worst:.2e}")
    compiled, plain = run_world(1, lambda: compile_cost(), timeout=600)[0]
    print(f"first forward+backward of bias_gelu_impl on CPU: torch.compile {compiled:.2f} s, eager {plain:.4f} s "
          f"(ratio {compiled / plain:.0f}x)")
    megatron, native = run_world(1, lambda: cpu_speed(), timeout=600)[0]
    print(f"forward+backward on (1024, 1024), same function: Megatron-Core's bias_gelu_impl eager {megatron:.1f} ms, "
          f"torch gelu(approximate='tanh') {native:.1f} ms (ratio {megatron / native:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
