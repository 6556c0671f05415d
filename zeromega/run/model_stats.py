"""Whole-model statistics for the log line and TensorBoard: the parameters' L2 norm (``--log-params-norm``),
the zeros in the gradients (``--log-num-zeros-in-grad``, DeepSpeed's engine; Megatron-Core's optimizer counts
its own) and Adam's state norms (Megatron-DeepSpeed's ``--log-optimizer-states-to-tensorboard``).

Every value is over the whole model and the same on every rank: a tensor-parallel shard counts on its own tp
rank, a parameter replicated over tp (norms, row-parallel biases) only on tp rank 0, a pipeline stage's
parameters on that stage, a shared copy (the last stage's tied output weight, ``param.shared``) not at all,
an expert on its own expert-parallel rank; ZeRO-3 partitions are gathered one parameter at a time. Data- and
context-parallel replicas hold the same values and count once. The collectives run outside zeromega's traffic
count (:func:`zeromega.integrations.comm.paused`).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist

from zeromega.integrations import comm


def _device() -> torch.device:
    """Where the figures' reduction tensors live: the rank's GPU under NCCL (which reduces device tensors
    only), else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _zeros(n: int = 1) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float64, device=_device())


def _is_expert(param: torch.Tensor) -> bool:
    return not getattr(param, "allreduce", True)  # Megatron-Core marks expert parameters allreduce=False


def _counts_here(param: torch.Tensor, expert: Optional[bool] = None) -> bool:
    """Whether this rank holds the copy of ``param`` that counts (not a tp replica, not a shared copy)."""
    from megatron.core import parallel_state as ps

    expert = _is_expert(param) if expert is None else expert

    if getattr(param, "shared", False):
        return False
    if getattr(param, "tensor_model_parallel", False):
        return True
    if not ps.model_parallel_is_initialized():
        return True
    rank = ps.get_expert_tensor_parallel_rank() if expert else ps.get_tensor_model_parallel_rank()
    return rank == 0


def _groups():
    """(dense group, expert group): the ranks whose counted parameters together make the whole model."""
    from megatron.core import parallel_state as ps

    if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
        return None, None
    return ps.get_model_parallel_group(), ps.get_expert_tensor_model_pipeline_parallel_group()


