"""The unified run config: one validated object that drives DeepSpeed,
Megatron-Core and the launcher.

Sizes follow Megatron-Core's naming: ``tp`` tensor, ``pp`` pipeline, ``cp``
context (sequence) and ``ep`` expert parallel; ``dp`` is whatever the world
size leaves (``world = tp * pp * cp * dp``), so it is resolved against a
world size with :meth:`RunConfig.layout`, never stored.

Sequence parallelism has two independent parts, as in Megatron-Core:
``parallel.sequence_parallel`` shards norms/dropout along the sequence over
the *tp* group (``sequence.mode: megatron`` when it is the only one), and
``sequence.mode`` ``ulysses | ring | usp`` splits attention over the *cp*
group, of size ``sequence.ulysses x sequence.ring``.

Every rule that needs no world size runs when the object is built
(:mod:`.rules`); :meth:`RunConfig.layout` adds the ones that do.
"""

from __future__ import annotations

import functools
import types
import typing
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, PydanticUserError, TypeAdapter, ValidationError,
                      ValidationInfo, field_validator, model_validator)
from pydantic_core import PydanticCustomError

from .errors import ConfigError

PositiveInt = Annotated[int, Field(ge=1)]
MAX_SCALE_POWER = 127
"""2**127 is the largest power of two a float32 holds (its exponent reaches 127)."""


class _Section(BaseModel):
    # allow_inf_nan=False: an infinite or NaN lr, eps, decay, timeout... is refused, never run with.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True,
                              allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """true/false where a number goes is refused (pydantic would read ``"stage": true`` as stage 1)."""
        if isinstance(value, bool) and _numeric(cls.model_fields[info.field_name].annotation):
            raise PydanticCustomError("bool_not_number", "Input should be a number, not true or false")
        return value


def _numeric(annotation) -> bool:
    """Whether a field's type takes numbers and not booleans (Optional, Annotated, Literal unwrapped)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _numeric(args[0])
    if origin is typing.Literal:
        return all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        return bool(kinds) and all(_numeric(a) for a in kinds)
    return annotation in (int, float)


class ParallelConfig(_Section):
    tp: int = Field(1, ge=1)
    """Tensor-model-parallel size (Megatron ``--tensor-model-parallel-size``)."""
    pp: int = Field(1, ge=1)
    """Pipeline-model-parallel size."""
    cp: int = Field(1, ge=1)
    """Context-parallel size: ranks sharing one sequence; equals sequence.ulysses x sequence.ring."""
    ep: int = Field(1, ge=1)
    """Expert-model-parallel size (carved out of dp x cp; with etp < tp, of tp x cp x dp / etp)."""
    etp: Optional[PositiveInt] = None
    """Expert-tensor-parallel size: tp of the expert MLPs (Megatron ``--expert-tensor-parallel-size``); None: tp."""
    vpp: Optional[PositiveInt] = None
    """Virtual pipeline stages (model chunks) per pipeline rank, for the interleaved schedule."""
    layers_per_virtual_stage: Optional[PositiveInt] = None
    """Layers in each virtual stage (Megatron ``--num-layers-per-virtual-pipeline-stage``)."""
    first_stage_layers: Optional[PositiveInt] = None
    """Layers on the first pipeline stage (Megatron ``--decoder-first-pipeline-num-layers``); the stages between
    the first and the last split the rest evenly. None: L / pp."""
    last_stage_layers: Optional[PositiveInt] = None
    """Layers on the last pipeline stage (Megatron ``--decoder-last-pipeline-num-layers``). None: L / pp."""
    embedding_in_split: bool = False
    """Count the embedding as one layer when splitting the layers over pp (Megatron
    ``--account-for-embedding-in-pipeline-split``): the first stage gets one transformer layer fewer."""
    loss_in_split: bool = False
    """Count the output layer and loss as one layer when splitting over pp (Megatron
    ``--account-for-loss-in-pipeline-split``): the last stage gets one transformer layer fewer."""
    sequence_parallel: bool = False
    """Megatron's tp sequence parallelism (norms/dropout sharded along the sequence)."""


class DDPConfig(_Section):
    """How data-parallel ranks exchange gradients and parameters: Megatron-Core's ``DistributedDataParallelConfig``
    on its engine, DeepSpeed ZeRO's counterparts on DeepSpeed's (docs/engines.md, "Data-parallel
    communication"). None: the engine's own default."""

    overlap_grad_reduce: Optional[bool] = None
    """Reduce gradients bucket by bucket from backward hooks, while the backward pass goes on
    (``--overlap-grad-reduce``). Megatron-Core engine: DDP's ``overlap_grad_reduce`` (None: off); DeepSpeed
    engine: ZeRO's ``overlap_comm`` (None: DeepSpeed's default, on for ZeRO-3 only; ZeRO-0 has no overlap)."""
    overlap_param_gather: bool = False
    """All-gather the distributed optimizer's updated parameters bucket by bucket from the next forward pass's
    pre-hooks instead of at the end of the step (``--overlap-param-gather``); needs zero.stage 1 and
    overlap_grad_reduce, as in Megatron-LM. DeepSpeed's ZeRO-1/2 gather at the end of the step."""
    grad_reduce_in_fp32: Optional[bool] = None
    """Accumulate and reduce bf16/fp16 gradients in fp32 (True) or in the parameters' dtype (False):
    ``--accumulate-allreduce-grads-in-fp32`` / ``--grad-reduce-in-bf16``. Megatron-Core engine: DDP's
    ``grad_reduce_in_fp32`` (None: Megatron-LM's rule, fp32 for bf16 and fp16 for fp16); DeepSpeed engine:
    ``communication_data_type`` fp32, with ``data_types.grad_accum_dtype`` fp32 at ZeRO-2/3 (ZeRO-0/1 accumulate
    in the parameters' dtype), or the parameters' dtype (None: DeepSpeed's default, the parameters'). Megatron
    flags without a DeepSpeed JSON set it True under ``--bf16``, as Megatron-LM's validate_args does."""
    bucket_size: Optional[PositiveInt] = None
    """Gradient elements per bucket under overlap_grad_reduce (``--ddp-bucket-size``; None: Megatron-Core's
    max(4e7, 1e6 x dp)). DeepSpeed engine: ZeRO's ``reduce_bucket_size``."""
    average_in_collective: bool = False
    """Average gradients inside the collective (ReduceOp.AVG) rather than scaling them by 1/dp before a sum
    (``--ddp-average-in-collective``; Megatron-Core engine only)."""
    num_buckets: Optional[PositiveInt] = None
    """Split each rank's parameters into this many buckets under overlap_grad_reduce: bucket_size = the rank's
    parameter count // num_buckets (``--ddp-num-buckets``, Megatron-LM's get_model); not with bucket_size.
    Megatron-Core engine only."""
    pad_buckets_for_high_nccl_busbw: bool = False
    """Pad the distributed optimizer's buckets to a multiple of lcm(dp, 128, 2**16) elements rather than
    lcm(dp, 128), for NCCL's bus bandwidth at large dp (``--ddp-pad-buckets-for-high-nccl-busbw``;
    Megatron-Core engine: DDP's own field, same values)."""
    align_grad_reduce: bool = True
    """Under overlap_grad_reduce, every pipeline stage starts its last reduces when its last backward ends, from
    the schedule (True), or each stage as its buckets fill (``--no-align-grad-reduce``). Megatron-Core engine."""
    align_param_gather: bool = True
    """Under overlap_param_gather with virtual stages, the schedule starts each chunk's all-gather in turn
    (True), or each chunk's forward pre-hook starts its own (``--no-align-param-gather``). Megatron-Core
    engine; without virtual stages Megatron-LM turns it off."""

    def grads_in_fp32(self, precision: str) -> bool:
        """Whether Megatron-Core's engine keeps an fp32 gradient buffer: grad_reduce_in_fp32, or unset
        Megatron-LM's rule (validate_args): fp32 for bf16 (and fp32) runs, the parameters' fp16 for fp16."""
        return self.grad_reduce_in_fp32 if self.grad_reduce_in_fp32 is not None else precision != "fp16"


