"""Megatron-DeepSpeed's MoE flags keep their own meaning (its megatron/arguments.py and
megatron/model/transformer.py): --num-experts N alone is N experts on every second layer (layer n, counted
from 1, is MoE when n % --expert-interval == 0), top-1, capacity factor 1.0 with token dropping, aux loss
weight 0.1. A Megatron-LM script's --num-experts keeps Megatron-LM's meaning (top-2 on every layer, dropless)."""

from __future__ import annotations

import warnings

import pytest

from distributed import run_world
from run_workers import build_architectures
from zeromega.config import ConfigError
from zeromega.config.schema import validate
from zeromega.launch import megatron_args

SHAPE = ["--num-layers", "6", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32"]


def _resolve(argv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return validate(megatron_args.parse(SHAPE + argv).partial)


def test_num_experts_alone_in_a_megatron_deepspeed_script_takes_its_defaults():
    with pytest.warns(UserWarning, match="--moe-min-capacity 4"):
        partial = megatron_args.parse(SHAPE + ["--deepspeed", "--zero-stage", "1", "--num-experts", "4"]).partial
    moe = validate(partial).moe
    assert moe.num_experts == 4 and moe.topk == 1
    assert moe.layer_freq == [0, 1, 0, 1, 0, 1]  # layers 2, 4, 6 (1-based), as get_num_experts_per_layer
    assert moe.expert_capacity_factor == 1.0 and moe.aux_loss_coeff == 0.1


def test_megatron_deepspeed_spellings_map_to_megatron_core():
    cfg = _resolve(["--deepspeed_config", "ds.json", "--num-experts", "8", "--expert-interval", "3", "--topk", "2",
                    "--moe-expert-parallel-size", "2", "--moe-train-capacity-factor", "1.5",
                    "--moe-eval-capacity-factor", "1.5", "--moe-loss-coeff", "0.01", "--create-moe-param-group"])
    assert (cfg.moe.num_experts, cfg.moe.topk, cfg.parallel.ep) == (8, 2, 2)
    assert cfg.moe.layer_freq == [0, 0, 1, 0, 0, 1]
    assert (cfg.moe.expert_capacity_factor, cfg.moe.aux_loss_coeff) == (1.5, 0.01)
    dropless = _resolve(["--topk", "1", "--num-experts", "4", "--expert-interval", "1",
                         "--disable-moe-token-dropping"])
    assert dropless.moe.expert_capacity_factor is None and dropless.moe.layer_freq == 1
    assert dropless.moe.topk == 1


def test_a_megatron_lm_script_keeps_megatron_lms_meaning():
    moe = _resolve(["--num-experts", "4"]).moe
    assert (moe.num_experts, moe.topk, moe.layer_freq, moe.expert_capacity_factor, moe.aux_loss_coeff) == \
        (4, 2, 1, None, 0.0)


def test_zero_stage_alone_does_not_switch_the_moe_dialect():
    """zeromega's own scripts take --zero-stage next to Megatron-LM's MoE flags (tests/test_architectures.py's
    Mixtral does): only --deepspeed / --deepspeed_config or Megatron-DeepSpeed's MoE spellings switch it."""
    moe = _resolve(["--zero-stage", "1", "--num-experts", "4"]).moe
    assert (moe.num_experts, moe.topk, moe.layer_freq, moe.expert_capacity_factor, moe.aux_loss_coeff) == \
        (4, 2, 1, None, 0.0)


def test_a_dense_megatron_deepspeed_script_stays_dense():
    assert _resolve(["--deepspeed", "--num-experts", "1"]).moe.num_experts is None


@pytest.mark.parametrize("argv, flag", [
    (["--deepspeed", "--num-experts", "4", "--use-tutel"], "--use-tutel"),
    (["--deepspeed", "--num-experts", "4", "--mlp-type", "residual"], "--mlp-type"),
    (["--deepspeed", "--num-experts", "4", "--moe-min-capacity", "8"], "--moe-min-capacity"),
    (["--deepspeed", "--num-experts", "4", "--moe-eval-capacity-factor", "2.0"], "--moe-eval-capacity-factor"),
    (["--deepspeed", "--num-experts", "4", "8", "4"], "--num-experts"),
])
def test_what_megatron_core_cannot_do_is_refused_naming_the_flag(argv, flag):
    with pytest.raises(ConfigError) as err:
        megatron_args.parse(SHAPE + argv)
    assert flag in str(err.value)


def test_written_back_as_megatron_deepspeed_and_read_again_the_same():
    cfg = _resolve(["--deepspeed", "--num-experts", "4", "--topk", "2", "--moe-loss-coeff", "0.05"])
    argv, lost = megatron_args.write_argv(cfg, "megatron-deepspeed")
    assert not [item for item in lost if "moe" in item or "expert" in item or "topk" in item], lost
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = validate(megatron_args.parse(argv).partial)
    assert again.moe == cfg.moe


def test_the_built_model_has_experts_where_megatron_deepspeed_puts_them():
    argv = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--lr", "1e-3", "--train-iters", "1", "--deepspeed", "--num-experts", "4"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (built,) = run_world(1, build_architectures, [argv])[0]
    assert built["moe_layers"] == [1, 3]
