"""Ulysses: trade the sequence split for a head split, attend locally, trade back.

Legend: ``b`` batch, ``s`` full sequence, ``s_l = s / U`` local tokens,
``h`` query heads, ``h_kv`` key/value heads, ``d`` head dim, ``U`` Ulysses
(group) size.

``[b, s_l, h, d]`` --all-to-all--> ``[b, s, h/U, d]`` --attention--> ``[b, s, h/U, d]``
--all-to-all--> ``[b, s_l, h, d]``. Four all-to-alls per layer (q, k, v,
out), each moving ``(U-1)/U`` of its tensor, independent of the mask.

Grouped-query attention: with ``h_kv`` divisible by ``U`` each rank gets
``h_kv/U`` key/value heads, exactly those its ``h/U`` query heads read. With
fewer key/value heads than ranks (``U % h_kv == 0``) every rank's query
heads read a single kv head, so each kv head is replicated ``U/h_kv`` times
before the exchange (gradients of the copies sum back through autograd).
Anything else cannot be split and is rejected.

Layouts: any of :mod:`.layout`'s, named by ``layout=`` (required for causal
attention over several ranks): the gathered sequence is re-sorted into
natural order before the local kernel (nothing to sort for ``contiguous``),
so Ulysses can share a batch layout with ring attention and Megatron's rotary
embedding.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .collectives import all_to_all
from .kernels import expand_kv
from .layout import LAYOUTS, check_bshd, check_layout, gather_plan, missing_layout_error

# attention(q, k, v, causal, scale) on [b, s, h', d] (k/v may have fewer heads) -> [b, s, h', d]
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float], torch.Tensor]


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                    dropout_p: float = 0.0) -> torch.Tensor:
    """Full attention of one rank's heads with torch's fused SDPA; ``[b, s, h, d]`` in and out. ``dropout_p``:
    dropout on the attention probabilities (each head sees its whole sequence here, as in Ulysses)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    k, v = expand_kv(k, q.size(1)), expand_kv(v, q.size(1))
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                          dropout_p=dropout_p).transpose(1, 2)


def check_heads(heads: int, kv_heads: int, size: int) -> None:
    """Reject head counts a Ulysses group of ``size`` cannot split."""
    if heads % size:
        raise ValueError(f"num_attention_heads={heads} is not divisible by the Ulysses size {size}; "
                         "fix: use a head count that is a multiple of it, or a smaller Ulysses size")
    if kv_heads % size and size % kv_heads:
        raise ValueError(f"num_query_groups={kv_heads} neither divides nor is a multiple of the Ulysses "
                         f"size {size}; fix: use a key/value head count that divides {size} or is a "
                         f"multiple of it")


def replicate_kv(x: torch.Tensor, size: int) -> torch.Tensor:
    """``[b, s_l, h_kv, d]`` -> ``[b, s_l, U, d]`` when ``h_kv < U``: rank ``u`` gets kv head ``u // (U/h_kv)``."""
    return x if x.size(2) >= size else x.repeat_interleave(size // x.size(2), dim=2)


def ulysses_exchange(q, k, v, group, attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                     order: Optional[torch.Tensor]) -> torch.Tensor:
    """The Ulysses skeleton: seq->head all-to-all, optional re-sort, ``attend``, and back."""
    size = dist.get_world_size(group)
    check_heads(q.size(2), k.size(2), size)
    k, v = replicate_kv(k, size), replicate_kv(v, size)
    q, k, v = (all_to_all(t, group, scatter_dim=2, gather_dim=1) for t in (q, k, v))
    if order is not None:
        order = order.to(q.device)
        q, k, v = (t.index_select(1, order) for t in (q, k, v))
    out = attend(q, k, v)
    if order is not None:
        out = out.index_select(1, torch.argsort(order))
    return all_to_all(out, group, scatter_dim=1, gather_dim=2)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, causal: bool = True,
                      scale: Optional[float] = None, layout: Optional[str] = None,
                      attention: Attention = local_attention) -> torch.Tensor:
    """Exact attention over a sequence split across ``group``; ``[b, s_l, h, d]`` in and out.

    ``layout``: which tokens each rank holds (:mod:`.layout`); required for
    causal attention over several ranks.
    """
    check_bshd(q, k, v)
    if layout is not None:
        check_layout(layout)
    size = dist.get_world_size(group)
    if causal and size > 1 and layout is None:
        raise missing_layout_error("ulysses_attention", LAYOUTS)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    order = None
    if layout is not None and size > 1:
        order, _ = gather_plan(q.size(1), layout, size, 1, 0, causal, "ulysses_attention")
    return ulysses_exchange(q, k, v, group, lambda q_, k_, v_: attention(q_, k_, v_, causal, scale), order)
