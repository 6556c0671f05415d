"""Bytes moved by torch.distributed, per collective kind, as the engines call it.

DeepSpeed's comms logger sees only calls made through ``deepspeed.comm``;
Megatron-Core calls ``torch.distributed`` directly (and binds a few of its
functions at import time). :func:`install` wraps the torch.distributed
functions once and rebinds the references the engines already hold, so one
counter sees every collective of a step.

A collective counts the bytes of the tensor it is handed (``all_gather``:
the gathered output; ``reduce_scatter``: the input; p2p: what is sent), and
only in groups of more than one rank. Dividing by what theory says a rank
moves is the benchmark's job.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections import Counter
from typing import Any, Callable

import torch
import torch.distributed as dist

# function name -> (kind, function(args, kwargs) -> the tensors whose bytes count)
_FIRST = lambda a, k, name: [k.get(name, a[0] if a else None)]  # noqa: E731
_SECOND = lambda a, k, name: [k.get(name, a[1] if len(a) > 1 else None)]  # noqa: E731
_LIST_FIRST = lambda a, k, name: list(k.get(name, a[0] if a else []) or [])  # noqa: E731

_COUNTED: dict[str, tuple[str, Callable, str]] = {
    "all_reduce": ("all_reduce", _FIRST, "tensor"),
    "broadcast": ("broadcast", _FIRST, "tensor"),
    "reduce": ("reduce", _FIRST, "tensor"),
    "all_gather_into_tensor": ("all_gather", _FIRST, "output_tensor"),
    "_all_gather_base": ("all_gather", _FIRST, "output_tensor"),
    "all_gather": ("all_gather", _LIST_FIRST, "tensor_list"),
    "reduce_scatter_tensor": ("reduce_scatter", _SECOND, "input"),
    "_reduce_scatter_base": ("reduce_scatter", _SECOND, "input"),
    "all_to_all_single": ("all_to_all", _SECOND, "input"),
    "send": ("p2p", _FIRST, "tensor"),
    "isend": ("p2p", _FIRST, "tensor"),
}

_lock = threading.Lock()
_counts: Counter = Counter()
_paused = threading.local()
_originals: dict[str, Callable] = {}


def _group_size(args: tuple, kwargs: dict) -> int:
    group = kwargs.get("group")
    if group is None:
        group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
    try:
        return dist.get_world_size(group)
    except (RuntimeError, ValueError):
        return 1


def _counting(name: str, fn: Callable) -> Callable:
    kind, pick, arg_name = _COUNTED[name]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        if not getattr(_paused, "on", False) and (kind == "p2p" or _group_size(args, kwargs) > 1):
            nbytes = sum(t.numel() * t.element_size() for t in pick(args, kwargs, arg_name)
                         if isinstance(t, torch.Tensor))
            with _lock:
                _counts[kind] += nbytes
        return fn(*args, **kwargs)

    wrapper.__zeromega_original__ = fn
    return wrapper


def _count_batch_p2p(fn: Callable) -> Callable:
    """batch_isend_irecv counts its sends once, here; the isend calls it makes are not counted again."""

    @functools.wraps(fn)
    def wrapper(p2p_op_list, *args, **kwargs):
        if getattr(_paused, "on", False):
            return fn(p2p_op_list, *args, **kwargs)
        sent = sum(op.tensor.numel() * op.tensor.element_size() for op in p2p_op_list
                   if getattr(op.op, "__name__", "") == "isend")
        with _lock:
            _counts["p2p"] += sent
        with paused():
            return fn(p2p_op_list, *args, **kwargs)

    wrapper.__zeromega_original__ = fn
    return wrapper


def install() -> None:
    """Wrap torch.distributed's collectives (idempotent) and rebind engine-held references."""
    if _originals:
        return
    for name in list(_COUNTED) + ["batch_isend_irecv"]:
        fn = getattr(dist, name, None)
        if fn is None:
            continue
        _originals[name] = fn
        setattr(dist, name, _count_batch_p2p(fn) if name == "batch_isend_irecv" else _counting(name, fn))
    # P2POp accepts only the isend/irecv that distributed_c10d holds (an identity check), so the
    # wrapped isend must stand there too, and irecv must stay one object in both namespaces.
    c10d = dist.distributed_c10d
    for name in ("isend", "batch_isend_irecv"):
        if getattr(c10d, name, None) is _originals.get(name):
            setattr(c10d, name, getattr(dist, name))
    by_id = {id(fn): getattr(dist, name) for name, fn in _originals.items()}
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith(("megatron.", "deepspeed.")):
            continue
        for attr, value in list(vars(module).items()):
            if id(value) in by_id and callable(value):
                setattr(module, attr, by_id[id(value)])


def take() -> dict[str, int]:
    """This rank's bytes per kind since the last call; resets the counter."""
    with _lock:
        snapshot = dict(_counts)
        _counts.clear()
    return snapshot


class paused:
    """Context in which collectives are not counted (zeromega's own bookkeeping)."""

    def __enter__(self):
        self._outer = getattr(_paused, "on", False)
        _paused.on = True

    def __exit__(self, *exc):
        _paused.on = self._outer


KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "reduce", "p2p")


def summed_over_ranks(local: dict[str, int]) -> dict[str, int]:
    """Each kind's bytes summed over every rank of the job (one uncounted all_reduce)."""
    values = torch.tensor([local.get(kind, 0) for kind in KINDS], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        with paused():
            dist.all_reduce(values)
    return {kind: int(v) for kind, v in zip(KINDS, values.tolist()) if v}
