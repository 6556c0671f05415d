"""The DeepSpeed config a run gets: :func:`to_deepspeed` writes the dict ``deepspeed.initialize`` takes.

The writer half of the DeepSpeed JSON dialect, below the launcher: the ZeRO
engine (:mod:`zeromega.plugins.zero.engine`) builds its config here, and
``zeromega translate --to deepspeed`` / ``zeromega plan`` write the same
dict. Reading DeepSpeed JSON (and the ``"auto"`` rules) stays in
:mod:`zeromega.launch.deepspeed_json`.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

from zeromega.config.schema import AioConfig, Layout, OffloadConfig, RunConfig

# DeepSpeed's fp16 block keys -> the unified loss_scaling field path.
FP16_KEYS: dict[str, str] = {
    "loss_scale": "loss_scaling.loss_scale",
    "initial_scale_power": "loss_scaling.initial_scale_power",
    "loss_scale_window": "loss_scaling.window",
    "hysteresis": "loss_scaling.hysteresis",
    "min_loss_scale": "loss_scaling.min_scale",
}
# DeepSpeed scheduler type -> the decay style it implements.
SCHEDULERS: dict[str, str] = {"WarmupLR": "constant", "WarmupDecayLR": "linear", "WarmupCosineLR": "cosine"}
# Defaults where DeepSpeed's own are wrong for a CPU device: its 5e8-element
# buckets allocate ~2 GB fp32 per bucket (docs/zero-offload.md).
CPU_ZERO_DEFAULTS = {
    "reduce_bucket_size": int(2e7),
    "allgather_bucket_size": int(2e7),
    "stage3_prefetch_bucket_size": int(2e7),
    "sub_group_size": int(2e7),
}


def to_deepspeed(cfg: RunConfig, layout: Optional[Layout] = None, device_type: str = "cpu",
                 standalone: bool = False) -> dict:
    """The dict ``deepspeed.initialize(config=...)`` takes for this config (and layout, when known).

    ``standalone`` also writes the optimizer and scheduler blocks, for a
    file used without zeromega (zeromega's engine builds its own AdamW).
    Without a layout the batch keys are the ones the config states, and
    DeepSpeed derives the rest from the world size it runs with. DeepSpeed
    counts context-parallel ranks as data-parallel (zeromega's MegatronMPU
    hands it the dp x cp group), so with cp > 1 its ``train_batch_size`` is
    the global batch x cp, or left out of a standalone file.
    """
    ds = copy.deepcopy(cfg.deepspeed_extra)
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = cfg.zero.stage
    for name in ("offload_optimizer", "offload_param"):
        offload = getattr(cfg.zero, name)
        if name in zero or offload != OffloadConfig():
            block = zero.setdefault(name, {})
            block.update(device=offload.device, pin_memory=offload.pin_memory)
            if offload.nvme_path:
                block["nvme_path"] = offload.nvme_path
    _data_parallel(cfg, ds, zero)
    if device_type == "cpu":
        for key, value in CPU_ZERO_DEFAULTS.items():
            zero.setdefault(key, value)
    nvme = "nvme" in (cfg.zero.offload_optimizer.device, cfg.zero.offload_param.device)
    if nvme or cfg.zero.aio != AioConfig():
        ds["aio"] = {**ds.get("aio", {}), **cfg.zero.aio.model_dump()}
    batch = _batch_keys(cfg, layout)
    if cfg.parallel.cp > 1 and "train_batch_size" in batch:
        if standalone and "train_micro_batch_size_per_gpu" in batch:
            del batch["train_batch_size"]  # whichever world DeepSpeed sees, it derives this one right
        elif layout is not None:  # MegatronMPU's data-parallel group spans dp x cp
            batch["train_batch_size"] = layout.global_batch * layout.cp
    ds.update(batch, gradient_clipping=cfg.optimizer.clip_grad)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": cfg.precision == "bf16"}
    fp16 = {**ds.get("fp16", {}), "enabled": cfg.precision == "fp16"}
    if cfg.precision == "fp16" or cfg.loss_scaling != type(cfg.loss_scaling)():
        fp16.update({key: getattr(cfg.loss_scaling, path.split(".")[1]) for key, path in FP16_KEYS.items()})
    ds["fp16"] = fp16
    # zeromega's run prints its own line every logging.interval steps, so the engine it builds stays quiet
    # unless the user's DeepSpeed JSON asked DeepSpeed to print (next to Megatron flags, as in Megatron-DeepSpeed).
    ds.setdefault("steps_per_print", cfg.logging.interval if standalone else 10**9)
    o = cfg.optimizer
    adam = {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay}
    if standalone:  # a file for DeepSpeed itself: what equals DeepSpeed's default is left to it
        adam = {key: value for key, value in adam.items() if key == "lr" or value != ADAM_DEFAULTS[key]}
        if "optimizer" not in ds and any(getattr(o, name) != getattr(type(o)(), name)
                                         for name in ("lr", "beta1", "beta2", "eps")):
            # an optimizer was stated (an lr, betas): DeepSpeed's own block, in the spelling it was read in
            ds["optimizer"] = {"type": o.deepspeed_type or "AdamW"}
    if "optimizer" in ds:
        ds["optimizer"]["params"] = {**ds["optimizer"].get("params", {}), **adam}
    if standalone and "scheduler" not in ds:
        scheduler = deepspeed_scheduler(cfg)
        if scheduler:
            ds["scheduler"] = scheduler
    if standalone:
        _leave_defaults_to_deepspeed(ds)
    return ds


def _data_parallel(cfg: RunConfig, ds: dict, zero: dict) -> None:
    """The run's ``ddp`` section in DeepSpeed's keys, where it has them: ZeRO's ``overlap_comm`` (its gradient
    reduce started from backward hooks, bucket by bucket, as Megatron-Core's ``overlap_grad_reduce``) and
    ``reduce_bucket_size``; ``communication_data_type`` for the reduce's dtype. Unset fields leave DeepSpeed's
    defaults (and a DeepSpeed JSON's own keys) alone; :func:`ddp_fallbacks` says what has no counterpart."""
    d = cfg.ddp
    if cfg.zero.stage >= 1:
        if d.overlap_grad_reduce is not None:
            zero["overlap_comm"] = d.overlap_grad_reduce
        if d.bucket_size is not None:
            zero["reduce_bucket_size"] = d.bucket_size
    if d.grad_reduce_in_fp32 is not None and cfg.precision != "fp32":
        for key, value in reduce_dtype_keys(cfg.zero.stage, cfg.precision, d.grad_reduce_in_fp32).items():
            ds[key] = {**ds.get(key, {}), **value} if isinstance(value, dict) else value


def reduce_dtype_keys(stage: int, precision: str, fp32: bool) -> dict:
    """DeepSpeed 0.19's keys for ``ddp.grad_reduce_in_fp32`` on a bf16/fp16 run at a ZeRO stage (the JSON reader
    reads exactly these back). fp32: ``communication_data_type`` fp32 reduces in fp32 at every stage; ZeRO-2/3
    also accumulate micro-batches in fp32 with ``data_types.grad_accum_dtype`` fp32 (their gradient
    partitions, ``averaged_gradients`` at ZeRO-2, become fp32). ZeRO-0 refuses that mix (``deepspeed.initialize``
    raises NotImplementedError 'unsupported mix of model_dtype=torch.bfloat16 and grad_accum_dtype=torch.float32')
    and ZeRO-1 swaps its ZeRO optimizer for BF16_Optimizer, so both accumulate in the parameters' dtype
    (:func:`ddp_fallbacks` says so). False: reduce (and accumulate) in the parameters' dtype."""
    if not fp32:
        return {"communication_data_type": precision}
    if stage >= 2:
        return {"communication_data_type": "fp32", "data_types": {"grad_accum_dtype": "fp32"}}
    return {"communication_data_type": "fp32"}


def ddp_fallbacks(cfg: RunConfig) -> list[str]:
    """One line for each ``ddp`` field DeepSpeed's engine (pp 1, dense) cannot honour, saying what runs
    instead; every one leaves the values as they are."""
    d, stage, lines = cfg.ddp, cfg.zero.stage, []
    if d.overlap_grad_reduce and stage == 0:
        lines.append("ddp.overlap_grad_reduce (--overlap-grad-reduce): DeepSpeed's engine without ZeRO reduces the "
                     "gradients after the backward pass (its overlap_comm is a ZeRO 1-3 option; zero.stage 1 has it)")
    if d.bucket_size is not None and stage == 0:
        lines.append("ddp.bucket_size (--ddp-bucket-size): DeepSpeed's engine without ZeRO reduces in its own "
                     "fixed-size buckets (ZeRO's reduce_bucket_size takes it)")
    if d.overlap_param_gather and stage in (1, 2):
        lines.append("ddp.overlap_param_gather (--overlap-param-gather): DeepSpeed's ZeRO-1/2 all-gather the updated "
                     "parameters at the end of the step, not in the next forward pass (same values)")
    if d.average_in_collective:
        lines.append("ddp.average_in_collective (--ddp-average-in-collective): DeepSpeed divides the gradients by "
                     "the data-parallel size around a summing collective (same values up to rounding)")
    b = cfg.batch
    # more than one micro-batch per step (at some dp size: the world size is not known here)
    accumulates = b.accumulation > 1 if b.accumulation else b.global_ is not None and b.global_ != b.micro
    if d.grad_reduce_in_fp32 and cfg.precision != "fp32" and stage < 2 and accumulates:
        lines.append(f"ddp.grad_reduce_in_fp32 (Megatron-LM's fp32 gradients for --{cfg.precision}): DeepSpeed's "
                     f"ZeRO-{stage} reduces in fp32 (communication_data_type) but accumulates a step's micro-batches "
                     f"in {cfg.precision} (DeepSpeed's fp32 accumulation, data_types.grad_accum_dtype, is set at "
                     "ZeRO-2/3 only: " + ("ZeRO-0 refuses it" if stage == 0 else "at ZeRO-1 it swaps the ZeRO "
                     "optimizer for another") + "; zero.stage 2 has it)")
    return lines


# DeepSpeed 0.19's Adam/AdamW defaults (FusedAdam, DeepSpeedCPUAdam): a standalone file leaves these unstated.
ADAM_DEFAULTS = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
# Top-level values DeepSpeed 0.19 takes when a key is absent (runtime/constants.py), left out of a standalone file.
DEEPSPEED_DEFAULTS = {"gradient_clipping": 0.0, "steps_per_print": 10}


# DeepSpeed 0.19's fp16 block defaults (DeepSpeedFP16Config) and its warmup schedulers' (lr_schedules.py).
FP16_DEFAULTS = {"loss_scale": 0.0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                 "min_loss_scale": 1.0}
SCHEDULER_DEFAULTS = {"warmup_min_lr": 0.0, "warmup_type": "log", "warmup_min_ratio": 0.0, "cos_min_ratio": 0.0001}


def _leave_defaults_to_deepspeed(ds: dict) -> None:
    """Drop what a standalone file would only restate of DeepSpeed's defaults (adds nothing the input did not say)."""
    for key, value in DEEPSPEED_DEFAULTS.items():
        if key in ds and ds[key] == value:
            del ds[key]
    fp16 = ds.get("fp16")
    if isinstance(fp16, dict):
        for key, value in FP16_DEFAULTS.items():
            if key in fp16 and fp16[key] == value:
                del fp16[key]
    params = (ds.get("scheduler") or {}).get("params")
    if isinstance(params, dict):
        for key, value in SCHEDULER_DEFAULTS.items():
            if key in params and params[key] == value:
                del params[key]
    for name in ("bf16", "fp16"):
        if ds.get(name) == {"enabled": False}:
            del ds[name]
    if ds.get("zero_optimization") == {"stage": 0}:
        del ds["zero_optimization"]


def _batch_keys(cfg: RunConfig, layout: Optional[Layout]) -> dict:
    if layout is not None:
        return {"train_micro_batch_size_per_gpu": layout.micro, "gradient_accumulation_steps": layout.accumulation,
                "train_batch_size": layout.global_batch}
    b = cfg.batch
    if b.global_ is None:  # DeepSpeed needs the micro batch or the global one
        keys = {"train_micro_batch_size_per_gpu": b.micro or 1}
        if b.accumulation is not None:
            keys["gradient_accumulation_steps"] = b.accumulation
        return keys
    keys = {"train_batch_size": b.global_}
    if b.micro is not None:
        keys["train_micro_batch_size_per_gpu"] = b.micro
    if b.accumulation is not None:
        keys["gradient_accumulation_steps"] = b.accumulation
    return keys


def deepspeed_scheduler(cfg: RunConfig) -> Optional[dict]:
    """The DeepSpeed scheduler block for the schedule, or None when DeepSpeed has none like it.

    Only a schedule DeepSpeed's own class runs (``scheduler.deepspeed_type``) is written: Megatron's
    differs in its step counting. DeepSpeed's schedulers all warm up for >= 1 step, WarmupDecayLR decays
    back to where warmup began, and none does inverse-square-root or WSD;
    such schedules stay in the zeromega block instead.
    """
    s, lr = cfg.scheduler, cfg.optimizer.lr
    if s.deepspeed_type is None:
        return None  # Megatron-Core's scheduler runs it; the zeromega block carries it
    if s.decay_style == "constant" and s.warmup_iters == 0:
        return None
    if s.decay_style not in SCHEDULERS.values() or s.warmup_iters == 0:
        return None
    if s.decay_iters is not None and s.decay_iters != s.train_iters:
        return None  # DeepSpeed's total_num_steps is both the decay span and the run
    total = s.train_iters
    params: dict[str, Any] = {"warmup_num_steps": s.warmup_iters, "warmup_type": s.warmup_style}
    if s.decay_style == "constant":
        kind = "WarmupLR"
        params.update(warmup_min_lr=s.warmup_init_lr, warmup_max_lr=lr)
    elif total is None:
        return None
    elif s.decay_style == "linear":
        if s.min_lr != s.warmup_init_lr:
            return None
        kind = "WarmupDecayLR"
        params.update(warmup_min_lr=s.warmup_init_lr, warmup_max_lr=lr, total_num_steps=total)
    else:
        kind = "WarmupCosineLR"
        params.update(warmup_min_ratio=s.warmup_init_lr / lr, cos_min_ratio=s.min_lr / lr, total_num_steps=total)
    return {"type": kind, "params": params}
