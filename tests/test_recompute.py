"""Activation recomputation (``recompute``, Megatron-LM's ``--recompute-*``) acts, on both engines.

Parity: selective and full recompute give the loss and gradient-norm curve of
no recompute, on one process and at tp2 and tp2-sp (DeepSpeed engine) and pp2
(Megatron-Core's engine). Dropout is on (0.1), so this also checks that the
recomputed forward draws the same dropout masks: Megatron's CheckpointFunction
saves the CPU generator and the model-parallel tracker's states in forward and
restores them for the recompute (on CPU through the tracker patches of
``cpu_patches``). Tolerance 1e-6 relative, measured 0.0 (recompute runs the
same kernels on the same inputs); the control without the RNG restore is off
by more than 100x that (measured 2e-4 to 1.5e-3).

Memory: at a long sequence (s = 1024, h = 64, 4 layers, one micro-batch of 2:
the ``[b, heads, s, s]`` attention scores dominate) each case trains one
DeepSpeed-engine step in a fresh forked process and reports how much its
``ru_maxrss`` grew (the project's CPU peak, ``accelerator.peak_memory_bytes``;
it never falls within a process, and a forked child starts from its parent's
current resident set). Measured on 2 shared cores, 3 runs: none ~540 MiB,
selective 0.44-0.48 and full 0.42-0.44 of it (full keeps each layer's input,
but recomputing one layer in backward still holds that layer's scores);
asserted: below 0.6 and 0.55. bench/recompute_memory.py prints the figures.
"""

from __future__ import annotations

import pytest

from distributed import run_world
from hybrid_workers import train_gpt_deepspeed, train_gpt_megatron
from workers import train_gpt

STEPS = 3
SHAPE = dict(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=64, vocab_size=257,
             hidden_dropout=0.1, attention_dropout=0.1)
SELECTIVE = {"granularity": "selective"}
FULL_UNIFORM = {"granularity": "full", "method": "uniform", "num_layers": 2}
FULL_BLOCK = {"granularity": "full", "method": "block", "num_layers": 1}


def _cfg(recompute=None, tp=1, pp=1, sp=False, micro=2, zero=0, global_batch=4):
    return {"parallel": {"tp": tp, "pp": pp, "sequence_parallel": sp}, "zero": {"stage": zero}, "precision": "fp32",
            "batch": {"micro": micro, "global": global_batch}, "optimizer": {"lr": 3e-3, "clip_grad": 1.0},
            "recompute": recompute or {}}


def _assert_same_curve(got, ref, what, rtol=1e-6):
    for key in ("loss", "grad_norm"):
        for step, (g, r) in enumerate(zip(got[key], ref[key]), 1):
            assert abs(g - r) <= rtol * abs(r), f"{what} {key} step {step}: {g!r} vs no recompute {r!r}"


# name: (world, worker, cfg kwargs, recompute settings compared to none)
LAYOUTS = {
    "deepspeed-1p": (1, train_gpt, {"zero": 1}, (SELECTIVE, FULL_UNIFORM)),
    "deepspeed-tp2": (2, train_gpt, {"tp": 2, "micro": 4, "zero": 1}, (SELECTIVE, FULL_UNIFORM)),
    # Under sequence parallel the whole block runs inside the tracker's fork, so full recompute
    # saves and restores the model-parallel stream as the CPU generator's state.
    "deepspeed-tp2-sp": (2, train_gpt_deepspeed, {"tp": 2, "sp": True, "micro": 4, "zero": 1}, (FULL_UNIFORM,)),
    "megatron-pp2": (2, train_gpt_megatron, {"pp": 2}, (SELECTIVE, FULL_BLOCK)),
}


_references: dict = {}


def _reference(name, prefix):
    """The layout's run without recompute (shared by the parity test and the control)."""
    if name not in _references:
        world, worker, kwargs, _ = LAYOUTS[name]
        _references[name] = run_world(world, worker, _cfg(**kwargs), SHAPE, prefix, STEPS)[0]
    return _references[name]


@pytest.mark.parametrize("name", LAYOUTS)
def test_recompute_keeps_the_loss_curve(name, small_corpus):
    world, worker, kwargs, settings = LAYOUTS[name]
    reference = _reference(name, small_corpus)
    assert reference["loss"][-1] < reference["loss"][0] - 0.1, "the reference run must learn"
    for recompute in settings:
        for rank, result in enumerate(run_world(world, worker, _cfg(recompute, **kwargs), SHAPE, small_corpus,
                                                STEPS)):
            _assert_same_curve(result, reference, f"{name} {recompute} rank {rank}")


def _without_rng_restore(*args):
    """train_gpt with CheckpointFunction's RNG save/restore disabled: the recompute draws new masks."""
    from megatron.core.tensor_parallel import random

    random._set_all_rng_states = lambda *states: None
    return train_gpt(*args)


