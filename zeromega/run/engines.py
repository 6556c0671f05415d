"""Two engines behind one surface, chosen in one place (as Megatron-Core's ``get_forward_backward_func``
chooses a schedule).

=====================================  ===============================================
layout                                  engine
=====================================  ===============================================
pp == 1, dense (any tp, cp, ZeRO 0-3,   DeepSpeed: ``deepspeed.initialize`` around the
offload)                                model, ZeRO over Megatron's dp x cp group
pp > 1, or MoE experts, or resuming a   Megatron-Core: its schedules (1F1B, interleaved),
Megatron-engine checkpoint              DDP and distributed optimizer (ZeRO-1)
=====================================  ===============================================

Why: DeepSpeed refuses ZeRO-2/3 with pipelines, wants a ``PipelineModule``,
and would average Megatron's expert gradients over the whole dp group
(:mod:`zeromega.plugins.megatron.pipeline`). Both engines start from the
same weights for a seed (:func:`zeromega.integrations.megatron.model.init_by_name`),
so changing pp does not change the model.

An engine offers ``train_step(micro_batches) -> (loss, grad_norm)``,
``optimizer`` (whose ``param_groups`` the schedule drives), ``modules``
(this rank's model chunks) and ``checkpointer(...)``; after each step
``last_params_norm`` and ``last_num_zeros`` (``--log-params-norm``,
``--log-num-zeros-in-grad``; None when not asked for), and both empty the
CUDA allocator's cache at Megatron-LM's points (``--empty-unused-memory-level``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from zeromega.config import ConfigError, Layout, RunConfig
from zeromega.run import model_stats

DEEPSPEED, MEGATRON = "deepspeed", "megatron"


def select(cfg: RunConfig, layout: Layout, resumes_megatron: bool = False, own_model: bool = False) -> str:
    """Which engine runs this layout (the table in the module docstring)."""
    megatron = layout.pp > 1 or bool(cfg.moe.num_experts) or resumes_megatron
    if megatron and own_model:
        field, value = ("parallel.pp", layout.pp) if layout.pp > 1 else ("moe.num_experts", cfg.moe.num_experts)
        raise ConfigError(field, value, "pipeline and expert parallelism run on Megatron-Core's engine, which "
                          "needs a Megatron-Core GPT model", "use pp 1 and a dense model with your own module, "
                          "or let zeromega build the GPT (Run without model=)")
    return MEGATRON if megatron else DEEPSPEED


class DeepSpeedEngine:
    """A model under ``deepspeed.initialize`` (ZeRO 0-3, offload); one step = accumulation x (fwd, bwd, step)."""

    name = DEEPSPEED

    def __init__(self, module: torch.nn.Module, cfg: RunConfig, layout: Layout,
                 loss: Callable[[torch.nn.Module, dict], torch.Tensor], plan_fn=None):
        from zeromega.plugins.zero.engine import build_engine

        self.engine = build_engine(module, cfg, layout, plan_fn)
        self.optimizer = self.engine.optimizer
        self.modules = [self.engine.module]
        self._loss = loss
        self._clipped_norm = None
        self._ramping = False
        self._keep_clipping_norm()
        self.empty_unused_memory_level = cfg.scheduler.empty_unused_memory_level
        self._log_params_norm = cfg.logging.log_params_norm
        self._log_num_zeros = cfg.logging.log_num_zeros_in_grad

    last_params_norm: Optional[float] = None
    last_num_zeros: Optional[float] = None

    def _keep_clipping_norm(self) -> None:
        """Without ZeRO or mixed precision DeepSpeed clips through ``clip_fp32_gradients``, which drops the norm
        its ``clip_grad_norm_`` returns (``get_global_grad_norm()`` is then None); the same call, norm kept."""
        engine = self.engine
        if not hasattr(engine, "clip_fp32_gradients"):
            return
        from deepspeed.runtime.utils import clip_grad_norm_

        def clip_and_keep() -> None:
            self._clipped_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                 max_norm=engine.gradient_clipping(), mpu=engine.mpu)

        engine.clip_fp32_gradients = clip_and_keep

    last_step_skipped = False
    """Whether the last step's update was skipped (an fp16 overflow: DeepSpeed's ``skipped_steps`` grew)."""
    _step_scale = 1.0
    """The loss scale the last backward ran with (ZeRO-0 fp16)."""

    def _scaled_for_zero0_fp16(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` as ZeRO-0 fp16 needs it: DeepSpeed 0.19's ``engine.backward`` scales the loss only for a ZeRO
        optimizer (``isinstance(self.optimizer, ZeROOptimizer)``), yet ZeRO-0's ``FP16_Optimizer`` /
        ``FP16_UnfusedOptimizer`` divide the gradients by their loss scale in ``step()`` and look there for the
        overflow a scaled loss would cause: unscaled, every update is loss-scale times too small and no step is
        ever skipped (upstream's open PR 8393). A hook on the loss multiplies the gradient reaching it by the
        scale, unless DeepSpeed already scaled it (a fixed engine: that gradient is then scale / accumulation,
        not 1 / accumulation): the probe runs at every backward. Other stages and precisions: ``loss``."""
        engine = self.engine
        if not engine.fp16_enabled() or engine.zero_optimization() or not loss.requires_grad:
            return loss
        scale = self._step_scale = float(engine._get_optimizer_loss_scale() or 1.0)
        unscaled = 1.0 / engine.gradient_accumulation_steps()
        loss = loss.float()

        def scale_if_deepspeed_did_not(grad: torch.Tensor) -> torch.Tensor:
            if scale != 1.0 and abs(float(grad) - unscaled) <= 1e-6 * unscaled:
                return grad * scale
            return grad

        loss.register_hook(scale_if_deepspeed_did_not)
        return loss

    def train_step(self, micro_batches: list[dict]) -> tuple[float, Optional[float]]:
        total = 0.0
        skipped = getattr(self.engine, "skipped_steps", 0)
        for i, batch in enumerate(micro_batches):
            if self._ramping:  # the step's last micro-batch is the boundary, whatever micro_steps % gas says
                self.engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
            loss = self._loss(self.engine, batch)
            self.engine.backward(self._scaled_for_zero0_fp16(loss))
            if i == len(micro_batches) - 1:  # the step's gradients are reduced: the optimizer step is next
                if self.empty_unused_memory_level >= 1:
                    model_stats.empty_unused_memory()
                if self._log_num_zeros:
                    self.last_num_zeros = model_stats.count_zeros_deepspeed(self.engine.module)
            self.engine.step()
            total += loss.item()
        if self.empty_unused_memory_level >= 2:
            model_stats.empty_unused_memory()
        if self._log_params_norm:
            self.last_params_norm = model_stats.params_norm(self.modules)
        self.last_step_skipped = getattr(self.engine, "skipped_steps", 0) > skipped
        if self.last_step_skipped:  # no norm for a skipped step, as Megatron-Core's optimizer (DeepSpeed says inf)
            self.last_num_zeros = None  # nor a zero count, as there
            return total / len(micro_batches), None
        norm = self.engine.get_global_grad_norm()
        if norm is not None and type(self.engine.optimizer).__name__ == "FP16_UnfusedOptimizer":
            # DeepSpeed 0.19's unfused fp16 optimizer (ZeRO-0 around a torch optimizer) keeps the norm of the scaled
            # gradients (its fused sibling divides by the scale): the norm of the gradients is that over the scale
            norm = norm / self._step_scale
        if norm is None:
            norm, self._clipped_norm = self._clipped_norm, None
        return total / len(micro_batches), None if norm is None else float(norm)

    def set_global_batch(self, samples: int) -> None:
        """A ramp-up step's global batch: DeepSpeed's accumulation boundary moves with it (as Megatron-DeepSpeed
        calls ``set_train_batch_size``)."""
        self._ramping = True  # DeepSpeed finds boundaries by micro_steps % gas, which a changed gas misplaces
        if self.engine.train_batch_size() != samples:
            self.engine.set_train_batch_size(samples)

    def checkpointer(self, layout: Layout, cfg: RunConfig, schedule, model_meta: dict):
        from zeromega.checkpoint import Checkpointer

        return Checkpointer(self.engine, layout, cfg.zero.stage, cfg.precision, schedule, model_meta=model_meta)


