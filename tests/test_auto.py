"""DeepSpeed's "auto" filled as the HF Trainer (with Accelerate) fills it: from what the run states, else the
Trainer's own defaults, never an invented value; every fill reported, every unfilled auto in one error.

The golden values of Accelerate's auto-fill tests (tests/deepspeed/test_deepspeed.py: a ZeRO-3 file of autos,
a 1-process run with batch 16, lr 5e-5, weight decay 1e-4, 10 warmup steps, GPT-2's hidden size 768) are
restated here with zeromega's sources standing in for Accelerate's DummyOptim / DummyScheduler / dataloader.
"""

from __future__ import annotations

import copy
import inspect
import logging
from pathlib import Path

import pytest

from zeromega.config.errors import ConfigError
from zeromega.launch import cli, translate

H = 768  # GPT-2's hidden size, the model of Accelerate's tests

# The shape of Accelerate's ZeRO-3 test file: everything the Trainer owns is "auto".
ZERO3_AUTOS = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"},
                          "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto",
                          "stage3_gather_16bit_weights_on_model_save": "auto"},
    "gradient_accumulation_steps": 1,
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
}


def resolve(ds: dict, *more, megatron: bool = False):
    filled: list[str] = []
    cfg = translate.resolve([("DeepSpeed config", translate.from_deepspeed(copy.deepcopy(ds))), *more],
                            megatron=megatron, filled=filled)
    return cfg, filled


def flags(*argv: str):
    return ("command-line arguments", translate.from_megatron_args(list(argv))[0])


def deepspeed_warmup_default(name: str):
    from deepspeed.runtime.lr_schedules import WarmupLR

    return inspect.signature(WarmupLR.__init__).parameters[name].default


def assert_accelerate_golden(cfg) -> None:
    """Accelerate's test_autofill_dsconfig assertions, on the DeepSpeed JSON zeromega writes for 1 process."""
    ds = translate.to_deepspeed_file(cfg, cfg.layout(1))
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["train_batch_size"] == 16
    assert ds["optimizer"]["params"]["lr"] == 5e-5 and ds["optimizer"]["params"]["weight_decay"] == 1e-4
    scheduler = ds["scheduler"]
    assert scheduler["type"] == "WarmupLR"  # the block of autos keeps its type
    params = scheduler["params"]
    assert params.get("warmup_min_lr", deepspeed_warmup_default("warmup_min_lr")) == 0.0
    assert params["warmup_max_lr"] == 5e-5 and params["warmup_num_steps"] == 10
    assert ds["gradient_clipping"] == 1.0
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] == H * H
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * H * H)
    assert zero["stage3_param_persistence_threshold"] == 10 * H
    assert not zero["stage3_gather_16bit_weights_on_model_save"]


def test_accelerate_zero3_golden_values_from_megatron_flags():
    cfg, filled = resolve(ZERO3_AUTOS, flags("--micro-batch-size", "16", "--lr", "5e-5", "--weight-decay", "1e-4",
                                             "--lr-warmup-iters", "10", "--hidden-size", str(H)), megatron=True)
    assert_accelerate_golden(cfg)
    assert "optimizer.params.lr = 5e-05  <- auto, from --lr (command-line arguments)" in filled
    assert "gradient_clipping = 1.0  <- auto, no --clip-grad given (Megatron-LM default)" in filled


def test_accelerate_zero3_golden_values_from_the_zeromega_block():
    ds = {**ZERO3_AUTOS, "zeromega": {"batch": {"micro": 16}, "optimizer": {"lr": 5e-5, "weight_decay": 1e-4},
                                      "scheduler": {"warmup_iters": 10}, "model": {"hidden_size": H}}}
    cfg, filled = resolve(ds)
    assert_accelerate_golden(cfg)
    assert "gradient_clipping = 1.0  <- auto, no --clip-grad given (HF Trainer default max_grad_norm)" in filled
    assert ("zero_optimization.stage3_gather_16bit_weights_on_model_save = false  <- auto, Accelerate's "
            "zero3_save_16bit_model default (HF Trainer)") in filled


