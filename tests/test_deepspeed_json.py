"""A DeepSpeed JSON read as DeepSpeed 0.19 reads it: its own config models validate the blocks it models,
a top-level typo DeepSpeed would ignore is refused, DeepSpeed's batch arithmetic, the sequence_parallel block."""

from __future__ import annotations

import pytest

from zeromega.config.errors import ConfigError
from zeromega.launch import deepspeed_json, translate


def ds(data: dict):
    return translate.resolve([("DeepSpeed", translate.from_deepspeed(data))])


BATCH = {"train_micro_batch_size_per_gpu": 2}


# ------------------------------------------------------------------ keys DeepSpeed refuses (or ignores)


@pytest.mark.parametrize("data, field, suggestion", [
    ({"zero_optimisation": {"stage": 3}}, "zero_optimisation", "zero_optimization"),
    ({"Zero_Optimization": {"stage": 3}}, "Zero_Optimization", "zero_optimization"),
    ({"train_micro_batch_size_per_gpus": 2}, "train_micro_batch_size_per_gpus", "train_micro_batch_size_per_gpu"),
    ({"gradient_clippng": 1.0}, "gradient_clippng", "gradient_clipping"),
    ({"zero_optimization": {"stage": 3, "stage3_param_persitance_threshold": 1e4}},
     "zero_optimization.stage3_param_persitance_threshold", "stage3_param_persistence_threshold"),
    ({"zero_optimization": {"stage": 2, "comm_overlap": True}}, "zero_optimization.comm_overlap", "overlap_comm"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_memroy": True}}},
     "zero_optimization.offload_param.pin_memroy", "pin_memory"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"devce": "cpu"}}},
     "zero_optimization.offload_optimizer.devce", "device"),
    ({"fp16": {"enabled": True, "loss_scale_windw": 500}}, "fp16.loss_scale_windw", "loss_scale_window"),
    ({"bf16": {"enabeld": True}}, "bf16.enabeld", "enabled"),
])
def test_misspelled_key_refused_with_did_you_mean(data, field, suggestion):
    with pytest.raises(ConfigError) as err:
        translate.from_deepspeed({**BATCH, **data})
    assert err.value.field == field
    assert f"did you mean {suggestion!r}" in str(err.value)


def test_misspelled_zero_block_never_silently_means_zero_0():
    with pytest.raises(ConfigError, match="silently have no effect"):
        ds({**BATCH, "zero_optimisation": {"stage": 3}})


@pytest.mark.parametrize("data, field", [
    ({"zero_optimization": {"stage": 5}}, "zero_optimization.stage"),
    ({"zero_optimization": {"stage": 3, "reduce_bucket_size": "big"}}, "zero_optimization.reduce_bucket_size"),
    ({"zero_optimization": {"offload_optimizer": {"device": "gpu"}}}, "zero_optimization.offload_optimizer.device"),
    ({"fp16": {"enabled": True, "loss_scale": -1}}, "fp16.loss_scale"),
])
def test_wrong_types_and_values_refused_as_deepspeed_refuses_them(data, field):
    from deepspeed.runtime.precision_config import get_float16_config
    from deepspeed.runtime.zero.config import get_zero_config

    with pytest.raises(Exception):  # DeepSpeed's own models refuse the block
        get_zero_config(data) if "zero_optimization" in data else get_float16_config(data)
    with pytest.raises(ConfigError) as err:
        translate.from_deepspeed({**BATCH, **data})
    assert err.value.field == field and "DeepSpeed 0.19 refuses it" in str(err.value)


def test_deprecated_and_alias_spellings_accepted_as_deepspeed_accepts_them():
    cfg = ds({**BATCH, "zero_optimization": {"stage": 3, "cpu_offload_param": True, "prefetch_bucket_size": 1000,
                                             "stage3_gather_fp16_weights_on_model_save": True}})
    assert cfg.zero.stage == 3 and cfg.zero.offload_param.device == "cpu"
    extra = cfg.deepspeed_extra["zero_optimization"]
    assert extra["stage3_prefetch_bucket_size"] == 1000
    assert extra["stage3_gather_16bit_weights_on_model_save"] is True


def test_deprecated_spelling_together_with_its_replacement_refused():
    with pytest.raises(ConfigError, match="cpu_offload"):
        translate.from_deepspeed({**BATCH, "zero_optimization": {"stage": 2, "cpu_offload": True,
                                                                 "offload_optimizer": {"device": "cpu"}}})


def test_auto_values_pass_deepspeed_validation_as_in_the_hf_trainer():
    # DeepSpeed's models drop "auto" before validating (the HF Trainer fills them): no refusal here
    deepspeed_json.check_with_deepspeed({"fp16": {"enabled": "auto", "loss_scale_window": "auto"},
                                         "zero_optimization": {"stage": "auto", "overlap_comm": "auto",
                                                               "allgather_bucket_size": "auto"}})
    cfg = ds({**BATCH, "fp16": {"enabled": "auto"}, "zero_optimization": {"stage": 2, "allgather_bucket_size": 5e8}})
    assert cfg.zero.stage == 2


