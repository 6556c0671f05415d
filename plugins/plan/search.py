"""Layout search: every layout of N GPUs that fits, ranked by predicted step time; why the rest do not.

A candidate is (tp, pp, vpp, cp, ep, dp, micro batch, recompute, optimizer
sharding, offload). It is kept when its worst rank's planned device bytes
(:mod:`zeromega.plugins.zero.plan`, the engine zeromega would run) fit the
GPU; kept layouts are ranked by :func:`.timing.step_time`. Families that
yield nothing are reported once each with the reason: a group crossing
nodes (tp, cp or ep wider than a node), divisibility (heads, layers, experts,
batch), or memory (the smallest need among the family's variants).

The engine follows zeromega's choice (``zeromega.run.engines``): pp > 1 or an
MoE model runs Megatron-Core's DDP with the distributed optimizer (or a plain
one); a dense pp-1 model may also run DeepSpeed ZeRO 1-3, with CPU offload of
the optimizer (and the parameters at ZeRO-3). Sequence parallelism is on
whenever tp > 1 (it only removes memory: Korthikanti et al. 2022).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from .calibration import FITTED
from .timing import Cluster, Efficiency, PlanLayout, StepTime, crossing_groups, step_time

GiB = 1024**3
RECOMPUTE = (None, "selective", "full")


def _pow2_upto(n: int) -> list[int]:
    out, x = [], 1
    while x <= n:
        out.append(x)
        x *= 2
    return out


def memory_plan(shape: dict, layout: PlanLayout, precision: str):
    """The memory plan of ``layout`` for the engine that runs it (worst rank on CUDA answers)."""
    from zeromega.plugins.zero import plan as zplan

    if layout.engine == "megatron":
        return zplan.plan_pipeline(precision, layout, shape, distributed_optimizer=layout.zero_stage >= 1,
                                   sequence_parallel=layout.sequence_parallel, recompute=layout.recompute,
                                   flash=layout.flash)
    ds = {"zero_optimization": {"stage": layout.zero_stage}, "bf16": {"enabled": precision == "bf16"},
          "fp16": {"enabled": precision == "fp16"}}
    if layout.offload != "none":
        ds["zero_optimization"]["offload_optimizer"] = {"device": layout.offload, "nvme_path": "/nvme"}
        if layout.zero_stage == 3:
            ds["zero_optimization"]["offload_param"] = {"device": layout.offload, "nvme_path": "/nvme"}
    model = zplan.gpt_size(tp=layout.tp, **shape)
    act = zplan.Activations(shape["seq_length"], layout.micro, layout.sequence_parallel, layout.recompute,
                            cp=layout.cp, flash=layout.flash)
    return zplan.plan_memory(ds, model, dp=layout.dp * layout.cp, tp=layout.tp, activations=act,
                             client_adam="fused" if layout.offload != "none" else "torch")


@dataclass
class Candidate:
    layout: PlanLayout
    need: int
    """Worst rank's device bytes."""
    time: Optional[StepTime] = None


@dataclass
class SearchResult:
    fits: list
    """Candidates that fit, fastest first."""
    rejected: dict
    """Family -> reason, for families with no fitting layout."""
    considered: int = 0
    capacity: int = 0
    notes: list = field(default_factory=list)


def _divisibility(shape: dict, tp: int, pp: int, cp: int, ep: int, dp: int, global_batch: int) -> Optional[str]:
    a = shape["num_attention_heads"]
    g = shape.get("num_query_groups") or a
    if a % tp or g % tp:
        return f"{a} heads / {g} query groups not divisible by tp {tp}"
    if shape["num_layers"] % pp:
        return f"{shape['num_layers']} layers not divisible by pp {pp} (uneven splits: plan one with " \
               "--decoder-first/last-pipeline-num-layers)"
    if shape["seq_length"] % (2 * cp if cp > 1 else 1):
        return f"sequence {shape['seq_length']} not divisible by 2 x cp {cp}"
    if ep > 1 and shape.get("num_experts") and (shape["num_experts"] % ep or (dp * cp) % ep):
        return f"{shape['num_experts']} experts or dp x cp {dp * cp} not divisible by ep {ep}"
    if global_batch % dp:
        return f"global batch {global_batch} not divisible by dp {dp}"
    return None


