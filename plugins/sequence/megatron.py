"""Ulysses / ring / USP as Megatron-Core's core attention, over its context-parallel group.

Legend: ``s_l`` tokens on this rank, ``b`` batch, ``h`` query heads and
``h_kv`` key/value heads per tensor-parallel partition, ``d`` head dim,
``C`` context-parallel size, ``U`` Ulysses size (USP), ``R = C / U``.

Megatron-Core's own context parallelism lives in TransformerEngine (CUDA
only); its local ``DotProductAttention`` refuses ``context_parallel_size > 1``.
:class:`ContextParallelAttention` takes that module's place through the layer
spec (:func:`gpt_layer_spec`): same constructor and forward, inputs
``[s_l, b, h, d]``, output ``[s_l, b, h*d]``. Megatron's ``cp_comm_type``
names select the mode as in Megatron-LM: ``p2p`` ring, ``a2a`` Ulysses,
``a2a+p2p`` USP (with ``hierarchical_context_parallel_sizes = [U, R]``).

What the rest of a GPT step needs with ``C > 1`` (GPTModel does none of it):

- each rank feeds its own tokens: :func:`shard_batch` (zigzag for ring/USP,
  contiguous for Ulysses; zigzag whenever rotary embeddings are used, since
  Megatron's ``RotaryEmbedding`` slices its table zigzag for ``C > 1``).
  Learned absolute positions follow the sharded ``position_ids``.
- the loss: GPTModel returns per-token losses of local tokens only;
  :func:`cp_loss` divides by the token count of the whole sequence (summed
  over the group) and multiplies by ``C``, because the data-parallel
  gradient average (DeepSpeed's dp group includes the cp ranks) divides by
  ``C`` again. The mean of the ranks' values is then the 1-process loss.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.transformer.module import MegatronModule

from .layout import check_layout, shard
from .ring import ring_attention
from .ulysses import check_heads, local_attention, ulysses_attention
from .usp import build_usp_groups, usp_attention

MODES = ("ulysses", "ring", "usp")
MODE_OF_CP_COMM_TYPE = {"a2a": "ulysses", "p2p": "ring", "a2a+p2p": "usp"}


def sequence_layout(mode: str, rotary: bool = False) -> str:
    """The token layout a mode's ranks hold (and :func:`shard_batch` must produce)."""
    if mode not in MODES:
        raise ValueError(f"sequence.mode={mode!r}: unknown; fix: use one of {MODES}")
    return "contiguous" if mode == "ulysses" and not rotary else "zigzag"


def _resolve_mode(mode: Optional[str], cp_comm_type: Optional[str]) -> str:
    if mode is None:
        if cp_comm_type is not None and cp_comm_type not in MODE_OF_CP_COMM_TYPE:
            raise ValueError(f"cp_comm_type={cp_comm_type!r}: not supported without TransformerEngine; "
                             f"fix: use one of {tuple(MODE_OF_CP_COMM_TYPE)}")
        mode = MODE_OF_CP_COMM_TYPE.get(cp_comm_type, "ring")  # Megatron's default is p2p
    sequence_layout(mode)  # validates
    return mode


