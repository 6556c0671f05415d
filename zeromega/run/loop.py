"""The training loop and its per-step metrics, the same for both engines.

One step = ``accumulation`` micro-batches through the engine's
``train_step`` (DeepSpeed's or Megatron-Core's: :mod:`zeromega.run.engines`),
then one step of the schedule. Rank 0 writes one JSON object per step: loss
(averaged over data-parallel ranks), lr, grad norm, tokens/s, peak memory
(max over ranks), bytes per collective kind (summed over ranks); and every
``logging.interval`` steps a line in Megatron-LM's format.
"""

from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from zeromega.integrations import accelerator as accel
from zeromega.integrations import comm, heartbeat
from zeromega.plugins.zero.report import proc_io


def gpt_loss(model, batch: dict[str, torch.Tensor], sequence_layout: Optional[str] = None) -> torch.Tensor:
    """Mean next-token loss over the tokens the loss mask keeps.

    With context parallelism (``sequence_layout`` = "zigzag" | "contiguous")
    this rank sees only its share of the sequence, and the loss is weighted
    by tokens over the cp group so it equals the whole sequence's mean.
    """
    device = getattr(model, "device", None) or next(model.parameters()).device
    if sequence_layout is not None:
        from zeromega.plugins.sequence.megatron import cp_loss, shard_batch

        batch = shard_batch(batch, sequence_layout)
    tokens = batch["tokens"].to(device)
    per_token = model(tokens, batch["position_ids"].to(device), None, labels=batch["labels"].to(device))
    if sequence_layout is not None:
        return cp_loss(per_token, batch["loss_mask"].to(per_token.device))
    mask = batch["loss_mask"].to(per_token.device, torch.float32)
    return (per_token.float() * mask).sum() / mask.sum()


@dataclass
class StepRecord:
    step: int
    loss: float
    tokens_per_s: float
    step_time_s: float
    peak_mem_bytes: int
    comm_bytes: dict[str, int] = field(default_factory=dict)
    lr: Optional[float] = None
    grad_norm: Optional[float] = None
    consumed_samples: Optional[int] = None
    storage_read_bytes: int = 0
    """Bytes this rank read from storage during the step (NVMe offload's swap-ins; /proc/self/io)."""
    storage_write_bytes: int = 0
    """Bytes this rank wrote to storage during the step (swap-outs, checkpoints saved after it excluded)."""
    global_batch: Optional[int] = None
    """Samples in this step over all dp ranks (grows under --rampup-batch-size)."""
    tflops_per_gpu: Optional[float] = None
    """Model TFLOP/s per rank by Megatron-LM's num_floating_point_operations (:mod:`zeromega.run.flops`)."""
    mfu: Optional[float] = None
    """tflops_per_gpu over the device's dense bf16/fp16 peak (:func:`zeromega.run.flops.peak_flops`)."""
    loss_scale: Optional[float] = None
    """fp16 loss scale after the step (1 without fp16)."""
    skipped: bool = False
    """The optimizer skipped this step (fp16 overflow)."""
    nan: bool = False
    """The step's loss is NaN or infinite."""
    params_norm: Optional[float] = None
    """L2 norm of all parameters after the step (``--log-params-norm``; :mod:`zeromega.run.model_stats`)."""
    num_zeros_in_grad: Optional[float] = None
    """Zero entries in the step's gradients (``--log-num-zeros-in-grad``)."""


class NotFinite(FloatingPointError):
    """A step's loss or gradient norm is NaN or infinite under ``scheduler.check_for_nan_in_loss_and_grad``
    (Megatron-LM's check, which stops the run there); ``str()`` is one line with the fix."""


def check_finite(step: int, loss: float, grad_norm: Optional[float]) -> None:
    """Raise :class:`NotFinite` where Megatron-LM's ``--check-for-nan-in-loss-and-grad`` stops a run: a NaN or
    infinite loss, or gradients whose norm is (every rank sees the same reduced values, so all stop together)."""
    bad = [f"loss {loss}"] if not math.isfinite(loss) else []
    if grad_norm is not None and not math.isfinite(grad_norm):
        bad.append(f"gradient norm {grad_norm}")
    if bad:
        raise NotFinite(f"iteration {step}: {' and '.join(bad)} (Megatron-LM's --check-for-nan-in-loss-and-grad, "
                        "on by default, stops here); fix: lower the learning rate, check the data, or pass "
                        "--no-check-for-nan-in-loss-and-grad (scheduler.check_for_nan_in_loss_and_grad: false) to "
                        "count NaN iterations and go on")


