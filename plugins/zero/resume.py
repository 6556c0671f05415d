"""Exact resume of a ZeRO-3 engine whose optimizer is offloaded to nvme: what DeepSpeed 0.19.8's load leaves out.

With ``offload_optimizer.device: nvme`` DeepSpeed's ``load_checkpoint``
(engine.py) does not read the ZeRO optimizer files at all. It copies the
checkpoint's ``offloaded_tensors/rankN`` back into the swap folder and calls
the optimizer's ``reset_swap_buffers``, which swaps each sub-group's fp32
master weights in and copies them into the model's partitions. What that
leaves behind (read in stage3.py and swap_tensor/, DeepSpeed 0.19.8):

1. The Adam moments. The swapper swaps a state tensor only when the
   optimizer's ``state[param]`` lists it; a fresh engine's state is empty,
   so the ``exp_avg`` / ``exp_avg_sq`` files copied back are never read,
   the first step after the load starts Adam over (``step`` 1, zero
   moments) and then overwrites those files. Measured: the next step's
   loss off by 3e-2 relative, 1e-3 to 6e-2 afterwards.
2. The non-tensor optimizer state (Adam's ``step``), the loss scaler and
   the overflow flag, which live only in the ZeRO files.
3. Sub-groups too small to swap (under DeepSpeed's 1 MiB ``MIN_AIO_BYTES``):
   their fp32 weights and moments stay in RAM and are saved in the ZeRO
   files, so they keep the fresh model's values, and the model's partitions
   are overwritten with those.

:func:`restoring` wraps the optimizer's ``reset_swap_buffers`` for the
duration of one load: after DeepSpeed's own work it reads this rank's ZeRO
file and puts back 1-3 (placeholders of the right size for the swapped
moments, so the next swap-in reads the copied files; the saved tensors for
RAM-resident sub-groups), before the load's epilogue gathers the persistent
parameters. :func:`needed` is the probe: whether this engine takes the path
above; ``ENABLED = False`` turns the patch off so a test can show the
resumed run departs without it.

Parameters offloaded to nvme with the optimizer on the CPU take DeepSpeed's
ordinary load, which fails on sub-groups that have no CPU buffer; for
those :func:`rigid_load` runs in its place (same steps, the parameters
written to their swap files).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch

ENABLED = True
"""Tests set it False (in a rank) to show the load without the patch."""


def needed(engine) -> bool:
    """Whether ``engine`` loads through DeepSpeed's nvme-optimizer path (the one this module completes)."""
    return bool(getattr(engine, "zero_nvme_offload_optimizer", lambda: False)()) and \
        hasattr(getattr(engine, "optimizer", None), "reset_swap_buffers")


def _state_order(opt) -> list[int]:
    """Sub-group ids in the order DeepSpeed's ZeRO-3 state dict numbers them (``_set_fp32_optimizer_param_groups``
    appends each sub-group's flat fp32 tensor to its param group; torch numbers params group by group)."""
    order = []
    for group_id in range(len(opt.optimizer.param_groups)):
        order += [sid for sid in range(len(opt.fp16_groups)) if opt.sub_group_to_group_id[sid] == group_id]
    return order


class MissingZeroFiles(RuntimeError):
    """A checkpoint without this rank's ZeRO optimizer files: ``problem`` and ``fix``."""

    def __init__(self, problem: str, fix: str):
        super().__init__(problem)
        self.problem, self.fix = problem, fix


def _zero_state_dict(engine, load_dir: str, tag: str) -> dict:
    """This rank's ZeRO optimizer file, read through the engine's (verified) checkpoint engine."""
    states = engine._get_all_zero_checkpoints(load_dir, tag)
    if states is None:  # zeromega.checkpoint turns it into its one-line CheckpointError
        raise MissingZeroFiles(f"{load_dir}/{tag}: no ZeRO optimizer files", "load a complete checkpoint")
    return states[torch.distributed.get_rank(group=engine.optimizer.dp_process_group)]


