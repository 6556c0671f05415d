"""Data-parallel overlap on CPU/gloo, off vs on, side by side: Megatron-Core's DDP (``ddp.overlap_grad_reduce`` with
``ddp.overlap_param_gather``, the distributed optimizer) and DeepSpeed's ZeRO ``overlap_comm``, 2 ranks.

For each case: the largest relative difference of the per-step loss and grad norm between the two runs (0 means
bitwise equal), and the ratio of their wall times (on / off: a run's setup included; on 2 CPU cores there is no
spare core for the reduce to run on, so no speed-up is expected). Run from the repository root:

    .venv/bin/python bench/overlap.py [--steps 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

SHAPE = dict(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=64, vocab_size=257,
             hidden_dropout=0.0, attention_dropout=0.0)
ON = {"overlap_grad_reduce": True, "bucket_size": 10_000}
# name: (run config less the ddp section, ddp section when on); pp 2 / MoE run on Megatron-Core's engine
CASES = {
    "megatron-core dp2, MoE (distributed optimizer)": ({"zero": {"stage": 1}, "moe": {"num_experts": 2}},
                                                  {**ON, "overlap_param_gather": True}),
    "megatron-core pp2 (1F1B, dp1)": ({"zero": {"stage": 1}, "parallel": {"pp": 2}},
                                      {**ON, "overlap_param_gather": True}),
    "deepspeed zero1": ({"zero": {"stage": 1}}, ON),
    "deepspeed zero2": ({"zero": {"stage": 2}}, ON),
    "deepspeed zero3": ({"zero": {"stage": 3}}, ON),
    "deepspeed zero2 bf16": ({"zero": {"stage": 2}, "precision": "bf16"}, ON),
}


def main() -> int:
    from distributed import run_world
    from run_workers import run_gpt

    from zeromega.integrations.megatron import data

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    prefix = str(data.build_corpus(Path(tempfile.mkdtemp()) / "corpus", max_bytes=200_000))
    print(f"{'case':44s} {'loss rel diff':>14s} {'norm rel diff':>14s} {'time on/off':>12s}")
    for name, (base, ddp) in CASES.items():
        results = {}
        for key, section in (("off", {"overlap_grad_reduce": False}), ("on", ddp)):
            cfg = {**base, "batch": {"micro": 2, "global": 8}, "optimizer": {"lr": 3e-3}, "ddp": section}
            start = time.perf_counter()
            results[key] = (run_world(2, run_gpt, cfg, SHAPE, prefix, args.steps)[0], time.perf_counter() - start)
        (off, t_off), (on, t_on) = results["off"], results["on"]
        loss = max(abs(a - b) / abs(b) for a, b in zip(on["loss"], off["loss"]))
        norm = max(abs(a - b) / abs(b) for a, b in zip(on["grad_norm"], off["grad_norm"]))
        print(f"{name:44s} {loss:14.3g} {norm:14.3g} {t_on / t_off:12.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