def _reduce_step_stats(loss_sum: float, peak_mem: int, dp_group) -> tuple[float, int]:
    """(loss averaged over dp ranks, peak memory max over all ranks) without being counted."""
    loss = torch.tensor([loss_sum], dtype=torch.float64)
    mem = torch.tensor([peak_mem], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        with comm.paused():
            dist.all_reduce(loss, group=dp_group)
            dist.all_reduce(mem, op=dist.ReduceOp.MAX)
        loss /= dist.get_world_size(dp_group)
    return float(loss.item()), int(mem.item())


def train_step(engine, batches: Iterator[dict], accumulation: int, sequence_layout: Optional[str] = None) -> float:
    """One optimizer step of a bare DeepSpeed engine over a GPT; this rank's mean micro-batch loss."""
    total = 0.0
    for _ in range(accumulation):
        loss = gpt_loss(engine, next(batches), sequence_layout)
        engine.backward(loss)
        engine.step()
        total += loss.item()
    return total / accumulation


class MetricsWriter:
    """JSON lines on rank 0 (no file on other ranks, or when ``path`` is None).

    ``after_step`` > 0 (a resumed run) keeps the records of steps up to it and
    drops later ones, which a run that died after its last checkpoint wrote:
    the file then holds one continuous curve however often the run restarted.
    """

    def __init__(self, path: Optional[str], after_step: int = 0):
        self._file = None
        if path and (not dist.is_initialized() or dist.get_rank() == 0):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if after_step > 0 and Path(path).is_file():
                for line in Path(path).read_text().splitlines():
                    try:
                        if json.loads(line)["step"] <= after_step:
                            kept.append(line + "\n")
                    except (ValueError, KeyError, TypeError):
                        continue
            self._file = open(path, "w")
            self._file.writelines(kept)

    def write(self, record: StepRecord) -> None:
        if self._file:
            self._file.write(json.dumps(record.__dict__) + "\n")
            self._file.flush()

    def write_dict(self, record: dict) -> None:
        """A record of another kind (an evaluation: ``{"kind": "valid", "step": N, ...}``)."""
        if self._file:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()


def log_line(record: StepRecord, iters: int, global_batch: int, skipped: int = 0, nan: int = 0,
             elapsed_ms: Optional[float] = None) -> str:
    """Megatron-LM's training log line (``training_log``), with the fields zeromega measures: ``skipped`` and
    ``nan`` count the interval's skipped and NaN iterations, ``elapsed_ms`` is its mean time per iteration."""
    parts = [f" iteration {record.step:8d}/{iters:8d}",
             f"consumed samples: {record.consumed_samples:12d}",
             f"elapsed time per iteration (ms): "
             f"{record.step_time_s * 1000 if elapsed_ms is None else elapsed_ms:.1f}"]
    if record.tflops_per_gpu is not None:
        parts.append(f"throughput per GPU (TFLOP/s/GPU): {record.tflops_per_gpu:.1f}")
    parts += [f"learning rate: {record.lr:.6E}" if record.lr is not None else "learning rate: n/a",
              f"global batch size: {record.global_batch or global_batch:5d}",
              f"lm loss: {record.loss:.6E}"]
    if record.loss_scale is not None:
        parts.append(f"loss scale: {record.loss_scale:.1f}")
    if record.grad_norm is not None:
        parts.append(f"grad norm: {record.grad_norm:.3f}")
    if record.num_zeros_in_grad is not None:  # Megatron-LM prints its float count as Python does (1234.0)
        parts.append(f"num zeros: {float(record.num_zeros_in_grad)}")
    if record.params_norm is not None:
        parts.append(f"params norm: {record.params_norm:.3f}")
    parts += [f"number of skipped iterations: {skipped:3d}", f"number of nan iterations: {nan:3d}",
              f"tokens/s: {record.tokens_per_s:,.0f}", f"peak memory (MiB): {record.peak_mem_bytes / 2**20:,.0f}"]
    return " | ".join(parts) + " |"


def eval_step(engine, micro_batches: list[dict]) -> float:
    """One global batch's loss without gradients (this rank's mean over its micro-batches; Megatron-Core's
    engine: already averaged over dp, the last pipeline stage's loss sent to every stage)."""
    if hasattr(engine, "trainer"):  # Megatron-Core's engine: its schedule with forward_only=True
        return engine.trainer.eval_step(micro_batches)
    module = engine.engine.module
    was_training = module.training
    module.eval()  # no dropout, as Megatron-LM's evaluate
    try:
        with torch.no_grad():
            total = sum(float(engine._loss(engine.engine, batch)) for batch in micro_batches)
    finally:
        module.train(was_training)
    return total / len(micro_batches)


def evaluate(engine, batches: Iterator[dict], *, iters: int, accumulation: int, dp_group=None) -> float:
    """Mean loss of ``iters`` global batches (Megatron-LM's ``evaluate``: forward only), averaged over dp."""
    total = 0.0
    for _ in range(iters):
        total += eval_step(engine, [next(batches) for _ in range(accumulation)])
        if getattr(engine, "empty_unused_memory_level", 0) >= 1:  # Megatron-LM's evaluate, after each forward
            from .model_stats import empty_unused_memory

            empty_unused_memory()
    loss = torch.tensor([total / iters], dtype=torch.float64)
    if not hasattr(engine, "trainer") and dist.is_initialized() and dist.get_world_size(dp_group) > 1:
        with comm.paused():
            dist.all_reduce(loss, group=dp_group)
        loss /= dist.get_world_size(dp_group)
    return float(loss.item())


def eval_record(kind: str, step: int, loss: float, label: str) -> tuple[dict, str]:
    """The metrics record and Megatron-LM's framed log line (``evaluate_and_print_results``) of one evaluation;
    perplexity is exp(min(20, loss)) as there."""
    ppl = math.exp(min(20.0, loss))
    line = f" validation loss at {label} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} | "
    rule = "-" * (len(line) + 1)
    return {"kind": kind, "step": step, "loss": loss, "ppl": ppl}, f"{rule}\n{line}\n{rule}"


def train(engine, batches: Iterator[dict], *, iters: int, accumulation: int, global_batch: int, seq_length: int,
          dp_group=None, metrics_out: Optional[str] = None, schedule=None, progress: bool = True,
          log_interval: Optional[int] = None, log=print, start_step: int = 0, start_samples: int = 0,
          on_step: Optional[Callable[[StepRecord], bool]] = None,
          timeout_minutes: Optional[float] = None,
          after_step: Optional[Callable[[StepRecord], list[dict]]] = None, batching=None,
          flops_per_sample: Optional[float] = None, peak_flops: Optional[float] = None,
          profiler=None, observers: tuple = (), log_throughput: bool = False,
          manual_gc_interval: Optional[int] = None, check_for_nan: bool = False) -> list[StepRecord]:
    """Run steps ``start_step + 1 .. iters`` of ``engine`` (:class:`zeromega.run.engines.Engine`).

    Returns their records (identical on every rank). ``on_step(record)``
    runs after every step on every rank (checkpointing, exit conditions); a
    true return ends training after that step. A collective that times out
    (after ``timeout_minutes``, the process groups' setting) raises
    :class:`~zeromega.integrations.heartbeat.CollectiveTimeout` naming the
    ranks that never reached the step. ``after_step(record)`` (evaluation) runs before ``on_step`` on
    every rank; the dicts it returns go to the metrics file after the step's record.

    ``batching`` (:class:`zeromega.run.schedule.Batching`) gives each step's global batch and micro-batches
    (a ramp-up); ``flops_per_sample`` (Megatron-LM's count) and ``peak_flops`` (per rank) give TFLOP/s and
    MFU (``log_throughput`` puts TFLOP/s in the log line, as Megatron-LM's ``--log-throughput``); ``profiler``
    is stepped before each step, as Megatron-LM steps it; ``observers`` get ``write(record)`` and ``close()``
    on rank 0 (Weights & Biases). ``manual_gc_interval`` (not None: Megatron-LM's ``--manual-gc``) turns
    Python's automatic collector off and collects at the start and after every that many steps (0: never in
    the loop), so the ranks pause together. ``check_for_nan`` stops at a NaN or infinite loss or gradient norm
    (:func:`check_finite`) after writing the step's record; a step the fp16 loss scaler skipped is the scaler's.
    """
    from tqdm import tqdm

    device = accel.current()
    comm.install()
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    writer = MetricsWriter(metrics_out, after_step=start_step)
    records = []
    bar = tqdm(total=iters, initial=start_step, disable=not (progress and rank0), unit="step", dynamic_ncols=True)
    comm.take()
    world = dist.get_world_size() if dist.is_initialized() else 1
    consumed = start_samples
    interval = {"skipped": 0, "nan": 0, "seconds": 0.0, "steps": 0}  # Megatron-LM's counts per log interval
    if manual_gc_interval is not None:
        gc.disable()
        gc.collect()
    try:
        for step in range(start_step + 1, iters + 1):
            heartbeat.post(step)
            try:
                device.reset_peak_memory()
                io_before = proc_io()
                lr = schedule.lr if schedule is not None else None
                if profiler is not None:
                    profiler.step()
                step_batch, step_micro = global_batch, accumulation
                if batching is not None:
                    step_batch, step_micro = batching.at(consumed)
                    if hasattr(engine, "set_global_batch"):
                        engine.set_global_batch(step_batch)
                start = time.perf_counter()
                micro_batches = [next(batches) for _ in range(step_micro)]
                if not seq_length:  # an own model's data: tokens per sample from its token ids
                    ids = next((micro_batches[0][k] for k in ("tokens", "input_ids")
                                if isinstance(micro_batches[0], dict) and hasattr(micro_batches[0].get(k), "shape")),
                               None)
                    seq_length = ids.shape[-1] if ids is not None else 0
                loss, grad_norm = engine.train_step(micro_batches)
                device.synchronize()
                elapsed = time.perf_counter() - start
                io_after = proc_io()
                local_comm = comm.take()
                loss, peak = _reduce_step_stats(loss, device.peak_memory_bytes(), dp_group)
                consumed += step_batch
                tflops = None if not flops_per_sample else flops_per_sample * step_batch / elapsed / world / 1e12
                record = StepRecord(
                    step=step, loss=loss, tokens_per_s=step_batch * seq_length / elapsed, step_time_s=elapsed,
                    peak_mem_bytes=peak, comm_bytes=comm.summed_over_ranks(local_comm), lr=lr,
                    grad_norm=grad_norm, consumed_samples=consumed,
                    storage_read_bytes=io_after["read_bytes"] - io_before["read_bytes"],
                    storage_write_bytes=io_after["write_bytes"] - io_before["write_bytes"],
                    global_batch=step_batch, tflops_per_gpu=tflops,
                    mfu=tflops * 1e12 / peak_flops if tflops is not None and peak_flops else None,
                    loss_scale=_loss_scale(engine), skipped=bool(getattr(engine, "last_step_skipped", False)),
                    nan=not math.isfinite(loss), params_norm=getattr(engine, "last_params_norm", None),
                    num_zeros_in_grad=getattr(engine, "last_num_zeros", None),
                )
                if schedule is not None and not record.skipped:  # Megatron-LM: no schedule step on a skipped one
                    schedule.step(step_batch)
                records.append(record)
                writer.write(record)
                if rank0:
                    for observer in observers:
                        observer.write(record)
                if check_for_nan and not record.skipped:
                    check_finite(step, loss, grad_norm)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record.tokens_per_s:,.0f}")
                interval["skipped"] += record.skipped
                interval["nan"] += record.nan and not record.skipped
                interval["seconds"] += elapsed
                interval["steps"] += 1
                if log_interval and step % log_interval == 0:
                    if rank0:
                        shown = record if log_throughput else StepRecord(**{**record.__dict__, "tflops_per_gpu": None})
                        (bar.write if progress else log)(log_line(
                            shown, iters, global_batch, skipped=interval["skipped"], nan=interval["nan"],
                            elapsed_ms=1000 * interval["seconds"] / interval["steps"]))
                    interval = {"skipped": 0, "nan": 0, "seconds": 0.0, "steps": 0}
                if manual_gc_interval and step % manual_gc_interval == 0:
                    gc.collect()
                if after_step is not None:
                    for extra in after_step(record):
                        writer.write_dict(extra)
                if on_step is not None and on_step(record):
                    break
            except RuntimeError as err:
                if heartbeat.is_timeout(err) and dist.is_initialized():
                    raise heartbeat.explain(err, step, timeout_minutes) from err
                raise
    finally:
        if manual_gc_interval is not None:
            gc.enable()
        bar.close()
        writer.close()
        if profiler is not None:
            profiler.stop()
        for observer in observers:
            observer.close()
    return records


def _loss_scale(engine) -> Optional[float]:
    from .tensorboard import loss_scale

    try:
        return loss_scale(engine)
    except (AttributeError, TypeError):
        return None
