"""zeromega's Ulysses, ring and USP attention in Hugging Face transformers' attention registry.

After :func:`register_hf_attention` a model built with
``attn_implementation="zeromega_ulysses" | "zeromega_ring" | "zeromega_usp"``
splits attention over zeromega's sequence-parallel group
(:func:`zeromega.sequence_group`). Each rank feeds its own tokens, from
:func:`zeromega.shard_batch` with the same mode, and the loss over the
sharded sequence is :func:`zeromega.cp_loss`::

    zeromega.register_hf_attention()
    model = LlamaForCausalLM(LlamaConfig(..., attn_implementation="zeromega_ring"))
    local = zeromega.shard_batch(batch, "ring")     # input_ids, shift_labels, position_ids
    logits = model(input_ids=local["input_ids"], position_ids=local["position_ids"]).logits

Legend: ``b`` batch, ``h`` query heads, ``h_kv`` key/value heads, ``s_l``
tokens on this rank, ``d`` head dim. transformers calls an attention
function with ``[b, h, s_l, d]`` query and ``[b, h_kv, s_l, d]`` key/value
(not yet repeated for GQA) and expects ``([b, s_l, h, d], weights)``. For a
name it has no mask function for, transformers builds no mask
(``attention_mask`` arrives None); the mask is causal, as the module says.

Guards, so that a wrong split never trains silently: the position ids the
model passes along must be the ones :func:`zeromega.shard_batch` makes for
this rank (checked on the first layer of each forward, agreed over the group
so every rank raises together); dropout, explicit masks and a KV cache are
refused.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

MODE_OF_NAME = {"zeromega_ulysses": "ulysses", "zeromega_ring": "ring", "zeromega_usp": "usp"}


def register_hf_attention() -> tuple[str, ...]:
    """Register the three attention implementations with transformers (idempotent); returns their names."""
    try:
        from transformers import AttentionInterface
    except ImportError:
        raise ImportError("register_hf_attention: transformers is not installed; fix: pip install "
                          "'zeromega[hf]'") from None
    for name, mode in MODE_OF_NAME.items():
        AttentionInterface.register(name, _attention_for(mode))
    return tuple(MODE_OF_NAME)


def _attention_for(mode: str):
    def attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                  scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
        return sequence_parallel_attention(mode, module, query, key, value, attention_mask, dropout, scaling,
                                           is_causal, **kwargs)

    attention.__name__ = f"zeromega_{mode}_attention"
    return attention


def _usp_groups(group):
    """USP's (Ulysses, ring) groups: Megatron's hierarchical context-parallel groups that Run builds."""
    from megatron.core import parallel_state

    from zeromega.plugins.sequence.usp import USPGroups

    groups = parallel_state.get_hierarchical_context_parallel_groups(check_initialized=False)
    if not groups:
        raise ValueError(f"attn_implementation='zeromega_usp' over {dist.get_world_size(group)} ranks needs "
                         "the Ulysses and ring sizes; fix: set sequence.mode usp with sequence.ulysses U and "
                         "sequence.ring R (both > 1; Megatron: --hierarchical-context-parallel-sizes U R), "
                         "or use zeromega_ulysses / zeromega_ring")
    return USPGroups(ulysses=groups[0], ring=groups[1])


def _check_positions(mode: str, module, position_ids, s_l: int, group) -> None:
    """Refuse (on every rank at once) position ids that are not this rank's tokens in ``mode``'s layout."""
    from zeromega.plugins.sequence.batch import layout_of
    from zeromega.plugins.sequence.layout import token_index

    if getattr(module, "layer_idx", 0) not in (0, None):
        return
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    layout = layout_of(mode)
    ok = position_ids is not None
    if ok:
        try:
            expected = token_index(s_l * size, rank, size, layout).to(position_ids.device)
            ok = bool(torch.all(position_ids == expected))
        except ValueError:
            ok = False
    flag = torch.tensor([0.0 if ok else 1.0], device=position_ids.device if position_ids is not None else "cpu")
    dist.all_reduce(flag, group=group)
    if flag.item():
        raise ValueError(f"attn_implementation='zeromega_{mode}': the position ids of rank {rank}'s "
                         f"{s_l} tokens are not its {layout} share of the sequence (or are missing); fix: "
                         f"shard each batch with zeromega.shard_batch(batch, {mode!r}) and pass its "
                         "position_ids to the model")


def sequence_parallel_attention(mode: str, module, query, key, value, attention_mask, dropout: float = 0.0,
                                scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """``[b, h, s_l, d]`` q, ``[b, h_kv, s_l, d]`` k/v -> ``([b, s_l, h, d], None)`` over the sequence group."""
    from zeromega.plugins.sequence import ring_attention, ulysses_attention, usp_attention
    from zeromega.plugins.sequence.batch import layout_of, sequence_group
    from zeromega.plugins.sequence.ulysses import local_attention

    name = f"zeromega_{mode}"
    if dropout:
        raise ValueError(f"attn_implementation={name!r}: attention dropout {dropout} is not supported; fix: set "
                         "attention_dropout=0.0 in the model config")
    if attention_mask is not None:
        raise ValueError(f"attn_implementation={name!r}: an explicit attention mask is not supported (the mask "
                         "is causal over whole sequences); fix: do not pass a 4D mask, pack without padding")
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        raise ValueError(f"attn_implementation={name!r}: a KV cache is not supported (training only); fix: "
                         "call the model with use_cache=False")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.size(-1))
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # -> [b, s_l, heads, d]
    group = sequence_group()
    size = dist.get_world_size(group)
    if size == 1:
        return local_attention(q, k, v, causal, scale).contiguous(), None
    _check_positions(mode, module, kwargs.get("position_ids"), q.size(1), group)
    layout = layout_of(mode)
    if mode == "ulysses":
        out = ulysses_attention(q, k, v, group, causal, scale, layout=layout)
    elif mode == "ring":
        out = ring_attention(q, k, v, group, causal, scale, layout=layout)
    else:
        out = usp_attention(q, k, v, _usp_groups(group), causal, scale, layout=layout)
    return out.contiguous(), None
