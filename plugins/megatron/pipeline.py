"""Megatron-Core's own engine for the layouts DeepSpeed cannot run: pp > 1 and MoE with ep.

Why not DeepSpeed here: its ZeRO refuses stages 2/3 with pipeline
parallelism, its ``PipelineEngine`` wants a ``PipelineModule`` (a flat
layer list, not a Megatron-Core ``GPTModel`` cut by ``parallel_state``), and
its ZeRO treats parameters marked ``allreduce=False`` (Megatron's experts)
as DeepSpeed-MoE experts only inside its own ``MoE`` module, so Megatron
experts would be averaged over the whole dp group. Megatron-Core already
has what these layouts need:

- the model cut into stages (and virtual stages) by ``parallel_state``;
- the schedules (``get_forward_backward_func``: no pipelining, 1F1B,
  interleaved 1F1B over virtual stages), micro-batching included;
- ``DistributedDataParallel``: contiguous grad buffers, reduced over the dp
  (x cp) group, expert grads over the expert-data-parallel group;
- ``DistributedOptimizer``: each dp rank keeps 1/dp of the fp32 master
  params and Adam state, grads arrive by reduce-scatter and params leave by
  all-gather, i.e. ZeRO-1 (ZeRO paper section 5.1) under another name.

:class:`MegatronTrainer` wires those together from a :class:`RunConfig`.

Pipeline bubble, measured: Megatron's schedules report their phases to
``config.timers``; :class:`PhaseTimers` is that seam. Per stage, over one
step, ``busy = forward-compute + backward-compute`` (model forward with the
loss, and autograd backward, of every micro-batch and chunk) and
``schedule = forward-backward - all-grads-sync`` (the schedule's wall time
without the gradient reduction that follows it); ``idle = 1 - busy /
schedule`` is the time the stage waited on its neighbours (p2p time
included). Theory for equal f + b per micro-batch: 1F1B ``(p-1)/(m+p-1)``,
interleaved with v chunks per stage ``(p-1)/(v m + p-1)`` (Narayanan et
al. 2021, section 2.2).

Dimension legend: ``b`` micro-batch, ``s`` sequence, ``m`` micro-batches per
step, ``p`` pipeline stages, ``v`` virtual stages per stage.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist

from zeromega.integrations import comm
from zeromega.integrations.megatron import model as gpt
from zeromega.config.schema import Layout, RunConfig


class _Phase:
    def __init__(self, totals: dict, name: str):
        self._totals, self._name, self._start = totals, name, None

    def start(self, barrier: bool = False) -> None:
        self._start = time.perf_counter()

    def stop(self, barrier: bool = False) -> None:
        if self._start is not None:
            self._totals[self._name] += time.perf_counter() - self._start
            self._start = None


class PhaseTimers:
    """Megatron's ``config.timers`` protocol (``timers(name, log_level).start()/.stop()``), summing seconds per phase."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self._phases: dict[str, _Phase] = {}

    def __call__(self, name: str, log_level: Optional[int] = None) -> _Phase:
        if name not in self._phases:
            self._phases[name] = _Phase(self.totals, name)
        return self._phases[name]

    def take(self) -> dict[str, float]:
        """Seconds per phase since the last call; resets."""
        out = dict(self.totals)
        self.totals.clear()
        return out


def idle_fraction(phases: dict[str, float]) -> float:
    """Share of the schedule's wall time this stage spent not computing (see module docstring)."""
    schedule = phases.get("forward-backward", 0.0) - phases.get("all-grads-sync", 0.0)
    busy = phases.get("forward-compute", 0.0) + phases.get("backward-compute", 0.0)
    return max(0.0, 1.0 - busy / schedule) if schedule > 0 else 0.0


def theoretical_bubble(p: int, m: int, v: int = 1) -> float:
    """Idle fraction of a stage under 1F1B (v = 1) or interleaved 1F1B with v chunks per stage."""
    return (p - 1) / (v * m + p - 1)


@dataclass
class StepResult:
    loss: float
    """Mean micro-batch loss over the step (averaged over dp ranks; the same on every rank)."""
    grad_norm: Optional[float]
    """Global gradient norm before clipping (Megatron's, over every shard and stage)."""
    idle: list[float] = field(default_factory=list)
    """Measured idle fraction of each pipeline stage (index = pp rank)."""
    phases: dict[str, float] = field(default_factory=dict)
    """This rank's seconds per schedule phase."""


def _masked_mean(loss_mask: torch.Tensor, per_token: torch.Tensor):
    mask = loss_mask.to(per_token.device, torch.float32)
    loss = (per_token.float() * mask).sum() / mask.sum()
    return loss, {"loss": loss.detach().clone()}  # the schedule divides `loss` in place