class ContextParallelAttention(MegatronModule):
    """Drop-in for Megatron-Core's ``DotProductAttention`` that splits the sequence over cp ranks.

    Extra keywords (bound by :func:`gpt_layer_spec`): ``mode`` (else from
    ``cp_comm_type``), ``ulysses_size`` (USP; else
    ``config.hierarchical_context_parallel_sizes[0]``), ``layout`` (else
    :func:`sequence_layout`). Everything a mode cannot do is rejected here,
    when the model is built, not in the first forward.
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, *, mode: Optional[str] = None,
                 ulysses_size: Optional[int] = None, layout: Optional[str] = None):
        super().__init__(config=config)
        from megatron.core import parallel_state

        self.mode = _resolve_mode(mode, cp_comm_type)
        self.layout = layout or sequence_layout(self.mode)
        check_layout(self.layout)
        self.attn_mask_type = attn_mask_type
        self.layer_number = max(1, layer_number)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout and self.mode != "ulysses":
            # Ulysses attends whole sequences of a subset of heads: dropout on their probabilities is local, as
            # in DeepSpeed-Ulysses. Ring and USP blocks would need one random stream per block across ranks.
            raise ValueError(f"attention_dropout={dropout}: ring and USP attention have no dropout (each rank "
                             "would need the same random stream per block); fix: set it to 0, or use Ulysses "
                             "(a2a), which has it")
        self.dropout = float(dropout or 0.0)
        if config.apply_query_key_layer_scaling:
            raise ValueError("apply_query_key_layer_scaling=True: not supported by context-parallel "
                             "attention; fix: turn it off (fp32 softmax makes it unnecessary)")
        if getattr(config, "softmax_type", "vanilla") != "vanilla" or getattr(config, "window_size", None):
            raise ValueError("softmax_type / window_size: only vanilla full softmax attention is supported "
                             "by context-parallel attention; fix: use the defaults")
        tp = config.tensor_model_parallel_size
        self.heads = config.num_attention_heads // tp
        self.kv_heads = (config.num_query_groups or config.num_attention_heads) // tp
        head_dim = config.kv_channels
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        self.cp_group = cp_group or parallel_state.get_context_parallel_group()
        self.cp_size = dist.get_world_size(self.cp_group)
        self.usp_groups = None
        if self.cp_size > 1 and self.mode == "ulysses":
            check_heads(self.heads, self.kv_heads, self.cp_size)
        if self.cp_size > 1 and self.mode == "usp":
            sizes = getattr(config, "hierarchical_context_parallel_sizes", None)
            ulysses_size = ulysses_size or (sizes[0] if sizes else None)
            if ulysses_size is None:
                raise ValueError("ulysses_size=None: USP needs the Ulysses (inner) size; fix: pass it or set "
                                 "hierarchical_context_parallel_sizes=[ulysses, ring]")
            check_heads(self.heads, self.kv_heads, ulysses_size)
            self.usp_groups = build_usp_groups(ulysses_size, self.cp_group)

    def _causal(self, attn_mask_type) -> bool:
        from megatron.core.transformer.enums import AttnMaskType

        kind = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if kind not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise NotImplementedError(f"attn_mask_type={kind}: context-parallel attention supports causal "
                                      "and no_mask only")
        return kind == AttnMaskType.causal

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """``[s_l, b, h, d]`` q and ``[s_l, b, h_kv, d]`` k/v -> ``[s_l, b, h*d]``.

        ``attention_mask`` is ignored for a causal layer (the mask is implied;
        Megatron passes the full causal mask when it builds one) and must be
        None otherwise; bias and packed sequences are not supported.
        """
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("attention_bias / packed_seq_params: not supported by context-parallel "
                                      "attention")
        causal = self._causal(attn_mask_type)
        if attention_mask is not None and not causal:
            raise NotImplementedError("attention_mask with a non-causal layer: arbitrary masks are not "
                                      "supported by context-parallel attention")
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # -> [b, s_l, heads, d]
        attend = functools.partial(local_attention, dropout_p=self.dropout if self.training else 0.0)
        if self.cp_size == 1:
            out = attend(q, k, v, causal, self.scale)
        elif self.mode == "ulysses":
            out = ulysses_attention(q, k, v, self.cp_group, causal, self.scale, layout=self.layout, attention=attend)
        elif self.mode == "ring":
            out = ring_attention(q, k, v, self.cp_group, causal, self.scale, layout=self.layout)
        else:
            out = usp_attention(q, k, v, self.usp_groups, causal, self.scale, layout=self.layout)
        return out.transpose(0, 1).flatten(2).contiguous()


def gpt_layer_spec(mode: Optional[str] = None, ulysses_size: Optional[int] = None, layout: Optional[str] = None,
                   **local_spec_kwargs):
    """Megatron-Core's local GPT layer spec with :class:`ContextParallelAttention` as core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = copy.deepcopy(get_gpt_layer_local_spec(**local_spec_kwargs))
    spec.submodules.self_attention.submodules.core_attention = functools.partial(
        ContextParallelAttention, mode=mode, ulysses_size=ulysses_size, layout=layout)
    return spec


BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def shard_batch(batch: dict[str, torch.Tensor], layout: str, cp_group=None) -> dict[str, torch.Tensor]:
    """This cp rank's tokens of a ``[b, s]`` batch: tokens, labels, loss_mask, position_ids.

    Other entries pass through unchanged (an ``attention_mask`` is not
    needed: the causal mask is implied).
    """
    if cp_group is None:
        from megatron.core import parallel_state

        cp_group = parallel_state.get_context_parallel_group()
    rank, size = dist.get_rank(cp_group), dist.get_world_size(cp_group)
    if size == 1:
        return dict(batch)
    return {key: shard(value, 1, rank, size, layout) if key in BATCH_KEYS else value
            for key, value in batch.items()}


def cp_loss(per_token: torch.Tensor, loss_mask: torch.Tensor, cp_group=None) -> torch.Tensor:
    """Token-weighted mean loss of the whole sequence, scaled for a gradient average over cp ranks.

    ``sum(local loss x mask) x C / sum over the group(mask)``: the mean of the
    ranks' values is the 1-process masked token mean, and so is the mean of
    their gradients (which is what a data-parallel average over dp x cp
    computes), even when the ranks keep different numbers of tokens.
    """
    if cp_group is None:
        from megatron.core import parallel_state

        cp_group = parallel_state.get_context_parallel_group()
    mask = loss_mask.to(per_token.device, torch.float32)
    count = mask.sum().detach().clone()
    size = dist.get_world_size(cp_group)
    if size > 1:
        dist.all_reduce(count, group=cp_group)
    return (per_token.float() * mask).sum() * size / count
