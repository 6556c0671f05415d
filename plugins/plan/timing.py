"""Step time of a layout on a cluster: compute, communication, pipeline bubble, optimizer, offload.

Legend: ``t`` tp, ``p`` pp, ``v`` virtual stages, ``c`` cp, ``e`` ep, ``d`` dp,
``m`` micro-batches per step (per pipeline), ``b`` micro-batch, ``s`` sequence,
``T = s b / c`` tokens a rank works on per micro-batch, ``lp`` bytes of a
16-bit element.

Per micro-batch on the slowest pipeline stage:

- GEMMs: the stage's forward FLOPs x 3 (forward, two backward GEMMs), plus one
  more forward under full recomputation, the score GEMMs once more under
  selective; at ``matmul`` x the dense peak (:class:`Efficiency`).
- memory-bound kernels (norms, activations, dropout, softmax, residuals):
  ``memory_traffic`` x the bytes the layer stores for backward (the
  activation formula of :mod:`zeromega.plugins.zero.plan`, without
  recomputation) over the HBM bandwidth, once more for recomputed parts.
- tp: 2 all-reduces of ``T h lp`` forward and 2 backward per layer (2 more
  under full recomputation); sequence parallelism swaps each for a
  reduce-scatter + all-gather of the same volume. Ring: ``2 (t-1)/t x bytes /
  bandwidth``. Not overlapped (Megatron-Core without TransformerEngine's
  tp-comm overlap).
- cp: 4 all-to-alls forward and 4 backward per layer (Ulysses: q, k, v, out);
  ring attention is charged the same volume. ep: dispatch and combine, forward
  and backward: 4 all-to-alls of ``K T h lp`` per MoE layer. ``(n-1)/n x bytes /
  bandwidth``.
- pp: each micro-batch's activation forward and its gradient backward cross
  every stage boundary once per model chunk (``T h lp``, / t under sp).

Step: ``(m + (p-1)/v) x`` the slowest stage's micro-batch time (1F1B with the
bubble ``(p-1)/(v m)``), plus the data-parallel gradient reduction (Megatron's
fp32 gradient buffer: reduce-scatter 4 P + all-gather lp P with the
distributed optimizer, all-reduce 4 P without; Megatron-Core's DDP hides it
behind the last micro-batch's backward only under ``ddp.overlap_grad_reduce``
(``--overlap-grad-reduce``, the ``dp_overlap`` argument); DeepSpeed's
``overlap_comm``: ZeRO-0/1 reduce at the accumulation boundary behind the last
micro-batch's backward, ZeRO-2 reduce-scatters every micro-batch's gradients
behind its backward, ZeRO-3 also gathers the parameters for every forward and
backward; what a micro-batch's compute does not cover is exposed; ZeRO-1/2
all-gather the updated parameters after the step), the optimizer step
(memory-bound: ~32 bytes per stepped element) and offload transfers (bytes per
step over PCIe / NVMe bandwidth, CPU Adam at :data:`CPU_ADAM_ELEMENTS_PER_S`).

A group's bandwidth is the node's (NVLink) when all its ranks share a node,
else the per-GPU network's. Megatron-Core orders ranks tp fastest, then cp,
then dp (ep carved out of cp x dp), then pp: a group of span ``S`` consecutive
ranks stays inside a node of ``n`` GPUs when ``S <= n``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

from .devices import LINK_EFFICIENCY, Device
from .flops import layer_forward_flops, model_flops

CPU_ADAM_ELEMENTS_PER_S = 1.0e9
"""DeepSpeed CPU Adam throughput per rank (an assumption: the ZeRO-Offload paper reports CPU-Adam
updating ~1B parameters in well under a second on a server's cores shared by its GPUs)."""
NVME_GBS = 3.0
"""NVMe read / write bandwidth per rank, GB/s (an assumption: one PCIe Gen4 drive per GPU)."""
OPTIMIZER_BYTES_PER_ELEMENT = 32
"""HBM bytes the optimizer step moves per element it steps (read grad, master, m, v; write master, m, v, lp param)."""


@dataclass(frozen=True)
class Efficiency:
    """What fraction of the hardware's peaks the kernels reach; fitted in :mod:`.calibration`."""

    matmul: float
    """Fraction of the dense tensor-core peak the GEMMs reach."""
    memory_traffic: float
    """HBM bytes the memory-bound kernels move per byte of activations a layer stores for backward."""
    link: float = LINK_EFFICIENCY
    """Fraction of a link's bandwidth a collective reaches."""


@dataclass(frozen=True)
class Cluster:
    device: Device
    gpus: int
    gpus_per_node: int = 8
    precision: str = "bf16"

    @property
    def nodes(self) -> int:
        return max(1, math.ceil(self.gpus / self.gpus_per_node))


@dataclass(frozen=True)
class PlanLayout:
    """One candidate layout: the attributes :func:`zeromega.plugins.zero.plan.plan_pipeline` reads, plus the
    engine, optimizer sharding, recomputation and offload."""

    tp: int
    pp: int
    dp: int
    global_batch: int
    micro: int = 1
    cp: int = 1
    ep: int = 1
    etp: Optional[int] = None
    vpp: Optional[int] = None
    sequence_parallel: bool = False
    recompute: Optional[str] = None
    engine: str = "megatron"
    """``megatron`` (Megatron-Core DDP; pp > 1 and MoE always) or ``deepspeed`` (ZeRO 0-3, pp 1 dense)."""
    zero_stage: int = 1
    """DeepSpeed's ZeRO stage; for Megatron 1 = the distributed optimizer, 0 = a plain one."""
    offload: str = "none"
    """DeepSpeed optimizer (and at ZeRO-3 parameter) offload: ``none``, ``cpu``, ``nvme``."""
    flash: bool = False
    first_stage_layers: Optional[int] = None
    embedding_in_split: bool = False
    loss_in_split: bool = False
    last_stage_layers: Optional[int] = None

    @property
    def accumulation(self) -> int:
        return max(1, self.global_batch // (self.micro * self.dp))

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def describe(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}"]
        if self.vpp and self.vpp > 1:
            parts.append(f"vpp{self.vpp}")
        if self.cp > 1:
            parts.append(f"cp{self.cp}")
        if self.ep > 1:
            parts.append(f"ep{self.ep}")
        parts.append(f"dp{self.dp}")
        parts.append(f"mb{self.micro}")
        if self.sequence_parallel:
            parts.append("sp")
        parts.append({None: "no-recompute", "selective": "sel-recompute", "full": "full-recompute"}[self.recompute])
        if self.engine == "megatron":
            parts.append("distopt" if self.zero_stage >= 1 else "plain-opt")
        else:
            parts.append(f"zero{self.zero_stage}")
        if self.offload != "none":
            parts.append(f"offload-{self.offload}")
        return " ".join(parts)


def group_spans(layout: PlanLayout) -> dict:
    """Consecutive ranks each group spans under Megatron-Core's order (tp, cp, dp, pp; ep within cp x dp)."""
    t, c, d = layout.tp, layout.cp, layout.dp
    etp = layout.etp or t
    return {"tp": t, "cp": t * c, "ep": etp * layout.ep, "dp": t * c * d, "pp": t * c * d * layout.pp}


def crossing_groups(layout: PlanLayout, gpus_per_node: int) -> list[str]:
    """Groups whose ranks sit on more than one node; the topology rules of Narayanan et al. 2021 (tp inside a
    node, pp across nodes, dp outermost) want tp, cp and ep inside."""
    spans = group_spans(layout)
    out = []
    for name in ("tp", "cp", "ep"):
        size = {"tp": layout.tp, "cp": layout.cp, "ep": layout.ep}[name]
        if size > 1 and spans[name] > gpus_per_node:
            out.append(name)
    return out


def topology_warnings(layout: PlanLayout, gpus_per_node: int) -> list[str]:
    """One line per group that crosses nodes, naming it and what it costs."""
    spans = group_spans(layout)
    lines = []
    for name in crossing_groups(layout, gpus_per_node):
        size = {"tp": layout.tp, "cp": layout.cp, "ep": layout.ep}[name]
        lines.append(f"the {name} group ({name} {size}, spanning {spans[name]} consecutive ranks) crosses nodes of "
                     f"{gpus_per_node} GPUs: its {'all-reduces' if name == 'tp' else 'all-to-alls'} run over the "
                     f"network; keep tp{' x cp' if name != 'tp' else ''} within {gpus_per_node} and put pp across nodes")
    return lines


def _bandwidth(span: int, cluster: Cluster, eff: Efficiency) -> float:
    d = cluster.device
    gbs = d.intra_node_gbs if span <= cluster.gpus_per_node else d.inter_node_gbs
    return gbs * 1e9 * eff.link


def _ring_allreduce(nbytes: float, n: int, bw: float) -> float:
    return 0.0 if n <= 1 else 2 * (n - 1) / n * nbytes / bw


def _ring_gather(nbytes: float, n: int, bw: float) -> float:
    """All-gather or reduce-scatter of a ``nbytes`` whole (each rank holds 1/n)."""
    return 0.0 if n <= 1 else (n - 1) / n * nbytes / bw


@dataclass
class StepTime:
    """Seconds per optimizer step, by part, and what they make."""

    parts: dict
    model_flops: float
    tokens: int
    gpus: int
    peak: float
    seconds: float = 0.0
    notes: list = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def mfu(self) -> float:
        """Model FLOPs (Megatron's formula) per second over the cluster's dense peak."""
        return self.model_flops / (self.seconds * self.gpus * self.peak)

    def days(self, tokens: float) -> float:
        return tokens / self.tokens_per_s / 86400

    def as_dict(self) -> dict:
        return {"step_s": self.seconds, "parts_s": self.parts, "tokens_per_s": self.tokens_per_s, "mfu": self.mfu,
                "model_flops_per_step": self.model_flops}


def _stage_layers(shape: dict, layout: PlanLayout) -> list[list[int]]:
    from zeromega.plugins.zero.plan import stage_layers

    split = stage_layers(shape["num_layers"], layout.pp, layout.vpp, layout.first_stage_layers,
                         layout.last_stage_layers, layout.embedding_in_split, layout.loss_in_split)
    return [[i for f, n in chunks for i in range(f, f + n)] for chunks in split]


def _moe_flags(shape: dict) -> list[bool]:
    from zeromega.plugins.zero.plan import _moe_pattern

    return _moe_pattern(shape["num_layers"], shape.get("num_experts"), shape.get("moe_layer_freq", 1) or 1)


def _layer_activation_bytes(shape: dict, layout: PlanLayout, lp: int, flash: bool) -> tuple[float, float]:
    """Bytes one layer stores for backward per micro-batch (no recomputation), and of them the scores'."""
    s, b, h, a, t, c = shape["seq_length"], layout.micro, shape["hidden_size"], shape["num_attention_heads"], \
        layout.tp, layout.cp
    sl = s / c
    base = sl * b * h * ((34 / t) if layout.sequence_parallel else (10 + 24 / t)) * lp / 2
    scores = 0.0 if flash else sl * b * h * (5 * a * s / h) / t * lp / 2
    return base + scores, scores


def step_time(shape: dict, layout: PlanLayout, cluster: Cluster, eff: Efficiency,
              dp_overlap: Optional[bool] = None) -> StepTime:
    """Predicted seconds per optimizer step of ``layout`` on ``cluster`` (see the module doc for the model)."""
    dev, lp = cluster.device, (4 if cluster.precision == "fp32" else 2)
    peak = dev.peak(cluster.precision)
    t, p, c, e, d = layout.tp, layout.pp, layout.cp, layout.ep, layout.dp
    v = layout.vpp if layout.vpp and layout.vpp > 1 else 1
    etp = layout.etp or t
    s, b, h = shape["seq_length"], layout.micro, shape["hidden_size"]
    V = shape["vocab_size"]
    tokens = s * b / c
    flash = layout.flash
    spans = group_spans(layout)
    bw = {name: _bandwidth(span, cluster, eff) for name, span in spans.items()}
    bw_pp = _bandwidth(spans["pp"] if p > 1 else 1, cluster, eff) if p > 1 else float("inf")
    hbm = dev.hbm_gbs * 1e9
    moe = _moe_flags(shape)
    act, scores = _layer_activation_bytes(shape, layout, lp, flash)
    recompute = layout.recompute

    def layer_time(is_moe: bool) -> dict:
        fl = layer_forward_flops(shape, tokens, s, is_moe, causal_half=flash)
        gemm = fl["proj"] / t + fl["mlp"] / (etp if is_moe else t)
        core = fl["attention"] / t
        passes = 3 + (1 if recompute == "full" else 0)
        flops = gemm * passes + core * (passes + (1 if recompute == "selective" else 0))
        mem_bytes = eff.memory_traffic * (act * (4 / 3 if recompute == "full" else 1)
                                          + (scores / 3 if recompute == "selective" else 0)) * 3
        comm_tp = (4 + (2 if recompute == "full" else 0)) * _ring_allreduce(tokens * h * lp, t, bw["tp"])
        comm_cp = 8 * _ring_gather(tokens * h * lp / t, c, bw["cp"]) if c > 1 else 0.0
        comm_ep = 4 * _ring_gather(shape.get("moe_router_topk", 2) * tokens * h * lp / t, e, bw["ep"]) \
            if is_moe and e > 1 else 0.0
        return {"compute": flops / (peak * eff.matmul), "memory-bound": mem_bytes / hbm, "tp": comm_tp,
                "cp": comm_cp, "ep": comm_ep}

    per_kind = {False: layer_time(False), True: layer_time(True) if any(moe) else None}
    stages = _stage_layers(shape, layout)
    micro_parts = []
    for r, layers in enumerate(stages):
        parts = {"compute": 0.0, "memory-bound": 0.0, "tp": 0.0, "cp": 0.0, "ep": 0.0}
        for i in layers:
            for k, x in per_kind[moe[i]].items():
                parts[k] += x
        if r == p - 1:  # output layer and loss
            parts["compute"] += 3 * 2 * tokens * h * V / t / (peak * eff.matmul)
        if p > 1:
            parts["pp"] = 2 * v * tokens * h * lp / (t if layout.sequence_parallel else 1) / bw_pp
        micro_parts.append(parts)
    slowest = max(micro_parts, key=lambda x: sum(x.values()))
    m = layout.accumulation
    total = {k: x * m for k, x in slowest.items()}
    total["bubble"] = sum(slowest.values()) * (p - 1) / v

    # data parallel, optimizer, offload: per rank of the largest stage
    from zeromega.plugins.zero.plan import gpt_count

    count = gpt_count(tp=t, **{**shape, "ep": e, "etp": etp})
    stage_params = []
    for r, layers in enumerate(stages):
        n = sum(count.layers[i] for i in layers) + (count.embedding if r == 0 else 0)
        if r == p - 1:
            n += count.final_norm + count.output + (count.word_embedding if not count.output and p > 1 else 0)
        ex = sum(count.expert_layers[i] for i in layers)
        stage_params.append((n, ex))
    params, experts = max(stage_params)
    dense = params - experts
    edp = max(1, t * c * d // (etp * e))
    dpc = d * c
    notes = []
    micro = slowest["compute"] + slowest["memory-bound"]
    fwd, bwd = micro / 3, micro * 2 / 3
    if layout.engine == "megatron":
        dp_bw = bw["dp"]
        if layout.zero_stage >= 1:
            grad = _ring_gather(4 * dense, dpc, dp_bw) + _ring_gather(lp * dense, dpc, dp_bw)
            grad += _ring_gather(4 * experts, edp, dp_bw) + _ring_gather(lp * experts, edp, dp_bw)
            stepped = dense / dpc + experts / edp
        else:
            grad = _ring_allreduce(4 * dense, dpc, dp_bw) + _ring_allreduce(4 * experts, edp, dp_bw)
            stepped = params
        if dp_overlap:  # --overlap-grad-reduce: buckets reduce during the last micro-batch's backward
            grad = max(0.0, grad - bwd)
        offload = 0.0
    else:
        # DeepSpeed: ZeRO-0/1 reduce at the accumulation boundary (overlapping the last backward only), ZeRO-2
        # reduce-scatters every micro-batch's gradients during its backward, ZeRO-3 also gathers the parameters
        # for every forward and backward (prefetched behind compute); ZeRO-1/2 all-gather the updated
        # parameters after the step. Exposed: what a micro-batch's compute does not cover.
        dp_bw = bw["dp"]
        z = layout.zero_stage
        part = _ring_gather(lp * params, dpc, dp_bw)  # one reduce-scatter or all-gather of the model
        if z == 0:
            grad = max(0.0, _ring_allreduce(lp * params, dpc, dp_bw) - bwd)
        elif z == 1:
            grad = max(0.0, part - bwd) + part
        elif z == 2:
            grad = m * max(0.0, part - bwd) + part
        else:
            grad = m * (max(0.0, part - fwd) + max(0.0, 2 * part - bwd))
        if dp_overlap is False:
            grad = {0: 2 * part, 1: 2 * part, 2: (m + 1) * part}.get(z, 3 * m * part)
        stepped = params / dpc if z >= 1 else params
        offload = 0.0
        if layout.offload in ("cpu", "nvme"):
            host = dev.host_gbs * 1e9
            offload += (4 + lp) * stepped / host + stepped / CPU_ADAM_ELEMENTS_PER_S
            if z == 3:
                offload += m * 2 * lp * stepped / host
            if layout.offload == "nvme":
                offload += 2 * 16 * stepped / (NVME_GBS * 1e9)
            notes.append("offload: optimizer steps on the CPU (CPU Adam), states cross PCIe every step")
    total["dp"] = grad
    total["optimizer"] = 0.0 if layout.offload != "none" else OPTIMIZER_BYTES_PER_ELEMENT * stepped / hbm
    total["offload"] = offload
    step = sum(total.values())
    world = layout.world
    return StepTime(parts=total, model_flops=model_flops(shape, layout.global_batch), tokens=layout.global_batch * s,
                    gpus=world, peak=peak, seconds=step, notes=notes)


__all__ = ["CPU_ADAM_ELEMENTS_PER_S", "Cluster", "Efficiency", "NVME_GBS", "PlanLayout", "StepTime",
           "crossing_groups", "group_spans", "step_time", "topology_warnings", "replace"]