def test_accelerate_plugin_values_fill_stage_offload_accumulation_clip_and_precision():
    # Accelerate's test_autofill_dsconfig_from_ds_plugin: stage, offload devices, accumulation, clip, the
    # precision switch and the 16-bit gather given as "auto", filled from the run (here its flags / block)
    ds = copy.deepcopy(ZERO3_AUTOS)
    del ds["fp16"]
    ds["bf16"]["enabled"] = "auto"
    ds["zero_optimization"].update(stage="auto", offload_optimizer={"device": "auto"},
                                   offload_param={"device": "auto"})
    ds.update(gradient_accumulation_steps="auto", gradient_clipping="auto",
              zeromega={"zero": {"stage": 2, "offload_optimizer": {"device": "cpu"}}, "batch": {"accumulation": 2},
                        "optimizer": {"lr": 5e-5, "clip_grad": 1.0}, "scheduler": {"warmup_iters": 10},
                        "model": {"hidden_size": H}, "precision": "bf16"})
    cfg, filled = resolve(ds)
    assert (cfg.zero.stage, cfg.zero.offload_optimizer.device, cfg.batch.accumulation) == (2, "cpu", 2)
    assert cfg.optimizer.clip_grad == 1.0 and cfg.precision == "bf16"
    assert "bf16.enabled = true  <- auto, from DeepSpeed config" in filled  # its zeromega block
    # below ZeRO-3 the Trainer fills only reduce_bucket_size; DeepSpeed drops the other bucket autos
    zero = cfg.deepspeed_extra["zero_optimization"]
    assert zero["reduce_bucket_size"] == H * H and "stage3_prefetch_bucket_size" not in zero
    # Accelerate's own defaults where nothing states them: ZeRO-2, no offload
    ds["zeromega"] = {"optimizer": {"lr": 5e-5}, "scheduler": {"warmup_iters": 10}, "model": {"hidden_size": H}}
    cfg, filled = resolve(ds)
    assert (cfg.zero.stage, cfg.zero.offload_optimizer.device, cfg.zero.offload_param.device) == (2, "none", "none")
    assert "zero_optimization.stage = 2  <- auto, no --zero-stage given (HF Trainer default Accelerate's zero_stage)" \
        in filled


def test_an_hf_trainer_file_alone_takes_the_trainers_defaults():
    ds = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"},
          "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                    "weight_decay": "auto"}},
          "zero_optimization": {"stage": 2}}
    cfg, filled = resolve(ds)
    o = cfg.optimizer
    assert (o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, o.clip_grad) == (5e-5, 0.9, 0.999, 1e-8, 0.0, 1.0)
    layout = cfg.layout(4)
    assert (layout.micro, layout.accumulation, layout.global_batch) == (8, 1, 32)  # per_device_train_batch_size 8
    assert cfg.precision == "fp32"
    assert "fp16.enabled = false  <- auto, no --fp16/--bf16 given (HF Trainer default)" in filled
    assert "train_batch_size = \"micro x accumulation x dp\"  <- auto, derived, as DeepSpeed and the HF Trainer do" \
        in filled
    assert len(filled) == 10  # one line per auto


def test_every_unfilled_auto_is_named_in_one_error_with_its_flag():
    ds = {"train_micro_batch_size_per_gpu": "auto", "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
          "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto", "warmup_num_steps": 5}},
          "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}, "flops_profiler": {"enabled": "auto"}}
    with pytest.raises(ConfigError) as err:
        resolve(ds, flags("--tensor-model-parallel-size", "1"), megatron=True)  # Megatron-LM: no lr, micro default
    message = str(err.value)
    for key, fix in [("train_micro_batch_size_per_gpu", "--micro-batch-size"), ("optimizer.params.lr", "--lr"),
                     ("scheduler.params.total_num_steps", "--train-iters"),
                     ("zero_optimization.reduce_bucket_size", "--hidden-size"), ("flops_profiler.enabled", "a value")]:
        assert key in err.value.field and fix in err.value.fix, (key, message)
    assert message.count("\n") == 0
    del ds["flops_profiler"]
    cfg, filled = resolve(ds, flags("--micro-batch-size", "2", "--lr", "1e-4", "--train-iters", "50",
                                    "--hidden-size", "64"), megatron=True)  # the flags it names fill them
    assert cfg.scheduler.train_iters == 50 and cfg.deepspeed_extra["zero_optimization"]["reduce_bucket_size"] == 4096