class SequenceConfig(_Section):
    mode: Literal["none", "megatron", "ulysses", "ring", "usp"] = "none"
    """How the sequence is split: megatron = tp-sp only; ulysses/ring/usp split attention over the cp group."""
    ulysses: Optional[PositiveInt] = None
    """Ulysses (all-to-all over heads) size; the inner axis of usp. None: derived from mode and cp."""
    ring: Optional[PositiveInt] = None
    """Ring-attention (zigzag, point-to-point) size; the outer axis of usp. None: derived from mode and cp."""


class MoEConfig(_Section):
    num_experts: Optional[PositiveInt] = None
    """Experts per MoE layer (Megatron ``--num-experts``); None: a dense model."""
    topk: PositiveInt = 2
    """Experts each token is routed to (``--moe-router-topk``)."""
    ffn_hidden_size: Optional[PositiveInt] = None
    """Hidden size of each expert's MLP (``--moe-ffn-hidden-size``; None: model.ffn_hidden_size)."""
    aux_loss_coeff: float = Field(0.0, ge=0)
    """Weight of the load-balancing auxiliary loss (``--moe-aux-loss-coeff``)."""
    expert_capacity_factor: Optional[float] = Field(None, gt=0)
    """Tokens an expert takes, as a multiple of its even share; the rest are dropped
    (``--moe-expert-capacity-factor``; None: dropless)."""
    token_dispatcher_type: Literal["allgather", "alltoall"] = "allgather"
    """How tokens reach experts on other ep ranks (``--moe-token-dispatcher-type``)."""
    router_load_balancing_type: Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"] = "aux_loss"
    """The router's load balancing (``--moe-router-load-balancing-type``, Megatron-Core's
    ``moe_router_load_balancing_type``): ``aux_loss`` (GShard / Switch, per micro-batch, weighted by
    aux_loss_coeff: 0 adds nothing), ``seq_aux_loss`` (per sample), ``global_aux_loss`` (per global batch),
    ``sinkhorn`` (S-BASE; needs aux_loss_coeff 0) or ``none``."""
    layer_freq: Union[PositiveInt, list[Literal[0, 1]]] = 1
    """Which layers are MoE layers (``--moe-layer-freq``): N puts an MoE layer first in every N layers
    (the others dense); a list of 0/1 per layer gives the pattern (Megatron-Core's ``moe_layer_freq``)."""
    router_pre_softmax: bool = False
    """Softmax over all experts before choosing the top k (``--moe-router-pre-softmax``); Megatron-Core needs it
    for top-1, and Megatron-DeepSpeed's top-1 gating is this."""
    token_drop_policy: Literal["probs", "position"] = "probs"
    """Which tokens an expert over capacity drops (``--moe-token-drop-policy``, only with
    expert_capacity_factor): ``probs`` the lowest-probability ones, ``position`` the last ones."""
    grouped_gemm: bool = False
    """All local experts in one grouped GEMM (``--moe-grouped-gemm``; Megatron-Core's ``moe_grouped_gemm``):
    CUDA with TransformerEngine or the grouped_gemm package only; elsewhere the experts run one by one."""


class OffloadConfig(_Section):
    device: Literal["none", "cpu", "nvme"] = "none"
    """Where the state lives between uses (DeepSpeed ``offload_*.device``)."""
    nvme_path: Optional[str] = None
    """Directory on a fast local NVMe drive; required when device is nvme."""
    pin_memory: bool = True
    """Page-locked CPU buffers: faster transfers, but count against ``ulimit -l``."""


class AioConfig(_Section):
    """DeepSpeed's async-I/O settings for NVMe offload (its top-level ``aio`` block)."""

    block_size: PositiveInt = 1048576
    """Bytes per I/O request."""
    queue_depth: PositiveInt = 8
    """Requests in flight per thread."""
    intra_op_parallelism: PositiveInt = 1
    """I/O threads per swap operation."""
    single_submit: bool = False
    """Submit requests one by one instead of in batches."""
    overlap_events: bool = True
    """Overlap request submission with completion polling."""
    use_gds: bool = False
    """GPUDirect Storage (NVMe to GPU without a CPU bounce)."""


class ZeroConfig(_Section):
    stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    offload_optimizer: OffloadConfig = OffloadConfig()
    """Optimizer-state offload (ZeRO-Offload / ZeRO-Infinity); needs stage >= 1."""
    offload_param: OffloadConfig = OffloadConfig()
    """Parameter offload; needs stage 3."""
    aio: AioConfig = AioConfig()
    """Async I/O used by nvme offload."""