def test_unknown_top_level_keys_deepspeed_ignores_still_pass_through():
    data = {**BATCH, "my_project_notes": {"owner": "me"}, "wall_clock_breakdown": False,
            "flops_profiler": {"enabled": False}, "tensorboard": {"enabled": False}}
    cfg = ds(data)
    assert cfg.deepspeed_extra["my_project_notes"] == {"owner": "me"}
    assert cfg.deepspeed_extra["flops_profiler"] == {"enabled": False}


def test_top_level_keys_known_to_deepspeed_are_collected_from_deepspeed_itself():
    names = deepspeed_json.deepspeed_names()
    for key in ("zero_optimization", "train_batch_size", "train_micro_batch_size_per_gpu", "fp16", "bf16",
                "bfloat16", "gradient_clipping", "aio", "flops_profiler", "activation_checkpointing",
                "tensorboard", "wandb", "comms_logger", "data_efficiency", "compile", "tensor_parallel",
                "sequence_parallel_size", "zero_allow_untested_optimizer", "communication_data_type"):
        assert key in names, key


# ------------------------------------------------------------------ DeepSpeed's batch arithmetic


def deepspeed_batch(keys: dict, world: int):
    """(micro, accumulation, global) as DeepSpeedConfig derives them for a data-parallel world, or None where
    it refuses: its own _configure_train_batch_size on the three values its reader takes from the dict."""
    from deepspeed.runtime import config as ds_config

    engine = ds_config.DeepSpeedConfig.__new__(ds_config.DeepSpeedConfig)
    engine.train_batch_size = ds_config.get_train_batch_size(keys)
    engine.train_micro_batch_size_per_gpu = ds_config.get_train_micro_batch_size_per_gpu(keys)
    engine.gradient_accumulation_steps = ds_config.get_gradient_accumulation_steps(keys)
    engine.world_size = world
    try:
        engine._configure_train_batch_size()
    except AssertionError:
        return None
    return engine.train_micro_batch_size_per_gpu, engine.gradient_accumulation_steps, engine.train_batch_size


def zeromega_batch(keys: dict, world: int):
    try:
        layout = ds(keys).layout(world)
    except ConfigError:
        return None
    return layout.micro, layout.accumulation, layout.global_batch


# DeepSpeed's TestBatchConfig, in our words: a world of ranks, a global batch, a micro batch, an accumulation,
# and whether they fit (global = micro x accumulation x world). Each row is also tried with every subset of
# the three keys left out, where DeepSpeed derives the missing ones (flooring) and then checks the product.
BATCH_ROWS = [
    # world, train_batch_size, micro, accumulation, fits
    (2, 32, 16, 1, True),
    (2, 32, 8, 2, True),
    (2, 33, 17, 2, False),
    (2, 32, 18, 1, False),
    (1, 8, 2, 4, True),
    (4, 64, 4, 4, True),
    (4, 60, 4, 4, False),
    (3, 36, 4, 3, True),
    (3, 35, 4, 3, False),
    (8, 8, 1, 1, True),
]
KEY_NAMES = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _subsets():
    for world, train, micro, acc, fits in BATCH_ROWS:
        values = dict(zip(KEY_NAMES, (train, micro, acc)))
        for mask in range(8):
            keys = {name: values[name] for i, name in enumerate(KEY_NAMES) if mask >> i & 1}
            yield pytest.param(keys, world, fits if mask == 7 else None, id=f"w{world}-{keys}")


@pytest.mark.parametrize("keys, world, fits", _subsets())
def test_batch_arithmetic_is_deepspeeds(keys, world, fits):
    expected = deepspeed_batch(keys, world)
    if fits is not None:  # all three given: the row's own verdict, which DeepSpeed agrees with
        assert (expected is not None) == fits
    assert zeromega_batch(keys, world) == expected


@pytest.mark.parametrize("keys", [{}, {"gradient_accumulation_steps": 4}, {"steps_per_print": 5}])
def test_no_micro_and_no_global_batch_is_refused_as_deepspeed_refuses_it(keys):
    assert deepspeed_batch(keys, 2) is None
    with pytest.raises(ConfigError, match="neither it nor train_batch_size") as err:
        ds(keys)
    assert "--micro-batch-size" in err.value.fix


@pytest.mark.parametrize("flags, expected", [
    (["--micro-batch-size", "2"], (2, 4, 16)),
    (["--micro-batch-size", "4", "--global-batch-size", "32"], (4, 4, 32)),
])
def test_megatron_flags_state_the_batch_deepspeed_leaves_out(flags, expected):
    partial = translate.from_deepspeed({"gradient_accumulation_steps": 4, "zero_optimization": {"stage": 1}})
    cfg = translate.resolve([("ds", partial), ("flags", translate.from_megatron_args(flags)[0])], megatron=True)
    layout = cfg.layout(2)
    assert (layout.micro, layout.accumulation, layout.global_batch) == expected