def complete_load(engine, load_dir: str, tag: str) -> None:
    """Put back what DeepSpeed's nvme load left out (module doc: 1-3); call after its ``reset_swap_buffers``."""
    from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, LOSS_SCALER, OPTIMIZER_STATE_DICT

    opt = engine.optimizer
    sd = _zero_state_dict(engine, load_dir, tag)
    opt.loss_scaler = sd[LOSS_SCALER]
    opt.dynamic_loss_scale = sd["dynamic_loss_scale"]
    opt.overflow = sd["overflow"]
    saved_states = sd[OPTIMIZER_STATE_DICT]["state"]
    saved_flat = sd[FP32_FLAT_GROUPS]
    swapper = opt.optimizer_swapper
    for index, sid in enumerate(_state_order(opt)):
        param = opt.fp32_partitioned_groups_flat[sid]
        saved = saved_states.get(index, {})
        if opt._swappable_optimizer_subgroup(sid):
            # Swapped: the saved tensors are empty; the files DeepSpeed copied back hold them. A placeholder
            # of the sub-group's size makes the swapper list (and read) each one; its pages are never touched.
            numel = int(opt.fp16_partitioned_groups_flat_numel[sid])
            opt.optimizer.state[param] = {
                key: torch.empty(numel, dtype=value.dtype) if torch.is_tensor(value) else copy.deepcopy(value)
                for key, value in saved.items()}
            swapper.swap_in_optimizer_state(parameter=param)  # reads master weights and moments back
            swapper.release_swap_buffers(parameter=param)  # nothing changed: no write
        else:
            param.data.copy_(saved_flat[sid].to(param.dtype))
            opt.optimizer.state[param] = {
                key: value.to(param.device).clone() if torch.is_tensor(value) else copy.deepcopy(value)
                for key, value in saved.items()}
            opt._reassign_or_swap_out_partitioned_parameters(sid)  # into the model's partition (or its swap file)


def params_swapped(engine) -> bool:
    """Whether some ZeRO-3 sub-group's parameters live only in nvme swap files (``offload_param: nvme``
    with ``max_in_cpu`` below the partition): DeepSpeed keeps no flat CPU buffer for them (None)."""
    flats = getattr(getattr(engine, "optimizer", None), "fp16_partitioned_groups_flat", None)
    return bool(flats) and any(flat is None for flat in flats)


def rigid_load(opt, state_dict: dict, load_optimizer_states: bool = True) -> None:
    """DeepSpeed 0.19.8's ZeRO-3 ``_rigid_load_state_dict`` for sub-groups whose parameters are swapped to
    nvme: DeepSpeed copies the fp32 partitions into each sub-group's flat CPU buffer, which such sub-groups
    do not have (``None.data``: AttributeError). The same steps, each sub-group's parameters written through
    DeepSpeed's own ``_reassign_or_swap_out_partitioned_parameters`` (its flat buffer, or its swap files)."""
    from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, LOSS_SCALER, OPTIMIZER_STATE_DICT

    opt.loss_scaler = state_dict[LOSS_SCALER]
    opt.dynamic_loss_scale = state_dict["dynamic_loss_scale"]
    opt.overflow = state_dict["overflow"]
    if load_optimizer_states:
        opt._set_fp32_optimizer_param_groups()
        opt.optimizer.load_state_dict(state_dict[OPTIMIZER_STATE_DICT])
        opt._clear_fp32_optimizer_param_groups()
    for current, saved in zip(opt.fp32_partitioned_groups_flat, state_dict[FP32_FLAT_GROUPS]):
        current.data.copy_(saved.data)
    for sid in range(len(opt.fp32_partitioned_groups_flat)):
        opt._reassign_or_swap_out_partitioned_parameters(sid)


@contextlib.contextmanager
def restoring(engine, load_dir: str, tag: str) -> Iterator[None]:
    """While DeepSpeed's ``load_checkpoint(load_dir, tag)`` runs: complete its nvme-optimizer load (module doc),
    or load sub-groups whose parameters are swapped to nvme (:func:`rigid_load`)."""
    if ENABLED and not needed(engine) and params_swapped(engine):
        opt = engine.optimizer
        opt._rigid_load_state_dict = lambda state_dict, load_optimizer_states=True: rigid_load(
            opt, state_dict, load_optimizer_states)
        try:
            yield
        finally:
            del opt._rigid_load_state_dict
        return
    if not (ENABLED and needed(engine)):
        yield
        return
    opt = engine.optimizer
    original = opt.reset_swap_buffers  # bound method; only the load path calls it

    def reset_swap_buffers():
        original()
        complete_load(engine, load_dir, tag)

    opt.reset_swap_buffers = reset_swap_buffers
    try:
        yield
    finally:
        del opt.reset_swap_buffers  # the class's method again


__all__ = ["ENABLED", "complete_load", "needed", "params_swapped", "restoring", "rigid_load"]