class LossScalingConfig(_Section):
    """fp16 loss scaling (DeepSpeed's ``fp16`` block); unused under bf16/fp32. Defaults are Megatron-LM's;
    a DeepSpeed JSON's unstated keys take DeepSpeed's (initial_scale_power 16)."""

    loss_scale: float = Field(0.0, ge=0)
    """Static loss scale; 0 selects dynamic scaling."""
    initial_scale_power: int = Field(32, ge=0)
    """Dynamic scaling starts at 2**initial_scale_power (``--initial-loss-scale``)."""

    @field_validator("initial_scale_power")
    @classmethod
    def _finite_fp32_scale(cls, value: int) -> int:
        """The scale multiplies fp32 losses and gradients: 2**128 and above is inf there (largest finite fp32 power
        of two: 2**127), so every gradient would overflow and every step be skipped."""
        if value > MAX_SCALE_POWER:
            raise ConfigError("loss_scaling.initial_scale_power", value, f"2**{value} is not a finite fp32 number "
                              "(the largest power of two that is: 2**127), so every scaled gradient would overflow",
                              "use at most 127 (fp16.initial_scale_power in a DeepSpeed JSON, --initial-loss-scale "
                              "at most 2**127; DeepSpeed's default is 16, Megatron's 2**32)")
        return value
    window: PositiveInt = 1000
    """Overflow-free steps before the scale is raised."""
    hysteresis: PositiveInt = 2
    """Overflows tolerated before the scale is lowered."""
    min_scale: float = Field(1.0, gt=0)
    """Floor of the dynamic scale."""