def test_recompute_needs_the_rng_restore(small_corpus):
    """The control: parity above depends on the saved RNG states, so it sees the dropout masks."""
    reference = _reference("deepspeed-1p", small_corpus)
    broken = run_world(1, _without_rng_restore, _cfg(FULL_UNIFORM, zero=1), SHAPE, small_corpus, STEPS)[0]
    off = max(abs(b - r) / abs(r) for b, r in zip(broken["loss"], reference["loss"]))
    assert off > 100 * 1e-6, f"without the restore the curve is only {off:.1e} off: parity would not see it"


LONG = dict(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=1024, vocab_size=257,
            hidden_dropout=0.1, attention_dropout=0.1)


def _peak_growth(cfg: dict, shape: dict, prefix: str) -> int:
    """Bytes this fresh process's peak resident set grew by over one DeepSpeed-engine training step."""
    import resource

    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train_gpt(cfg, shape, prefix, 1)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) * 1024


def test_recompute_lowers_peak_memory(small_corpus):
    full = {"granularity": "full", "method": "uniform", "num_layers": 1}
    cases = {"none": None, "selective": SELECTIVE, "full": full}
    growth = {name: run_world(1, _peak_growth, _cfg(recompute, micro=2, zero=1, global_batch=2), LONG,
                              small_corpus)[0] for name, recompute in cases.items()}
    mib = {name: round(value / 2**20) for name, value in growth.items()}
    assert growth["selective"] < 0.6 * growth["none"], mib
    assert growth["full"] < 0.55 * growth["none"], mib


# Config time: what Megatron-LM's validate_args and TransformerConfig refuse, and what Megatron-Core
# would only fail on at the first forward, is a ConfigError naming the field, its value and a fix.
REFUSED = {
    "full without method": ({"granularity": "full", "num_layers": 1}, {}, "recompute.method=None"),
    "full without num_layers": ({"granularity": "full", "method": "block"}, {}, "recompute.num_layers=None"),
    "selective with a method": ({"granularity": "selective", "method": "uniform"}, {}, "recompute.method='uniform'"),
    "selective with num_layers": ({"granularity": "selective", "num_layers": 2}, {}, "recompute.num_layers=2"),
    "uniform chunks do not tile the layers": ({"granularity": "full", "method": "uniform", "num_layers": 3},
                                              {"model": {"num_layers": 4}}, "recompute.num_layers=3"),
    "uniform chunk longer than a pp stage": ({"granularity": "full", "method": "uniform", "num_layers": 4},
                                             {"model": {"num_layers": 4}, "parallel": {"pp": 2}},
                                             "recompute.num_layers=4"),
    "uniform chunk longer than a virtual stage": ({"granularity": "full", "method": "uniform", "num_layers": 2},
                                                  {"model": {"num_layers": 8}, "parallel": {"pp": 2, "vpp": 4}},
                                                  "recompute.num_layers=2"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_bad_recompute_is_refused_at_config_time(case):
    from zeromega.config import ConfigError
    from zeromega.config.schema import validate

    recompute, rest, named = REFUSED[case]
    with pytest.raises(ConfigError) as err:
        validate({"recompute": recompute, **rest})
    assert str(err.value).startswith(named) and "; fix: " in str(err.value), str(err.value)


def test_megatron_flags_reach_the_rule():
    from launch import translate
    from zeromega.config import ConfigError
    from zeromega.config.schema import validate

    partial, _ = translate.from_megatron_args(["--num-layers", "4", "--recompute-granularity", "full",
                                               "--recompute-method", "uniform", "--recompute-num-layers", "3"])
    with pytest.raises(ConfigError, match=r"^recompute\.num_layers=3: .*fix: use one of \[1, 2, 4\]"):
        validate(partial)


ACCEPTED = {
    "off": ({}, {}, (None, None, None)),
    "selective": (SELECTIVE, {}, ("selective", None, None)),
    "full uniform": (FULL_UNIFORM, {"model": {"num_layers": 4}}, ("full", "uniform", 2)),
    "full block, more than a stage holds": ({"granularity": "full", "method": "block", "num_layers": 8},
                                            {"model": {"num_layers": 4}, "parallel": {"pp": 2}}, ("full", "block", 8)),
}


@pytest.mark.parametrize("case", ACCEPTED)
def test_transformer_config_receives_recompute(case):
    """What the rules accept reaches Megatron-Core's TransformerConfig, which accepts it too."""
    from zeromega.config.schema import validate
    from zeromega.integrations.megatron import model

    recompute, rest, expected = ACCEPTED[case]
    cfg = validate({"recompute": recompute, **rest})
    config = model.transformer_config(model.GPTShape(**SHAPE), cfg)
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == expected
