"""The run's checkpoint policy, as Megatron-LM's flags define it.

``checkpoint.save`` + ``interval``: save every N steps and once more at
the end. ``load``: resume from the newest (model, optimizer partitions,
schedule, every rank's RNGs, data position); a run that finds nothing
there (a missing or empty directory) starts fresh, with a warning as in
Megatron-LM unless ``load == save`` (one command line serves the first
attempt and every restart); a directory holding other files is refused.
``finetune`` / ``no_load_optim`` load the
weights only, from either engine's checkpoint into any layout
(:mod:`zeromega.checkpoint.weights`); ``no_load_rng`` keeps this run's
seeds. ``exit_interval`` and ``exit_signal_handler`` (SIGTERM) save after
the step and stop every rank at the same step.
"""

from __future__ import annotations

import os
import signal
from typing import Optional

import torch
import torch.distributed as dist

from zeromega.config import ConfigError, RunConfig


def saves_where_it_loads(cfg: RunConfig) -> bool:
    """--save and --load name one directory: one command line for the first attempt and every restart."""
    c = cfg.checkpoint
    return bool(c.save and c.load) and os.path.abspath(c.save) == os.path.abspath(c.load)


def weights_only(cfg: RunConfig) -> bool:
    c = cfg.checkpoint
    return bool(c.load) and (c.finetune or c.no_load_optim)


def check(cfg: RunConfig) -> None:
    """Refusals that need no process: fine-tuning into the directory it loads from."""
    if cfg.checkpoint.finetune and saves_where_it_loads(cfg):
        raise ConfigError("checkpoint.finetune", True, f"with load and save both {cfg.checkpoint.load!r} every "
                          "restart would fine-tune again from step 0, from the run's own checkpoint",
                          "save to another directory")


def resumes_megatron(cfg: RunConfig) -> bool:
    """Whether ``load`` names a checkpoint of Megatron-Core's engine (collective): such a run stays on that
    engine, whatever its pp. A weights-only load goes into whichever engine this layout picks."""
    from zeromega.checkpoint import reshard, saved_engine

    return bool(cfg.checkpoint.load) and not weights_only(cfg) and saved_engine(cfg.checkpoint.load) == reshard.MEGATRON


def read_weights(cfg: RunConfig):
    """The load checkpoint's whole fp32 weights for finetune / no_load_optim (collective: every file
    verified first); None otherwise, or when the directory is empty and save names it."""
    from zeromega.checkpoint import open_verified
    from zeromega.checkpoint import weights as weights_io

    if not weights_only(cfg):
        return None
    found = open_verified(cfg.checkpoint.load, allow_empty=True)
    if found is None:
        _starting_fresh(cfg)
    return None if found is None else weights_io.read(*found)


def _starting_fresh(cfg: RunConfig) -> None:
    """Megatron-LM's load_checkpoint: a --load with no checkpoint (missing or empty directory) starts from
    random with a warning; zeromega says so too, except for the first attempt of --load == --save."""
    if not saves_where_it_loads(cfg) and (not dist.is_initialized() or dist.get_rank() == 0):
        import warnings

        warnings.warn(f"--load {cfg.checkpoint.load}: no checkpoint there; starting from random weights at step 0, "
                      "as Megatron-LM does", UserWarning, stacklevel=2)


class CheckpointPolicy:
    """When to save, what to resume, when to stop, around the engine's checkpointer."""

    def __init__(self, cfg: RunConfig, checkpointer, global_batch: int, schedule=None, weights=None):
        self.cfg, self.c, self.ckpt = cfg, cfg.checkpoint, checkpointer
        self.global_batch, self.schedule, self.weights = global_batch, schedule, weights
        self.start_step, self.start_samples, self.saved_step, self.last_step = 0, 0, None, None
        self.stop_requested = False
        if self.c.exit_signal_handler:
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = True

    def resume(self) -> tuple[int, int]:
        """(step, consumed samples) to start from; (0, 0) for a fresh run."""
        if not self.c.load:
            return 0, 0
        if self.weights is not None:
            return self._resume_without_optimizer()
        if weights_only(self.cfg):  # finetune / no_load_optim with nothing saved yet
            return 0, 0
        resumed = self.ckpt.load(self.c.load, allow_empty=True, load_rng=not self.c.no_load_rng)
        if resumed is None:
            _starting_fresh(self.cfg)
            return 0, 0
        self.start_step, self.start_samples = resumed.step, resumed.consumed_samples
        self.saved_step = resumed.step
        return resumed.step, resumed.consumed_samples

    def _resume_without_optimizer(self) -> tuple[int, int]:
        """The weights are in the model already; no_load_optim also takes the step, data position,
        schedule and (under the saved layout) this rank's RNGs, as Megatron-LM does."""
        from zeromega.checkpoint import RNG_FILE, _rank, rng
        from zeromega.checkpoint.files import safe_load

        if self.c.finetune:
            return 0, 0
        manifest = self.weights.manifest
        if self.schedule is not None and manifest.get("scheduler") is not None:
            self.schedule.load_state_dict(manifest["scheduler"])
        rng_file = self.weights.path / RNG_FILE.format(_rank())
        if not self.c.no_load_rng and manifest["layout"] == self.ckpt._layout_meta() and rng_file.is_file():
            rng.restore(safe_load(rng_file))
        self.start_step, self.start_samples = int(manifest["step"]), int(manifest["consumed_samples"])
        self.saved_step = self.start_step
        return self.start_step, self.start_samples

    def consumed(self, step: int) -> int:
        return self.start_samples + (step - self.start_step) * self.global_batch

    def save(self, step: int) -> None:
        if self.c.save and self.saved_step != step:
            self.ckpt.save(self.c.save, step, self.consumed(step))
            self.saved_step = step

    def _signalled(self) -> bool:
        """Whether any rank got SIGTERM (all ranks must stop at the same step)."""
        flag = torch.tensor([1.0 if self.stop_requested else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def after_step(self, record) -> bool:
        """Save when due; True when the run must stop after this step."""
        step = record.step
        if self.c.interval and step % self.c.interval == 0:
            self.save(step)
        stop = bool(self.c.exit_interval and step % self.c.exit_interval == 0)
        if self.c.exit_signal_handler and self._signalled():
            stop = True
        if stop:
            self.save(step)
        self.last_step = step
        return stop

    def finish(self) -> None:
        """Megatron saves once more at the end unless the last step was just saved."""
        if self.last_step is not None:
            self.save(self.last_step)


def note(cfg: RunConfig) -> Optional[str]:
    if weights_only(cfg) and saves_where_it_loads(cfg) and cfg.checkpoint.no_load_optim:
        return ("note: --no-load-optim with --load and --save naming one directory restarts Adam at every "
                "restart too; drop --no-load-optim once this run has saved")
    return None