class BatchConfig(_Section):
    micro: Optional[PositiveInt] = None
    """Samples per micro-batch per data-parallel rank (None: global / (accumulation x dp), else 1)."""
    global_: Optional[PositiveInt] = Field(None, alias="global")
    """Samples per optimizer step over all ranks (None: micro x accumulation x dp)."""
    accumulation: Optional[PositiveInt] = None
    """Micro-batches per step (None: derived from global, micro and dp)."""
    rampup: Optional[tuple[PositiveInt, PositiveInt, Annotated[int, Field(ge=0)]]] = None
    """Batch-size ramp-up START INCREMENT SAMPLES (``--rampup-batch-size``): the global batch grows from START by
    INCREMENT over SAMPLES samples to global, by Megatron-Core's num_microbatches_calculator."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True,
                              use_attribute_docstrings=True)


class OptimizerConfig(_Section):
    """AdamW; defaults are Megatron-LM's, except lr (DeepSpeed's Adam default; Megatron-LM has none)."""

    lr: float = Field(1e-3, gt=0)
    """Peak learning rate (``--lr``)."""
    weight_decay: float = Field(0.01, ge=0)
    """Decoupled (AdamW) weight decay (``--weight-decay``)."""
    beta1: float = Field(0.9, ge=0, lt=1)
    """Adam first-moment decay (``--adam-beta1``)."""
    beta2: float = Field(0.999, ge=0, lt=1)
    """Adam second-moment decay (``--adam-beta2``)."""
    eps: float = Field(1e-8, gt=0)
    """Adam denominator epsilon (``--adam-eps``)."""
    clip_grad: float = Field(1.0, ge=0)
    """Global gradient-norm clip, 0 disables (``--clip-grad``; DeepSpeed ``gradient_clipping``)."""
    decoupled_lr: Optional[float] = Field(None, gt=0)
    """Peak lr of the input embedding and output layer (``--decoupled-lr``; None: lr)."""
    decoupled_min_lr: Optional[float] = Field(None, ge=0)
    """Floor of their decay (``--decoupled-min-lr``; None: min_lr)."""
    deepspeed_type: Optional[str] = None
    """How a DeepSpeed JSON spelled this optimizer's type when not "AdamW" (``"Adam"``, ``"adamw"``): DeepSpeed 0.19
    runs "Adam" as AdamW unless ``adam_w_mode`` is false, so the run is the same; a written file keeps the
    spelling. None: "AdamW"."""

    @field_validator("deepspeed_type")
    @classmethod
    def _an_adam(cls, value: Optional[str]) -> Optional[str]:
        """zeromega's optimizer is AdamW: only DeepSpeed's spellings of it are a choice of words."""
        if value is not None and value.lower() not in ("adam", "adamw"):
            raise ConfigError("optimizer.deepspeed_type", value, "zeromega's optimizer is AdamW; this field only "
                              "keeps how a DeepSpeed JSON spelled it",
                              'use "Adam" or "AdamW" (any case), or leave it out')
        return value


class SchedulerConfig(_Section):
    decay_style: Literal["constant", "linear", "cosine", "inverse-square-root", "WSD"] = "linear"
    """Learning-rate decay after warmup (Megatron ``--lr-decay-style``)."""
    deepspeed_type: Optional[Literal["WarmupLR", "WarmupDecayLR", "WarmupCosineLR"]] = None
    """DeepSpeed scheduler class that runs the schedule (a DeepSpeed JSON's ``scheduler.type``);
    None: Megatron-Core's OptimizerParamScheduler."""
    warmup_iters: int = Field(0, ge=0)
    """Steps of warmup from warmup_init_lr to the peak lr."""
    warmup_init_lr: float = Field(0.0, ge=0)
    """Learning rate warmup starts from (Megatron ``--lr-warmup-init``, DeepSpeed ``warmup_min_lr``)."""
    warmup_style: Literal["linear", "log"] = "linear"
    """Shape of the warmup ramp; log is DeepSpeed's default, Megatron only has linear."""
    min_lr: float = Field(0.0, ge=0)
    """Floor the decay ends at."""
    train_iters: Optional[PositiveInt] = None
    """Optimizer steps in the run (Megatron ``--train-iters``, DeepSpeed ``total_num_steps``)."""
    decay_iters: Optional[PositiveInt] = None
    """Steps the decay spans (None: train_iters)."""
    train_samples: Optional[PositiveInt] = None
    """Samples in the run, instead of train_iters (``--train-samples``; Megatron-LM: the steps are
    train_samples // global batch, or counted through the batch-size ramp-up; the schedule runs on samples)."""
    decay_samples: Optional[PositiveInt] = None
    """Samples the decay spans under train_samples (``--lr-decay-samples``; None: train_samples)."""
    warmup_samples: int = Field(0, ge=0)
    """Samples of warmup under train_samples (``--lr-warmup-samples``)."""
    warmup_fraction: Optional[float] = Field(None, ge=0, lt=1)
    """Warmup as a fraction of the decay span (``--lr-warmup-fraction``; excludes warmup_iters/samples)."""
    train_tokens: Optional[PositiveInt] = None
    """Megatron-DeepSpeed's ``--train-tokens``: training also stops before a step once this many tokens are
    consumed."""
    decay_tokens: Optional[PositiveInt] = None
    """Megatron-DeepSpeed's ``--lr-decay-tokens``: the decay runs on consumed tokens."""
    warmup_tokens: Optional[int] = Field(None, ge=0)
    """Megatron-DeepSpeed's ``--lr-warmup-tokens``: the warmup runs on consumed tokens."""
    override: bool = False
    """On resume, this run's schedule values replace the checkpoint's (``--override-opt_param-scheduler``)."""
    use_checkpoint: bool = False
    """On resume, the checkpoint's schedule values replace this run's (``--use-checkpoint-opt_param-scheduler``);
    with neither switch they must agree, as in Megatron-LM."""
    manual_gc: bool = False
    """Python's automatic garbage collector is off during training and collects only at the points below, so
    every rank pauses at the same step (``--manual-gc``, Megatron-LM's TrainingConfig)."""
    manual_gc_interval: int = Field(0, ge=0)
    """With manual_gc, collect every this many steps (``--manual-gc-interval``; 0: only at the start and around
    evaluations)."""
    manual_gc_eval: bool = True
    """With manual_gc, collect before and after each evaluation (``--no-manual-gc-eval`` turns it off)."""
    check_for_nan_in_loss_and_grad: bool = False
    """Stop the run at the first step whose loss or gradient norm is NaN or infinite, naming it, instead of
    counting a NaN iteration and going on. Megatron-LM's ``--check-for-nan-in-loss-and-grad`` is on by default
    (except fp16 with dynamic loss scaling, whose scaler feeds on such steps), so Megatron-LM flags without a
    DeepSpeed JSON turn it on; ``--no-check-for-nan-in-loss-and-grad`` turns it off. Off here by default, as
    DeepSpeed has no such check."""
    empty_unused_memory_level: Literal[0, 1, 2] = 0
    """Return the CUDA allocator's unused cached blocks (``--empty-unused-memory-level``, Megatron-LM's points):
    1 after each step's forward/backward and each evaluation step, 2 also after the optimizer step. On CPU there
    is no allocator cache: nothing happens."""


class RecomputeConfig(_Section):
    granularity: Optional[Literal["selective", "full"]] = None
    """Activation recomputation: selective (attention core only) or full layers; None: off."""
    method: Optional[Literal["uniform", "block"]] = None
    """Full recompute: uniform (chunks of num_layers) or block (first num_layers per stage)."""
    num_layers: Optional[PositiveInt] = None
    """Layers per chunk (uniform) or per pipeline stage (block) recomputed under full."""
    distribute_saved_activations: bool = False
    """Full recompute at tp > 1 without sequence parallel: each tp rank keeps 1/tp of every recomputed chunk's
    input, gathered again before its recompute (Megatron-Core's ``distribute_saved_activations``;
    ``--distribute-saved-activations``, Megatron-DeepSpeed's ``--partition-activations``)."""


class CheckpointConfig(_Section):
    save: Optional[str] = None
    """Directory checkpoints are written to (None: never saved)."""
    load: Optional[str] = None
    """Directory to resume from (None: start fresh); the same directory as save makes one command line
    serve the first attempt and every restart."""
    interval: Optional[PositiveInt] = None
    """Steps between saves; needs save."""
    exit_interval: Optional[PositiveInt] = None
    """Save and exit after a step divisible by this (``--exit-interval``)."""
    exit_signal_handler: bool = False
    """On SIGTERM, save after the current step and exit (``--exit-signal-handler``)."""
    exit_duration_in_mins: Optional[float] = Field(None, gt=0)
    """Save (with save) and exit after the first step that ends past this many minutes of the run's wall time,
    every rank at the same step (``--exit-duration-in-mins``; Megatron-LM takes whole minutes, fractions are
    accepted here)."""
    finetune: bool = False
    """Load only the weights from load (any layout, either engine); start at step 0 with a fresh optimizer,
    scheduler, data position and RNGs (``--finetune``)."""
    no_load_optim: bool = False
    """Load the weights, step, data position and scheduler, not the optimizer (``--no-load-optim``)."""
    no_load_rng: bool = False
    """Keep this run's RNG states instead of the checkpoint's (``--no-load-rng``)."""


class DataConfig(_Section):
    path: Optional[str] = None
    """Prefix of a Megatron ``.bin/.idx`` dataset (``--data-path``); None: the project's own corpus."""
    blend: Optional[list[str]] = None
    """Several datasets in one ``--data-path``, as Megatron-LM reads it: ``w1 p1 w2 p2 ...`` (weighted) or
    ``p1 p2 ...`` (weighted by size); divided by ``split``."""
    split: Optional[str] = None
    """Train/valid/test proportions (``--split``); None: Megatron-LM's legacy default "969, 30, 1"."""
    train_path: Optional[list[str]] = None
    """The train split's own prefix or blend (``--train-data-path``; ``split`` does not apply)."""
    valid_path: Optional[list[str]] = None
    """The validation split's own prefix or blend (``--valid-data-path``)."""
    test_path: Optional[list[str]] = None
    """The test split's own prefix or blend (``--test-data-path``)."""
    cache_path: Optional[str] = None
    """Directory of Megatron's shuffle/sample index cache (``--data-cache-path``); None: beside the data."""
    mock: bool = False
    """Megatron-Core's ``MockGPTDataset`` instead of files (``--mock-data``)."""
    eod_mask_loss: bool = False
    """No loss on end-of-document tokens (``--eod-mask-loss``; Megatron-Core's GPTDataset sets the mask)."""
    reset_position_ids: bool = False
    """Position ids restart after each end-of-document token (``--reset-position-ids``)."""
    mmap_bin_files: bool = True
    """``.bin`` files are memory-mapped; ``--no-mmap-bin-files`` reads them with file reads instead
    (Megatron-Core's ``mmap_bin_files``: for filesystems where mmap is slow)."""
    tokenizer_type: Optional[Literal["NullTokenizer", "GPT2BPETokenizer", "HuggingFaceTokenizer",
                                     "SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer",
                                     "TikTokenizer"]] = None
    """The tokenizer the data was made with (``--tokenizer-type``, from local files); None: zeromega's byte
    tokenizer (257 ids), the project's corpus."""
    vocab_file: Optional[str] = None
    """GPT-2 BPE ``vocab.json`` (``--vocab-file``)."""
    merge_file: Optional[str] = None
    """GPT-2 BPE ``merges.txt`` (``--merge-file``)."""
    tokenizer_model: Optional[str] = None
    """A Hugging Face tokenizer directory, a SentencePiece ``.model`` file or a tiktoken ``.json``
    (``--tokenizer-model``)."""
    tiktoken_pattern: Optional[Literal["v1", "v2"]] = None
    """TikTokenizer's pre-tokenizing regex (``--tiktoken-pattern``; Megatron-LM's training asserts one is given)."""
    tiktoken_num_special_tokens: PositiveInt = 1000
    """TikTokenizer's special ids 0..N-1, before the file's ranks (``--tiktoken-num-special-tokens``)."""
    tokenizer_special_tokens: Optional[list[str]] = None
    """TikTokenizer's named special tokens (``--tokenizer-special-tokens``; ``--tiktoken-special-tokens`` is
    Megatron-LM's deprecated spelling); None: ``<unk> <s> </s> <mask> <pad> <cls> <sep>``."""

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        """Megatron-LM's rules: --data-path excludes the per-split paths; --mock-data reads no files."""
        per_split = [f"data.{name}_path" for name in ("train", "valid", "test") if getattr(self, f"{name}_path")]
        whole = [name for name, value in (("data.path", self.path), ("data.blend", self.blend)) if value]
        if len(whole) == 2:
            raise ConfigError("data.blend", self.blend, "and data.path both name the data", "state one of them")
        if whole and per_split:
            raise ConfigError(per_split[0], getattr(self, per_split[0][5:]), f"cannot go with {whole[0]} "
                              "(Megatron-LM: --data-path excludes --train/valid/test-data-path)", "pass one of them")
        if self.mock and (whole or per_split):
            raise ConfigError("data.mock", True, f"reads no files, but {(whole + per_split)[0]} names some",
                              "drop --mock-data or the data paths")
        needs = {"GPT2BPETokenizer": ("vocab_file", "merge_file"), "HuggingFaceTokenizer": ("tokenizer_model",),
                 "SentencePieceTokenizer": ("tokenizer_model",), "GPTSentencePieceTokenizer": ("tokenizer_model",),
                 "Llama2Tokenizer": ("tokenizer_model",), "TikTokenizer": ("tokenizer_model", "tiktoken_pattern")}
        if self.tokenizer_type is None:
            given = [name for name in ("vocab_file", "merge_file", "tokenizer_model") if getattr(self, name)]
            if given:  # the byte tokenizer would leave them unread
                raise ConfigError(f"data.{given[0]}", getattr(self, given[0]), "names a tokenizer file, but no "
                                  "--tokenizer-type says which tokenizer reads it", "add --tokenizer-type "
                                  "(GPT2BPETokenizer for vocab.json + merges.txt)")
        for name in needs.get(self.tokenizer_type, ()):  # Megatron-LM's build_tokenizer asserts them
            if getattr(self, name) is None:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"data.{name}", None, f"--tokenizer-type {self.tokenizer_type} needs {flag}",
                                  f"pass {flag} v1 or v2" if name == "tiktoken_pattern" else
                                  f"pass {flag} (a local file; zeromega downloads nothing)")
        return self