def search(shape: dict, cluster: Cluster, global_batch: int, capacity_gib: Optional[float] = None,
           eff: Efficiency = FITTED, flash: Optional[bool] = None, micro_batches=(1, 2, 4),
           max_cp: Optional[int] = None) -> SearchResult:
    """Every layout of ``cluster.gpus`` GPUs for ``shape`` at ``global_batch`` sequences per step that fits.

    ``flash``: fused / flash attention everywhere (None: what zeromega runs: flash at cp > 1 only).
    ``max_cp``: the largest cp tried (default: 1 below 8K tokens, else up to a node).
    """
    n, node = cluster.gpus, cluster.gpus_per_node
    cap = int((capacity_gib if capacity_gib is not None else cluster.device.memory_gib) * GiB)
    moe = bool(shape.get("num_experts"))
    if max_cp is None:
        max_cp = 1 if shape["seq_length"] < 8192 else node
    result = SearchResult(fits=[], rejected={}, capacity=cap)
    for tp in _pow2_upto(min(n, 2 * node)):
        for cp in _pow2_upto(max_cp):
            if n % (tp * cp):
                continue
            rest = n // (tp * cp)
            for pp in [x for x in range(1, rest + 1) if rest % x == 0 and x <= shape["num_layers"]]:
                dp = rest // pp
                eps = [e for e in _pow2_upto(dp * cp) if e <= shape["num_experts"]] if moe else [1]
                for ep in eps:
                    family = f"tp{tp} pp{pp}" + (f" cp{cp}" if cp > 1 else "") + (f" ep{ep}" if ep > 1 else "") \
                        + f" dp{dp}"
                    probe = PlanLayout(tp=tp, pp=pp, dp=dp, cp=cp, ep=ep, global_batch=global_batch)
                    crossing = crossing_groups(probe, node)
                    if crossing:
                        result.rejected[family] = f"{crossing[0]} crosses nodes of {node} GPUs"
                        continue
                    bad = _divisibility(shape, tp, pp, cp, ep, dp, global_batch)
                    if bad:
                        result.rejected[family] = bad
                        continue
                    best_need = None
                    kept = 0
                    for cand in _variants(shape, probe, moe, micro_batches, flash):
                        result.considered += 1
                        need = memory_plan(shape, cand, cluster.precision).peak("cuda")
                        if need <= cap:
                            kept += 1
                            result.fits.append(Candidate(cand, need, step_time(shape, cand, cluster, eff)))
                        elif best_need is None or need < best_need:
                            best_need = need
                    if not kept:
                        result.rejected[family] = (f"memory: the smallest variant needs {best_need / GiB:,.1f} GiB "
                                                   f"of {cap / GiB:,.0f}" if best_need is not None
                                                   else "no micro batch / schedule divides the batch")
    result.fits.sort(key=lambda c: c.time.seconds)
    return result


def _variants(shape: dict, base: PlanLayout, moe: bool, micro_batches, flash: Optional[bool]):
    tp, pp, dp, cp = base.tp, base.pp, base.dp, base.cp
    fl = cp > 1 if flash is None else flash
    per_dp = base.global_batch // dp
    for micro in micro_batches:
        if per_dp % micro:
            continue
        m = per_dp // micro
        vpps = [None] + [v for v in (2, 4) if pp > 2 and shape["num_layers"] % (pp * v) == 0 and m % pp == 0]
        for vpp in vpps:
            for rc in RECOMPUTE:
                common = dict(micro=micro, vpp=vpp, recompute=rc, sequence_parallel=tp > 1, flash=fl)
                if pp > 1 or moe:  # zeromega runs these on Megatron-Core's engine
                    yield replace(base, engine="megatron", zero_stage=1, **common)
                else:  # and a dense pp-1 model on DeepSpeed's
                    for z in (1, 2, 3):
                        yield replace(base, engine="deepspeed", zero_stage=z, **common)
                    yield replace(base, engine="deepspeed", zero_stage=3, offload="cpu", **common)


