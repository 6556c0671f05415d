"""Which global ranks form each process group, exactly as Megatron-Core builds them.

Megatron-Core lays ranks out in the order ``tp-cp-ep-dp-pp`` (tp varies
fastest) and takes a group of kind ``k`` as the ranks that differ only in
their ``k`` coordinates; dense layers use (tp, cp, dp, pp), expert layers
(tp, ep, expert-dp, pp). This module repeats that arithmetic instead of
importing ``megatron.core.parallel_state.RankGenerator``, because importing
megatron.core costs seconds to tens of seconds; the tests check that both
agree. USP splits each cp group the way
``hierarchical_context_parallel_sizes=[ulysses, ring]`` does: Ulysses groups
are runs of consecutive cp ranks, ring groups take every ulysses-th one.
"""

from __future__ import annotations

import math

from .schema import Layout

ORDER = "tp-cp-ep-dp-pp"
"""Megatron-Core's default rank order (``initialize_model_parallel(order=...)``)."""


def orthogonal_groups(sizes: dict[str, int], kinds: str) -> list[list[int]]:
    """Rank groups spanning the axes in ``kinds`` ('tp', 'dp-cp', ...) of a grid laid out in ORDER."""
    axes = [a for a in ORDER.split("-") if a in sizes]
    strides = {a: math.prod(sizes[b] for b in axes[:i]) for i, a in enumerate(axes)}
    wanted = kinds.split("-")

    def offsets(over: list[str]) -> list[int]:  # every combination, first axis fastest
        found = [0]
        for axis in over:
            found = [o + k * strides[axis] for k in range(sizes[axis]) for o in found]
        return found

    inside = offsets([a for a in axes if a in wanted])
    return [[base + o for o in inside] for base in offsets([a for a in axes if a not in wanted])]


def rank_groups(layout: Layout) -> dict[str, list[list[int]]]:
    """Group kind -> list of rank lists, for every kind a run of this layout builds."""
    dense = {"tp": layout.tp, "cp": layout.cp, "ep": 1, "dp": layout.dp, "pp": layout.pp}
    etp = getattr(layout, "etp", None) or layout.tp  # expert layers have their own tp size
    expert_dp = layout.world // (etp * layout.ep * layout.pp)
    expert = {"tp": etp, "cp": 1, "ep": layout.ep, "dp": expert_dp, "pp": layout.pp}
    groups = {kind: orthogonal_groups(dense, kind) for kind in ("tp", "cp", "dp", "dp-cp", "pp")}
    groups["ep"] = orthogonal_groups(expert, "ep")
    groups["expert-tp"] = orthogonal_groups(expert, "tp")
    groups["expert-dp"] = orthogonal_groups(expert, "dp")
    if layout.ulysses > 1 and layout.ring > 1:
        u = layout.ulysses
        groups["ulysses"] = [cp[i:i + u] for cp in groups["cp"] for i in range(0, len(cp), u)]
        groups["ring"] = [cp[i::u] for cp in groups["cp"] for i in range(u)]
    return groups


DESCRIPTIONS = {
    "tp": "tensor parallel",
    "cp": "context parallel (sequence split for attention)",
    "dp": "data parallel",
    "dp-cp": "data x context parallel: gradients are averaged here (DeepSpeed's data-parallel group)",
    "pp": "pipeline stages",
    "ep": "expert parallel",
    "expert-dp": "data parallel of expert weights",
    "expert-tp": "tensor parallel of expert weights (etp)",
    "ulysses": "USP inner axis: Ulysses all-to-all",
    "ring": "USP outer axis: ring attention",
}