class LoggingConfig(_Section):
    interval: PositiveInt = 100
    """Steps between log lines (``--log-interval``; DeepSpeed ``steps_per_print``)."""
    metrics_path: Optional[str] = None
    """JSON-lines file with one record per step, written by rank 0 (``--metrics-out``)."""
    progress: bool = True
    """A progress bar on rank 0 (``--no-progress`` turns it off)."""
    eval_interval: Optional[PositiveInt] = None
    """Steps between evaluations on the validation split (``--eval-interval``); None: no evaluation (Megatron-LM
    0.16 cannot size its validation set without it either). With it, validation also runs after the last step
    and the test split once at the end, as Megatron-LM's pretrain does."""
    eval_iters: Annotated[int, Field(ge=0)] = 100
    """Global batches per evaluation, of the validation and of the test split (``--eval-iters``); 0: none."""
    tensorboard_dir: Optional[str] = None
    """TensorBoard event files go here, written by rank 0 (``--tensorboard-dir``; Megatron-LM writes from the last
    rank: the values are reduced over ranks, so they are the same): lm loss, learning-rate, batch-size,
    grad-norm every step, validation loss after each evaluation (test: ``lm loss test``)."""
    tensorboard_log_interval: PositiveInt = 1
    """Steps between TensorBoard training scalars (``--tensorboard-log-interval``)."""
    tensorboard_queue_size: PositiveInt = 1000
    """Events pending before the writer flushes (``--tensorboard-queue-size``; SummaryWriter's max_queue)."""
    log_loss_scale_to_tensorboard: bool = True
    """``loss-scale`` in TensorBoard (``--no-log-loss-scale-to-tensorboard`` turns it off; 1 without fp16)."""
    log_validation_ppl_to_tensorboard: bool = False
    """``lm loss validation ppl`` in TensorBoard too (``--log-validation-ppl-to-tensorboard``)."""
    log_memory_to_tensorboard: bool = False
    """``mem-max-allocated-bytes`` (peak over ranks in the step; on CUDA also reserved/allocated bytes and
    allocation count, as Megatron-LM) in TensorBoard (``--log-memory-to-tensorboard``)."""
    log_timers_to_tensorboard: bool = False
    """``iteration-time`` (seconds) in TensorBoard (``--log-timers-to-tensorboard``)."""
    log_world_size_to_tensorboard: bool = False
    """``world-size`` in TensorBoard (``--log-world-size-to-tensorboard``)."""
    log_params_norm: bool = False
    """The L2 norm of all parameters after each step (``--log-params-norm``): ``params norm`` in the log line,
    ``params-norm`` in TensorBoard and wandb, ``params_norm`` in the metrics file. Over the whole model: tp shards
    and pp stages summed, tp-replicated and shared (tied embedding) parameters once, ZeRO partitions summed."""
    log_num_zeros_in_grad: bool = False
    """The number of zero entries in the step's gradients (``--log-num-zeros-in-grad``): ``num zeros`` in the log
    line, ``num-zeros`` in TensorBoard and wandb, ``num_zeros_in_grad`` in the metrics file."""
    log_batch_size_to_tensorboard: bool = False
    """Megatron-DeepSpeed's ``--log-batch-size-to-tensorboard``: its ``batch-size/batch-size`` tags (against steps,
    samples and tokens) besides Megatron-LM's ``batch-size``, which is always written."""
    log_optimizer_states_to_tensorboard: bool = False
    """Megatron-DeepSpeed's ``--log-optimizer-states-to-tensorboard``: L2 and L1 norms and largest magnitude of
    Adam's first and second moments (and its square root) and of the optimizer's parameters, as
    ``optimizer/momentum_l2`` etc., every ``tensorboard_log_interval`` steps."""
    log_throughput: bool = False
    """``throughput per GPU (TFLOP/s/GPU)`` in the log line (``--log-throughput``; the metrics file always has
    tflops_per_gpu and mfu)."""
    wandb_project: Optional[str] = None
    """Weights & Biases project, written by rank 0 (``--wandb-project``; needs the wandb package)."""
    wandb_exp_name: Optional[str] = None
    """Weights & Biases run name (``--wandb-exp-name``; required with wandb_project, as in Megatron-LM)."""
    wandb_save_dir: Optional[str] = None
    """Where wandb writes (``--wandb-save-dir``; None: <checkpoint.save>/wandb, else ./wandb)."""
    wandb_entity: Optional[str] = None
    """Weights & Biases entity (team or user) the run goes to (``--wandb-entity``; None: wandb's default)."""
    profile: bool = False
    """Profile steps profile_step_start..profile_step_end with torch.profiler (``--profile``; Megatron-LM's nsys
    mode needs CUDA and an nsys launch, so zeromega always runs torch's profiler, as ``--use-pytorch-profiler``)."""
    profile_step_start: Annotated[int, Field(ge=0)] = 10
    """First profiled step (``--profile-step-start``)."""
    profile_step_end: Annotated[int, Field(ge=0)] = 12
    """Profiling stops at this step (``--profile-step-end``)."""
    profile_ranks: list[Annotated[int, Field(ge=0)]] = [0]
    """Global ranks that profile (``--profile-ranks``)."""
    profile_dir: Optional[str] = None
    """Where the trace goes (zeromega's ``--profile-dir``; None: tensorboard_dir, as Megatron-LM)."""


