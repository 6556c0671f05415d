"""Weights & Biases output of a run, as Megatron-LM's ``_set_wandb_writer`` and ``training_log`` write it.

``--wandb-project`` turns it on; ``--wandb-exp-name`` names the run (Megatron-LM
refuses an empty one); ``--wandb-save-dir`` holds its files (default
``<--save>/wandb``, Megatron-LM's; ``./wandb`` without ``--save``). One
process writes (Megatron-LM: the last rank; here rank 0 — the values are
reduced over ranks first, so they are the same). Keys are Megatron-LM's
(``lm loss``, ``learning-rate``, ``batch-size``, ``loss-scale``, ``grad-norm``,
``samples vs steps``, ``throughput``, ``lm loss validation``) at the
iteration as step. ``WANDB_MODE=offline`` writes the run to the save
directory without any network; ``wandb sync`` uploads it later.

wandb is optional: :func:`check` refuses the flag before launch when it is
not installed, with the one line that fixes it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Optional

from zeromega.config import ConfigError, RunConfig


def check(cfg: RunConfig) -> None:
    """Refuse --wandb-project without wandb installed, or without --wandb-exp-name (Megatron-LM's rule)."""
    log = cfg.logging
    if not log.wandb_project:
        return
    if not log.wandb_exp_name:
        raise ConfigError("logging.wandb_exp_name", log.wandb_exp_name, "--wandb-project needs the experiment's "
                          "name (Megatron-LM: 'Please specify the wandb experiment name!')",
                          "pass --wandb-exp-name NAME")
    if not _installed():
        raise ConfigError("logging.wandb_project", log.wandb_project, "needs the wandb package, which is not "
                          "installed", "pip install wandb (and WANDB_MODE=offline to write without network), or "
                          "drop --wandb-project")


def _installed() -> bool:
    if sys.modules.get("wandb") is not None:
        return True
    try:
        return importlib.util.find_spec("wandb") is not None
    except (ValueError, ImportError):
        return False


def save_dir(cfg: RunConfig) -> str:
    log = cfg.logging
    if log.wandb_save_dir:
        return log.wandb_save_dir
    return os.path.join(cfg.checkpoint.save, "wandb") if cfg.checkpoint.save else "wandb"


class WandB:
    """A wandb run on rank 0 (nothing elsewhere, or without --wandb-project); ``write(record)`` per step."""

    def __init__(self, cfg: RunConfig, module=None):
        import torch.distributed as dist

        self.run = None
        self._log = cfg.logging
        if not self._log.wandb_project or (dist.is_initialized() and dist.get_rank() != 0):
            return
        if module is None:
            import wandb as module
        directory = save_dir(cfg)
        os.makedirs(directory, exist_ok=True)
        entity = {"entity": self._log.wandb_entity} if self._log.wandb_entity else {}  # as Megatron-LM passes it
        self.run = module.init(dir=directory, name=self._log.wandb_exp_name, project=self._log.wandb_project,
                               config=cfg.model_dump(mode="json"), **entity)

    def write(self, record) -> None:
        if self.run is None:
            return
        values = {"lm loss": record.loss, "batch-size": record.global_batch,
                  "samples vs steps": record.consumed_samples, "iteration-time": record.step_time_s}
        optional = {"learning-rate": record.lr, "grad-norm": record.grad_norm, "loss-scale": record.loss_scale,
                    "throughput": record.tflops_per_gpu, "mfu": record.mfu,  # TFLOP/s per rank, as Megatron-LM
                    "num-zeros": record.num_zeros_in_grad, "params-norm": record.params_norm}
        values.update({k: v for k, v in optional.items() if v is not None})
        if self._log.log_memory_to_tensorboard:
            values["mem-max-allocated-bytes"] = record.peak_mem_bytes
        self.run.log(values, step=record.step)

    def evaluation(self, result: dict) -> None:
        if self.run is None:
            return
        tag = "lm loss validation" if result["kind"] == "valid" else "lm loss test"
        values = {tag: result["loss"]}
        if self._log.log_validation_ppl_to_tensorboard:
            values[f"{tag} ppl"] = result["ppl"]
        self.run.log(values, step=result["step"])

    def close(self, exit_code: Optional[int] = None) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
