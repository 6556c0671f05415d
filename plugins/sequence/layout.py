"""Where each rank's tokens sit in the full sequence, and the one input layout.

Legend: ``b`` batch, ``s`` full sequence, ``s_l`` this rank's tokens
(``s / P``), ``h`` query heads, ``h_kv`` key/value heads, ``d`` head dim,
``P`` ranks sharing one sequence, ``U`` Ulysses (inner) size, ``R = P / U``
ring (outer) size; rank ``p = r*U + u`` (ring index ``r``, Ulysses index ``u``).

The layouts, by name (``token_index`` gives each rank's positions):

- ``contiguous``: rank ``p`` holds tokens ``[p*s_l, (p+1)*s_l)``: DeepSpeed
  Ulysses, ring-flash-attention's basic ring and yunchang's ``basic``.
- ``zigzag``: the sequence is cut into ``2P`` chunks and rank ``p`` holds
  chunks ``p`` and ``2P-1-p``, in that order. Under a causal mask every rank
  then has the same amount of work. This is also the order Megatron-Core's
  rotary embedding assumes for context-parallel ranks and
  ring-flash-attention's zigzag ring.
- ``ring_zigzag``: yunchang's ``zigzag`` for USP: zigzag over the ``R``
  ring ranks (chunks ``r`` and ``2R-1-r``), that share then split into ``U``
  contiguous parts over the Ulysses ranks. Equals ``zigzag`` when ``U = 1``.
- ``stripe``: ring-flash-attention's stripe: rank ``p`` holds positions
  ``p, p+P, p+2P, ...``.
- ``ring_stripe``: yunchang's ``strip`` for USP: stripe over the ``R`` ring
  ranks (positions ``r, r+R, ...``), split into ``U`` contiguous parts over
  the Ulysses ranks. Equals ``stripe`` when ``U = 1``.

Which module takes which layout under a causal mask (without a mask every
layout is exact): Ulysses all of them; ring ``zigzag`` (balanced) and
``contiguous`` (the classic ring: rank ``p`` idles on the blocks after its
own, exact but unbalanced); USP any layout whose Ulysses gather leaves ring
rank ``r`` with its zigzag or contiguous share of the ring: ``zigzag``,
``contiguous`` and ``ring_zigzag``. Anything else is refused with the layout
to use and the helper that produces it (:func:`shard`, ``zeromega.shard_batch``).
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import torch

Layout = Literal["contiguous", "zigzag", "stripe", "ring_zigzag", "ring_stripe"]
LAYOUTS = ("contiguous", "zigzag", "stripe", "ring_zigzag", "ring_stripe")
RING_LAYOUTS = ("zigzag", "contiguous")
"""Causal layouts a ring takes directly (zigzag balanced, contiguous the classic unbalanced ring)."""
HELPER = "zeromega.plugins.sequence.shard(x, dim, rank, size, layout) or zeromega.shard_batch(batch, mode)"


def check_layout(layout: Optional[str], field: str = "layout") -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"{field}={layout!r}: unknown; fix: use one of {LAYOUTS}")


def _split(size: int, ulysses_size: int) -> int:
    if ulysses_size < 1 or size % ulysses_size:
        raise ValueError(f"ulysses_size={ulysses_size} does not divide the {size} ranks; fix: choose a divisor")
    return size // ulysses_size


def parts_needed(seq_len: int, size: int, layout: str, ulysses_size: int = 1) -> int:
    """The smallest multiple of which every length the layout splits over ``size`` ranks is."""
    check_layout(layout)
    ring = _split(size, ulysses_size)
    if layout == "zigzag":
        return 2 * size
    if layout == "ring_zigzag":  # 2R chunks; a ring rank's 2 chunks over U ranks
        return math.lcm(2 * ring, ring * ulysses_size)
    if layout == "ring_stripe":  # R stripes; each over U ranks
        return ring * ulysses_size
    return size


def check_seq_len(seq_len: int, size: int, layout: str, field: str = "seq_length", ulysses_size: int = 1) -> None:
    """Reject a full sequence length the layout cannot split evenly over ``size`` ranks."""
    parts = parts_needed(seq_len, size, layout, ulysses_size)
    if seq_len % parts:
        up = -(-seq_len // parts) * parts
        raise ValueError(f"{field}={seq_len}: a {layout} split over {size} ranks needs a multiple of "
                         f"{parts}; fix: pad the sequence to {up} or change the parallel size")


def token_index(seq_len: int, rank: int, size: int, layout: str, ulysses_size: int = 1) -> torch.Tensor:
    """Positions (in the full sequence) of the ``s_l`` tokens ``rank`` holds, in its order."""
    check_seq_len(seq_len, size, layout, ulysses_size=ulysses_size)
    s_l = seq_len // size
    if layout == "contiguous":
        return torch.arange(rank * s_l, (rank + 1) * s_l)
    if layout == "zigzag":
        c = seq_len // (2 * size)
        return torch.cat([torch.arange(rank * c, (rank + 1) * c),
                          torch.arange((2 * size - 1 - rank) * c, (2 * size - rank) * c)])
    if layout == "stripe":
        return torch.arange(rank, seq_len, size)
    ring = size // ulysses_size
    r, u = divmod(rank, ulysses_size)
    share = token_index(seq_len, r, ring, "zigzag") if layout == "ring_zigzag" else torch.arange(r, seq_len, ring)
    return share[u * s_l:(u + 1) * s_l]


def shard(x: torch.Tensor, dim: int, rank: int, size: int, layout: str, ulysses_size: int = 1) -> torch.Tensor:
    """This rank's part of a full-sequence tensor (sequence along ``dim``)."""
    return x.index_select(dim, token_index(x.size(dim), rank, size, layout, ulysses_size).to(x.device))