class LaunchConfig(_Section):
    nproc_per_node: Optional[PositiveInt] = None
    """Processes per node (None: given on the command line)."""
    nnodes: PositiveInt = 1
    """Nodes in the job."""
    hostfile: Optional[str] = None
    """DeepSpeed hostfile (``host slots=N`` lines) for multi-node jobs."""
    distributed_timeout_minutes: float = Field(10.0, gt=0)
    """A collective waiting longer than this fails, so a hung or dead rank ends the job (Megatron
    ``--distributed-timeout-minutes``; fractions allowed)."""


class ModelConfig(_Section):
    """The model's shape, as far as known; rules that need a missing value are skipped."""

    num_layers: Optional[PositiveInt] = None
    """Transformer layers."""
    hidden_size: Optional[PositiveInt] = None
    """Model width."""
    ffn_hidden_size: Optional[PositiveInt] = None
    """MLP width (None: 4 x hidden_size)."""
    num_attention_heads: Optional[PositiveInt] = None
    """Query heads."""
    num_query_groups: Optional[PositiveInt] = None
    """Key/value heads under grouped-query attention (None: one per query head)."""
    seq_length: Optional[PositiveInt] = None
    """Tokens per sample."""
    max_position_embeddings: Optional[PositiveInt] = None
    """Positions the embedding covers (None: seq_length)."""
    vocab_size: Optional[PositiveInt] = None
    """Vocabulary size before padding (None: the tokenizer's; every token id of the data must be below it)."""
    make_vocab_size_divisible_by: PositiveInt = 128
    """Pad the vocabulary to a multiple of lcm(this, tp): one size at every tp that divides it. Megatron-LM pads to
    ``--make-vocab-size-divisible-by`` x tp, so its flag N at tp T is read as N x T."""
    hidden_dropout: float = Field(0.1, ge=0, lt=1)
    """Dropout after attention and MLP."""
    attention_dropout: float = Field(0.1, ge=0, lt=1)
    """Dropout on attention probabilities."""
    init_method_std: float = Field(0.02, gt=0)
    """Standard deviation of the weights' normal init."""
    position_embedding_type: Literal["learned_absolute", "rope"] = "learned_absolute"
    """Learned absolute positions or rotary embeddings."""
    untie_embeddings_and_output_weights: bool = False
    """Separate output layer instead of the word embedding's transpose."""
    swiglu: bool = False
    """SwiGLU MLP (``--swiglu``): Megatron-Core's ``gated_linear_unit`` with ``activation_func`` silu; fc1 is
    one [2 x ffn, hidden] weight (gate and up halves). Unstated ffn_hidden_size is then Megatron-LM's
    ``int(4 x hidden x 2 / 3 / 64) x 64``."""
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    """The norms' kind (``--normalization``; Megatron-Core's ``normalization``). RMSNorm has no bias."""
    add_bias_linear: bool = True
    """Biases in every linear layer (QKV, attention output, both MLP layers); ``--disable-bias-linear``
    clears it (Megatron-Core's ``add_bias_linear``). An MoE model keeps them too (the router's and every
    expert's), at expert tensor parallel 1 only (Megatron-Core's rule, checked before launch)."""
    kv_channels: Optional[PositiveInt] = None
    """Width of each attention head (``--kv-channels``; None: hidden_size / num_attention_heads)."""
    rotary_base: PositiveInt = 10000
    """Base of the rotary embeddings' frequencies (``--rotary-base``; Llama-3: 500000)."""
    rotary_percent: float = Field(1.0, gt=0, le=1)
    """Fraction of each head's channels the rotary embeddings rotate (``--rotary-percent``)."""
    # Kernel and precision choices (Megatron-Core's TransformerConfig fields of the same names). The config
    # keeps what was asked for; integrations/megatron/accel.py decides what this device runs, and says so.
    bias_activation_fusion: bool = False
    """Megatron-Core's fused bias + activation (Megatron-LM's default: on, unless ``--no-bias-gelu-fusion`` /
    ``--no-bias-swiglu-fusion``, or no biases under GELU). For GELU it computes the tanh approximation of GELU
    (``bias_gelu_impl``), not erf GELU: another function; for SwiGLU the same values. zeromega's own config
    default: off (erf GELU). MoE experts cannot fuse bias + GELU: such a model runs tanh GELU unfused."""
    bias_dropout_fusion: bool = False
    """Megatron-Core's fused bias + dropout + residual add (Megatron-LM's default: on, ``--no-bias-dropout-fusion``
    clears it); the same values as the unfused path."""
    masked_softmax_fusion: bool = False
    """Megatron's fused scale + mask + softmax CUDA kernel (Megatron-LM's default: on, ``--no-masked-softmax-fusion``
    clears it). Needs CUDA and its extension; elsewhere the torch softmax runs (same values)."""
    cross_entropy_loss_fusion: bool = False
    """Megatron-Core's fused cross entropy (``--cross-entropy-loss-fusion``): the same loss; the native
    implementation hands back the logits' gradient rounded to bf16, whatever the precision."""
    cross_entropy_fusion_impl: Literal["native", "te"] = "native"
    """Its implementation (``--cross-entropy-fusion-impl``): Megatron-Core's torch code, or TransformerEngine's."""
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    """Layer implementation (``--transformer-impl``): Megatron-Core's local spec, or TransformerEngine's layers
    (CUDA with TransformerEngine only). Megatron-LM's default is transformer_engine; zeromega's is local."""
    attention_backend: Literal["auto", "flash", "fused", "unfused", "local"] = "auto"
    """TransformerEngine's attention backend (``--attention-backend``; Megatron-Core's ``AttnBackend``)."""
    fp8: Optional[Literal["e4m3", "hybrid"]] = None
    """fp8 GEMMs through TransformerEngine (``--fp8-format``; compute capability 8.9 or newer)."""
    fp8_amax_history_len: PositiveInt = 1
    """fp8 scaling's amax history (``--fp8-amax-history-len``)."""
    fp8_amax_compute_algo: Literal["most_recent", "max"] = "most_recent"
    """fp8 scaling's amax choice (``--fp8-amax-compute-algo``)."""
    fp8_param: bool = False
    """Keep weights in fp8 and gather them in fp8 (``--fp8-param-gather``)."""


