"""The ZeRO engine: :func:`build_engine` (and :func:`model_init_context` for ZeRO-3), the optimizer
it needs for its config, and the config it should get.

DeepSpeed 0.19.8 refuses a client ``torch.optim.AdamW`` once the optimizer
is offloaded (``ZeRORuntimeException: You are using ZeRO-Offload with a
client provided optimizer ...``, engine.py ``_configure_optimizer``, unless
``zero_force_ds_cpu_optimizer: false``, which keeps torch's slow per-tensor
Adam on the host). Its own ``"optimizer"`` block builds ``DeepSpeedCPUAdam``
but over one parameter group, so Megatron's rule (no decay on biases and
norms) is lost. :func:`client_optimizer` gives the engine ``DeepSpeedCPUAdam``
over Megatron's decay groups: same update rule as torch's AdamW (decoupled
decay), computed by the fused C++ op (the ``cpu_adam`` JIT build, ~1 min
on 2 cores, once per machine).
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from zeromega.config.schema import Layout, RunConfig
from zeromega.integrations import accelerator as accel
from zeromega.integrations.deepspeed import MegatronMPU, _deepspeed_comm
from zeromega.integrations.megatron import cpu_patches

from . import defaults, preflight
from .ds_config import to_deepspeed
from .plan import ModelSize, ZeroSetup, plan_memory
from .space_guard import check_swap_reads, guard_engine


def offloads_optimizer(ds: dict) -> bool:
    """True when DeepSpeed will run the optimizer on the host (offload_optimizer cpu or nvme)."""
    return ZeroSetup.from_deepspeed(ds).optimizer_device in ("cpu", "nvme")


def decay_groups(model: torch.nn.Module, weight_decay: float, decoupled_lr: Optional[float] = None,
                 decoupled_min_lr: Optional[float] = None) -> list[dict]:
    """Megatron's AdamW groups (no decay on 1-D parameters), also for ZeRO-3-partitioned parameters.

    Under ``deepspeed.zero.Init`` a parameter's ``data`` is an empty 1-D
    tensor and its real shape is ``ds_shape``; testing ``param.ndim`` there
    puts every weight in the no-decay group (DeepSpeed then drops the empty
    decay group), which is why ZeRO-3 seemed to depart from ZeRO-1 with
    weight decay.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if len(getattr(param, "ds_shape", param.shape)) < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0}]
    if decoupled_lr is None:
        return groups
    # --decoupled-lr: Megatron-Core's own groups put the embedding and output weights apart with their max_lr /
    # min_lr, which its OptimizerParamScheduler reads per group; the same split here.
    out = []
    for group in groups:
        apart = [p for p in group["params"] if getattr(p, "is_embedding_or_output_parameter", False)]
        rest = [p for p in group["params"] if not getattr(p, "is_embedding_or_output_parameter", False)]
        out.append({**group, "params": rest})
        if apart:
            extra = {"max_lr": decoupled_lr} if decoupled_min_lr is None else \
                {"max_lr": decoupled_lr, "min_lr": decoupled_min_lr}
            out.append({**group, "params": apart, **extra})
    return [g for g in out if g["params"]]


def client_optimizer(param_groups: list[dict], ds: dict, lr: float, betas: tuple[float, float], eps: float):
    """``DeepSpeedCPUAdam`` (AdamW mode) when ``ds`` offloads the optimizer, else ``torch.optim.AdamW``."""
    if not offloads_optimizer(ds):
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(param_groups, lr=lr, betas=betas, eps=eps, adamw_mode=True)


def zero_config(run, layout, device_type: str, plan_fn=None) -> tuple[dict, list]:
    """The DeepSpeed dict for ``run``: translated, tuned defaults filled, nvme settings corrected.

    Returns (dict, notes): the notes name every default filled and every
    correction made, for the caller to print. ``plan_fn(ds) -> MemoryPlan``
    sizes the corrections (swap buffers from the largest parameter); without
    it they are sized from a bare parameter count of 0 (buffers kept as given).
    """
    ds, filled = defaults.tuned(to_deepspeed(run, layout, device_type), device_type)
    fp16 = (ds.get("fp16") or {}).get("enabled") is True  # the probe computes: only asked for an fp16 run
    preflight.check_combinations(ds, device_type, device_type == "cuda" or not fp16 or _cpu_fp16())
    if plan_fn is None:
        plan_fn = lambda d: plan_memory(d, ModelSize(0, 0, 0, 0), dp=layout.dp)  # noqa: E731
    ds, corrections = preflight.correct(ds, plan_fn(ds))
    return ds, [f"default {f}" for f in filled] + [f"corrected {c}" for c in corrections]


