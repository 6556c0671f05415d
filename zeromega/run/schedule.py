"""The learning-rate schedule the config names, run by the engine that defines it.

A schedule read from Megatron-LM flags (or the unified file) runs on
Megatron-Core's ``OptimizerParamScheduler``; one read from a DeepSpeed
JSON's ``scheduler`` block runs on DeepSpeed's own class of that name
(``scheduler.deepspeed_type``), so its log warmup and step counting are
DeepSpeed's. Both are stepped once after every optimizer step, on either
engine, and both keep their position in ``state_dict()`` for checkpoints.
"""

from __future__ import annotations

from zeromega.config import ConfigError, RunConfig


class Schedule:
    """One surface over both scheduler kinds: ``step()`` after each optimizer step, ``lr`` now, state."""

    def __init__(self, scheduler, optimizer, megatron: bool):
        self.scheduler, self._optimizer, self._megatron = scheduler, optimizer, megatron

    @property
    def lr(self) -> float:
        """The learning rate the next optimizer step uses (of the first, decayed, group)."""
        return float(self._optimizer.param_groups[0]["lr"])

    def step(self) -> None:
        if self._megatron:
            self.scheduler.step(1)
        else:
            self.scheduler.step()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)
        if not self._megatron:  # DeepSpeed's classes set the lr on step(); put it where it was
            self.scheduler.step(self.scheduler.last_batch_iteration)


def build(cfg: RunConfig, optimizer) -> Schedule:
    """The schedule of ``cfg.scheduler`` over ``optimizer``'s parameter groups."""
    s, o = cfg.scheduler, cfg.optimizer
    train_iters = s.train_iters
    if s.decay_style == "WSD":
        raise ConfigError("scheduler.decay_style", "WSD", "needs the WSD decay span and style "
                          "(--lr-wsd-decay-iters, --lr-wsd-decay-style), which zeromega does not read yet",
                          "choose constant, linear, cosine or inverse-square-root")
    if s.deepspeed_type is not None:
        return Schedule(_deepspeed(cfg, optimizer), optimizer, megatron=False)
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay = s.decay_iters or train_iters
    if decay is None and s.decay_style != "constant":
        raise ConfigError("scheduler.train_iters", None, f"the {s.decay_style} decay needs its span",
                          "give --train-iters (or --lr-decay-iters)")
    if decay is not None and decay <= s.warmup_iters and s.decay_style != "constant":
        raise ConfigError("scheduler.warmup_iters", s.warmup_iters, f"is not below the decay span {decay}",
                          "warm up for fewer steps than --lr-decay-iters / --train-iters")
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=s.warmup_init_lr, max_lr=o.lr, min_lr=s.min_lr, lr_warmup_steps=s.warmup_iters,
        lr_decay_steps=decay or max(1, s.warmup_iters + 1), lr_decay_style=s.decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=train_iters or 1, wd_incr_style="constant",
    )
    return Schedule(scheduler, optimizer, megatron=True)


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
