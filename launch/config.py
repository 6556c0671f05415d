"""The unified run config: one validated object that drives DeepSpeed,
Megatron-Core and the launcher.

Sizes follow Megatron-Core's naming: ``tp`` tensor, ``pp`` pipeline, ``cp``
context (sequence) and ``ep`` expert parallel; ``dp`` is whatever the world
size leaves (``world = tp * pp * cp * dp``), so it is resolved against a
world size with :meth:`RunConfig.layout`, never stored.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from .errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ParallelConfig(_Section):
    tp: int = Field(1, ge=1)
    """Tensor-model-parallel size (Megatron ``--tensor-model-parallel-size``)."""
    pp: int = Field(1, ge=1)
    """Pipeline-model-parallel size."""
    cp: int = Field(1, ge=1)
    """Context (sequence) parallel size."""
    ep: int = Field(1, ge=1)
    """Expert-model-parallel size (carved out of dp x cp)."""
    sequence_parallel: bool = False
    """Megatron's tp sequence parallelism (norms/dropout sharded along the sequence)."""


class ZeroConfig(_Section):
    stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage."""


class BatchConfig(_Section):
    micro: int = Field(1, ge=1)
    """Samples per micro-batch per data-parallel rank."""
    global_: Optional[int] = Field(None, ge=1, alias="global")
    """Samples per optimizer step over all ranks (None: micro x accumulation x dp)."""
    accumulation: Optional[int] = Field(None, ge=1)
    """Micro-batches per step (None: derived from global, micro and dp)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class OptimizerConfig(_Section):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    clip_grad: float = Field(0.0, ge=0)
    """Global gradient-norm clip (0 disables)."""


class Layout(_Section):
    """Sizes resolved against a world size."""

    world: int
    tp: int
    pp: int
    cp: int
    ep: int
    dp: int
    micro: int
    accumulation: int
    global_batch: int


class RunConfig(_Section):
    parallel: ParallelConfig = ParallelConfig()
    zero: ZeroConfig = ZeroConfig()
    batch: BatchConfig = BatchConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision; fp16 uses dynamic loss scaling."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where ranks compute (auto: CUDA when present)."""
    deepspeed_extra: dict[str, Any] = Field(default_factory=dict)
    """DeepSpeed JSON keys zeromega does not model; passed through unchanged."""

    def layout(self, world_size: int) -> Layout:
        """Resolve dp and the batch arithmetic for ``world_size`` ranks, or raise ConfigError."""
        p, b = self.parallel, self.batch
        model_parallel = p.tp * p.pp * p.cp
        if world_size % model_parallel:
            raise ConfigError(
                "world_size", world_size,
                f"not divisible by tp x pp x cp = {p.tp} x {p.pp} x {p.cp} = {model_parallel}",
                f"launch a multiple of {model_parallel} processes or lower the parallel sizes",
            )
        dp = world_size // model_parallel
        if (dp * p.cp) % p.ep:
            raise ConfigError("parallel.ep", p.ep, f"does not divide dp x cp = {dp * p.cp}",
                              "choose an expert-parallel size that divides dp x cp")
        if p.sequence_parallel and p.tp == 1:
            raise ConfigError("parallel.sequence_parallel", True, "Megatron sequence parallel needs tp > 1",
                              "set tp >= 2 or turn sequence_parallel off")
        accumulation = b.accumulation
        if b.global_ is None:
            accumulation = accumulation or 1
        else:
            per_step = b.micro * dp
            if b.global_ % per_step:
                raise ConfigError(
                    "batch.global", b.global_,
                    f"not divisible by micro x dp = {b.micro} x {dp} = {per_step}",
                    f"use a global batch that is a multiple of {per_step}",
                )
            derived = b.global_ // per_step
            if accumulation is not None and accumulation != derived:
                raise ConfigError(
                    "batch.accumulation", accumulation,
                    f"global {b.global_} != micro {b.micro} x accumulation {accumulation} x dp {dp}",
                    f"set accumulation to {derived} or drop one of the three",
                )
            accumulation = derived
        return Layout(world=world_size, tp=p.tp, pp=p.pp, cp=p.cp, ep=p.ep, dp=dp, micro=b.micro,
                      accumulation=accumulation, global_batch=b.micro * accumulation * dp)