def _cpu_fp16() -> bool:
    """fp16 trains on DeepSpeed's engine on this CPU (natively, or with zeromega's accelerator patch)."""
    return cpu_patches.deepspeed_fp16_on_cpu()


def _fp16_on_cpu(ds: dict) -> None:
    """For an fp16 ``ds`` on the CPU accelerator: DeepSpeed's CPU accelerator told that torch computes fp16
    (``cpu_patches.DEEPSPEED_FP16``; without it ``deepspeed.initialize`` raises 'Type fp16 is not supported
    on your device.'). A no-op on CUDA, for bf16 / fp32, and where DeepSpeed already says yes."""
    if accel.current().device_type == "cpu" and ZeroSetup.from_deepspeed(ds).precision == "fp16":
        skip = tuple(filter(None, os.environ.get("ZEROMEGA_SKIP_PATCH", "").split(",")))
        cpu_patches.apply_deepspeed_fp16(skip=skip)


def init_context(ds: dict):
    """``deepspeed.zero.Init`` over Megatron's data-parallel group for a ZeRO-3 ``ds``, else a no-op."""
    if ZeroSetup.from_deepspeed(ds).stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    _deepspeed_comm()
    _fp16_on_cpu(ds)
    check_swap_reads(ds)  # zero.Init already swaps parameters out to nvme
    return deepspeed.zero.Init(data_parallel_group=MegatronMPU().get_data_parallel_group(), config_dict_or_path=ds,
                               mpu=MegatronMPU())


def initialize(model: torch.nn.Module, run, ds: dict):
    """``deepspeed.initialize`` on ``ds`` with Megatron's decay groups and the optimizer the config needs,
    swap reads checked, the nvme space guard and the CPU heap trims attached (``build_engine`` calls it)."""
    import deepspeed

    accel.current().deepspeed_accelerator()
    o = run.optimizer
    optimizer = None
    if "optimizer" not in ds:
        optimizer = client_optimizer(decay_groups(model, o.weight_decay, o.decoupled_lr, o.decoupled_min_lr), ds,
                                     o.lr, (o.beta1, o.beta2), o.eps)
    check_swap_reads(ds)
    _fp16_on_cpu(ds)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds, mpu=MegatronMPU(),
                                           dist_init_required=False)

    guard_engine(engine, ds)
    accel.trim_host_heap_after_each_step(engine)
    return engine


def model_init_context(cfg: RunConfig, layout: Layout, plan_fn=None):
    """Where to build the model: under ZeRO-3, inside ``deepspeed.zero.Init`` so every
    parameter is partitioned over the data-parallel group as soon as its module is
    built and no rank ever holds the whole model; otherwise a no-op context.
    ``plan_fn(ds) -> MemoryPlan`` sizes the corrections from the model (see :func:`zero_config`)."""
    if cfg.zero.stage != 3:
        return contextlib.nullcontext()
    accel.current().deepspeed_accelerator()
    # The same corrected dict build_engine gives DeepSpeed (swap buffers, prefetch, sub-groups).
    ds_config, _ = zero_config(cfg, layout, accel.current().device_type, plan_fn)
    return init_context(ds_config)


def build_engine(model: torch.nn.Module, cfg: RunConfig, layout: Layout, plan_fn=None):
    """``deepspeed.initialize`` for ``model`` under ``cfg``; returns the engine.

    Without an ``"optimizer"`` block in the DeepSpeed JSON the optimizer is
    AdamW over Megatron's decay groups: torch's (no JIT-built op needed), or
    DeepSpeed's CPU Adam when the optimizer is offloaded; with a block,
    DeepSpeed builds its own.
    """
    accel.current().deepspeed_accelerator()
    # Tuned defaults filled where the config is silent, settings DeepSpeed would silently
    # not honour corrected out loud (preflight).
    ds_config, notes = zero_config(cfg, layout, accel.current().device_type, plan_fn)
    if notes and torch.distributed.get_rank() == 0:
        print("zeromega: " + "; ".join(notes))
    # the client optimizer, swap-read checks, the nvme space guard, the CPU heap trims
    return initialize(model, cfg, ds_config)