def test_filled_autos_never_take_deepspeeds_unstated_defaults():
    # before: gradient_clipping "auto" became DeepSpeed's unstated 0, fp16 "auto" silently fp32 with no word
    cfg, filled = resolve({"train_micro_batch_size_per_gpu": 1, "gradient_clipping": "auto",
                           "fp16": {"enabled": "auto"}}, flags("--fp16", "--clip-grad", "0.5"), megatron=True)
    assert cfg.optimizer.clip_grad == 0.5 and cfg.precision == "fp16"
    assert sorted(filled) == ["fp16.enabled = true  <- auto, from --fp16 (command-line arguments)",
                              "gradient_clipping = 0.5  <- auto, from --clip-grad (command-line arguments)"]


def test_warmup_steps_auto_is_at_least_one_as_deepspeed_0_19_needs():
    from deepspeed.runtime.lr_schedules import WarmupLR

    import torch
    with pytest.raises(ValueError):  # DeepSpeed itself refuses no warmup
        WarmupLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), warmup_num_steps=0)
    cfg, filled = resolve({"train_micro_batch_size_per_gpu": 1, "scheduler": {"type": "WarmupLR", "params": {
        "warmup_num_steps": "auto", "warmup_max_lr": 3e-4}}})
    assert cfg.scheduler.warmup_iters == 1 and cfg.scheduler.deepspeed_type == "WarmupLR"
    assert translate.to_deepspeed_file(cfg)["scheduler"]["type"] == "WarmupLR"


# ------------------------------------------------------------------ the command line


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_check_lists_the_filled_autos_and_translate_plan_take_the_shape_flags(tmp_path, capsys):
    import json

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "fp16": {"enabled": "auto"},
                                "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}))
    code, out, err = run(capsys, "check", str(path), "--world-size", "2")
    assert code == 2 and "--hidden-size" in err and err.count("\n") == 1
    code, out, err = run(capsys, "check", str(path), "--world-size", "2", "--hidden-size", "64")
    assert code == 0
    assert "  fp16.enabled = false  <- auto, no --fp16/--bf16 given (HF Trainer default)\n" in out
    assert "  zero_optimization.reduce_bucket_size = 4096  <- auto, h*h with the hidden size h = 64" in out
    code, out, err = run(capsys, "translate", str(path), "--to", "deepspeed", "--hidden-size", "64")
    assert code == 0 and json.loads(out)["zero_optimization"]["reduce_bucket_size"] == 4096
    assert "reduce_bucket_size = 4096  <- auto" in err
    code, out, err = run(capsys, "plan", str(path), "--world-size", "2", "--num-layers", "2", "--hidden-size", "64",
                         "--num-attention-heads", "4", "--seq-length", "32", "--vocab-size", "128")
    assert code == 0, err


@pytest.fixture(autouse=True)
def _quiet_deepspeed():
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)


def test_a_warmupdecaylr_block_of_autos_keeps_its_type():
    # before: the block's autos went unfilled, warmup 0 dropped the scheduler from the DeepSpeed output
    example = Path(__file__).resolve().parent.parent / "examples" / "configs" / "hf_zero2_auto.json"
    found = translate.sources(example)[0]
    cfg = translate.resolve(found + [("the command line", {"scheduler": {"train_iters": 1000}})])
    scheduler = translate.to_deepspeed_file(cfg, cfg.layout(2))["scheduler"]
    assert scheduler == {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 1, "warmup_max_lr": 5e-5,
                                                             "total_num_steps": 1000}}
