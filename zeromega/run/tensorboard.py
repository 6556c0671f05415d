"""TensorBoard output of a run, as Megatron-LM's ``training_log`` and ``evaluate_and_print_results`` write it.

Tags are Megatron-LM's: ``lm loss``, ``learning-rate``, ``batch-size``, ``grad-norm`` (each also ``... vs
samples``), ``loss-scale`` (on unless ``--no-log-loss-scale-to-tensorboard``), ``world-size``,
``iteration-time`` (and ``throughput`` with ``--log-throughput``), ``mem-*``, ``num-zeros``, ``params-norm``
behind their switches, Megatron-DeepSpeed's ``optimizer/*`` states (``... vs tokens`` too) behind
``--log-optimizer-states-to-tensorboard`` and its ``batch-size/batch-size`` behind
``--log-batch-size-to-tensorboard``, ``lm loss validation`` (and ``... ppl``) after each evaluation.
The test split goes to ``lm loss test`` (Megatron-LM writes it under the validation tag, at the same iteration
as the last validation). Written by rank 0 (Megatron-LM: the last rank); the values are reduced over ranks
first, so every rank holds the same ones.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from zeromega.config import ConfigError, RunConfig


def check(cfg: RunConfig) -> None:
    """Refuse --tensorboard-dir when the tensorboard package is missing (before any rank trains)."""
    if not cfg.logging.tensorboard_dir:
        return
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as err:
        raise ConfigError("logging.tensorboard_dir", cfg.logging.tensorboard_dir,
                          f"needs the tensorboard package ({err})",
                          "pip install tensorboard (a dependency of zeromega), or drop --tensorboard-dir") from err


def loss_scale(engine) -> float:
    """The engine's current loss scale (1 without fp16)."""
    if hasattr(engine, "trainer"):
        scale = engine.trainer.optimizer.get_loss_scale()
        return float(scale.item() if torch.is_tensor(scale) else scale)
    optimizer = getattr(getattr(engine, "engine", None), "optimizer", None)
    scale = getattr(optimizer, "cur_scale", None) or getattr(optimizer, "loss_scale", None)
    return float(scale) if isinstance(scale, (int, float)) else 1.0