class Layout(_Section):
    """Sizes resolved against a world size."""

    world: int
    """Ranks in the job."""
    tp: int
    """Tensor-parallel size."""
    pp: int
    """Pipeline-parallel size."""
    cp: int
    """Context-parallel size (ulysses x ring)."""
    ep: int
    """Expert-parallel size."""
    etp: int
    """Expert-tensor-parallel size (tp of the expert MLPs); etp x ep x expert-dp = tp x cp x dp."""
    dp: int
    """Data-parallel size: world / (tp x pp x cp)."""
    micro: int
    """Samples per micro-batch per dp rank."""
    accumulation: int
    """Micro-batches per optimizer step."""
    global_batch: int
    """micro x accumulation x dp."""
    ulysses: int = 1
    """Ulysses size inside cp."""
    ring: int = 1
    """Ring size inside cp."""
    vpp: Optional[int] = None
    """Virtual pipeline stages per pp rank."""


class RunConfig(_Section):
    parallel: ParallelConfig = ParallelConfig()
    """Parallel sizes."""
    sequence: SequenceConfig = SequenceConfig()
    """Sequence parallelism: mode and sizes."""
    moe: MoEConfig = MoEConfig()
    """Mixture of experts."""
    ddp: DDPConfig = DDPConfig()
    """Data-parallel gradient and parameter communication (overlap, buckets, reduce dtype)."""
    zero: ZeroConfig = ZeroConfig()
    """ZeRO stage and offload."""
    batch: BatchConfig = BatchConfig()
    """Batch arithmetic."""
    optimizer: OptimizerConfig = OptimizerConfig()
    """AdamW hyper-parameters and gradient clipping."""
    scheduler: SchedulerConfig = SchedulerConfig()
    """Learning-rate schedule."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision; fp16 uses loss_scaling."""
    loss_scaling: LossScalingConfig = LossScalingConfig()
    """fp16 loss scaling."""
    recompute: RecomputeConfig = RecomputeConfig()
    """Activation recomputation."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Checkpoint directories and interval."""
    logging: LoggingConfig = LoggingConfig()
    """Log interval and metrics file."""
    launch: LaunchConfig = LaunchConfig()
    """Processes, nodes, hostfile."""
    model: ModelConfig = ModelConfig()
    """Model shape, for validation and for Megatron-Core's TransformerConfig."""
    data: DataConfig = DataConfig()
    """Training data."""
    seed: int = Field(1234, ge=0)
    """Seed of the weights' init, dropout and data order (``--seed``)."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where ranks compute (auto: CUDA when present)."""
    deepspeed_extra: dict[str, Any] = Field(default_factory=dict)
    """DeepSpeed JSON keys zeromega does not model; passed through unchanged."""

    @model_validator(mode="after")
    def _resolve_and_check(self) -> "RunConfig":
        from . import rules

        rules.resolve_sequence(self)
        rules.check(self)
        return self

    def layout(self, world_size: int) -> Layout:
        """Resolve dp and the batch arithmetic for ``world_size`` ranks, or raise ConfigError."""
        from . import rules

        rules.check(self)  # again: sections may have been assigned to since construction
        p = self.parallel
        model_parallel = p.tp * p.pp * p.cp
        if world_size % model_parallel:
            raise ConfigError(
                "world_size", world_size,
                f"not divisible by tp x pp x cp = {p.tp} x {p.pp} x {p.cp} = {model_parallel}",
                f"launch a multiple of {model_parallel} processes or lower the parallel sizes",
            )
        dp = world_size // model_parallel
        etp = p.etp or p.tp
        if etp == p.tp and (dp * p.cp) % p.ep:
            raise ConfigError("parallel.ep", p.ep, f"does not divide dp x cp = {dp * p.cp}",
                              "choose an expert-parallel size that divides dp x cp")
        # Expert layers regroup each pipeline stage's tp x cp x dp ranks as etp x ep x expert-dp.
        if (p.tp * p.cp * dp) % (etp * p.ep):
            raise ConfigError("parallel.etp", etp, f"x ep {p.ep} = {etp * p.ep} does not divide the "
                              f"tp x cp x dp = {p.tp * p.cp * dp} ranks of a pipeline stage",
                              "choose etp and ep whose product divides tp x cp x dp")
        micro, accumulation = resolve_batch(self.batch, dp)
        return Layout(world=world_size, tp=p.tp, pp=p.pp, cp=p.cp, ep=p.ep, etp=etp, dp=dp, micro=micro,
                      accumulation=accumulation, global_batch=micro * accumulation * dp,
                      ulysses=self.sequence.ulysses or 1, ring=self.sequence.ring or 1, vpp=self._virtual_stages())

    def _virtual_stages(self) -> Optional[int]:
        """vpp, or the layers per pp rank over ``--num-layers-per-virtual-pipeline-stage`` (Megatron-LM's
        way of asking for the interleaved schedule)."""
        p, layers = self.parallel, self.model.num_layers
        if p.vpp is None and p.layers_per_virtual_stage and layers:
            return layers // p.pp // p.layers_per_virtual_stage
        return p.vpp