def test_auto_batch_keeps_the_hf_trainer_rule():
    # TrainingArguments' per_device_train_batch_size defaults to 8, gradient_accumulation_steps to 1
    layout = ds({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto"}).layout(4)
    assert (layout.micro, layout.accumulation, layout.global_batch) == (8, 1, 32)


@pytest.mark.parametrize("flags", [["--global-batch-size", "32"], ["--tensor-model-parallel-size", "2"]])
def test_with_megatron_flags_among_the_sources_megatron_requires_the_micro_batch(flags):
    # Megatron-LM's validate_args asserts args.micro_batch_size is not None; the global batch does not replace it
    partial = translate.from_deepspeed({"gradient_accumulation_steps": 4, "zero_optimization": {"stage": 1}})
    with pytest.raises(ConfigError, match="Megatron-LM asserts") as err:
        translate.resolve([("ds", partial), ("command-line arguments", translate.from_megatron_args(flags)[0])],
                          megatron=True)
    assert err.value.field == "--micro-batch-size" and "--micro-batch-size" in err.value.fix


def test_a_launch_with_no_megatron_flags_leaves_the_batch_to_the_script():
    # zeromega launch --config ds.json SCRIPT with no arguments: no Megatron flag, so no Megatron rule (the
    # script's own engine sizes the batch), as before
    partial = translate.from_deepspeed({"zero_optimization": {"stage": 1}})
    cfg = translate.resolve([("ds", partial), ("command-line arguments", {})], megatron=True)
    assert cfg.batch.micro is None and cfg.batch.global_ is None


# ------------------------------------------------------------------ DeepSpeed Ulysses (sequence_parallel)


@pytest.mark.parametrize("data", [
    {"sequence_parallel_size": 4},
    {"sequence_parallel": {"sequence_parallel_size": 4}},
    {"sequence_parallel": {"enabled": True, "size": 4}},
    {"sequence_parallel": {"sp_size": 4}},
    {"sequence_parallel": {"enabled": True}, "sequence_parallel_size": 4},
    {"sequence_parallel": {"size": 4}, "sequence_parallel_size": 4},
])
def test_sequence_parallel_block_means_ulysses_of_that_size(data):
    cfg = ds({**BATCH, **data})
    assert cfg.sequence.mode == "ulysses" and cfg.sequence.ulysses == 4
    assert "sequence_parallel" not in cfg.deepspeed_extra and "sequence_parallel_size" not in cfg.deepspeed_extra
    layout = cfg.layout(8)
    assert layout.cp == 4 and layout.ulysses == 4 and layout.dp == 2


@pytest.mark.parametrize("data", [
    {"sequence_parallel": {"enabled": False, "size": 4}},
    {"sequence_parallel": {"size": 1}},
    {"sequence_parallel_size": 1},
])
def test_sequence_parallel_off_or_of_size_one_is_none(data):
    assert ds({**BATCH, **data}).sequence.mode == "none"


@pytest.mark.parametrize("data, field", [
    ({"sequence_parallel": {"enabled": True}}, "sequence_parallel"),
    ({"sequence_parallel": {"size": 4, "mode": "ring"}}, "sequence_parallel.mode"),
    ({"sequence_parallel": {"size": 4, "sp_size": 2}}, "sequence_parallel.sp_size"),
    ({"sequence_parallel": {"size": 2}, "sequence_parallel_size": 4}, "sequence_parallel.size"),
    ({"sequence_parallel": {"enabled": False}, "sequence_parallel_size": 4}, "sequence_parallel.enabled"),
    ({"sequence_parallel": 4}, "sequence_parallel"),
    ({"sequence_parallel": {"size": "four"}}, "sequence_parallel.size"),
])
def test_sequence_parallel_block_that_says_something_else_is_refused(data, field):
    with pytest.raises(ConfigError) as err:
        ds({**BATCH, **data})
    assert err.value.field == field


@pytest.mark.parametrize("data", [
    {"zeromega": {"\n": 1}},
    {"zero_optimization": {"stage": 1, "a\nb": 1}},
    {"sequence_parallel": {"size": 2, "\n": 1}},
    {"scheduler": {"type": "WarmupLR", "params": {"\n": 1}}},
])
def test_a_key_with_a_newline_is_named_on_one_line(data):
    with pytest.raises(ConfigError) as err:
        ds({**BATCH, **data})
    assert "\n" not in str(err.value)


def test_steps_per_print_is_deepspeeds_next_to_megatrons_log_interval(tmp_path):
    """Megatron-DeepSpeed: --log-interval is the run's, steps_per_print stays DeepSpeed's own print interval
    (they never conflict); read alone, steps_per_print is the run's log interval."""
    import json

    from zeromega.launch import translate
    from zeromega.plugins.zero.ds_config import to_deepspeed

    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "steps_per_print": 2000}))
    both = translate.build(str(config), ["--log-interval", "1", "--lr", "1e-4"])
    assert both.logging.interval == 1 and to_deepspeed(both, both.layout(1))["steps_per_print"] == 2000
    alone = translate.build(str(config))
    assert alone.logging.interval == 2000 and to_deepspeed(alone, alone.layout(1))["steps_per_print"] == 10**9
