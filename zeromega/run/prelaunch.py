"""The run's own checks that need no process, cheap enough for ``zeromega launch`` to run before it starts any
rank: the run's length, checkpoint directories, TensorBoard, wandb and the profiler's span. Each module that
owns a check is imported only when its feature is asked for (the launcher should not pay for Megatron-Core)."""

from __future__ import annotations

import os
import warnings

from zeromega.config import ConfigError, RunConfig


def before_launch(cfg: RunConfig, gpt: bool = True) -> None:
    """``gpt``: the run trains zeromega's GPT (its model section applies); False for an own model."""
    s, log = cfg.scheduler, cfg.logging
    if s.train_iters is None and s.train_samples is None:
        raise ConfigError("scheduler.train_iters", None, "the run's length is unstated",
                          "pass --train-iters N or --train-samples N (DeepSpeed: the scheduler's total_num_steps)")
    if gpt and cfg.parallel.cp > 1 and cfg.sequence.mode in ("ring", "usp") and cfg.model.attention_dropout:
        # the attention module refuses it when the ranks build the model: said here, before any rank starts
        raise ConfigError("model.attention_dropout", cfg.model.attention_dropout, f"{cfg.sequence.mode} attention "
                          "has no dropout (each rank would need the same random stream per block)",
                          "pass --attention-dropout 0, or use Ulysses (--cp-comm-type a2a), which has it")
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
    if cfg.parallel.pp == 1 and not cfg.moe.num_experts and os.environ.get("RANK", "0") == "0":
        # DeepSpeed's engine runs this layout (zeromega.run.engines.select): what it has no counterpart for
        from zeromega.plugins.zero.ds_config import ddp_fallbacks

        for line in ddp_fallbacks(cfg):
            warnings.warn(f"accepted, with a fallback: {line}", stacklevel=3)
