"""USP: Ulysses inside ring attention, a 2-D split of one sequence over ``U x R`` ranks.

Legend: ``b`` batch, ``s_l`` local tokens, ``h`` query heads, ``h_kv``
key/value heads, ``d`` head dim, ``C = U x R`` context-parallel size, ``U``
Ulysses (inner) size, ``R`` ring (outer) size, ``c = r*U + u`` a rank's
index in its context-parallel group (ring index ``r``, Ulysses index ``u``).

Groups follow Megatron-Core's hierarchical context parallelism
(``hierarchical_context_parallel_sizes=[U, R]``): Ulysses groups are runs of
``U`` consecutive context-parallel ranks (cheap all-to-alls within a node),
ring groups take every ``U``-th rank (point-to-point across nodes).

Layouts (``layout=``, required for causal attention): ``zigzag`` over all
``C`` ranks (rank ``c`` holds chunks ``c`` and ``2C-1-c``), the same as ring
attention over ``C`` ranks and as Megatron's rotary embedding. After the
Ulysses gather, ring rank ``r`` holds chunks ``rU .. rU+U-1`` and
``2C-U-rU .. 2C-1-rU``: sorted, that is exactly the zigzag layout of ``2R``
bigger chunks over the ring, so the ring runs unchanged on ``h/U`` heads and
``U x s_l`` tokens. yunchang's zigzag (``ring_zigzag``) gathers into that
same ring layout already sorted; ``contiguous`` gathers into the ring's
contiguous layout (the classic ring). Other layouts (yunchang's stripe) are
refused under a causal mask (:func:`.layout.gather_plan`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .layout import check_bshd, check_layout, gather_plan, missing_layout_error
from .ring import ring_attention
from .ulysses import ulysses_exchange


@dataclass(frozen=True)
class USPGroups:
    """This rank's Ulysses (inner) and ring (outer) groups."""

    ulysses: dist.ProcessGroup
    ring: dist.ProcessGroup

    @property
    def ulysses_size(self) -> int:
        return dist.get_world_size(self.ulysses)

    @property
    def ring_size(self) -> int:
        return dist.get_world_size(self.ring)


_cache: dict[tuple, USPGroups] = {}


def split_ranks(cp_ranks: list[int], ulysses_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(Ulysses groups, ring groups) of one context-parallel group's global ranks."""
    if ulysses_size < 1 or len(cp_ranks) % ulysses_size:
        raise ValueError(f"ulysses_size={ulysses_size} does not divide the context-parallel size "
                         f"{len(cp_ranks)}; fix: choose a divisor of it (ring size = cp / ulysses_size)")
    grid = torch.tensor(cp_ranks).reshape(len(cp_ranks) // ulysses_size, ulysses_size)  # [R, U]
    return grid.tolist(), grid.t().tolist()


def build_usp_groups(ulysses_size: int, cp_group: Optional[dist.ProcessGroup] = None) -> USPGroups:
    """Both groups for this rank; a collective: every rank of the job calls it, in the same order.

    ``cp_group`` is this rank's context-parallel group (default: the whole
    job). Every rank first learns every context-parallel group (one
    ``all_gather_object``), then all ranks create all sub-groups in one
    sorted order, as ``new_group`` requires. Cached per layout.
    """
    cp_ranks = sorted(dist.get_process_group_ranks(cp_group or dist.group.WORLD))
    split_ranks(cp_ranks, ulysses_size)  # validate before any collective
    key = (tuple(cp_ranks), ulysses_size)
    if key in _cache:
        return _cache[key]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, cp_ranks)
    mine = None
    for ranks in sorted({tuple(r) for r in every}):
        ulysses_lists, ring_lists = split_ranks(list(ranks), ulysses_size)
        ulysses = [dist.new_group(r) for r in ulysses_lists]
        ring = [dist.new_group(r) for r in ring_lists]
        if ranks == tuple(cp_ranks):
            me = dist.get_rank()
            mine = USPGroups(ulysses=next(g for g, r in zip(ulysses, ulysses_lists) if me in r),
                             ring=next(g for g, r in zip(ring, ring_lists) if me in r))
    _cache[key] = mine
    return mine


def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: USPGroups, causal: bool = True,
                  scale: Optional[float] = None, layout: Optional[str] = None) -> torch.Tensor:
    """Exact attention over a sequence split across ``U x R`` ranks; ``[b, s_l, h, d]`` in and out.

    ``layout``: which tokens each rank holds (:mod:`.layout`); required for
    causal attention.
    """
    check_bshd(q, k, v)
    if layout is not None:
        check_layout(layout)
    u_size, r_size = groups.ulysses_size, groups.ring_size
    if causal and u_size * r_size > 1 and layout is None:
        raise missing_layout_error("usp_attention", ("zigzag", "contiguous", "ring_zigzag"))
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    order, ring_layout = None, "contiguous"
    if layout is not None:
        order, ring_layout = gather_plan(q.size(1), layout, u_size, r_size, dist.get_rank(groups.ring), causal,
                                         "usp_attention")
    return ulysses_exchange(q, k, v, groups.ulysses,
                            lambda q_, k_, v_: ring_attention(q_, k_, v_, groups.ring, causal, scale, ring_layout),
                            order)
