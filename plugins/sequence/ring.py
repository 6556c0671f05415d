"""Ring attention: queries stay, key/value blocks travel, partial results merge by log-sum-exp.

Legend: ``b`` batch, ``s_l`` local tokens (two zigzag chunks of ``c = s_l/2``),
``h`` query heads, ``h_kv`` key/value heads, ``d`` head dim, ``P`` ring size,
``r`` this rank, ``j`` the rank whose key/value block is held at a step.

Input ``[b, s_l, h, d]`` (keys/values ``[b, s_l, h_kv, d]``); a causal
mask needs the layout named (``layout=``, see :mod:`.layout`); any other
layout than these two is refused, never computed wrongly.

``zigzag`` (rank ``r`` holds chunks ``r`` and ``2P-1-r``): each step is one
of three blocks, all of the same cost after step 0:

- ``j == r``: the local causal block (its two chunks in order are causal);
- ``j < r``: every local query sees chunk ``j`` and none of ``2P-1-j``, so
  all queries against the first half of the keys, unmasked;
- ``j > r``: chunk ``r`` sees nothing of rank ``j``; chunk ``2P-1-r`` sees
  all of it, so the second half of the queries against all keys, unmasked.

``contiguous`` (the classic ring, ring-flash-attention's basic layout):
step 0 is the local causal block, a block from an earlier rank is seen
whole, a later rank's block not at all (skipped: rank ``r`` computes ``r+1``
blocks, exact but unbalanced).

Forward: the next key/value block is sent/received asynchronously while
the current one is computed. Backward: key/value blocks travel again, and
their gradients travel with them, one step behind, collecting each rank's
share; after ``P`` passes each rank holds its own block's dk/dv. Nothing is
gathered, so per-rank memory stays ``O(s_l)``. Key/value heads travel
unexpanded (GQA costs no extra bytes); they are expanded only for the kernel.
Non-causal attention has no mask and any layout works.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .collectives import Ring, wait_all
from .kernels import attention_backward, attention_forward, expand_kv, reduce_kv_grad
from .layout import HELPER, RING_LAYOUTS, check_bshd, check_layout, missing_layout_error, odd_length_error

_KV_TAG, _DKV_TAG = 11, 12


def _block(step: int, src: int, rank: int, causal: bool, s_l: int,
           layout: str = "zigzag") -> Optional[tuple[slice, slice, bool]]:
    """(query rows, key columns, causal) of the block computed at ``step`` against rank ``src``; None: no
    query here sees any of those keys (contiguous layout, a later rank's block)."""
    every = slice(0, s_l)
    if step == 0:
        return every, every, causal
    if not causal:
        return every, every, False
    if layout == "contiguous":
        return (every, every, False) if src < rank else None
    half = s_l // 2
    if src < rank:
        return every, slice(0, half), False
    return slice(half, s_l), every, False


def _merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """In place: fold a block's (out, lse) into the running fp32 (out, lse) of the same rows."""
    new_lse = torch.logaddexp(lse, block_lse)
    out.mul_(torch.exp(lse - new_lse).unsqueeze(-1))
    out.add_(block_out.float() * torch.exp(block_lse - new_lse).unsqueeze(-1))
    lse.copy_(new_lse)


class _RingAttention(torch.autograd.Function):
    """Kernel layout ``[b, h, s_l, d]``; k/v ``[b, h_kv, s_l, d]``."""

    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, layout):
        ring = Ring(group)
        heads, s_l = q.size(1), q.size(2)
        kv = torch.stack([k, v])  # one message per step
        out = lse = None
        for step in range(ring.size):
            handles = []
            if step + 1 < ring.size:
                incoming, handles = ring.pass_on(kv, _KV_TAG)
            block = _block(step, ring.source(step), ring.rank, causal, s_l, layout)
            if block is None:
                wait_all(handles)
                if handles:
                    kv = incoming
                continue
            rows, cols, masked = block
            block_out, block_lse = attention_forward(
                q[:, :, rows], expand_kv(kv[0][:, :, cols], heads), expand_kv(kv[1][:, :, cols], heads),
                masked, scale)
            if out is None:
                out, lse = block_out.float(), block_lse.float().clone()
            else:
                _merge(out[:, :, rows], lse[:, :, rows], block_out, block_lse)
            wait_all(handles)
            if handles:
                kv = incoming
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.causal, ctx.scale, ctx.layout = group, causal, scale, layout
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        ring = Ring(ctx.group)
        heads, kv_heads, s_l = q.size(1), k.size(1), q.size(2)
        dq = torch.zeros_like(q, dtype=torch.float32)
        kv = torch.stack([k, v])
        dkv = None  # fp32 [2, b, h_kv, s_l, d] for the block held, travelling one step behind kv
        dkv_handles: list = []
        for step in range(ring.size):
            kv_handles = []
            if step + 1 < ring.size:
                incoming, kv_handles = ring.pass_on(kv, _KV_TAG)
            block = _block(step, ring.source(step), ring.rank, ctx.causal, s_l, ctx.layout)
            if step == 0:
                dkv = torch.zeros_like(kv, dtype=torch.float32)
            else:
                wait_all(dkv_handles)  # dkv now holds ranks r-step .. r-1's shares of this same block
            if block is not None:
                rows, cols, masked = block
                dq_b, dk_b, dv_b = attention_backward(
                    dout[:, :, rows], q[:, :, rows], expand_kv(kv[0][:, :, cols], heads),
                    expand_kv(kv[1][:, :, cols], heads), out[:, :, rows], lse[:, :, rows], masked, ctx.scale)
                dq[:, :, rows] += dq_b
                dkv[0][:, :, cols] += reduce_kv_grad(dk_b.float(), kv_heads)
                dkv[1][:, :, cols] += reduce_kv_grad(dv_b.float(), kv_heads)
            if ring.size > 1:  # to r+1, whose block this becomes one step later (or its own, at the end)
                dkv, dkv_handles = ring.pass_on(dkv, _DKV_TAG)
            wait_all(kv_handles)
            if kv_handles:
                kv = incoming
        wait_all(dkv_handles)  # now dkv is this rank's own block, with every rank's share
        dk, dv = dkv[0].to(k.dtype), dkv[1].to(v.dtype)
        return dq.to(q.dtype), dk, dv, None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, causal: bool = True,
                   scale: Optional[float] = None, layout: Optional[str] = None) -> torch.Tensor:
    """Exact attention over the sequence spread across ``group``; ``[b, s_l, h, d]`` in and out.

    ``layout`` (which tokens each rank holds, :mod:`.layout`): ``"zigzag"`` or
    ``"contiguous"``; required for causal attention over several ranks (no
    default could be right for both), any other is refused.
    """
    check_bshd(q, k, v)
    size = 1 if group is None and not _initialized() else _world(group)
    if layout is not None:
        check_layout(layout)
    if causal and size > 1:
        if layout is None:
            raise missing_layout_error("ring_attention", RING_LAYOUTS)
        if layout not in RING_LAYOUTS:
            raise ValueError(f"ring_attention: layout={layout!r} is not supported under a causal mask (a ring "
                             "block would need a mask the fused kernels do not take); fix: use layout='zigzag' "
                             f"(balanced) or 'contiguous' (the classic ring), and shard with {HELPER}")
        if layout == "zigzag" and q.size(1) % 2:
            raise odd_length_error(q.size(1), size, "ring_attention")
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    # the kernels take strided [b, h, s_l, d] views: no copies of q, k, v
    out = _RingAttention.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), group, causal, scale,
                               layout or "contiguous")
    return out.transpose(1, 2)


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _world(group) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group)
