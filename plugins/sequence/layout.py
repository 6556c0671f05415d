"""Where each rank's tokens sit in the full sequence, and the one input layout.

Legend: ``b`` batch, ``s`` full sequence, ``s_l`` this rank's tokens
(``s / P``), ``h`` query heads, ``h_kv`` key/value heads, ``d`` head dim,
``P`` ranks sharing one sequence, ``c`` zigzag chunk (``s / 2P``).

Two layouts:

- ``contiguous``: rank ``r`` holds tokens ``[r*s_l, (r+1)*s_l)``. Enough for
  Ulysses (it gathers the whole sequence before attending) and for any
  non-causal attention.
- ``zigzag``: the sequence is cut into ``2P`` chunks and rank ``r`` holds
  chunks ``r`` and ``2P-1-r``, in that order. Under a causal mask every rank
  then has the same amount of work (an early chunk sees little, a late one
  much). This is also the order Megatron-Core's rotary embedding assumes for
  context-parallel ranks (``get_pos_emb_on_this_cp_rank``).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

Layout = Literal["contiguous", "zigzag"]
LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: unknown; fix: use one of {LAYOUTS}")


def check_seq_len(seq_len: int, size: int, layout: str, field: str = "seq_length") -> None:
    """Reject a full sequence length the layout cannot split evenly over ``size`` ranks."""
    check_layout(layout)
    parts = 2 * size if layout == "zigzag" else size
    if seq_len % parts:
        up = -(-seq_len // parts) * parts
        raise ValueError(f"{field}={seq_len}: a {layout} split over {size} ranks needs a multiple of "
                         f"{parts}; fix: pad the sequence to {up} or change the parallel size")


def token_index(seq_len: int, rank: int, size: int, layout: str) -> torch.Tensor:
    """Positions (in the full sequence) of the ``s_l`` tokens ``rank`` holds, in its order."""
    check_seq_len(seq_len, size, layout)
    if layout == "contiguous":
        s_l = seq_len // size
        return torch.arange(rank * s_l, (rank + 1) * s_l)
    c = seq_len // (2 * size)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c),
                      torch.arange((2 * size - 1 - rank) * c, (2 * size - rank) * c)])


def shard(x: torch.Tensor, dim: int, rank: int, size: int, layout: str) -> torch.Tensor:
    """This rank's part of a full-sequence tensor (sequence along ``dim``)."""
    return x.index_select(dim, token_index(x.size(dim), rank, size, layout).to(x.device))


def unshard(parts: Sequence[torch.Tensor], dim: int, layout: str) -> torch.Tensor:
    """Inverse of :func:`shard`: the full sequence from every rank's part, in rank order."""
    size = len(parts)
    seq_len = sum(p.size(dim) for p in parts)
    gathered = torch.cat(list(parts), dim)
    order = torch.cat([token_index(seq_len, r, size, layout) for r in range(size)])
    return gathered.index_select(dim, torch.argsort(order).to(gathered.device))


def gathered_order(s_l: int, gather_size: int, rank_offset: int, total_size: int) -> torch.Tensor | None:
    """How to sort a zigzag sequence that an all-to-all gathered from ``gather_size`` ranks.

    Ulysses concatenates the pieces of ranks ``offset .. offset+gather_size-1``
    of a zigzag layout over ``total_size`` ranks; piece ``u`` is chunks
    ``offset+u`` and ``2*total-1-offset-u``. Sorting the chunks by position
    gives natural order when ``gather_size == total_size`` (Ulysses alone), and
    the zigzag layout of the outer ring when the gather is the inner axis of
    USP (``offset = ring_rank * gather_size``). Returns the token index that
    sorts them (None when already sorted).
    """
    if s_l % 2:
        raise ValueError(f"local sequence length {s_l} is odd: a zigzag layout holds two equal chunks; "
                         "fix: make the sequence length a multiple of 2 x the parallel size")
    c = s_l // 2
    chunk_ids = []
    for u in range(gather_size):
        chunk_ids += [rank_offset + u, 2 * total_size - 1 - rank_offset - u]
    by_position = sorted(range(len(chunk_ids)), key=chunk_ids.__getitem__)
    if by_position == list(range(len(chunk_ids))):
        return None
    return torch.cat([torch.arange(slot * c, (slot + 1) * c) for slot in by_position])


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
