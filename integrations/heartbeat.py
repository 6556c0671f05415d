"""Name the rank that held a collective up when one times out.

A collective that times out fails on the ranks that waited, and their error
("Timed out waiting 6000ms for recv operation") names neither the rank that
never arrived nor why. The launcher then reports a waiting rank as the
failure, and the hung rank, stopped by the launcher, looks like a victim.

So every rank posts the step it begins to the job's key-value store (the
``c10d`` store torch.distributed rendezvoused on; one small ``set`` per
step). A rank whose collective times out reads every rank's post and raises
:class:`CollectiveTimeout`: which ranks never began this step (hung, or far
slower), or, when all did, that they are stuck inside it. The store is
served by a thread of rank 0 or of the torchrun agent, so it answers while a
rank's Python is blocked.
"""

from __future__ import annotations

import time
from typing import Optional

import torch.distributed as dist

KEY = "zeromega/heartbeat/{rank}"


class CollectiveTimeout(RuntimeError):
    """A collective outlived the configured timeout; the message names the ranks that held it up."""


def _store():
    if not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, AttributeError, ValueError):
        return None


def post(step: int) -> None:
    """Record that this rank begins ``step`` (best effort: a store that is gone must not fail the step)."""
    store = _store()
    if store is None or dist.get_world_size() == 1:
        return
    try:
        store.set(KEY.format(rank=dist.get_rank()), f"{step} {time.time():.3f}")
    except (RuntimeError, OSError):
        pass


def posts() -> dict[int, Optional[tuple[int, float]]]:
    """rank -> (last step begun, seconds since), None for a rank that posted nothing."""
    store, now, seen = _store(), time.time(), {}
    for rank in range(dist.get_world_size()):
        key = KEY.format(rank=rank)
        try:
            if store is None or not store.check([key]):
                seen[rank] = None
                continue
            step, stamp = store.get(key).decode().split()
            seen[rank] = (int(step), now - float(stamp))
        except (RuntimeError, OSError, ValueError):
            seen[rank] = None
    return seen


def is_timeout(err: BaseException) -> bool:
    """Whether ``err`` is a collective's timeout (gloo and NCCL word it differently)."""
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("timed out" in text or "timeout" in text)


def explain(err: BaseException, step: int, timeout_minutes: Optional[float] = None) -> CollectiveTimeout:
    """The :class:`CollectiveTimeout` for ``err``, raised by this rank during ``step``."""
    seen = posts()
    behind = {r: p for r, p in seen.items() if p is None or p[0] < step}
    limit = f" after {timeout_minutes * 60:g} s (launch.distributed_timeout_minutes)" if timeout_minutes else ""
    if behind:
        who = "; ".join(f"rank {r} " + ("never began a step" if p is None else
                                        f"last began step {p[0]}, {p[1]:.0f} s ago")
                        for r, p in sorted(behind.items()))
        cause = (f"rank(s) {', '.join(map(str, sorted(behind)))} never reached step {step}: {who} "
                 "(hung, dead or far slower)")
    else:
        cause = f"every rank began step {step}, so one is stuck inside it or the ranks called different collectives"
    first_line = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return CollectiveTimeout(f"rank {dist.get_rank()}: a collective of step {step} timed out{limit}; {cause}. "
                             f"({first_line})")
