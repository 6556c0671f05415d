"""What each rank runs in the ZeRO / offload tests and benchmarks (module level, so forked children find it)."""

from __future__ import annotations

import os
import time
from typing import Any, Optional


def offload(optimizer: str = "none", param: str = "none", nvme_path=None) -> dict:
    """The ``offload_optimizer`` / ``offload_param`` blocks for one target each (``"none"``, ``"cpu"`` or
    ``"nvme"``), as a ZeRO section holds them (DeepSpeed's ``zero_optimization`` and the unified config's
    ``zero`` spell them alike); nvme swaps under ``nvme_path``, without pinned buffers."""
    blocks: dict = {}
    for key, device in (("offload_optimizer", optimizer), ("offload_param", param)):
        if device not in ("none", "cpu", "nvme"):
            raise ValueError(f"{key}: {device!r} is not none, cpu or nvme")
        if device == "nvme":
            blocks[key] = {"device": "nvme", "nvme_path": str(nvme_path), "pin_memory": False}
        elif device == "cpu":
            blocks[key] = {"device": "cpu"}
    return blocks


def ds_config_for(run, layout) -> dict:
    """The DeepSpeed dict build_engine gives DeepSpeed, with zeromega's tuned defaults and corrections."""
    from zeromega.integrations import accelerator as accel
    from zeromega.plugins.zero.ds_config import to_deepspeed
    from zeromega.plugins.zero import defaults

    ds, _ = defaults.tuned(to_deepspeed(run, layout, accel.current().device_type), accel.current().device_type)
    return ds


def engine_with(model, run, layout, ds: dict, optimizer: str = "client"):
    """The engine on ``ds`` (already corrected).

    ``optimizer``: ``"client"`` is :func:`zeromega.plugins.zero.engine.initialize`
    (CPU Adam or torch AdamW over Megatron's decay groups, the change proposed
    for build_engine); ``"block"`` lets DeepSpeed build it from an
    ``"optimizer"`` block (one group: decay on everything).
    """
    from zeromega.plugins.zero import engine

    if optimizer == "block":
        o = run.optimizer
        ds = {**ds, "optimizer": {"type": "AdamW", "params": {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps,
                                                               "weight_decay": o.weight_decay}}}
    return engine.initialize(model, run, ds)


def train_offload(cfg: dict, shape: dict, data_prefix: str, iters: int, ds_patch: Optional[dict] = None,
                  optimizer: str = "client", seed: int = 1234, nvme_dir: Optional[str] = None) -> dict[str, Any]:
    """Train a Megatron-Core GPT under ZeRO/offload; losses, peak memory, swap-file and I/O bytes, the plan.

    ``ds_patch`` is merged into the ``zero_optimization`` block (and ``aio``)
    after zeromega's defaults: the knobs a test varies.
    """
    from megatron.core import parallel_state

    from zeromega.integrations import accelerator as accel
    from zeromega.integrations.megatron import data, model, parallel
    from zeromega.config.schema import RunConfig
    from zeromega.plugins.zero import plan as zplan
    from zeromega.plugins.zero import report
    from zeromega.plugins.zero.preflight import correct
    from zeromega.run.loop import _reduce_step_stats, gpt_loss

    run = RunConfig.model_validate(cfg)
    layout = parallel.initialize(run, seed=seed)
    ds = ds_config_for(run, layout)
    for key, value in (ds_patch or {}).items():
        if key == "aio":
            ds["aio"] = {**ds.get("aio", {}), **value}
        elif isinstance(value, dict) and isinstance(ds["zero_optimization"].get(key), dict):
            ds["zero_optimization"][key] = {**ds["zero_optimization"][key], **value}
        else:
            ds["zero_optimization"][key] = value
    plan_fn = lambda d: zplan.for_run(d, layout, shape=shape)  # noqa: E731
    ds, corrections = correct(ds, plan_fn(ds))
    gpt_shape = model.GPTShape(**shape)
    train_ds, _, _ = data.build_gpt_datasets(data_prefix, gpt_shape.seq_length, seed,
                                             (iters * layout.global_batch, 0, 0), split="1,0,0")
    io = report.IOWatch().start()
    from zeromega.plugins.zero.engine import init_context

    with init_context(ds):
        gpt = model.build_gpt(gpt_shape, run)
    engine = engine_with(gpt, run, layout, ds, optimizer)
    init_rss = report.current_rss()
    batches = data.sample_batches(train_ds, layout.micro, dp_rank=parallel_state.get_data_parallel_rank(),
                                  dp_size=layout.dp)
    losses, steps = [], []
    for step in range(1, iters + 1):
        total, t, step_io = 0.0, time.perf_counter(), report.IOWatch().start()
        for _ in range(layout.accumulation):
            loss = gpt_loss(engine, next(batches))
            engine.backward(loss)
            engine.step()
            total += loss.item()
        step_io.stop()
        steps.append({"step": step, "s": time.perf_counter() - t, "read": step_io.read_bytes,
                      "written": step_io.write_bytes})
        losses.append(_reduce_step_stats(total / layout.accumulation, 0, parallel_state.get_data_parallel_group())[0])
    io.stop()
    s = zplan.ZeroSetup.from_deepspeed(ds)
    paths = [s.optimizer_nvme_path if s.optimizer_device == "nvme" else None,
             s.param_nvme_path if s.param_device == "nvme" else None]
    measured = report.measure(paths, io, init_rss)
    planned = plan_fn(ds)
    optimizer_name = type(engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer")
                          else engine.optimizer).__name__
    parallel.shutdown()
    return {"loss": losses, "steps": steps, "measured": report.as_dict(measured), "plan_peak": planned.peak(accel.current().device_type),
            "plan_nvme": planned.nvme_bytes, "corrections": [str(c) for c in corrections],
            "optimizer": optimizer_name, "pid": os.getpid()}


