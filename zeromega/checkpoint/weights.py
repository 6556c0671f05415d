"""Weights-only loads (Megatron's ``--finetune`` and ``--no-load-optim``): any checkpoint, any layout.

A full resume needs the optimizer state in a form the new layout can read
(:mod:`zeromega.checkpoint.reshard` says which changes that allows). The
weights alone move anywhere: :func:`zeromega.checkpoint.export.checkpoint_weights`
turns a checkpoint of either engine and any layout into whole fp32 tensors
under 1-process Megatron-Core names, and :func:`load_by_name` cuts each
into this rank's shard (its pp stage's layers by global number, its ep
rank's experts, its tp slice along Megatron's ``partition_dim``). Loaded
before the optimizer is built, the optimizer's fp32 masters start from
them, exactly as from a fresh init; Adam's moments start at zero.

Under ZeRO-3 a parameter is a partition until gathered: each is gathered,
written on every rank and partitioned again (``GatheredParameters``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from zeromega.integrations.megatron.model import global_param_names, tp_shard, tp_split

from . import _agree, reshard
from .export import checkpoint_weights
from .files import CheckpointError


@dataclass(frozen=True)
class Weights:
    """Whole fp32 tensors of one checkpoint, by 1-process name."""

    path: Path
    """The checkpoint they came from."""
    manifest: dict
    """Its manifest (step, data position, scheduler, layout)."""
    tensors: dict[str, torch.Tensor]
    source: str
    """Which values they are (fp32 masters, or model weights and why)."""


def read(ckpt: Path, manifest: dict) -> Weights:
    """The consolidated weights of a checkpoint :func:`~zeromega.checkpoint.open_verified` checked (collective).

    A DeepSpeed ZeRO-1..3 checkpoint goes through the universal form a
    reshard would use, converted once by rank 0 and cached beside it
    (:func:`zeromega.checkpoint.reshard.universal_copy`); every rank then
    reads the fp32 masters from there. Other checkpoints are read by every
    rank directly (ZeRO-0 module files, Megatron's dist checkpoint).
    """
    def cached_universal() -> Path:
        return _agree(lambda: reshard.universal_copy(ckpt, manifest))

    tensors, source = checkpoint_weights(ckpt, manifest, universal_folder=cached_universal)
    return Weights(ckpt, manifest, tensors, source)


@contextlib.contextmanager
def _whole(param: torch.nn.Parameter) -> Iterator[None]:
    """The parameter's whole (tp-local) tensor meanwhile, under ZeRO-3 too (collective there)."""
    if not hasattr(param, "ds_id"):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
        yield


def load_by_name(modules: list[torch.nn.Module], weights: Weights) -> None:
    """Copy each parameter's shard of its 1-process tensor into ``modules`` (this rank's GPT chunks).

    Every parameter must be found with the whole shape its shard implies;
    otherwise nothing is half-loaded: the names are checked first, and a
    shape that does not fit raises naming the tensor, both shapes and the fix.
    """
    plan = []
    for module in modules:
        names = global_param_names(module)
        plan += [(names[name], param) for name, param in module.named_parameters()]
    missing = [name for name, _ in plan if name not in weights.tensors]
    if missing:
        raise CheckpointError(f"{weights.path} has no weights for {len(missing)} of this model's tensors, e.g. "
                              f"{', '.join(missing[:3])}", "load a checkpoint of the same model shape")
    for name, param in plan:
        full = weights.tensors[name]
        with _whole(param):
            dim, tp_size, _ = tp_split(param)
            expected = list(param.shape)
            if dim >= 0:
                expected[dim] *= tp_size
            if list(full.shape) != expected:
                raise CheckpointError(f"{weights.path}: {name} is {list(full.shape)}, this model's is {expected}",
                                      "load a checkpoint of the same model shape (layers, hidden size, heads, "
                                      "vocabulary padding)")
            with torch.no_grad():
                param.copy_(tp_shard(param, full).to(param.dtype))