def _sum_over_model(dense: torch.Tensor, expert: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """``dense`` reduced over tp x pp plus ``expert`` reduced over etp x ep x pp (Megatron-LM's two groups)."""
    dense_group, expert_group = _groups()
    if dense_group is None:
        return dense + expert if op == dist.ReduceOp.SUM else torch.maximum(dense, expert)
    with comm.paused():
        same = dist.get_process_group_ranks(dense_group) == dist.get_process_group_ranks(expert_group)
        if same:
            total = dense + expert if op == dist.ReduceOp.SUM else torch.maximum(dense, expert)
            dist.all_reduce(total, op=op, group=dense_group)
            return total
        dist.all_reduce(dense, op=op, group=dense_group)
        dist.all_reduce(expert, op=op, group=expert_group)
    return dense + expert if op == dist.ReduceOp.SUM else torch.maximum(dense, expert)


def _full(param: torch.Tensor) -> torch.Tensor:
    """The parameter's whole values (a ZeRO-3 parameter gathered from its partitions; collective)."""
    if hasattr(param, "ds_id"):
        import deepspeed

        with comm.paused(), deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            return param.data.detach().float().clone()
    return param.data.detach().float()


def params_norm(modules: Iterable[torch.nn.Module]) -> float:
    """The L2 norm of every parameter of the model that ``modules`` (this rank's chunks) are part of, in fp32
    (Megatron-LM's ``calc_params_l2_norm``; it reads the fp32 main copy under bf16, this the model's copy)."""
    dense, expert = _zeros(), _zeros()
    for module in modules:
        for param in module.parameters():
            values = _full(param)  # every rank gathers a ZeRO-3 parameter, even one it does not count
            if not _counts_here(param):
                continue
            square = values.double().pow(2).sum().to(dense.device)
            if _is_expert(param):
                expert += square
            else:
                dense += square
    return float(_sum_over_model(dense, expert).sqrt().item())


def count_zeros_deepspeed(module: torch.nn.Module) -> float:
    """Zero entries of the step's gradients under DeepSpeed's engine, between the last backward and the step
    (the gradients reduced over dp; DeepSpeed's ``safe_get_full_grad`` gathers a ZeRO-1/2/3 partition's)."""
    from deepspeed.utils import safe_get_full_grad

    dense = _zeros()
    with comm.paused():
        for param in module.parameters():
            if not param.requires_grad:
                continue
            grad = safe_get_full_grad(param)  # collective for partitioned gradients: every rank asks
            if grad is None or not _counts_here(param):
                continue
            dense += grad.numel() - torch.count_nonzero(grad).to(dense.device)
    return float(_sum_over_model(dense, _zeros()).item())


# Megatron-DeepSpeed's --log-optimizer-states-to-tensorboard tags, in its order: (tag, state, transform, kind)
OPTIMIZER_STATS = (
    ("optimizer/variance_l2", "exp_avg_sq", None, "l2"),
    ("optimizer/variance_sqrt_l2", "exp_avg_sq", "sqrt", "l2"),
    ("optimizer/momentum_l2", "exp_avg", None, "l2"),
    ("optimizer/weight_l2", "param", None, "l2"),
    ("optimizer/variance_l1", "exp_avg_sq", None, "l1"),
    ("optimizer/variance_sqrt_l1", "exp_avg_sq", "sqrt", "l1"),
    ("optimizer/momentum_l1", "exp_avg", None, "l1"),
    ("optimizer/weight_l1", "param", None, "l1"),
    ("optimizer/variance_abs_max", "exp_avg_sq", None, "max"),
    ("optimizer/variance_sqrt_abs_max", "exp_avg_sq", "sqrt", "max"),
    ("optimizer/momentum_abs_max", "exp_avg", None, "max"),
    ("optimizer/weight_abs_max", "param", None, "max"),
)


def _innermost(optimizer):
    """The torch optimizer under DeepSpeed's / Megatron-Core's wrappers (None for a chain of several)."""
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer") and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def _zero12_fragments(optimizer, inner) -> Optional[list]:
    """ZeRO-1/2: [(model param, this rank's fragments of its fp32 weight and Adam states, expert)], read from the
    optimizer's flat fp32 partition at the param's fragment address. (DeepSpeed 0.19's own
    ``safe_get_full_optimizer_state`` links the states after the first param group's first step, so the
    second group's, the no-weight-decay group's, are never found: ValueError. A DeepSpeed that links them after
    every group's step lets ``safe_get_full_optimizer_state`` replace this; the dp2-zero1 case of
    tests/test_logging_flags.py checks the figures either way.)"""
    out = []
    for i, params in enumerate(optimizer.bit16_groups):
        flat = optimizer.single_partition_of_fp32_groups[i]
        state = inner.state.get(flat, {})
        for param in params:
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is None:
                continue  # no part of this parameter in this rank's partition
            if "exp_avg" not in state or "exp_avg_sq" not in state:
                return None
            start, numel = mapping.hp_fragment_address.start, mapping.hp_fragment_address.numel
            out.append((param, {"exp_avg": state["exp_avg"].narrow(0, start, numel),
                                "exp_avg_sq": state["exp_avg_sq"].narrow(0, start, numel),
                                "param": flat.narrow(0, start, numel)}, _is_expert(param)))
    return out


def _unfused_masters(optimizer, inner) -> Optional[list]:
    out = []
    for params, masters in zip(optimizer.fp16_groups, optimizer.fp32_groups):
        if not isinstance(masters, (list, tuple)) or len(params) != len(masters):
            return None  # the fused sibling's one flat master per group
        for param, master in zip(params, masters):
            state = inner.state.get(master, {})
            if "exp_avg" not in state or "exp_avg_sq" not in state or master.numel() != param.numel():
                return None
            out.append((param, {"exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"], "param": master},
                        _is_expert(param)))
    return out


