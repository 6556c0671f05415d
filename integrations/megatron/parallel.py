"""Process groups and seeds, the way Megatron-Core expects them, on any device.

``initialize(cfg)`` is the per-process entry: it starts torch.distributed with
the accelerator's backend, makes Megatron-Core device-agnostic (CPU patches),
builds ``parallel_state``'s tp / pp / cp / ep / dp groups from the run
config's layout, and seeds every RNG the way Megatron-LM does.
"""

from __future__ import annotations

import datetime
import os
import random
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from zeromega.integrations import accelerator as accel
from zeromega.config.schema import Layout, RunConfig

from . import cpu_patches


def _init_distributed(backend: str, timeout_minutes: float) -> None:
    """Join the job torchrun / the deepspeed launcher started (or a 1-process job)."""
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    dist.init_process_group(
        backend=backend,
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


def _set_group_timeouts(minutes: float) -> None:
    """Give every process group the timeout, not just the default one.

    Megatron-Core may build a group with its own whole-minute default; a
    shorter timeout (tests, impatient jobs) is set on each group here, so the
    first collective that waits longer fails on every group alike.
    """
    from megatron.core import parallel_state

    timeout = datetime.timedelta(minutes=minutes)
    for group in [None, *(parallel_state._global_process_group_list or [])]:
        if group is None or not dist.distributed_c10d._rank_not_in_group(group):
            dist.distributed_c10d._set_pg_timeout(timeout, group)


def initialize(cfg: RunConfig, seed: int = 1234, timeout_minutes: Optional[float] = None) -> Layout:
    """Set up this process for ``cfg``: device, groups, seeds. Returns the resolved layout.

    ``timeout_minutes`` (default: the config's ``launch.distributed_timeout_minutes``) bounds every
    collective, so a rank that hangs or dies ends the job instead of holding it.
    """
    from megatron.core import parallel_state

    if timeout_minutes is None:
        timeout_minutes = cfg.launch.distributed_timeout_minutes

    device = accel.select(cfg.device)
    world = int(os.environ.get("WORLD_SIZE", 1))
    layout = cfg.layout(world)  # raises ConfigError before any group is built
    if not device.is_cuda:
        cpu_patches.apply(skip=tuple(filter(None, os.environ.get("ZEROMEGA_SKIP_PATCH", "").split(","))))
    device.bind(int(os.environ.get("LOCAL_RANK", 0)))
    _init_distributed(device.backend, timeout_minutes)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        # USP: Megatron builds the ulysses (inner) and ring (outer) subgroups of cp.
        hierarchical_context_parallel_sizes=[layout.ulysses, layout.ring] if layout.ulysses > 1 and layout.ring > 1 else None,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        distributed_timeout_minutes=timeout_minutes,  # a float works: Megatron makes a timedelta of it
        create_gloo_process_groups=device.is_cuda,  # on CPU the main groups are gloo already
    )
    _set_group_timeouts(timeout_minutes)
    set_seed(seed)
    return layout


def set_seed(seed: int, data_parallel_random_init: bool = False) -> None:
    """Megatron-LM's seeding: one seed per pipeline stage, tp/ep offsets in the tracker."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    if data_parallel_random_init:
        seed += 10 * parallel_state.get_data_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    """Tear down Megatron's groups and the default process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
