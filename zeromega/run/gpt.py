"""What a run needs when it trains zeromega's GPT: the shape from the config, the data, the vocabulary check."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

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
        moe_token_drop_policy=moe.token_drop_policy, moe_router_pre_softmax=moe.router_pre_softmax,
        swiglu=m.swiglu, normalization=m.normalization, add_bias_linear=m.add_bias_linear,
        kv_channels=m.kv_channels, rotary_base=m.rotary_base, rotary_percent=m.rotary_percent,
    )


@dataclass
class DataSource:
    """What a run reads: Megatron-Core's blend (or per-split blends, or mock data) and the tokenizer."""

    blend: Optional[tuple[list[str], Optional[list[float]]]] = None
    blend_per_split: Optional[list] = None
    mock: bool = False
    tokenizer: Any = None

    def prefixes(self) -> list[str]:
        """Every dataset prefix read, once each, in the order given."""
        parts = [self.blend] if self.blend else list(self.blend_per_split or [])
        return list(dict.fromkeys(prefix for part in parts if part for prefix in part[0]))


def _blend(field: str, flag: str, entries: list[str]):
    """Megatron-Core's ``(prefixes, weights)`` of a ``--data-path``-style list, each prefix checked."""
    from megatron.core.datasets.utils import get_blend_from_list

    if len(entries) % 2 == 0 and any(_is_number(e) for e in entries[::2]) and \
            not all(_is_number(e) for e in entries[::2]):
        raise ConfigError(field, " ".join(entries), f"{flag} mixes weights and prefixes",
                          f"write {flag} W1 PREFIX1 W2 PREFIX2 ... (or prefixes only)")
    prefixes, weights = get_blend_from_list(entries)
    if weights is not None and (any(w < 0 for w in weights) or not sum(weights) > 0):
        raise ConfigError(field, " ".join(entries), f"{flag} weights must be >= 0 with a positive sum",
                          "give each prefix a non-negative weight")
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not Path(f"{prefix}{suffix}").is_file():
                raise ConfigError(field, prefix, f"{prefix}{suffix} does not exist",
                                  "pass the prefix of a Megatron .bin/.idx pair (without the suffix)")
    return list(prefixes), None if weights is None else list(weights)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def tokenizer(cfg: RunConfig):
    """The tokenizer ``cfg.data`` names (Megatron-LM's ``--tokenizer-type``), or the byte tokenizer."""
    d = cfg.data
    try:
        return data.build_tokenizer(d.tokenizer_type, vocab_file=d.vocab_file, merge_file=d.merge_file,
                                    tokenizer_model=d.tokenizer_model, vocab_size=cfg.model.vocab_size,
                                    tiktoken_pattern=d.tiktoken_pattern,
                                    tiktoken_num_special_tokens=d.tiktoken_num_special_tokens,
                                    special_tokens=d.tokenizer_special_tokens)
    except data.DataError as err:
        raise ConfigError(err.field, err.value, err.problem, err.fix) from None


def corpus(cfg: RunConfig, rank0: bool) -> DataSource:
    """What the run reads: ``data.path`` / ``data.blend`` / the per-split paths, mock data, or the project's
    corpus (built by rank 0 on first use; the caller barriers); with the tokenizer of ``cfg.data``. The
    ``rank0`` rank also scans each file for :func:`vocab_size`'s check, so after the barrier the other
    ranks find the answer in the cache."""
    source = _corpus(cfg, rank0)
    if rank0:
        for prefix in source.prefixes():
            data.largest_token_id(prefix)
    return source