def resolve_batch(b: BatchConfig, dp: int) -> tuple[int, int]:
    """(micro, accumulation) from whichever of micro/global/accumulation are given, DeepSpeed's way."""
    micro, glob, acc = b.micro, b.global_, b.accumulation
    if glob is None:
        return micro or 1, acc or 1
    if micro is None:
        acc = acc or 1
        if glob % (acc * dp):
            raise ConfigError("batch.global", glob, f"not divisible by accumulation x dp = {acc} x {dp}",
                              f"use a global batch that is a multiple of {acc * dp}, or state batch.micro")
        return glob // (acc * dp), acc
    per_step = micro * dp
    if glob % per_step:
        raise ConfigError("batch.global", glob, f"not divisible by micro x dp = {micro} x {dp} = {per_step}",
                          f"use a global batch that is a multiple of {per_step}")
    derived = glob // per_step
    if acc is not None and acc != derived:
        raise ConfigError("batch.accumulation", acc,
                          f"global {glob} != micro {micro} x accumulation {acc} x dp {dp}",
                          f"set accumulation to {derived} or drop one of the three")
    return micro, derived


# ------------------------------------------------------------------ building and field types


def validate(data: dict) -> RunConfig:
    """``RunConfig`` from a nested dict; every failure is a ConfigError naming the field."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise config_error(err) from None


def config_error(err: ValidationError, prefix: str = "") -> ConfigError:
    """The first problem of a pydantic ValidationError as a ConfigError (ours pass through)."""
    first = err.errors()[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):
        return cause
    field = prefix + ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        section = field.rsplit(".", 1)[0] if "." in field else ""
        names = sorted(_field_names(section))
        return ConfigError(field, first.get("input"), "unknown field", f"use one of {names}")
    return ConfigError(field, first.get("input"), " ".join(first["msg"].split()),
                       f"give {field} {describe(field)}")


def _model_at(path: str):
    """The section model at a dotted path ('' for RunConfig itself)."""
    model = RunConfig
    for part in filter(None, path.split(".")):
        model = model.model_fields[_attr(model, part)].annotation
    return model


def _attr(model, name: str) -> str:
    for attr, info in model.model_fields.items():
        if name in (attr, info.alias):
            return attr
    raise KeyError(name)


def _field_names(section: str) -> list[str]:
    try:
        return [info.alias or attr for attr, info in _model_at(section).model_fields.items()]
    except (KeyError, AttributeError):
        return []


@functools.lru_cache(maxsize=None)
def _field(path: str):
    section, _, leaf = path.rpartition(".")
    model = _model_at(section)
    return model.model_fields[_attr(model, leaf)]


def describe(path: str) -> str:
    """'a value of type T (doc)' for the field at ``path``, for fix messages."""
    try:
        info = _field(path)
    except (KeyError, AttributeError):
        return "a valid value"
    doc = f" ({' '.join(info.description.split()).rstrip('.')})" if info.description else ""  # one line
    return f"{_type_name(info.annotation)}{doc}"


def _type_name(annotation) -> str:
    """'an integer', 'one of ['a', 'b']', ... for an annotation (Optional and Annotated unwrapped)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return f"one of {list(args)}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object"}
    return names.get(annotation) or names.get(origin) or getattr(annotation, "__name__", str(annotation))


@functools.lru_cache(maxsize=None)
def _adapter(path: str) -> TypeAdapter:
    info = _field(path)
    kind = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    try:
        return TypeAdapter(kind, config=ConfigDict(allow_inf_nan=False))  # as the sections validate
    except PydanticUserError:  # a section type carries its own config
        return TypeAdapter(kind)


def coerce(path: str, value: Any, source: str) -> Any:
    """``value`` checked (and converted, e.g. "2" -> 2) against the field at ``path``.

    ``source`` is how the user spelled it (a DeepSpeed key, a Megatron flag),
    so a wrong type is reported in the user's own dialect.
    """
    try:
        adapter = _adapter(path)
    except (KeyError, AttributeError):
        return value
    if isinstance(value, bool) and _numeric(_field(path).annotation):
        raise ConfigError(source, value, "cannot read it: true/false is not a number", f"give {source} "
                          f"{describe(path)}")
    try:
        return adapter.validate_python(value)
    except ValidationError as err:
        msg = err.errors()[0]["msg"]
        raise ConfigError(source, value, f"cannot read it: {msg[0].lower()}{msg[1:]}",
                          f"give {source} {describe(path)}") from None