def _deepspeed_states(engine) -> tuple[Optional[list], object]:
    """([(model param, {"exp_avg": t, "exp_avg_sq": t, "param": t}, expert)], group): whole fp32 tensors
    (group None), or under ZeRO-1/2 this rank's fragments, to be summed over the ZeRO group; None where the
    states cannot be tied to the model's parameters (the fused fp16 optimizer flattens its masters) or Adam has
    not stepped (every fp16 step so far skipped)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    optimizer = engine.engine.optimizer  # zeromega's DeepSpeedEngine around DeepSpeed's
    inner = _innermost(optimizer)
    if inner is not None and hasattr(optimizer, "single_partition_of_fp32_groups") and \
            hasattr(optimizer, "bit16_groups"):
        return _zero12_fragments(optimizer, inner), optimizer.dp_process_group
    if inner is not None and isinstance(getattr(optimizer, "fp32_groups", None), list) and \
            isinstance(getattr(optimizer, "fp16_groups", None), list):
        # fp16 / bf16 without ZeRO (FP16_UnfusedOptimizer): one fp32 master per model parameter, in order
        return _unfused_masters(optimizer, inner), None
    out = []
    with comm.paused():
        for param in engine.engine.module.parameters():
            if not param.requires_grad:
                continue
            if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
                states = {key: safe_get_full_optimizer_state(param, key) for key in ("exp_avg", "exp_avg_sq")}
                states["param"] = safe_get_full_fp32_param(param)
            elif inner is not None and param in inner.state:
                states = {key: inner.state[param].get(key) for key in ("exp_avg", "exp_avg_sq")}
                states["param"] = param.data
            else:
                return None, None
            if any(value is None for value in states.values()):
                return None, None
            out.append((param, states, _is_expert(param)))
    return out, None


def _megatron_states(optimizer) -> list:
    """[(main param, states, expert)] of Megatron-Core's optimizer: its main params carry the model params'
    tensor-parallel and shared attributes (experts: their param group's ``is_expert_parallel``), each rank
    holding its shard under the distributed optimizer."""
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    out = []
    for sub in chained:
        inner = _innermost(sub)
        if inner is None:
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state.get(param, {})
                if "exp_avg" in state and "exp_avg_sq" in state:
                    out.append((param, {"exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"],
                                        "param": param.data}, bool(group.get("is_expert_parallel", False))))
    return out


def optimizer_states(engine) -> Optional[dict[str, float]]:
    """Megatron-DeepSpeed's twelve optimizer-state scalars for ``engine`` (:mod:`zeromega.run.engines`), the same
    on every rank; collective, so every rank calls it. None where the states are not reachable (see
    :func:`_deepspeed_states`)."""
    from megatron.core import parallel_state as ps

    megatron = hasattr(engine, "trainer")
    pairs, zero_group = (_megatron_states(engine.optimizer), None) if megatron else _deepspeed_states(engine)
    flag = _zeros() + (1.0 if pairs is None else 0.0)
    if dist.is_initialized():
        with comm.paused():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one rank without states: none writes
    if flag.item():
        return None
    n = len(OPTIMIZER_STATS)
    sums = {kind: [_zeros(n) for _ in range(2)] for kind in ("sum", "max")}
    for param, states, expert in pairs:
        if not _counts_here(param, expert):
            continue
        part = 1 if expert else 0
        for i, (_, key, transform, kind) in enumerate(OPTIMIZER_STATS):
            value = states[key].detach().to(sums["sum"][0].device, torch.float64)
            if transform == "sqrt":
                value = value.sqrt()
            if kind == "l2":
                sums["sum"][part][i] += value.pow(2).sum()
            elif kind == "l1":
                sums["sum"][part][i] += value.abs().sum()
            else:
                if value.numel():
                    sums["max"][part][i] = torch.maximum(sums["max"][part][i], value.abs().max())
    if zero_group is not None and dist.is_initialized():  # ZeRO-1/2's fragments are disjoint over its group
        with comm.paused():
            for part in (0, 1):
                dist.all_reduce(sums["sum"][part], group=zero_group)
                dist.all_reduce(sums["max"][part], op=dist.ReduceOp.MAX, group=zero_group)
    if megatron and engine.trainer.cfg.zero.stage >= 1 and dist.is_initialized():
        # the distributed optimizer: each dp rank holds a shard of the main params and their states
        with comm.paused():
            for part, group in ((0, ps.get_data_parallel_group(with_context_parallel=True)),
                                (1, ps.get_expert_data_parallel_group())):
                dist.all_reduce(sums["sum"][part], group=group)
                dist.all_reduce(sums["max"][part], op=dist.ReduceOp.MAX, group=group)
    total = _sum_over_model(*sums["sum"])
    largest = _sum_over_model(*sums["max"], op=dist.ReduceOp.MAX)
    result = {}
    for i, (tag, _, _, kind) in enumerate(OPTIMIZER_STATS):
        result[tag] = float(total[i].sqrt() if kind == "l2" else total[i] if kind == "l1" else largest[i])
    return result


def empty_unused_memory() -> None:
    """Megatron-LM's ``torch.cuda.empty_cache()`` (``--empty-unused-memory-level``); on CPU there is no
    allocator cache to return, so nothing happens."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