class MegatronTrainer:
    """GPT training with Megatron-Core's schedules, DDP and (distributed) optimizer.

    ``virtual_stages`` > 1 selects the interleaved schedule. ``init_seed``
    re-draws the weights by their 1-process names (:func:`model.init_by_name`)
    so that any layout starts where a 1-process run does; ``load_weights(chunks)``
    (a weights-only checkpoint load, :mod:`zeromega.checkpoint.weights`) then replaces them, before
    the optimizer takes its masters from the model.
    """

    def __init__(self, shape: gpt.GPTShape, cfg: RunConfig, layout: Layout, *, virtual_stages: Optional[int] = None,
                 distributed_optimizer: bool = True, init_seed: Optional[int] = None,
                 load_weights: Optional[Callable[[list], None]] = None):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.shape, self.cfg, self.layout = shape, cfg, layout
        if virtual_stages is None:  # the run config's vpp, when it has one
            virtual_stages = getattr(layout, "vpp", None)
        self.virtual_stages = virtual_stages if virtual_stages and virtual_stages > 1 else 1
        chunks = gpt.build_gpt_chunks(shape, cfg, virtual_stages)
        if init_seed is not None:
            gpt.init_by_name(chunks, shape, init_seed)
        if load_weights is not None:
            load_weights(chunks)
        self.config = chunks[0].config
        d = cfg.ddp
        overlap = bool(d.overlap_grad_reduce)
        # Megatron-LM's DDP arguments (training.py get_model): the fields of the run's ddp section; a bucket size
        # only matters under overlap (DDP puts every gradient in one bucket otherwise)
        self.overlap_param_gather = d.overlap_param_gather and distributed_optimizer
        bucket_size = d.bucket_size
        if d.num_buckets is not None:  # --ddp-num-buckets: the rank's parameter count (all chunks) over them
            bucket_size = sum(p.numel() for chunk in chunks for p in chunk.parameters()) // d.num_buckets
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=d.grads_in_fp32(cfg.precision), overlap_grad_reduce=overlap,
            overlap_param_gather=self.overlap_param_gather, use_distributed_optimizer=distributed_optimizer,
            bucket_size=bucket_size if overlap else None, average_in_collective=d.average_in_collective,
            pad_buckets_for_high_nccl_busbw=d.pad_buckets_for_high_nccl_busbw,
            align_param_gather=self.overlap_param_gather and self.virtual_stages > 1 and d.align_param_gather)
        self.chunks = [DistributedDataParallel(config=self.config, ddp_config=ddp_config, module=chunk,
                                               disable_bucketing=i > 0)
                       for i, chunk in enumerate(chunks)]
        o, scaling = cfg.optimizer, cfg.loss_scaling
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=cfg.scheduler.min_lr, weight_decay=o.weight_decay,
                            adam_beta1=o.beta1, adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.clip_grad,
                            use_distributed_optimizer=distributed_optimizer, params_dtype=self.config.params_dtype,
                            bf16=cfg.precision == "bf16", fp16=cfg.precision == "fp16",
                            # fp16 loss scaling (Megatron's names; 0 = dynamic, as in DeepSpeed's fp16 block)
                            loss_scale=scaling.loss_scale or None,
                            initial_loss_scale=2.0 ** scaling.initial_scale_power,
                            min_loss_scale=scaling.min_scale, loss_scale_window=scaling.window,
                            hysteresis=scaling.hysteresis,
                            # --decoupled-lr: the embedding and output weights' own max_lr / min_lr groups
                            decoupled_lr=o.decoupled_lr, decoupled_min_lr=o.decoupled_min_lr),
            self.chunks, use_gloo_process_groups=False)
        # Megatron-Core gives the expert optimizer the dense tp group, where a parameter that is not tp-split
        # counts in the grad norm on tp rank 0 only. An expert's fc2 bias (MoE with biases, expert tp 1) is not
        # split, yet the other tp ranks hold other experts' biases (measured at tp 2 x ep 2: the norm 3.5 % low,
        # so clipping scaled differently): the expert optimizer judges duplicates within the expert tp group.
        from megatron.core import parallel_state

        for sub in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            if sub.param_groups and all(g.get("is_expert_parallel") for g in sub.param_groups):
                sub.tp_group = parallel_state.get_expert_tensor_parallel_group()
        for group in self.optimizer.param_groups:  # Megatron's scheduler would do this each step
            group["weight_decay"] = o.weight_decay * group.get("wd_mult", 1.0)
        self.timers = PhaseTimers()
        self.config.timers = self.timers
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.grad_scale_func = self.optimizer.scale_loss if cfg.precision == "fp16" else None
        if len(self.chunks) > 1 or overlap:
            self.config.no_sync_func = self._one_or_list([c.no_sync for c in self.chunks])
        if overlap and cfg.ddp.align_grad_reduce:  # Megatron-LM's train(): every stage starts its reduce as its
            # last backward ends (--no-align-grad-reduce: each stage's buckets start their own)
            self.config.grad_sync_func = self._one_or_list([c.start_grad_sync for c in self.chunks])
        self._param_sync_func = None
        if ddp_config.align_param_gather:  # interleaved: the schedule starts each chunk's gather in turn
            self._param_sync_func = self._one_or_list([c.start_param_sync for c in self.chunks])
        if self.overlap_param_gather:
            # Megatron-LM's train(): no gather hooks until a step has updated the weights, so that a bad load or
            # init is not spread by the first all-gather
            self._set_gather_hooks(False, sync=False)
        self._forward_backward = get_forward_backward_func()

    def _one_or_list(self, funcs: list):
        return funcs[0] if len(funcs) == 1 else funcs

    _gather_hooks = True

    def _set_gather_hooks(self, on: bool, sync: bool = True) -> None:
        """Megatron-LM's enable/disable_forward_pre_hook under ``--overlap-param-gather``: the forward pre-hooks
        that wait for (and start) the all-gather of the updated weights; disabling them gathers at once
        (``sync``)."""
        if on == self._gather_hooks:
            return
        for chunk in self.chunks:
            if on:
                chunk.enable_forward_pre_hook()
            else:
                chunk.disable_forward_pre_hook(param_sync=sync)
        self.config.param_sync_func = self._param_sync_func if on else None
        self._gather_hooks = on

    def sync_params(self) -> None:
        """Make every model chunk hold the updated weights now: under ``--overlap-param-gather`` the
        distributed optimizer's step leaves the all-gather to the next forward pass, so a checkpoint (or
        anything else that reads the weights between steps) calls this first (Megatron-LM's
        ``force_param_sync``). A no-op otherwise."""
        if self.overlap_param_gather:
            for chunk in self.chunks:
                chunk.start_param_sync(force_sync=True)

    @property
    def module(self) -> torch.nn.Module:
        """The first model chunk (the whole model when pp == 1 and v == 1)."""
        return self.chunks[0].module

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, lambda per_token: _masked_mean(batch["loss_mask"], per_token)

    def train_step(self, micro_batches: Iterable[dict]) -> StepResult:
        """One optimizer step over ``layout.accumulation`` micro-batches of this dp rank.

        Every rank of a pipeline draws the same micro-batches (the first stage
        reads tokens, the last labels and mask); each model chunk gets its own
        iterator over them, as the interleaved schedule asks.
        """
        from megatron.core import parallel_state as ps

        batches = list(micro_batches)
        m = len(batches)
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        iterators = [iter(batches) for _ in self.chunks]
        self.timers.take()
        losses = self._forward_backward(
            forward_step_func=self._forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
            num_microbatches=m,
            seq_length=batches[0]["tokens"].shape[1],  # the batch's, not the position table's (may be longer)
            micro_batch_size=batches[0]["tokens"].shape[0],
            forward_only=False,
        )
        phases = self.timers.take()
        updated, grad_norm, _ = self.optimizer.step()
        if updated and self.overlap_param_gather:
            self._set_gather_hooks(True, sync=False)  # from now on the next forward gathers (Megatron-LM's train)
        loss = torch.tensor([sum(float(x["loss"]) for x in losses) / m if losses else 0.0], dtype=torch.float64)
        idle = torch.zeros(ps.get_pipeline_model_parallel_world_size(), dtype=torch.float64)
        idle[ps.get_pipeline_model_parallel_rank()] = idle_fraction(phases)
        with comm.paused():  # bookkeeping, not training traffic
            last = ps.get_pipeline_model_parallel_last_rank()
            dist.broadcast(loss, src=last, group=ps.get_pipeline_model_parallel_group())
            dist.all_reduce(loss, group=ps.get_data_parallel_group(with_context_parallel=True))
            dist.all_reduce(idle, group=ps.get_pipeline_model_parallel_group())
        loss /= ps.get_data_parallel_world_size(with_context_parallel=True)
        return StepResult(loss=float(loss.item()), grad_norm=None if grad_norm is None else float(grad_norm),
                          idle=idle.tolist(), phases=phases)

    def eval_step(self, micro_batches: Iterable[dict]) -> float:
        """One global batch's loss, forward only (Megatron-LM's ``evaluate``): the chunks in eval mode, no
        gradients, the last stage's loss sent to every stage and averaged over dp (as ``train_step``'s)."""
        from megatron.core import parallel_state as ps

        batches = list(micro_batches)
        hooks = self._gather_hooks
        if self.overlap_param_gather:  # Megatron-LM evaluates with the weights gathered first, hooks off
            self._set_gather_hooks(False)
        for chunk in self.chunks:
            chunk.eval()
        try:
            with torch.no_grad():
                losses = self._forward_backward(
                    forward_step_func=self._forward_step,
                    data_iterator=[iter(batches) for _ in self.chunks] if len(self.chunks) > 1 else iter(batches),
                    model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
                    num_microbatches=len(batches), seq_length=batches[0]["tokens"].shape[1],
                    micro_batch_size=batches[0]["tokens"].shape[0], forward_only=True)
        finally:
            for chunk in self.chunks:
                chunk.train()
            if self.overlap_param_gather:
                self._set_gather_hooks(hooks, sync=False)
        self.timers.take()
        loss = torch.tensor([sum(float(x["loss"]) for x in losses) / len(batches) if losses else 0.0],
                            dtype=torch.float64)
        with comm.paused():
            dist.broadcast(loss, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
            dist.all_reduce(loss, group=ps.get_data_parallel_group(with_context_parallel=True))
        return float(loss.item()) / ps.get_data_parallel_world_size(with_context_parallel=True)
