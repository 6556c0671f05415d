"""The whole model's parameter count, as Megatron's formula counts it, from the shards every rank holds.

Each parameter is named as in a 1-process model (``global_param_names``); a tensor-parallel shard
(Megatron-Core's ``tensor_model_parallel`` attribute) counts once per tensor- (or expert-tensor-) parallel
rank, anything else once whatever the rank: data-parallel replicas, sequence-parallel norms and the last
stage's copy of a tied output weight are not counted twice. Under ZeRO-3 a parameter's full size is its
``ds_numel``.
"""

from __future__ import annotations

import torch.distributed as dist


def _local(modules) -> dict[tuple[str, int], int]:
    from megatron.core import parallel_state

    from zeromega.integrations.megatron.model import global_param_names

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    try:
        etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    except Exception:  # no expert groups: experts follow tp
        etp_rank = tp_rank
    out: dict[tuple[str, int], int] = {}
    for module in modules:
        chunk = getattr(module, "module", module)
        names = global_param_names(chunk)
        for name, param in chunk.named_parameters():
            split = bool(getattr(param, "tensor_model_parallel", False))
            rank = (etp_rank if ".local_experts." in names[name] else tp_rank) if split else 0
            out[(names[name], rank)] = int(getattr(param, "ds_numel", param.numel()))
    return out


def model_parameter_count(modules) -> int:
    """The parameters of the whole model (every rank calls it: an all-gather over the world)."""
    local = _local(modules)
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        for other in gathered:
            local.update(other)
    return sum(local.values())
