"""The learning-rate schedule and the run's length, run by the engine that defines them.

A schedule read from Megatron-LM flags (or the unified file) runs on
Megatron-Core's ``OptimizerParamScheduler`` as Megatron-LM's
``get_optimizer_param_scheduler`` (core_v0.16.1) builds it: counted in
samples, stepped by each step's global batch; ``--lr-warmup-fraction`` is a
fraction of the decay span; ``--train-samples`` sets the steps by Megatron-LM's
``update_train_iters``. A ``--rampup-batch-size`` grows the global batch by
Megatron-Core's ``num_microbatches_calculator``. Megatron-DeepSpeed's
``--lr-warmup-tokens`` / ``--lr-decay-tokens`` run the same class counted in
tokens, with Megatron-DeepSpeed's order: a step's schedule update sees the
tokens consumed *before* that step; ``--train-tokens`` ends training before a
step once that many tokens are consumed.

One read from a DeepSpeed JSON's ``scheduler`` block runs on DeepSpeed's own
class of that name (``scheduler.deepspeed_type``), so its log warmup and step
counting are DeepSpeed's. Both are stepped once after every optimizer step,
on either engine, and both keep their position in ``state_dict()`` for
checkpoints.
"""

from __future__ import annotations

from typing import Optional

from zeromega.config import ConfigError, RunConfig

SAMPLES, TOKENS, DEEPSPEED = "samples", "tokens", "deepspeed"


class Batching:
    """The global batch (and micro-batches per rank) of each step: constant, or Megatron-Core's ramp-up."""

    def __init__(self, cfg: RunConfig, global_batch: int, micro: int, dp: int):
        from megatron.core.num_microbatches_calculator import _build_num_microbatches_calculator

        rampup = cfg.batch.rampup
        self.global_batch, self.micro, self.dp = global_batch, micro, dp
        if rampup is not None:
            start, increment, _ = rampup
            per = micro * dp
            if start > global_batch or (global_batch - start) % increment:
                raise ConfigError("batch.rampup", list(rampup), f"cannot ramp from {start} by {increment} to the "
                                  f"global batch {global_batch}", "choose a start <= the global batch whose "
                                  "difference to it the increment divides")
            if start % per or increment % per:
                raise ConfigError("batch.rampup", list(rampup), f"the start {start} and increment {increment} must "
                                  f"be multiples of micro x dp = {per} (Megatron-Core asserts each step)",
                                  f"use multiples of {per}")
        self._calc = _build_num_microbatches_calculator(1, list(rampup) if rampup else None, global_batch, micro,
                                                        dp, False)

    def at(self, consumed_samples: int) -> tuple[int, int]:
        """(global batch, micro-batches per dp rank) of the step that starts after ``consumed_samples``."""
        self._calc.update(consumed_samples, consistency_check=True)
        return self._calc.get_current_global_batch_size(), self._calc.get()

    def iterations(self, cfg: RunConfig) -> int:
        """Steps in the run: --train-iters, or Megatron-LM's ``update_train_iters`` of --train-samples; with
        Megatron-DeepSpeed's --train-tokens, the steps before the consumed tokens reach it."""
        s = cfg.scheduler
        if s.train_iters:
            iters = s.train_iters
        elif s.train_samples:
            if cfg.batch.rampup is None:
                iters = s.train_samples // self.global_batch
            else:  # ramp-up phase step by step, then whole batches of the constant phase (a partial one dropped)
                iters = consumed = 0
                while consumed <= cfg.batch.rampup[2] and consumed <= s.train_samples:
                    consumed += self.at(consumed)[0]
                    iters += 1
                if s.train_samples > consumed:
                    iters += (s.train_samples - consumed) // self.global_batch
            if iters < 1:
                raise ConfigError("scheduler.train_samples", s.train_samples, f"is less than one global batch "
                                  f"({self.global_batch})", "train on more samples, or a smaller global batch")
        else:
            raise ConfigError("scheduler.train_iters", None, "the run's length is unstated",
                              "pass --train-iters N or --train-samples N (DeepSpeed: the scheduler's "
                              "total_num_steps)")
        if s.train_tokens and cfg.model.seq_length:
            steps = consumed = 0
            while steps < iters and consumed * cfg.model.seq_length < s.train_tokens:
                consumed += self.at(consumed)[0]
                steps += 1
            iters = steps
        return iters


