"""``gpt_size`` / ``gpt_count`` against the models zeromega really builds: every architecture flag the run
accepts changes the planned count exactly as it changes the built model (1 process and tp 2, CPU)."""

from __future__ import annotations

import pytest

from distributed import run_world
from zeromega.plugins.zero import plan as zplan

BASE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=257)
LLAMA = dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=2, seq_length=32,
             vocab_size=1000, swiglu=True, normalization="RMSNorm", add_bias_linear=False,
             position_embedding_type="rope", untie_embeddings_and_output_weights=True,
             make_vocab_size_divisible_by=64)
MIXTRAL = {**LLAMA, "num_layers": 3, "num_experts": 4, "moe_ffn_hidden_size": 96, "moe_layer_freq": [1, 0, 1]}
SHAPES = {
    "base": BASE,
    "swiglu": {**BASE, "swiglu": True},
    "swiglu-ffn": {**BASE, "swiglu": True, "ffn_hidden_size": 100},
    "gqa-kv": {**BASE, "num_attention_heads": 8, "num_query_groups": 2, "kv_channels": 16},
    "untied": {**BASE, "untie_embeddings_and_output_weights": True},
    "no-bias": {**BASE, "add_bias_linear": False},
    "rmsnorm": {**BASE, "normalization": "RMSNorm"},
    "rope": {**BASE, "position_embedding_type": "rope"},
    "vocab-pad": {**BASE, "vocab_size": 1001, "make_vocab_size_divisible_by": 96},
    "llama": LLAMA,
    "moe-8": {**BASE, "num_experts": 8},
    "moe-freq2": {**BASE, "num_layers": 4, "num_experts": 4, "moe_layer_freq": 2, "moe_ffn_hidden_size": 48},
    "mixtral": MIXTRAL,
}


def count_built(cfg: dict, shapes: dict) -> dict[str, int]:
    """Parameters of this rank's built chunks, per named shape."""
    from zeromega.config.schema import RunConfig
    from zeromega.integrations.megatron import model, parallel

    run = RunConfig.model_validate(cfg)
    parallel.initialize(run, seed=1)
    try:
        return {name: sum(p.numel() for c in model.build_gpt_chunks(model.GPTShape(**shape), run)
                          for p in c.parameters())
                for name, shape in shapes.items()}
    finally:
        parallel.shutdown()


def test_flags_change_the_count():
    """Each flag alone moves the count (none is silently ignored)."""
    base = zplan.gpt_size(**BASE).params
    for name, shape in SHAPES.items():
        if name != "base":
            assert zplan.gpt_size(**shape).params != base, name
    assert zplan.gpt_size(**{**BASE, "num_experts": 8}).params > zplan.gpt_size(**{**BASE, "num_experts": 4}).params


def test_count_equals_the_built_model_one_process():
    built = run_world(1, count_built, {"precision": "fp32"}, SHAPES)[0]
    planned = {name: zplan.gpt_size(**shape).params for name, shape in SHAPES.items()}
    assert planned == built


def test_count_equals_the_built_model_tp2():
    shapes = {k: SHAPES[k] for k in ("base", "swiglu", "gqa-kv", "untied", "vocab-pad", "llama", "mixtral")}
    built = run_world(2, count_built, {"precision": "fp32", "parallel": {"tp": 2}}, shapes)
    planned = {name: zplan.gpt_size(tp=2, **shape).params for name, shape in shapes.items()}
    assert built[0] == built[1] == planned
