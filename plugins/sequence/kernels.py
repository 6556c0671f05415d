"""One block of attention with its log-sum-exp, on torch's fused kernels.

Legend: ``b`` batch, ``h`` heads, ``s_q`` / ``s_k`` query / key tokens of
the block, ``d`` head dim. Kernel layout is ``[b, h, s, d]``; the log-sum-exp
is ``[b, h, s_q]`` in fp32.

Ring attention needs each block's softmax normaliser (the log-sum-exp) to
merge partial results exactly, and a backward that takes the *final* output
and log-sum-exp (then each block's gradient is its exact share). torch
exposes both halves of its fused kernels as aten ops:

- CPU: ``_scaled_dot_product_flash_attention_for_cpu`` (+ ``_backward``);
- CUDA, fp16/bf16: ``_scaled_dot_product_flash_attention`` (+ ``_backward``);
- CUDA, fp32 (flash has no fp32): ``_scaled_dot_product_efficient_attention``
  (+ ``_backward``), whose log-sum-exp is padded to a multiple of 32 rows.

The CUDA branches follow the ops' schemas in torch 2.13 but have not run
here (no GPU on the machine that wrote them): test them on the first GPU.

Only ``is_causal`` masks exist here (ring blocks are either fully visible or
the causal diagonal); dropout is 0 (a ring would need one RNG stream per
block to make dropout reproducible).
"""

from __future__ import annotations

import torch

_aten = torch.ops.aten
_LSE_ALIGN = 32  # efficient attention's log-sum-exp rows come padded to this


def expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[b, h_kv, s, d]`` -> ``[b, heads, s, d]``: query head ``i`` reads kv head ``i // (heads / h_kv)``."""
    group = heads // x.size(1)
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def reduce_kv_grad(dx: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Adjoint of :func:`expand_kv`: sum the gradients of the query heads that shared a kv head."""
    b, h, s, d = dx.shape
    return dx if h == kv_heads else dx.view(b, kv_heads, h // kv_heads, s, d).sum(2)


def _use_flash_cuda(q: torch.Tensor) -> bool:
    return q.dtype in (torch.float16, torch.bfloat16)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``out [b, h, s_q, d]`` (q's dtype) and ``lse [b, h, s_q]`` (fp32); k/v already have h heads."""
    if q.device.type == "cpu":
        out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse
    if q.device.type != "cuda":
        raise NotImplementedError(f"no fused attention kernel with log-sum-exp for device {q.device}")
    if _use_flash_cuda(q):
        out, lse = _aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
        return out, lse
    out, lse = _aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)[:2]
    return out, lse[..., : q.size(2)].float()


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, causal: bool,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of one block given the (final) ``out`` and ``lse`` of its query rows."""
    if q.device.type == "cpu":
        return _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale)
    if _use_flash_cuda(q):
        # None = undefined cumulative lengths: the dense (not varlen) path, as the forward returns them;
        # the philox seed/offset are read only with dropout > 0
        seed = torch.empty(0, device=q.device, dtype=torch.int64)
        return _aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, None, None, q.size(2), k.size(2), 0.0, causal, seed, seed, scale=scale)
    rows = -(-q.size(2) // _LSE_ALIGN) * _LSE_ALIGN
    padded = lse.new_zeros(*lse.shape[:-1], rows)
    padded[..., : lse.size(-1)] = lse
    seed = torch.empty(0, device=q.device, dtype=torch.int64)
    dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, None, out, padded, seed, seed, 0.0, [True, True, True, False], causal, scale=scale)
    return dq, dk, dv