class Schedule:
    """One surface over both scheduler kinds: ``step(samples)`` after each optimizer step, ``lr`` now, state."""

    def __init__(self, scheduler, optimizer, kind: str, tokens_per_sample: int = 0):
        self.scheduler, self._optimizer, self.kind = scheduler, optimizer, kind
        self._tokens_per_sample = tokens_per_sample
        self._pending_tokens = 0  # tokens mode: the last step's tokens, counted at the next update

    @property
    def lr(self) -> float:
        """The learning rate the next optimizer step uses (of the first, decayed, group)."""
        return float(self._optimizer.param_groups[0]["lr"])

    def step(self, samples: int = 1) -> None:
        """After an optimizer step over ``samples`` samples (the step's global batch)."""
        if self.kind == DEEPSPEED:
            self.scheduler.step()
        elif self.kind == SAMPLES:
            self.scheduler.step(increment=samples)
        else:  # Megatron-DeepSpeed updates consumed_train_tokens after the step's scheduler update
            self.scheduler.step(increment=self._pending_tokens)
            self._pending_tokens = samples * self._tokens_per_sample

    def state_dict(self) -> dict:
        state = dict(self.scheduler.state_dict())
        if self.kind == TOKENS:
            state["zeromega_pending_tokens"] = self._pending_tokens
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.kind == DEEPSPEED:
            self.scheduler.load_state_dict(state)
            self.scheduler.step(self.scheduler.last_batch_iteration)  # DeepSpeed's classes set the lr on step()
            return
        self._pending_tokens = int(state.get("zeromega_pending_tokens", 0))
        state = {k: v for k, v in state.items() if k != "zeromega_pending_tokens"}
        try:
            self.scheduler.load_state_dict(state)
        except AssertionError as err:  # Megatron-Core's _check_and_set: class and checkpoint values differ
            raise ConfigError("scheduler", " ".join(str(err).split()), "this run's schedule differs from the "
                              "checkpoint's", "pass --override-opt_param-scheduler (this run's values) or "
                              "--use-checkpoint-opt_param-scheduler (the checkpoint's), as in Megatron-LM") from None


def build(cfg: RunConfig, optimizer, global_batch: int = 1, seq_length: Optional[int] = None) -> Schedule:
    """The schedule of ``cfg.scheduler`` over ``optimizer``'s parameter groups (``global_batch``: the
    constant-phase global batch, in which iteration counts are turned into samples)."""
    s, o = cfg.scheduler, cfg.optimizer
    if s.decay_style == "WSD":
        raise ConfigError("scheduler.decay_style", "WSD", "needs the WSD decay span and style "
                          "(--lr-wsd-decay-iters, --lr-wsd-decay-style), which zeromega does not read yet",
                          "choose constant, linear, cosine or inverse-square-root")
    if s.deepspeed_type is not None:
        return Schedule(_deepspeed(cfg, optimizer), optimizer, DEEPSPEED)
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    kind, per_unit = SAMPLES, 1
    if s.train_iters:  # Megatron-LM: iteration counts times the global batch
        decay = (s.decay_iters or s.train_iters) * global_batch
        wd_steps = s.train_iters * global_batch
        warmup = s.warmup_fraction * decay if s.warmup_fraction is not None else s.warmup_iters * global_batch
    elif s.train_samples:
        decay = s.decay_samples or s.train_samples
        wd_steps = s.train_samples
        warmup = s.warmup_fraction * decay if s.warmup_fraction is not None else s.warmup_samples
    else:
        raise ConfigError("scheduler.train_iters", None, "the run's length is unstated",
                          "pass --train-iters N or --train-samples N")
    if s.decay_tokens is not None or s.warmup_tokens is not None:  # Megatron-DeepSpeed's token schedule
        if not seq_length:
            raise ConfigError("scheduler.decay_tokens", s.decay_tokens, "counts tokens, which needs the sequence "
                              "length", "pass --seq-length")
        kind, per_unit = TOKENS, seq_length
        decay = s.decay_tokens if s.decay_tokens is not None else decay * seq_length
        warmup = s.warmup_tokens if s.warmup_tokens is not None else 0
        wd_steps = wd_steps * seq_length
    if s.decay_style != "constant" and warmup >= decay:
        field = "scheduler.warmup_tokens" if kind == TOKENS else "scheduler.warmup_iters"
        raise ConfigError(field, warmup, f"is not below the decay span {decay} ({kind})",
                          "warm up for less than the decay span (--lr-decay-iters / --train-iters, or the "
                          "samples/tokens forms)")
    decay = max(decay, warmup + 1) if s.decay_style == "constant" else decay
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=s.warmup_init_lr, max_lr=o.lr, min_lr=s.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=decay, lr_decay_style=s.decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=wd_steps, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=s.use_checkpoint, override_opt_param_scheduler=s.override,
    )
    return Schedule(scheduler, optimizer, kind, per_unit)


def _deepspeed(cfg: RunConfig, optimizer):
    """DeepSpeed's own scheduler class, with the parameters its block gave (see launch.deepspeed_json)."""
    from deepspeed.runtime import lr_schedules

    s, lr = cfg.scheduler, cfg.optimizer.lr
    common = dict(warmup_num_steps=s.warmup_iters, warmup_type=s.warmup_style)
    if s.deepspeed_type == "WarmupLR":
        return lr_schedules.WarmupLR(optimizer, warmup_min_lr=s.warmup_init_lr, warmup_max_lr=lr, **common)
    if s.train_iters is None:
        raise ConfigError("scheduler.params.total_num_steps", None, f"{s.deepspeed_type} needs the run's length",
                          "give total_num_steps in the scheduler block, or --train-iters")
    if s.deepspeed_type == "WarmupDecayLR":
        return lr_schedules.WarmupDecayLR(optimizer, total_num_steps=s.train_iters, warmup_min_lr=s.warmup_init_lr,
                                          warmup_max_lr=lr, **common)
    return lr_schedules.WarmupCosineLR(optimizer, total_num_steps=s.train_iters,
                                       warmup_min_ratio=s.warmup_init_lr / lr, cos_min_ratio=s.min_lr / lr, **common)