def fixes(shape: dict, layout: PlanLayout, cluster: Cluster, capacity_gib: float, eff: Efficiency = FITTED) -> list:
    """What would make ``layout`` fit, each with its need and predicted step time: more pp, recomputation,
    the distributed optimizer / a higher ZeRO stage, CPU offload. Rows: (change, layout, need bytes, StepTime)."""
    tries = []
    cap = capacity_gib * GiB
    pp_try = None  # more pipeline stages: the fewest that fit, else the most the layers and dp allow
    k = 2
    while layout.pp * k <= shape["num_layers"] and layout.dp % k == 0 and shape["num_layers"] % (layout.pp * k) == 0:
        more = replace(layout, pp=layout.pp * k, dp=layout.dp // k, engine="megatron", vpp=None,
                       zero_stage=min(layout.zero_stage, 1), offload="none")  # pp > 1 runs on Megatron-Core
        pp_try = (f"pp {layout.pp} -> {layout.pp * k} (dp {layout.dp} -> {layout.dp // k})", more)
        if memory_plan(shape, more, cluster.precision).peak("cuda") <= cap:
            break
        k *= 2
    if pp_try:
        tries.append(pp_try)
    for rc in ("selective", "full"):
        if layout.recompute != rc and not (layout.recompute == "full"):
            tries.append((f"recompute {rc}", replace(layout, recompute=rc)))
    if layout.tp > 1 and not layout.sequence_parallel:
        tries.append(("sequence parallelism", replace(layout, sequence_parallel=True)))
    if layout.engine == "megatron" and layout.zero_stage == 0:
        tries.append(("distributed optimizer (ZeRO-1 over dp)", replace(layout, zero_stage=1)))
    if layout.engine == "deepspeed":
        for z in (1, 2, 3):
            if layout.zero_stage < z:
                tries.append((f"ZeRO-{z}", replace(layout, zero_stage=z)))
        if layout.offload == "none":
            tries.append(("ZeRO-3 + CPU offload (optimizer and parameters)",
                          replace(layout, zero_stage=3, offload="cpu")))
    rows = []
    for change, cand in tries:
        try:
            need = memory_plan(shape, cand, cluster.precision).peak("cuda")
        except ValueError:
            continue
        rows.append((change, cand, need, step_time(shape, cand, cluster, eff)))
    return rows


def to_unified(shape: dict, layout: PlanLayout, cluster: Cluster) -> dict:
    """``layout`` as a zeromega unified config (what ``zeromega launch --config FILE`` reads)."""
    parallel = {"tp": layout.tp, "pp": layout.pp, "cp": layout.cp, "ep": layout.ep,
                "sequence_parallel": layout.sequence_parallel}
    if layout.vpp and layout.vpp > 1:
        parallel["vpp"] = layout.vpp
    if layout.first_stage_layers:
        parallel["first_stage_layers"] = layout.first_stage_layers
    if layout.last_stage_layers:
        parallel["last_stage_layers"] = layout.last_stage_layers
    for key in ("embedding_in_split", "loss_in_split"):
        if getattr(layout, key):
            parallel[key] = True
    cfg = {"parallel": parallel, "batch": {"micro": layout.micro, "global": layout.global_batch},
           "precision": cluster.precision, "device": "cuda",
           "zero": {"stage": layout.zero_stage},
           "launch": {"nproc_per_node": min(cluster.gpus, cluster.gpus_per_node), "nnodes": cluster.nodes}}
    if layout.cp > 1:
        cfg["sequence"] = {"mode": "ulysses", "ulysses": layout.cp}
    if layout.offload != "none":
        cfg["zero"]["offload_optimizer"] = {"device": layout.offload}
        if layout.zero_stage == 3:
            cfg["zero"]["offload_param"] = {"device": layout.offload}
    if layout.recompute == "selective":
        cfg["recompute"] = {"granularity": "selective"}
    elif layout.recompute == "full":
        cfg["recompute"] = {"granularity": "full", "method": "uniform", "num_layers": 1}
    model_keys = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "vocab_size", "ffn_hidden_size",
                  "num_query_groups", "swiglu", "normalization", "add_bias_linear", "kv_channels",
                  "position_embedding_type", "untie_embeddings_and_output_weights", "make_vocab_size_divisible_by",
                  "max_position_embeddings")
    cfg["model"] = {k: shape[k] for k in model_keys if shape.get(k) is not None}
    if shape.get("num_experts"):
        moe = {"num_experts": shape["num_experts"]}
        for ours, theirs in (("topk", "moe_router_topk"), ("ffn_hidden_size", "moe_ffn_hidden_size"),
                             ("layer_freq", "moe_layer_freq")):
            if shape.get(theirs) is not None:
                moe[ours] = shape[theirs]
        cfg["moe"] = moe
    return cfg


__all__ = ["Candidate", "SearchResult", "fixes", "memory_plan", "search", "to_unified"]
