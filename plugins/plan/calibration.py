"""Published Megatron-LM runs, as data with their sources, and the efficiency factors fitted on some of them.

The step time of each run comes from its published throughput: Narayanan et
al. 2021 report achieved TFLOP/s per GPU counted with their eq. (3) (full
recomputation), so ``step = eq3 FLOPs / (GPUs x TFLOP/s)``; Korthikanti et al.
2022 report model FLOPs utilization, so ``step = model FLOPs / (GPUs x MFU x
312 TFLOP/s)``. All ran on Selene's DGX A100 80GB nodes (8 GPUs a node, one
200 Gb/s HDR link per GPU; none on 40GB parts).

Sources and what was checked:

- Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
  Clusters Using Megatron-LM" (arXiv 2104.04473), Table 1: vocabulary 51,200,
  sequence 2048, fp16, full recomputation. The table itself is an image in the
  paper and in Megatron-LM's README; its rows here are as printed in the paper.
  Checked in retrievable text: the 1T row (abstract: 502 petaFLOP/s on 3072 GPUs,
  52% of peak) and, as its own row, Megatron-LM's README of 2021 (commit
  71359e1): GPT-3 175B at tp 8 x pp 16 on 1024 GPUs, global batch 1536, micro
  batch 1 (examples/pretrain_gpt3_175B.sh), ~32 s per iteration, 138 TFLOP/s per
  GPU. Table 1 does not state the micro batch or the schedule: micro batch 1 and
  the non-interleaved 1F1B schedule are assumed (the README script's).
- Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models" (arXiv 2205.05198), Table 3 (configurations: micro batch
  1 except the 22B's 4, dp 1) with selective recomputation and sequence
  parallelism; MFU and HFU as printed in Megatron-LM's README (commit 360712f):
  22B 41.5% / 43.7%, 175B 51.4% / 52.8%, 530B 56.0% / 57.0%, 1T 56.3% / 57.0%.
  The iteration times of the paper's Table 5 (1.10, 13.75, 37.83, 71.49 s) equal
  the MFU-derived ones within 0.3%.

Memory: neither paper prints per-GPU memory as a number (Korthikanti et al.
show it as a share of 80 GB in a figure), so the memory check is that each
published run fits an 80 GB A100 in the plan, not a 15% comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .devices import DEVICES
from .flops import korthikanti_model_flops, narayanan_flops
from .timing import Cluster, Efficiency, PlanLayout, step_time

A100_PEAK = 312e12


@dataclass(frozen=True)
class PublishedRun:
    name: str
    source: str
    layers: int
    hidden: int
    heads: int
    tp: int
    pp: int
    gpus: int
    global_batch: int
    micro: int
    recompute: str
    sequence_parallel: bool
    published: str
    """The figure as printed (TFLOP/s per GPU, MFU, or s per iteration)."""
    step_s: float
    """Seconds per iteration derived from the published figure."""
    fit: bool
    """Used to fit the efficiency factors (else held out)."""
    seq: int = 2048
    vocab: int = 51200

    @property
    def shape(self) -> dict:
        return dict(num_layers=self.layers, hidden_size=self.hidden, num_attention_heads=self.heads,
                    seq_length=self.seq, vocab_size=self.vocab, make_vocab_size_divisible_by=128)

    @property
    def layout(self) -> PlanLayout:
        dp = self.gpus // (self.tp * self.pp)
        return PlanLayout(tp=self.tp, pp=self.pp, dp=dp, global_batch=self.global_batch, micro=self.micro,
                          sequence_parallel=self.sequence_parallel, recompute=self.recompute, engine="megatron",
                          zero_stage=0)


def _narayanan(name, heads, hidden, layers, tp, pp, gpus, batch, tflops, pct, fit, source="Narayanan et al. 2021, "
               "Table 1"):
    step = narayanan_flops(batch, 2048, layers, hidden, 51200) / (gpus * tflops * 1e12)
    return PublishedRun(name, source, layers, hidden, heads, tp, pp, gpus, batch, 1, "full", False,
                        f"{tflops} TFLOP/s/GPU ({pct}% of peak)", step, fit)


def _korthikanti(name, heads, hidden, layers, tp, pp, gpus, batch, micro, mfu, fit):
    step = korthikanti_model_flops(batch, 2048, layers, hidden, 51200) / (gpus * mfu * A100_PEAK)
    return PublishedRun(name, "Korthikanti et al. 2022, Tables 3 and 5 (MFU: Megatron-LM README)", layers, hidden,
                        heads, tp, pp, gpus, batch, micro, "selective", True, f"MFU {mfu * 100:.1f}%", step, fit)


RUNS = (
    _narayanan("GPT 1.7B", 24, 2304, 24, 1, 1, 32, 512, 137, 44, True),
    _narayanan("GPT 3.6B", 32, 3072, 30, 2, 1, 64, 512, 138, 44, False),
    _narayanan("GPT 7.5B", 32, 4096, 36, 4, 1, 128, 512, 142, 46, False),
    _narayanan("GPT 18.4B", 48, 6144, 40, 8, 1, 256, 1024, 135, 43, True),
    _narayanan("GPT 39.1B", 64, 8192, 48, 8, 2, 512, 1536, 138, 44, False),
    _narayanan("GPT 76.1B", 80, 10240, 60, 8, 4, 1024, 1792, 140, 45, False),
    _narayanan("GPT 145.6B", 96, 12288, 80, 8, 8, 1536, 2304, 148, 47, True),
    _narayanan("GPT 310.1B", 128, 16384, 96, 8, 16, 1920, 2160, 155, 50, False),
    _narayanan("GPT 529.6B", 128, 20480, 105, 8, 35, 2520, 2520, 163, 52, False),
    _narayanan("GPT 1008.0B", 160, 25600, 128, 8, 64, 3072, 3072, 163, 52, True),
    _narayanan("GPT-3 175B (README)", 96, 12288, 96, 8, 16, 1024, 1536, 138, 44, False,
               source="Megatron-LM README 2021 (examples/pretrain_gpt3_175B.sh): ~32 s/iteration"),
    _korthikanti("22B (sel+sp)", 64, 6144, 48, 8, 1, 8, 4, 4, 0.415, False),
    _korthikanti("175B (sel+sp)", 96, 12288, 96, 8, 8, 64, 64, 1, 0.514, True),
    _korthikanti("530B (sel+sp)", 128, 20480, 105, 8, 35, 280, 280, 1, 0.560, False),
    _korthikanti("1T (sel+sp)", 160, 25600, 128, 8, 64, 512, 512, 1, 0.563, False),
)

A100_CLUSTER = dict(gpus_per_node=8, precision="fp16")

FITTED = Efficiency(matmul=0.705, memory_traffic=1.6)
"""What :func:`fit` returns on the rows marked ``fit`` (tests/test_plan_time.py recomputes it): GEMMs at 70.5% of
the dense peak, memory-bound kernels moving 1.6x the bytes a layer stores for backward."""


def predict(run: PublishedRun, eff: Efficiency) -> float:
    cluster = Cluster(DEVICES["a100-80"], run.gpus, **A100_CLUSTER)
    return step_time(run.shape, run.layout, cluster, eff).seconds


def errors(eff: Efficiency, runs=RUNS) -> list[float]:
    """Relative error of the predicted step time per run (predicted / published - 1)."""
    return [predict(r, eff) / r.step_s - 1 for r in runs]


def _linear(run: PublishedRun) -> tuple[float, float, float]:
    """The predicted step is ``a / matmul + b x memory_traffic + c`` (the model is linear in both); a, b, c
    from three evaluations, so the fit's grid costs no further planning."""
    t10 = predict(run, Efficiency(1.0, 0.0))
    t20 = predict(run, Efficiency(0.5, 0.0))
    t11 = predict(run, Efficiency(1.0, 1.0))
    a = t20 - t10
    return a, t11 - t10, t10 - a


def fit(runs=None) -> Efficiency:
    """The (matmul, memory_traffic) pair minimising the worst relative step-time error over ``runs`` (default:
    the rows marked ``fit``): a grid, matmul 0.500-0.950 in steps of 0.005, memory_traffic 0-12 in steps of 0.1."""
    runs = [r for r in RUNS if r.fit] if runs is None else runs
    coeffs = [(_linear(r), r.step_s) for r in runs]
    best = None
    for i in range(91):
        mm = round(0.50 + 0.005 * i, 3)
        for j in range(121):
            k = round(0.1 * j, 1)
            worst = max(abs((a / mm + b * k + c) / step - 1) for (a, b, c), step in coeffs)
            if best is None or worst < best[0]:
                best = (worst, Efficiency(matmul=mm, memory_traffic=k))
    return best[1]


__all__ = ["FITTED", "PublishedRun", "RUNS", "errors", "fit", "predict"]
