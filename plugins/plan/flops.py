"""Floating-point operations of a GPT training step.

Legend: ``B`` sequences per step, ``s`` sequence, ``h`` hidden, ``L`` layers,
``a`` heads, ``d`` head width (kv_channels), ``q = a d``, ``k = g d`` (GQA
groups g), ``f`` MLP width, ``V`` padded vocabulary, ``E`` experts, ``K``
top-k.

:func:`model_flops` is Megatron-LM 0.16's ``num_floating_point_operations``
(training.py) for the dense / GQA / SwiGLU / MoE transformer: every GEMM runs
three times (forward, data gradient, weight gradient) at 2 FLOPs a
multiply-add; attention scores count half the s x s matrix (causal). It is
what Megatron prints as TFLOP/s and what MFU divides by.

The papers' formulas differ: Narayanan et al. 2021 (eq. 3) count the whole
score matrix and full recomputation, ``96 B s L h^2 (1 + s/(6h) + V/(16 L h))``;
Korthikanti et al. 2022 (section 6) give model FLOPs ``72 B s L h^2 (1 + s/(6h) +
V/(12 L h))`` and hardware FLOPs with the recomputation actually run.
"""

from __future__ import annotations

from typing import Optional


def _dims(shape: dict) -> tuple:
    h, a = shape["hidden_size"], shape["num_attention_heads"]
    d = shape.get("kv_channels") or h // a
    g = shape.get("num_query_groups") or a
    swiglu = bool(shape.get("swiglu"))
    f = shape.get("ffn_hidden_size") or (int((4 * h * 2 / 3) / 64) * 64 if swiglu else 4 * h)
    return h, a, d, g, f, swiglu


def moe_layers(shape: dict) -> int:
    """How many of the L layers are MoE layers (Megatron-Core's ``moe_layer_freq``)."""
    L = shape["num_layers"]
    if not shape.get("num_experts"):
        return 0
    freq = shape.get("moe_layer_freq", 1) or 1
    if isinstance(freq, (list, tuple)):
        return sum(1 for x in freq if x)
    return sum(1 for i in range(L) if i % int(freq) == 0)


def model_flops(shape: dict, batch: int, seq_length: Optional[int] = None, vocab: Optional[int] = None) -> float:
    """Megatron-LM 0.16's model FLOPs for ``batch`` sequences (no recomputation counted)."""
    s = seq_length or shape["seq_length"]
    h, a, d, g, f, swiglu = _dims(shape)
    V = vocab or shape["vocab_size"]
    L = shape["num_layers"]
    n_moe = moe_layers(shape)
    ffx = 3 if swiglu else 2
    topk = shape.get("moe_router_topk", 2) if n_moe else 0
    moe_f = shape.get("moe_ffn_hidden_size") or f
    q, k = d * a, d * g
    mlp = 6 * h * (f * ffx * (L - n_moe) + moe_f * topk * ffx * n_moe)
    attn = 6 * (h * (q + 2 * k) + q * s / 2 * 2 + q * h) * L
    logits = 6 * h * V
    return float(batch * s * (mlp + attn + logits))


def layer_forward_flops(shape: dict, tokens: float, seq_length: int, moe: bool, causal_half: bool) -> dict:
    """Forward FLOPs of one layer over ``tokens`` tokens of sequences of ``seq_length`` (the whole model, no tp):
    ``proj`` (QKV and output projections), ``mlp`` (dense MLP, or the router and top-k experts),
    ``attention`` (QK^T and scores x V; half under causal flash kernels)."""
    h, a, d, g, f, swiglu = _dims(shape)
    q, k = d * a, d * g
    ffx = 3 if swiglu else 2
    if moe:
        topk = shape.get("moe_router_topk", 2)
        mlp = 2 * tokens * h * (shape.get("moe_ffn_hidden_size") or f) * ffx * topk + 2 * tokens * h * shape["num_experts"]
    else:
        mlp = 2 * tokens * h * f * ffx
    proj = 2 * tokens * (h * (q + 2 * k) + q * h)
    core = 2 * 2 * tokens * seq_length * q * (0.5 if causal_half else 1.0)
    return {"proj": proj, "mlp": mlp, "attention": core}


def narayanan_flops(batch: int, seq: int, layers: int, hidden: int, vocab: int) -> float:
    """Narayanan et al. 2021, eq. (3): FLOPs per iteration with full activation recomputation."""
    return 96.0 * batch * seq * layers * hidden**2 * (1 + seq / (6 * hidden) + vocab / (16 * layers * hidden))


def korthikanti_model_flops(batch: int, seq: int, layers: int, hidden: int, vocab: int) -> float:
    """Korthikanti et al. 2022, section 6: model FLOPs per iteration (no recomputation)."""
    return 72.0 * batch * seq * layers * hidden**2 * (1 + seq / (6 * hidden) + vocab / (12 * layers * hidden))


__all__ = ["korthikanti_model_flops", "layer_forward_flops", "model_flops", "moe_layers", "narayanan_flops"]