def unshard(parts: Sequence[torch.Tensor], dim: int, layout: str, ulysses_size: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard`: the full sequence from every rank's part, in rank order."""
    size = len(parts)
    seq_len = sum(p.size(dim) for p in parts)
    gathered = torch.cat(list(parts), dim)
    order = torch.cat([token_index(seq_len, r, size, layout, ulysses_size) for r in range(size)])
    return gathered.index_select(dim, torch.argsort(order).to(gathered.device))


def odd_length_error(s_l: int, size: int, module: str) -> ValueError:
    """The zigzag layout holds two equal chunks: a fix that works (pad the full sequence, then shard it)."""
    seq_len = s_l * size
    up = -(-seq_len // (2 * size)) * (2 * size)
    return ValueError(f"{module}: local sequence length {s_l} (a full sequence of {seq_len} over {size} ranks) "
                      f"is odd, and layout='zigzag' holds two equal chunks per rank; fix: pad the full sequence "
                      f"to {up} (a multiple of 2 x {size}) before sharding it with {HELPER}, or shard it "
                      "contiguously and pass layout='contiguous'")


def missing_layout_error(module: str, supported: Sequence[str]) -> ValueError:
    return ValueError(f"{module}: layout=None: causal attention over several ranks needs to know which tokens each "
                      f"rank holds; fix: pass layout= one of {tuple(supported)} and shard with {HELPER}")


def gather_plan(s_l: int, layout: str, ulysses_size: int, ring_size: int, ring_rank: int,
                causal: bool, module: str) -> tuple[Optional[torch.Tensor], str]:
    """How to sort what a Ulysses gather of ``ulysses_size`` ranks brings to ring rank ``ring_rank``.

    The gather concatenates the tokens of ranks ``ring_rank*U .. ring_rank*U+U-1``
    in rank order. Sorted by position they must be this ring rank's share of
    a layout the ring takes (zigzag or contiguous over ``R``; with ``R = 1``
    the whole sequence). Returns (the index that sorts them or None when
    already sorted, the ring's layout); a causal layout that sorts into
    neither is refused, with the layout to use.
    """
    check_layout(layout)
    size = ulysses_size * ring_size
    seq_len = s_l * size
    if seq_len % parts_needed(seq_len, size, layout, ulysses_size):
        if layout == "zigzag" and s_l % 2:
            raise odd_length_error(s_l, size, module)
        check_seq_len(seq_len, size, layout, ulysses_size=ulysses_size)
    positions = torch.cat([token_index(seq_len, ring_rank * ulysses_size + u, size, layout, ulysses_size)
                           for u in range(ulysses_size)])
    order = torch.argsort(positions)
    ordered = positions[order]
    ring_layout = None
    for candidate in RING_LAYOUTS:
        if seq_len % parts_needed(seq_len, ring_size, candidate) == 0 and torch.equal(
                ordered, token_index(seq_len, ring_rank, ring_size, candidate)):
            ring_layout = candidate
            break
    if ring_layout is None:
        if causal:
            raise ValueError(f"{module}: layout={layout!r} over {ulysses_size} x {ring_size} ranks (Ulysses x ring) "
                             "leaves a ring rank tokens that are neither its zigzag nor its contiguous share, "
                             "which a causal ring cannot mask; fix: use layout='zigzag' (balanced) or "
                             f"'contiguous', and shard with {HELPER}")
        ring_layout = "contiguous"  # without a mask any order is exact; no sort needed
        return None, ring_layout
    if torch.equal(order, torch.arange(order.numel())):
        return None, ring_layout
    return order, ring_layout


def check_bshd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """The one input layout: q ``[b, s_l, h, d]``, k and v ``[b, s_l, h_kv, d]``, ``h_kv | h``."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} has shape {tuple(t.shape)}: expected [b, s_l, heads, d] "
                             "(batch first; Megatron's [s, b, h, d] goes through the megatron adapter)")
    if k.shape != v.shape:
        raise ValueError(f"key {tuple(k.shape)} and value {tuple(v.shape)} must have the same shape")
    b, s_l, h, d = q.shape
    if (k.size(0), k.size(1), k.size(3)) != (b, s_l, d):
        raise ValueError(f"query {tuple(q.shape)} and key {tuple(k.shape)} disagree on batch, local "
                         "sequence or head dim; all are [b, s_l, heads, d]")
    if h % k.size(2):
        raise ValueError(f"num_query_groups={k.size(2)} does not divide num_attention_heads={h}; "
                         "fix: use a key/value head count that divides the query head count")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"query/key/value dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
