"""The run's own checks that need no process, cheap enough for ``zeromega launch`` to run before it starts any
rank: the run's length, checkpoint directories, TensorBoard, wandb and the profiler's span. Each module that
owns a check is imported only when its feature is asked for (the launcher should not pay for Megatron-Core)."""

from __future__ import annotations

from zeromega.config import ConfigError, RunConfig


def before_launch(cfg: RunConfig) -> None:
    s, log = cfg.scheduler, cfg.logging
    if s.train_iters is None and s.train_samples is None:
        raise ConfigError("scheduler.train_iters", None, "the run's length is unstated",
                          "pass --train-iters N or --train-samples N (DeepSpeed: the scheduler's total_num_steps)")
    if cfg.checkpoint.finetune:
        from .checkpointing import check

        check(cfg)
    if log.tensorboard_dir or log.profile:
        from . import tensorboard

        tensorboard.check(cfg)
        tensorboard.check_profile(cfg)
    if log.wandb_project:
        from . import wandb

        wandb.check(cfg)
