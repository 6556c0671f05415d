"""What a run needs when it trains zeromega's GPT: the shape from the config, the data, the vocabulary check."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from zeromega.config import ConfigError, RunConfig
from zeromega.integrations.megatron import data
from zeromega.integrations.megatron.model import GPTShape

REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "seq_length")


def shape(cfg: RunConfig, vocab_size: int) -> GPTShape:
    """The GPT the config's model and moe sections describe, over ``vocab_size`` tokens."""
    m, moe = cfg.model, cfg.moe
    missing = [name for name in REQUIRED if getattr(m, name) is None]
    if missing:
        flags = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise ConfigError(f"model.{missing[0]}", None, f"the model's shape is incomplete (missing {flags})",
                          f"pass {flags} (Megatron-LM has no default for them)")
    return GPTShape(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        seq_length=m.max_position_embeddings or m.seq_length, vocab_size=vocab_size,
        ffn_hidden_size=m.ffn_hidden_size, num_query_groups=m.num_query_groups,
        hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std, position_embedding_type=m.position_embedding_type,
        untie_embeddings_and_output_weights=m.untie_embeddings_and_output_weights,
        make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
        num_experts=moe.num_experts, moe_router_topk=moe.topk, moe_ffn_hidden_size=moe.ffn_hidden_size,
        moe_aux_loss_coeff=moe.aux_loss_coeff, moe_expert_capacity_factor=moe.expert_capacity_factor,
        moe_token_dispatcher_type=moe.token_dispatcher_type,
        moe_router_load_balancing_type=moe.router_load_balancing_type, moe_layer_freq=moe.layer_freq,
        moe_token_drop_policy=moe.token_drop_policy,
        swiglu=m.swiglu, normalization=m.normalization, add_bias_linear=m.add_bias_linear,
        kv_channels=m.kv_channels, rotary_base=m.rotary_base, rotary_percent=m.rotary_percent,
    )


def corpus(cfg: RunConfig, rank0: bool) -> Path:
    """The dataset prefix: the config's data.path, or the project's corpus (built by rank 0 on first use;
    the caller barriers)."""
    if cfg.data.path is not None:
        prefix = Path(cfg.data.path)
        for suffix in (".bin", ".idx"):
            if not Path(f"{prefix}{suffix}").is_file():
                raise ConfigError("data.path", str(prefix), f"{prefix}{suffix} does not exist",
                                  "pass the prefix of a Megatron .bin/.idx pair (without the suffix)")
        return prefix
    prefix = data.default_corpus_prefix()
    if rank0:
        data.build_corpus(prefix)
    return prefix


def largest_token_id(prefix: Path) -> int:
    """The largest token id in a ``.bin`` (read through its ``.idx``'s dtype, one pass over the file)."""
    from megatron.core.datasets.indexed_dataset import DType

    with open(f"{prefix}.idx", "rb") as f:
        f.seek(17)
        dtype = DType.dtype_from_code(f.read(1)[0])
    tokens = np.memmap(f"{prefix}.bin", dtype=dtype, mode="r")
    return int(tokens.max()) if tokens.size else -1


def vocab_size(cfg: RunConfig, prefix: Path) -> int:
    """The model's vocabulary before padding: ``--vocab-size``, or the tokenizer's (bytes: 257); every
    token id of the data must be below it."""
    size = cfg.model.vocab_size or data.ByteTokenizer().vocab_size
    largest = largest_token_id(prefix)
    if largest >= size:
        field = "model.vocab_size" if cfg.model.vocab_size else "data.path"
        raise ConfigError(field, cfg.model.vocab_size or str(prefix), f"{prefix}.bin holds token id {largest}, "
                          f"outside a vocabulary of {size}", f"pass --vocab-size {largest + 1} or more (or the "
                          "tokenizer the data was made with)")
    return size


def num_samples(cfg: RunConfig, iters: int, global_batch: int) -> tuple[int, int, int]:
    """(train, valid, test) samples to draw, as Megatron-LM's ``get_train_valid_test_num_samples``: every
    evaluation reads ``eval_iters`` new global batches of the validation split (one per ``eval_interval``
    steps, one more at the end), the test split is read once. No evaluation: (train, 0, 0)."""
    log = cfg.logging
    if not (log.eval_interval and log.eval_iters):
        return iters * global_batch, 0, 0
    return (iters * global_batch, (iters // log.eval_interval + 1) * log.eval_iters * global_batch,
            log.eval_iters * global_batch)


def datasets(cfg: RunConfig, prefix: Path, seq_length: int, iters: int, layout) -> list:
    """(train, valid, test) GPTDatasets of ``cfg.data.split``; a split of weight 0 (or not evaluated) is None."""
    samples = num_samples(cfg, iters, layout.global_batch)
    built = data.build_gpt_datasets(prefix, seq_length, cfg.seed, samples, split=cfg.data.split or "969, 30, 1")
    return [ds if n else None for ds, n in zip(built, samples)]


def batches(cfg: RunConfig, prefix: Path, seq_length: int, iters: int, layout, start_sample: int,
            dp_rank: int, dataset=None) -> Iterator[dict]:
    """This dp rank's micro-batches from ``start_sample`` on (cp ranks of one dp rank read the same ones)."""
    if dataset is None:
        dataset = datasets(cfg, prefix, seq_length, iters, layout)[0]
    return data.sample_batches(dataset, layout.micro, start_sample=start_sample, dp_rank=dp_rank, dp_size=layout.dp)


def layer_spec(shape: GPTShape, cfg: RunConfig):
    """The layer spec a whole-model GPT needs: zeromega's Ulysses / ring / USP core attention at cp > 1
    (Megatron's own context parallelism needs TransformerEngine), else None (Megatron-Core's local spec)."""
    if cfg.parallel.cp == 1 or cfg.sequence.mode not in ("ulysses", "ring", "usp"):
        return None
    if shape.num_experts and shape.moe_layer_freq != 1:
        raise ConfigError("moe.layer_freq", shape.moe_layer_freq, "the context-parallel attention's layer spec "
                          "makes every layer an MoE layer", "use --moe-layer-freq 1 with --context-parallel-size")
    from zeromega.plugins.sequence.megatron import gpt_layer_spec, sequence_layout

    # Under rope Megatron's rotary table is sliced zigzag per cp rank, so the batch is sharded zigzag
    # (shard_batch) and the attention must read its tokens in that order, Ulysses included.
    layout = sequence_layout(cfg.sequence.mode, rotary=shape.position_embedding_type == "rope")
    return gpt_layer_spec(cfg.sequence.mode, ulysses_size=cfg.sequence.ulysses, layout=layout,
                          num_experts=shape.num_experts, moe_grouped_gemm=False,
                          normalization=shape.normalization)