class MegatronEngine:
    """Megatron-Core's schedules, DDP and (distributed) optimizer over this stage's GPT chunks."""

    name = MEGATRON

    def __init__(self, shape, cfg: RunConfig, layout: Layout, weights=None):
        from zeromega.plugins.megatron.pipeline import MegatronTrainer

        load = None
        if weights is not None:
            from zeromega.checkpoint.weights import load_by_name

            load = lambda chunks: load_by_name(chunks, weights)  # noqa: E731
        self.trainer = MegatronTrainer(shape, cfg, layout, distributed_optimizer=cfg.zero.stage >= 1,
                                       init_seed=cfg.seed, load_weights=load)
        self.optimizer = self.trainer.optimizer
        self.modules = [chunk.module for chunk in self.trainer.chunks]
        self.engine = None
        self.empty_unused_memory_level = cfg.scheduler.empty_unused_memory_level
        self._log_params_norm = cfg.logging.log_params_norm
        self._wrap_optimizer_step(cfg.logging.log_num_zeros_in_grad)

    last_params_norm: Optional[float] = None
    last_num_zeros: Optional[float] = None

    def _wrap_optimizer_step(self, count_zeros: bool) -> None:
        """Megatron-Core's optimizer counts the zeros of its main gradients when its OptimizerConfig says
        ``log_num_zeros_in_grad`` (``count_zeros_fp32``: tp replicas and shared copies once, summed over its
        grad-stats group) and returns the count from ``step()``; its step is also where Megatron-LM empties the
        cache (level 1 just before it, level 2 after it). The trainer's step is left as it is: the optimizer's
        ``step`` is wrapped here."""
        optimizer = self.trainer.optimizer
        for sub in [optimizer, *getattr(optimizer, "chained_optimizers", [])]:
            sub.config.log_num_zeros_in_grad = count_zeros  # read at each step (one config object, shared)
        step = optimizer.step
        level = self.empty_unused_memory_level

        def step_and_keep(*args, **kwargs):
            if level >= 1:
                model_stats.empty_unused_memory()
            result = step(*args, **kwargs)
            self.last_num_zeros = None if not count_zeros or result[2] is None else float(result[2])
            if level >= 2:
                model_stats.empty_unused_memory()
            return result

        if count_zeros or level:
            optimizer.step = step_and_keep

    last_step_skipped = False
    """Whether the last step's update was skipped: under fp16 Megatron-Core's optimizer returns no grad norm
    when it finds inf/NaN gradients and skips the update."""

    def train_step(self, micro_batches: list[dict]) -> tuple[float, Optional[float]]:
        result = self.trainer.train_step(micro_batches)
        self.last_step_skipped = self.trainer.cfg.precision == "fp16" and result.grad_norm is None
        if self._log_params_norm:
            sync = getattr(self.trainer, "sync_params", None)
            if sync is not None:  # --overlap-param-gather leaves the updated weights' gather to the next forward
                sync()
            self.last_params_norm = model_stats.params_norm(self.modules)
        return result.loss, result.grad_norm

    def checkpointer(self, layout: Layout, cfg: RunConfig, schedule, model_meta: dict):
        from zeromega.checkpoint.megatron import MegatronCheckpointer

        return MegatronCheckpointer(self.trainer, layout, cfg.zero.stage, cfg.precision, schedule,
                                    model_meta=model_meta)