class TensorBoard:
    """A SummaryWriter on rank 0 over ``cfg.logging.tensorboard_dir`` (nothing elsewhere, or without it)."""

    def __init__(self, cfg: RunConfig, global_batch: int):
        self.log, self.global_batch, self.writer = cfg.logging, global_batch, None
        self.seq_length = cfg.model.seq_length  # the optimizer-state scalars' tokens axis (None: own model)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        if self.log.tensorboard_dir and (not dist.is_initialized() or dist.get_rank() == 0):
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=self.log.tensorboard_dir, max_queue=self.log.tensorboard_queue_size)

    def step(self, record, engine) -> None:
        """A training step's scalars, every ``tensorboard_log_interval`` steps (called on every rank: the
        optimizer-state scalars are collective)."""
        w, log, it = self.writer, self.log, record.step
        if not log.tensorboard_dir or it % log.tensorboard_log_interval:
            return
        states = None
        if log.log_optimizer_states_to_tensorboard:  # Megatron-DeepSpeed computes them on every rank
            from .model_stats import optimizer_states

            states = optimizer_states(engine)
        if w is None:
            return
        samples = record.consumed_samples if record.consumed_samples is not None else it * self.global_batch

        def both(tag, value):
            w.add_scalar(tag, value, it)
            w.add_scalar(f"{tag} vs samples", value, samples)

        if record.lr is not None:
            both("learning-rate", record.lr)
        batch = record.global_batch or self.global_batch  # the step's (a ramp-up's) global batch
        both("batch-size", batch)
        if log.log_batch_size_to_tensorboard:  # Megatron-DeepSpeed's own tags for it
            w.add_scalar("batch-size/batch-size", batch, it)
            w.add_scalar("batch-size/batch-size vs samples", batch, samples)
            if self.seq_length:
                w.add_scalar("batch-size/batch-size vs tokens", batch, samples * self.seq_length)
        both("lm loss", record.loss)
        if log.log_loss_scale_to_tensorboard:
            both("loss-scale", loss_scale(engine))
        if log.log_world_size_to_tensorboard:
            both("world-size", self.world)
        if record.grad_norm is not None:
            both("grad-norm", record.grad_norm)
        if record.num_zeros_in_grad is not None:
            both("num-zeros", record.num_zeros_in_grad)
        if record.params_norm is not None:
            both("params-norm", record.params_norm)
        for tag, value in (states or {}).items():  # Megatron-DeepSpeed's x axes: steps, and tokens
            w.add_scalar(tag, value, it)
            if record.consumed_samples is not None and self.seq_length:
                w.add_scalar(f"{tag} vs tokens", value, record.consumed_samples * self.seq_length)
        if log.log_memory_to_tensorboard:
            w.add_scalar("mem-max-allocated-bytes", record.peak_mem_bytes, it)
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                stats = torch.cuda.memory_stats()
                w.add_scalar("mem-reserved-bytes", stats.get("reserved_bytes.all.current", 0), it)
                w.add_scalar("mem-allocated-bytes", stats.get("allocated_bytes.all.current", 0), it)
                w.add_scalar("mem-allocated-count", stats.get("allocation.all.current", 0), it)
        if log.log_timers_to_tensorboard:
            w.add_scalar("iteration-time", record.step_time_s, it)
            if log.log_throughput and record.tflops_per_gpu is not None:  # Megatron-LM: both switches
                w.add_scalar("throughput", record.tflops_per_gpu, it)

    def evaluation(self, record: dict, samples: Optional[int] = None) -> None:
        """An evaluation's loss (``{"kind": "valid" | "test", "step", "loss", "ppl"}``)."""
        if self.writer is None:
            return
        tag = "lm loss validation" if record["kind"] == "valid" else "lm loss test"
        it = record["step"]
        samples = it * self.global_batch if samples is None else samples
        self.writer.add_scalar(tag, record["loss"], it)
        self.writer.add_scalar(f"{tag} vs samples", record["loss"], samples)
        if self.log.log_validation_ppl_to_tensorboard:
            self.writer.add_scalar(f"{tag} ppl", record["ppl"], it)
            self.writer.add_scalar(f"{tag} ppl vs samples", record["ppl"], samples)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def profiler(cfg: RunConfig, start_step: int = 0):
    """``--profile``: torch.profiler on the ranks of ``--profile-ranks`` over steps profile_step_start ..
    profile_step_end, with Megatron-LM's schedule (wait start - 1, warm up 1, active end - start; stepped
    before each step) and trace handler (TensorBoard's, into --tensorboard-dir or zeromega's --profile-dir).
    None when not asked for here. Megatron-LM's plain ``--profile`` means nsys over CUDA; zeromega always runs
    torch's profiler (``--use-pytorch-profiler``), which works on CPU too."""
    log = cfg.logging
    rank = dist.get_rank() if dist.is_initialized() else 0
    if not log.profile or rank not in log.profile_ranks:
        return None
    directory = log.profile_dir or log.tensorboard_dir
    begin, end = log.profile_step_start - start_step, log.profile_step_end - start_step
    if end <= 0:
        return None
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=max(begin - 1, 0), warmup=1 if begin > 0 else 0,
                                         active=log.profile_step_end - max(log.profile_step_start, start_step),
                                         repeat=1),
        on_trace_ready=torch.profiler.tensorboard_trace_handler(directory, worker_name=f"rank{rank}"),
        record_shapes=True, with_stack=True)
    prof.start()
    return prof


def check_profile(cfg: RunConfig) -> None:
    """--profile needs a place for its trace and a span of at least one step."""
    log = cfg.logging
    if not log.profile:
        return
    if not (log.profile_dir or log.tensorboard_dir):
        raise ConfigError("logging.profile", True, "has nowhere to write its trace (Megatron-LM writes it to "
                          "--tensorboard-dir)", "pass --tensorboard-dir DIR (or zeromega's --profile-dir DIR)")
    if log.profile_step_end <= log.profile_step_start:
        raise ConfigError("logging.profile_step_end", log.profile_step_end, f"is not after --profile-step-start "
                          f"{log.profile_step_start}", "profile at least one step: end > start")
