"""Megatron-Core GPT models built from Megatron-LM-style shape arguments.

Local layer spec (no TransformerEngine), CPU-side initialisation (so weights
are the same for every tp size and the same seed), learned absolute or
rotary position embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from zeromega.launch.config import RunConfig


@dataclass
class GPTShape:
    """The model's shape, named as Megatron-LM's flags name it."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    seq_length: int
    vocab_size: int
    ffn_hidden_size: Optional[int] = None
    num_query_groups: Optional[int] = None
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    position_embedding_type: str = "learned_absolute"
    untie_embeddings_and_output_weights: bool = False
    make_vocab_size_divisible_by: int = 128


def padded_vocab_size(vocab: int, multiple: int, tp: int) -> int:
    """Pad to a multiple of lcm(``multiple``, tp) so every tp shard is equal.

    Megatron-LM pads to ``multiple x tp``, which changes the model (and its
    random init) with the tp size; the lcm keeps one padded size for every
    power-of-two tp up to ``multiple``, so layouts stay comparable and
    checkpoints move between them.
    """
    step = math.lcm(multiple, tp)
    return ((vocab + step - 1) // step) * step


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def transformer_config(shape: GPTShape, cfg: RunConfig):
    """Megatron-Core's TransformerConfig for ``shape`` under ``cfg``'s parallel sizes and precision."""
    from megatron.core.transformer import TransformerConfig

    p = cfg.parallel
    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        ffn_hidden_size=shape.ffn_hidden_size,
        hidden_dropout=shape.hidden_dropout,
        attention_dropout=shape.attention_dropout,
        init_method_std=shape.init_method_std,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        context_parallel_size=p.cp,
        expert_model_parallel_size=p.ep,
        sequence_parallel=p.sequence_parallel,
        use_cpu_initialization=True,
        params_dtype=_DTYPES[cfg.precision],
        bf16=cfg.precision == "bf16",
        fp16=cfg.precision == "fp16",
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


def build_gpt(shape: GPTShape, cfg: RunConfig):
    """A Megatron-Core ``GPTModel`` for this rank (whole model: pp == 1)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = transformer_config(shape, cfg)
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=padded_vocab_size(shape.vocab_size, shape.make_vocab_size_divisible_by, cfg.parallel.tp),
        max_sequence_length=shape.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not shape.untie_embeddings_and_output_weights,
        position_embedding_type=shape.position_embedding_type,
    )