def count_params(cfg: dict, shape: dict) -> dict[str, int]:
    """Parameters of the built Megatron-Core GPT on this rank: total, largest tensor, tensor count."""
    from zeromega.integrations.megatron import model, parallel
    from zeromega.config.schema import RunConfig

    run = RunConfig.model_validate(cfg)
    parallel.initialize(run, seed=1)
    gpt = model.build_gpt(model.GPTShape(**shape), run)
    sizes = [p.numel() for p in gpt.parameters()]
    parallel.shutdown()
    return {"params": sum(sizes), "largest": max(sizes), "tensors": len(sizes)}


def params_after_steps(cfg: dict, shape: dict, data_prefix: str, steps: int = 1) -> dict:
    """Every parameter (gathered under ZeRO-3) after ``steps`` steps, by name, as lists (debugging parity)."""
    from megatron.core import parallel_state

    from zeromega.plugins.zero.engine import build_engine, model_init_context
    from zeromega.integrations.megatron import data, model, parallel
    from zeromega.config.schema import RunConfig
    from zeromega.run.loop import train_step

    run = RunConfig.model_validate(cfg)
    layout = parallel.initialize(run, seed=1234)
    gpt_shape = model.GPTShape(**shape)
    train_ds, _, _ = data.build_gpt_datasets(data_prefix, gpt_shape.seq_length, 1234,
                                             (steps * layout.global_batch, 0, 0), split="1,0,0")
    with model_init_context(run, layout):
        gpt = model.build_gpt(gpt_shape, run)
    engine = build_engine(gpt, run, layout)
    batches = data.sample_batches(train_ds, layout.micro, dp_rank=parallel_state.get_data_parallel_rank(),
                                  dp_size=layout.dp)
    for _ in range(steps):
        train_step(engine, batches, layout.accumulation)
    out = {}
    import deepspeed

    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters(p) if hasattr(p, "ds_id") else _null():
            out[name] = p.detach().clone().double().flatten().tolist()
    opt = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    groups = [{k: v for k, v in g.items() if k != "params"} | {"n": len(g["params"])} for g in opt.param_groups]
    parallel.shutdown()
    return {"params": out, "groups": groups}


def _null():
    import contextlib

    return contextlib.nullcontext()


def baseline_peak(cfg: dict) -> int:
    """Peak resident bytes of a rank that only joins the job (imports, gloo, DeepSpeed comm): the plan's baseline."""
    from zeromega.integrations import accelerator as accel
    from zeromega.integrations.deepspeed import _deepspeed_comm
    from zeromega.integrations.megatron import parallel
    from zeromega.config.schema import RunConfig

    parallel.initialize(RunConfig.model_validate(cfg), seed=1)
    _deepspeed_comm()
    peak = accel.current().peak_memory_bytes()
    parallel.shutdown()
    return peak


def comm_per_step(cfg: dict, shape: dict, data_prefix: str, steps: int = 2) -> dict[str, Any]:
    """Bytes this rank handed to each collective kind per training step (after one warm-up step),
    and the model's parameter bytes (ZeRO-3 partitioned parameters counted whole)."""
    from megatron.core import parallel_state

    from zeromega.integrations import accelerator as accel
    from zeromega.integrations import comm
    from zeromega.integrations.megatron import data, model, parallel
    from zeromega.config.schema import RunConfig
    from zeromega.plugins.zero import engine as zengine
    from zeromega.run.loop import train_step

    comm.install()
    run = RunConfig.model_validate(cfg)
    layout = parallel.initialize(run, seed=1)
    ds, _ = zengine.zero_config(run, layout, accel.current().device_type)
    gpt_shape = model.GPTShape(**shape)
    train_ds, _, _ = data.build_gpt_datasets(data_prefix, gpt_shape.seq_length, 1,
                                             ((steps + 1) * layout.global_batch, 0, 0), split="1,0,0")
    with zengine.init_context(ds):
        gpt = model.build_gpt(gpt_shape, run)
    eng = zengine.initialize(gpt, run, ds)
    batches = data.sample_batches(train_ds, layout.micro, dp_rank=parallel_state.get_data_parallel_rank(),
                                  dp_size=layout.dp)
    train_step(eng, batches, layout.accumulation)  # warm-up: the first step may differ
    comm.take()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(eng, batches, layout.accumulation)
    step_s = (time.perf_counter() - start) / steps
    counted = {k: v // steps for k, v in comm.take().items()}
    param_bytes = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in eng.module.parameters())
    parallel.shutdown()
    return {"bytes": counted, "param_bytes": param_bytes, "step_s": step_s}


def train_offload_steps(cfg: dict, shape: dict, data_prefix: str, iters: int) -> list[dict]:
    """Per-step time and storage bytes read/written of :func:`train_offload`."""
    return train_offload(cfg, shape, data_prefix, iters)["steps"]