def _corpus(cfg: RunConfig, rank0: bool) -> DataSource:
    d = cfg.data
    source = DataSource(tokenizer=tokenizer(cfg), mock=d.mock)
    if d.mock:
        return source
    per_split = [("train", d.train_path), ("valid", d.valid_path), ("test", d.test_path)]
    if any(paths for _, paths in per_split):
        source.blend_per_split = [_blend(f"data.{name}_path", f"--{name}-data-path", paths) if paths else None
                                  for name, paths in per_split]
        return source
    if d.path is not None or d.blend:
        field, entries = ("data.path", [d.path]) if d.path is not None else ("data.blend", d.blend)
        source.blend = _blend(field, "--data-path", entries)
        return source
    if d.tokenizer_type is not None:
        raise ConfigError("data.tokenizer_type", d.tokenizer_type, "the project's corpus is byte-tokenized, and "
                          "no --data-path names data made with this tokenizer", "pass --data-path (zeromega "
                          "preprocess makes one) or --mock-data, or drop --tokenizer-type")
    prefix = data.default_corpus_prefix()
    if rank0:
        data.build_corpus(prefix)
    source.blend = ([str(prefix)], None)
    return source


def vocab_size(cfg: RunConfig, source: DataSource) -> int:
    """The model's vocabulary before padding, as Megatron-LM sizes it: the tokenizer's (``NullTokenizer``:
    ``--vocab-size`` + 1; the byte tokenizer: ``--vocab-size`` or 257). Every token id of every file read must
    be below it: checked here, before the first step, naming the file and its largest id."""
    tok = source.tokenizer
    if cfg.data.tokenizer_type is None:
        size = cfg.model.vocab_size or tok.vocab_size
    else:
        size = tok.vocab_size
        if cfg.model.vocab_size and cfg.data.tokenizer_type != "NullTokenizer" and cfg.model.vocab_size != size:
            warnings.warn(f"--vocab-size {cfg.model.vocab_size} is ignored with --tokenizer-type "
                          f"{cfg.data.tokenizer_type}, as in Megatron-LM: the vocabulary is the tokenizer's ({size})",
                          stacklevel=2)
    for prefix in source.prefixes():
        largest = data.largest_token_id(Path(prefix))  # scanned once per file version, then cached
        if largest >= size:
            if cfg.data.tokenizer_type is None:
                field, value = ("model.vocab_size", cfg.model.vocab_size) if cfg.model.vocab_size else \
                    ("data.tokenizer_type", None)
                fix = (f"pass --tokenizer-type (and its files) the data was made with, or --vocab-size "
                       f"{largest + 1} or more")
            else:
                field, value = "data.tokenizer_type", cfg.data.tokenizer_type
                fix = "pass the tokenizer the data was made with" + (
                    f" (or --vocab-size {largest} or more)" if cfg.data.tokenizer_type == "NullTokenizer" else
                    f" (or --vocab-size {largest + 1} or more)" if cfg.data.tokenizer_type == "TikTokenizer" else "")
            raise ConfigError(field, value, f"{prefix}.bin holds token id {largest}, outside the "
                              f"{type(tok).__name__} vocabulary of {size}", fix)
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


def datasets(cfg: RunConfig, source: DataSource, seq_length: int, iters: int, layout) -> list:
    """(train, valid, test) GPTDatasets of ``source``; a split not read (or without data) is None."""
    samples = num_samples(cfg, iters, layout.global_batch)
    try:
        built = data.build_datasets(seq_length, cfg.seed, samples, blend=source.blend,
                                    blend_per_split=source.blend_per_split, mock=source.mock,
                                    split=cfg.data.split or "969, 30, 1", tokenizer=source.tokenizer,
                                    cache_dir=cfg.data.cache_path, eod_mask_loss=cfg.data.eod_mask_loss,
                                    reset_position_ids=cfg.data.reset_position_ids,
                                    mmap_bin_files=cfg.data.mmap_bin_files)
    except data.DataError as err:
        raise ConfigError(err.field, err.value, err.problem, err.fix) from None
    return [ds if n else None for ds, n in zip(built, samples)]


def batches(cfg: RunConfig, source: DataSource, seq_length: int, iters: int, layout, start_sample: int,
            dp_rank: int, dataset=None) -> Iterator[dict]:
    """This dp rank's micro-batches from ``start_sample`` on (cp ranks of one dp rank read the same ones)."""
    if dataset is None:
        dataset = datasets(cfg, source, seq_length, iters, layout)[0]
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
