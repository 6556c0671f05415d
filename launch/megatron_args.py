"""The Megatron-LM dialect: argument lists and bash launch scripts in, argv and Megatron-Core fields out.

Flags mean what they mean in Megatron-LM (and Megatron-DeepSpeed for
``--zero-stage``, ``--deepspeed_config``, ``--ds-sequence-parallel-size``).
``--cp-comm-type`` selects the sequence mode: ``p2p`` ring, ``a2a`` Ulysses,
``a2a+p2p`` USP with ``--hierarchical-context-parallel-sizes U R``.

Flags this table does not know are returned, in order and with their
values, never dropped. Unstated flags take zeromega's defaults, not
Megatron-LM's (they differ for ``--lr-decay-style``: constant here, linear
there; and ``--initial-loss-scale``: 2**16 here, 2**32 there).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

from zeromega.config.schema import RunConfig, coerce
from zeromega.config.errors import ConfigError
from . import limits
from .partial import set_path

SWITCH = "switch"
# Flag -> (unified field path, value kind). Switches set True when present.
FLAGS: dict[str, tuple[str, Any]] = {
    "--tensor-model-parallel-size": ("parallel.tp", int),
    "--pipeline-model-parallel-size": ("parallel.pp", int),
    "--num-virtual-stages-per-pipeline-rank": ("parallel.vpp", int),
    "--num-layers-per-virtual-pipeline-stage": ("parallel.layers_per_virtual_stage", int),
    "--decoder-first-pipeline-num-layers": ("parallel.first_stage_layers", int),
    "--decoder-last-pipeline-num-layers": ("parallel.last_stage_layers", int),
    "--account-for-embedding-in-pipeline-split": ("parallel.embedding_in_split", SWITCH),
    "--account-for-loss-in-pipeline-split": ("parallel.loss_in_split", SWITCH),
    "--context-parallel-size": ("parallel.cp", int),
    "--expert-model-parallel-size": ("parallel.ep", int),
    "--expert-tensor-parallel-size": ("parallel.etp", int),
    "--sequence-parallel": ("parallel.sequence_parallel", SWITCH),
    "--moe-router-topk": ("moe.topk", int),
    "--moe-router-pre-softmax": ("moe.router_pre_softmax", SWITCH),
    "--micro-batch-size": ("batch.micro", int),
    "--global-batch-size": ("batch.global", int),
    "--zero-stage": ("zero.stage", int),
    "--lr": ("optimizer.lr", float),
    "--weight-decay": ("optimizer.weight_decay", float),
    "--clip-grad": ("optimizer.clip_grad", float),
    "--adam-beta1": ("optimizer.beta1", float),
    "--adam-beta2": ("optimizer.beta2", float),
    "--adam-eps": ("optimizer.eps", float),
    "--lr-decay-style": ("scheduler.decay_style", str),
    "--lr-warmup-iters": ("scheduler.warmup_iters", int),
    "--lr-warmup-init": ("scheduler.warmup_init_lr", float),
    "--min-lr": ("scheduler.min_lr", float),
    "--train-iters": ("scheduler.train_iters", int),
    "--lr-decay-iters": ("scheduler.decay_iters", int),
    "--loss-scale": ("loss_scaling.loss_scale", float),
    "--loss-scale-window": ("loss_scaling.window", float),
    "--hysteresis": ("loss_scaling.hysteresis", int),
    "--min-loss-scale": ("loss_scaling.min_scale", float),
    "--recompute-granularity": ("recompute.granularity", str),
    "--recompute-method": ("recompute.method", str),
    "--recompute-num-layers": ("recompute.num_layers", int),
    "--distribute-saved-activations": ("recompute.distribute_saved_activations", SWITCH),
    "--save": ("checkpoint.save", str),
    "--load": ("checkpoint.load", str),
    "--save-interval": ("checkpoint.interval", int),
    "--log-interval": ("logging.interval", int),
    "--distributed-timeout-minutes": ("launch.distributed_timeout_minutes", float),
    "--num-layers": ("model.num_layers", int),
    "--hidden-size": ("model.hidden_size", int),
    "--ffn-hidden-size": ("model.ffn_hidden_size", int),
    "--num-attention-heads": ("model.num_attention_heads", int),
    "--seq-length": ("model.seq_length", int),
    "--max-position-embeddings": ("model.max_position_embeddings", int),
    "--vocab-size": ("model.vocab_size", int),
    "--make-vocab-size-divisible-by": ("model.make_vocab_size_divisible_by", int),
    "--hidden-dropout": ("model.hidden_dropout", float),
    "--attention-dropout": ("model.attention_dropout", float),
    "--init-method-std": ("model.init_method_std", float),
    "--position-embedding-type": ("model.position_embedding_type", str),
    "--untie-embeddings-and-output-weights": ("model.untie_embeddings_and_output_weights", SWITCH),
    "--swiglu": ("model.swiglu", SWITCH),
    "--kv-channels": ("model.kv_channels", int),
    "--rotary-base": ("model.rotary_base", int),
    "--rotary-percent": ("model.rotary_percent", float),
    "--moe-token-drop-policy": ("moe.token_drop_policy", str),
    "--moe-ffn-hidden-size": ("moe.ffn_hidden_size", int),
    "--moe-aux-loss-coeff": ("moe.aux_loss_coeff", float),
    "--moe-expert-capacity-factor": ("moe.expert_capacity_factor", float),
    "--moe-token-dispatcher-type": ("moe.token_dispatcher_type", str),
    "--split": ("data.split", str),
    "--data-cache-path": ("data.cache_path", str),
    "--mock-data": ("data.mock", SWITCH),
    "--eod-mask-loss": ("data.eod_mask_loss", SWITCH),
    "--reset-position-ids": ("data.reset_position_ids", SWITCH),
    "--tokenizer-type": ("data.tokenizer_type", str),
    "--vocab-file": ("data.vocab_file", str),
    "--merge-file": ("data.merge_file", str),
    "--tokenizer-model": ("data.tokenizer_model", str),
    "--tiktoken-pattern": ("data.tiktoken_pattern", str),
    "--tiktoken-num-special-tokens": ("data.tiktoken_num_special_tokens", int),
    "--seed": ("seed", int),
    "--exit-interval": ("checkpoint.exit_interval", int),
    "--exit-signal-handler": ("checkpoint.exit_signal_handler", SWITCH),
    "--exit-duration-in-mins": ("checkpoint.exit_duration_in_mins", float),
    "--eval-interval": ("logging.eval_interval", int),
    "--eval-iters": ("logging.eval_iters", int),
    "--tensorboard-dir": ("logging.tensorboard_dir", str),
    "--tensorboard-log-interval": ("logging.tensorboard_log_interval", int),
    "--tensorboard-queue-size": ("logging.tensorboard_queue_size", int),
    "--log-validation-ppl-to-tensorboard": ("logging.log_validation_ppl_to_tensorboard", SWITCH),
    "--log-memory-to-tensorboard": ("logging.log_memory_to_tensorboard", SWITCH),
    "--log-timers-to-tensorboard": ("logging.log_timers_to_tensorboard", SWITCH),
    "--log-world-size-to-tensorboard": ("logging.log_world_size_to_tensorboard", SWITCH),
    "--finetune": ("checkpoint.finetune", SWITCH),
    "--no-load-optim": ("checkpoint.no_load_optim", SWITCH),
    "--no-load-rng": ("checkpoint.no_load_rng", SWITCH),
    "--train-samples": ("scheduler.train_samples", int),
    "--lr-decay-samples": ("scheduler.decay_samples", int),
    "--lr-warmup-samples": ("scheduler.warmup_samples", int),
    "--lr-warmup-fraction": ("scheduler.warmup_fraction", float),
    "--train-tokens": ("scheduler.train_tokens", int),
    "--lr-decay-tokens": ("scheduler.decay_tokens", int),
    "--lr-warmup-tokens": ("scheduler.warmup_tokens", int),
    "--override-opt_param-scheduler": ("scheduler.override", SWITCH),
    "--use-checkpoint-opt_param-scheduler": ("scheduler.use_checkpoint", SWITCH),
    "--decoupled-lr": ("optimizer.decoupled_lr", float),
    "--decoupled-min-lr": ("optimizer.decoupled_min_lr", float),
    "--log-throughput": ("logging.log_throughput", SWITCH),
    "--wandb-project": ("logging.wandb_project", str),
    "--wandb-exp-name": ("logging.wandb_exp_name", str),
    "--wandb-save-dir": ("logging.wandb_save_dir", str),
    "--wandb-entity": ("logging.wandb_entity", str),
    "--manual-gc": ("scheduler.manual_gc", SWITCH),
    "--manual-gc-interval": ("scheduler.manual_gc_interval", int),
    "--profile": ("logging.profile", SWITCH),
    "--profile-step-start": ("logging.profile_step_start", int),
    "--profile-step-end": ("logging.profile_step_end", int),
    "--overlap-grad-reduce": ("ddp.overlap_grad_reduce", SWITCH),
    "--overlap-param-gather": ("ddp.overlap_param_gather", SWITCH),
    "--ddp-bucket-size": ("ddp.bucket_size", int),
    "--ddp-average-in-collective": ("ddp.average_in_collective", SWITCH),
    "--ddp-num-buckets": ("ddp.num_buckets", int),
    "--ddp-pad-buckets-for-high-nccl-busbw": ("ddp.pad_buckets_for_high_nccl_busbw", SWITCH),
    "--log-params-norm": ("logging.log_params_norm", SWITCH),
    "--log-num-zeros-in-grad": ("logging.log_num_zeros_in_grad", SWITCH),
    "--log-optimizer-states-to-tensorboard": ("logging.log_optimizer_states_to_tensorboard", SWITCH),
    "--log-batch-size-to-tensorboard": ("logging.log_batch_size_to_tensorboard", SWITCH),
    "--empty-unused-memory-level": ("scheduler.empty_unused_memory_level", int),
}
# Megatron-LM's second spellings of the same flags.
ALIASES: dict[str, str] = {"--override-opt-param-scheduler": "--override-opt_param-scheduler",
                           "--use-checkpoint-opt-param-scheduler": "--use-checkpoint-opt_param-scheduler"}
# zeromega's own flags of the same scripts (no Megatron-LM counterpart).
ZEROMEGA_FLAGS: dict[str, tuple[str, Any]] = {
    "--metrics-out": ("logging.metrics_path", str),
    "--profile-dir": ("logging.profile_dir", str),
}
# Flags of real launch scripts that change speed or plumbing, not what is computed: accepted, and one line
# before launch says what each does here. flag -> (number of values, what happens here).
NOTED: dict[str, tuple[Any, str]] = {
    # Flags whose note depends on the device (integrations/megatron/accel.py words it, and drops it where the
    # device honours the flag); the text here is what a CPU rank runs.
    "--use-flash-attn": (0, "Megatron-LM 0.16.1 reads it for its legacy models only; Megatron-Core's attention "
                            "kernel is --attention-backend's choice: Megatron-Core's unfused attention runs here"),
    "--use-flash-attn-v2": (0, "flash attention needs CUDA kernels: Megatron-Core's unfused attention runs"),
    "--attention-backend": (1, "TransformerEngine's attention backends need CUDA and TransformerEngine: "
                               "Megatron-Core's local attention runs (same values)"),
    "--moe-grouped-gemm": (0, "grouped GEMM needs CUDA and TransformerEngine or grouped_gemm: experts run one "
                              "by one (same values)"),
    "--cross-entropy-fusion-impl": (1, "te needs TransformerEngine on CUDA: Megatron-Core's native fused cross "
                                       "entropy runs (same values)"),
    "--fp8-format": (1, "fp8 needs TransformerEngine on a GPU of compute capability 8.9+: the run keeps its "
                        "bf16/fp16/fp32"),
    "--fp8-amax-compute-algo": (1, "fp8 is off (see --fp8-format)"),
    "--fp8-amax-history-len": (1, "fp8 is off (see --fp8-format)"),
    "--fp8-param-gather": (0, "fp8 is off (see --fp8-format)"),
    "--masked-softmax-fusion": (0, "the fused softmax needs CUDA and Megatron's softmax extension: the torch "
                                   "softmax runs (same values)"),
    "--no-persist-layer-norm": (0, "the torch norm runs, as asked"),
    "--use-mcore-models": (0, "Megatron-Core's GPTModel is what zeromega builds"),
    "--transformer-impl": (1, "TransformerEngine's layers need CUDA and TransformerEngine: Megatron-Core's local "
                              "layers run"),
    "--num-workers": (1, "batches are read in the training process"),
    "--timing-log-level": (1, "the log line reports the step time; no Megatron timer tree"),
    "--timing-log-option": (1, "no Megatron timer tree to reduce over ranks (the step time is rank 0's)"),
    "--distributed-backend": (1, "zeromega picks NCCL on CUDA and gloo on CPU"),
    "--no-create-attention-mask-in-dataloader": (0, "the causal mask is built in attention, as asked"),
    "--ckpt-format": (1, "checkpoints use zeromega's format (zeromega export converts them)"),
    "--no-async-tensor-model-parallel-allreduce": (0, "tp all-reduces are synchronous, as asked"),
    "--use-pytorch-profiler": (0, "--profile always uses torch.profiler here"),
    "--overlap-param-gather-with-optimizer-step": (0, "the first chunk's all-gather runs in its next forward pass, "
                                                    "not during the optimizer step (same values)"),
    "--deepspeed-activation-checkpointing": (0, "recompute runs through Megatron-Core's (--checkpoint-activations "
                                                "or --recompute-*), not DeepSpeed's checkpointing"),
    "--partition-activations": (0, "recomputed layers' inputs are kept whole on each tp rank, not partitioned"),
    "--contigious-checkpointing": (0, "recompute runs through Megatron-Core's: no contiguous checkpoint buffer"),
    "--checkpoint-in-cpu": (0, "recomputed layers' inputs stay on the device, not moved to CPU memory"),
    "--synchronize-each-layer": (0, "no device synchronize around each recomputed layer (same values)"),
    "--profile-backward": (0, "DeepSpeed's checkpointing profiler is not run (use --profile)"),
    "--no-pipeline-parallel": (0, "pp 1 runs on DeepSpeed's engine, as asked"),
    "--use-flash-attn-v1": (0, "flash attention needs CUDA kernels: Megatron-Core's unfused attention runs"),
    "--use-flash-attn-triton": (0, "flash attention needs CUDA kernels: Megatron-Core's unfused attention runs"),
    "--data-impl": (1, "Megatron's mmap .bin/.idx is the format zeromega reads"),
    "--calculate-per-token-loss": (0, "every micro-batch has seq-length loss tokens (no --eod-mask-loss here), so "
                                      "the per-token mean is the mean of the micro-batch means: same values"),
}
# Switches that clear a field.
NEGATIONS: dict[str, str] = {"--no-progress": "logging.progress", "--disable-bias-linear": "model.add_bias_linear",
                             "--no-mmap-bin-files": "data.mmap_bin_files",
                             "--no-manual-gc-eval": "scheduler.manual_gc_eval",
                             "--no-check-for-nan-in-loss-and-grad": "scheduler.check_for_nan_in_loss_and_grad",
                             "--disable-manual-gc-eval": "scheduler.manual_gc_eval",
                             "--no-log-loss-scale-to-tensorboard": "logging.log_loss_scale_to_tensorboard",
                             "--disable-log-loss-scale-to-tensorboard": "logging.log_loss_scale_to_tensorboard",
                             "--no-align-grad-reduce": "ddp.align_grad_reduce",
                             "--no-align-param-gather": "ddp.align_param_gather"}
# Flags with a rule of their own: flag -> (value kind, number of values: 0, 1 or "+").
SPECIAL: dict[str, tuple[Any, Any]] = {
    "--bf16": (None, 0),
    "--fp16": (None, 0),
    "--use-distributed-optimizer": (None, 0),
    "--grad-reduce-in-bf16": (None, 0),
    "--accumulate-allreduce-grads-in-fp32": (None, 0),
    "--recompute-activations": (None, 0),
    "--checkpoint-activations": (None, 0),
    "--checkpoint-num-layers": (int, 1),
    "--deepspeed": (None, 0),
    "--group-query-attention": (None, 0),
    "--num-query-groups": (int, 1),
    "--num-key-value-heads": (int, 1),
    "--normalization": (str, 1),
    "--use-rotary-position-embeddings": (None, 0),
    "--no-position-embedding": (None, 0),
    "--apply-layernorm-1p": (None, 0),
    "--no-query-key-layer-scaling": (None, 0),
    "--moe-router-load-balancing-type": (str, "+"),
    "--moe-layer-freq": (str, 1),
    # Megatron-DeepSpeed's MoE dialect (its megatron/arguments.py): read by _deepspeed_moe
    "--num-experts": (int, "+"),
    "--expert-interval": (int, 1),
    "--topk": (int, 1),
    "--moe-expert-parallel-size": (int, 1),
    "--moe-train-capacity-factor": (float, 1),
    "--moe-eval-capacity-factor": (float, 1),
    "--moe-min-capacity": (int, 1),
    "--moe-loss-coeff": (float, 1),
    "--disable-moe-token-dropping": (None, 0),
    "--mlp-type": (str, 1),
    "--create-moe-param-group": (None, 0),
    "--disable-moe-top2-2nd-expert-sampling": (None, 0),
    "--use-tutel": (None, 0),
    "--cp-comm-type": (str, "+"),
    "--hierarchical-context-parallel-sizes": (int, "+"),
    "--ds-sequence-parallel-size": (int, 1),
    "--initial-loss-scale": (float, 1),
    "--data-path": (str, "+"),
    "--train-data-path": (str, "+"),
    "--valid-data-path": (str, "+"),
    "--test-data-path": (str, "+"),
    "--deepspeed_config": (str, 1),
    "--deepspeed-config": (str, 1),
    "--rampup-batch-size": (int, "+"),
    "--profile-ranks": (int, "+"),
    "--optimizer": (str, 1),
    "--tokenizer-special-tokens": (str, "+"),
    "--tiktoken-special-tokens": (str, "+"),
    # Megatron-LM's fusion switches (read by _kernels; the fusions are Megatron-Core's torch code, every device)
    "--bias-gelu-fusion": (None, 0),
    "--no-bias-gelu-fusion": (None, 0),
    "--no-bias-swiglu-fusion": (None, 0),
    "--no-bias-dropout-fusion": (None, 0),
    "--no-masked-softmax-fusion": (None, 0),
    "--cross-entropy-loss-fusion": (None, 0),
    "--no-gradient-accumulation-fusion": (None, 0),
}
CP_COMM_TYPES = {"p2p": "ring", "a2a": "ulysses", "a2a+p2p": "usp"}
# --normalization: Megatron-LM's spellings, and Megatron-DeepSpeed's lowercase ones.
NORMALIZATIONS = {"LayerNorm": "LayerNorm", "RMSNorm": "RMSNorm", "layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}
TABLE = {**FLAGS, **ZEROMEGA_FLAGS}


class FlagPartial(dict):
    """The unified fields Megatron flags state (a plain dict to every reader), and how they stated the
    vocabulary padding, which the unified field holds as Megatron-LM's product (flag x tp):
    ``divisible_by`` is --make-vocab-size-divisible-by as typed (None where Megatron's default 128 is only
    implied) and ``tp`` the tp the flags multiplied it by. ``translate.resolve`` compares these, the user's own
    values, with a unified config that states the field."""

    divisible_by: Optional[int] = None
    tp: int = 1


@dataclass
class MegatronArgs:
    """What a Megatron argument list says."""

    partial: dict
    """Unified fields the flags state."""
    unknown: list[str] = field(default_factory=list)
    """Arguments no table knows, in order, with their values."""
    deepspeed_config: Optional[str] = None
    """The ``--deepspeed_config`` path, if given."""


def _convert(flag: str, kind: Any, text: str) -> Any:
    if "$" in text:
        name = text.split("$", 1)[1].strip("{}()").split("}")[0].split(":")[0]
        raise ConfigError(flag, text, f"uses the shell variable {name}, which is not set",
                          f"pass its value (zeromega translate/check --env {name}=VALUE)")
    if kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            short = text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"
            raise ConfigError(flag, short, f"invalid {kind.__name__} value: {short!r}",
                              f"give {flag} a number") from None
        if kind is float and not math.isfinite(value):
            raise ConfigError(flag, text, "is not a finite number (Megatron-LM would run with it)",
                              f"give {flag} a finite number")
        if kind is int and abs(value) > limits.MAX_INT:
            raise ConfigError(flag, f"<{len(text)}-digit integer>", f"is beyond the 64-bit limit of "
                              f"+-{limits.MAX_INT}", f"give {flag} a number that fits in 64 bits")
        return value
    return text


def _scan(argv: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """{flag: values} for the flags the tables know (last one wins), and the rest in order."""
    known, unknown = {}, []
    i = 0
    while i < len(argv):
        token = argv[i]
        flag, eq, inline = token.partition("=") if token.startswith("--") else (token, "", "")
        flag = ALIASES.get(flag, flag)
        nargs = 0 if TABLE.get(flag, (None, 1))[1] == SWITCH or flag in NEGATIONS else SPECIAL.get(flag, (None, 1))[1]
        if flag in NOTED and flag not in TABLE and flag not in SPECIAL and flag not in NEGATIONS:
            nargs = NOTED[flag][0]
        if flag not in TABLE and flag not in SPECIAL and flag not in NEGATIONS and flag not in NOTED:
            unknown.append(token)
            i += 1
            continue
        if nargs == 0:
            if eq:
                raise ConfigError(flag, inline, "is a switch and takes no value", f"write {flag} alone")
            known[flag] = []
            i += 1
            continue
        values = [inline] if eq else []
        i += 1
        while i < len(argv) and not argv[i].startswith("--") and (nargs == "+" or not values):
            values.append(argv[i])
            i += 1
        if not values:
            raise ConfigError(flag, None, "expected a value after it", f"write {flag} VALUE")
        known[flag] = values
    return known, unknown


def parse(argv: list[str]) -> MegatronArgs:
    """Read Megatron-LM arguments; values are checked against the unified field types."""
    known, unknown = _scan(list(argv))
    partial: dict = {}

    def put(flag, path, value):
        set_path(partial, path, coerce(path, value, flag))

    for flag, values in known.items():
        if flag in TABLE:
            path, kind = TABLE[flag]
            put(flag, path, True if kind == SWITCH else _convert(flag, kind, values[0]))
        elif flag in NEGATIONS:
            put(flag, NEGATIONS[flag], False)
    precision = [name for name in ("bf16", "fp16") if f"--{name}" in known]
    if len(precision) == 2:
        raise ConfigError("--fp16", True, "--fp16 and --bf16 are both given", "pass one of them")
    if precision:
        put(f"--{precision[0]}", "precision", precision[0])
    if "--use-distributed-optimizer" in known:  # Megatron's optimizer sharding is ZeRO-1's
        stage = partial.get("zero", {}).get("stage")
        if stage == 0:
            raise ConfigError("--zero-stage", 0, "contradicts --use-distributed-optimizer (sharded optimizer "
                              "state is ZeRO-1)", "drop one of them")
        if stage is None:
            put("--use-distributed-optimizer", "zero.stage", 1)
    _data_parallel(known, put, partial, precision)
    if "--recompute-activations" in known:
        granularity = partial.get("recompute", {}).get("granularity", "selective")
        if granularity != "selective":
            raise ConfigError("--recompute-activations", True, f"means selective recompute, but "
                              f"--recompute-granularity is {granularity}", "pass one of them")
        put("--recompute-activations", "recompute.granularity", "selective")
    _checkpoint_activations(known, put, partial)
    partition_note = _partition_activations(known, put, partial)
    if "--initial-loss-scale" in known:
        scale = _convert("--initial-loss-scale", float, known["--initial-loss-scale"][0])
        power = math.log2(scale) if scale > 0 else -1
        if power != int(power) or power < 0:
            raise ConfigError("--initial-loss-scale", scale, "is not a power of two (DeepSpeed scales by 2**k)",
                              "use a power of two, e.g. 65536")
        put("--initial-loss-scale", "loss_scaling.initial_scale_power", int(power))
    if "--data-path" in known:  # one prefix, or a blend (weights read by Megatron-Core's get_blend_from_list)
        paths = [_convert("--data-path", str, path) for path in known["--data-path"]]
        put("--data-path", "data.path" if len(paths) == 1 else "data.blend", paths[0] if len(paths) == 1 else paths)
    if "--vocab-file" in known and "--merge-file" in known and "--tokenizer-type" not in known:
        # Megatron-LM's own GPT-3 script gives the files alone; 0.16.1 then stops (no tokenizer for None)
        warnings.warn("--vocab-file and --merge-file without --tokenizer-type: read as GPT2BPETokenizer, the "
                      "tokenizer of these files (Megatron-LM 0.16.1 stops with NotImplementedError)", stacklevel=2)
        put("--vocab-file", "data.tokenizer_type", "GPT2BPETokenizer")
    if "--eod-mask-loss" in known and "--calculate-per-token-loss" in known:
        raise ConfigError("--calculate-per-token-loss", True, "with --eod-mask-loss micro-batches hold different "
                          "numbers of loss tokens, and zeromega averages the micro-batch means, not the tokens",
                          "drop one of them")
    for name in ("train", "valid", "test"):
        if f"--{name}-data-path" in known:
            put(f"--{name}-data-path", f"data.{name}_path",
                [_convert(f"--{name}-data-path", str, path) for path in known[f"--{name}-data-path"]])
    if "--rampup-batch-size" in known:
        values = known["--rampup-batch-size"]
        if len(values) != 3:
            raise ConfigError("--rampup-batch-size", " ".join(values), "takes three numbers: the start global "
                              "batch, the increment and the ramp-up samples", "write --rampup-batch-size 16 16 "
                              "5859375")
        put("--rampup-batch-size", "batch.rampup", [_convert("--rampup-batch-size", int, v) for v in values])
    if "--optimizer" in known and known["--optimizer"][0] not in ("adam", "adamw"):
        raise ConfigError("--optimizer", known["--optimizer"][0], "zeromega trains with Adam with decoupled weight "
                          "decay (Megatron's 'adam'; DeepSpeed's optimizer block may name another)",
                          "pass --optimizer adam, or an optimizer block in the DeepSpeed JSON")
    special = known.get("--tokenizer-special-tokens", known.get("--tiktoken-special-tokens"))
    if special:  # Megatron-LM's validate_args: the tiktoken spelling is the deprecated one, used when alone
        put("--tokenizer-special-tokens", "data.tokenizer_special_tokens",
            [_convert("--tokenizer-special-tokens", str, token) for token in special])
    if "--profile-ranks" in known:
        put("--profile-ranks", "logging.profile_ranks",
            [_convert("--profile-ranks", int, v) for v in known["--profile-ranks"]])
    _sequence(known, put)
    _architecture(known, put, partial)
    typed_divisible_by = _vocabulary_padding(known, put, partial)
    _deepspeed_moe(known, put)
    _kernels(known, put, partial)
    _schedule(partial)
    noted = [flag for flag in known if flag in NOTED and flag not in TABLE and flag not in SPECIAL
             and flag not in NEGATIONS and (flag != "--partition-activations" or partition_note)]
    texts = _device_notes(known, partial, noted)
    if partition_note:
        texts["--partition-activations"] = partition_note
    _note([flag for flag in noted if flag not in DEVICE_FLAGS or flag in texts], texts)
    config = known.get("--deepspeed_config", known.get("--deepspeed-config"))
    if config:
        _convert("--deepspeed_config", str, config[0])
    stated = FlagPartial(partial)
    stated.divisible_by, stated.tp = typed_divisible_by, partial.get("parallel", {}).get("tp", 1)
    return MegatronArgs(stated, unknown, config[0] if config else None)


def _checkpoint_activations(known: dict, put, partial: dict) -> None:
    """Megatron-DeepSpeed's ``--checkpoint-activations``: whole layers recomputed in chunks of
    ``--checkpoint-num-layers`` (default 1), its transformer's ``_checkpointed_forward`` and its pipeline's
    ``activation_checkpoint_interval``: Megatron-Core's full recompute, uniform method. (Megatron-LM 0.16.1
    exits on the flag: 'no longer valid, use --recompute-activations'.)"""
    chunk = known.get("--checkpoint-num-layers")
    if "--checkpoint-activations" not in known:
        if chunk:
            warnings.warn(f"--checkpoint-num-layers {chunk[0]} without --checkpoint-activations does nothing, as in "
                          "Megatron-DeepSpeed", stacklevel=3)
        return
    layers = _convert("--checkpoint-num-layers", int, chunk[0]) if chunk else 1
    wanted = {"granularity": "full", "method": "uniform", "num_layers": layers}
    stated = partial.get("recompute", {})
    for key, flag in (("granularity", "--recompute-granularity"), ("method", "--recompute-method"),
                      ("num_layers", "--recompute-num-layers")):
        if key in stated and stated[key] != wanted[key]:
            raise ConfigError(flag, stated[key], f"contradicts --checkpoint-activations (full recompute, uniform "
                              f"chunks of --checkpoint-num-layers {layers})", "pass one of them")
        put("--checkpoint-activations", f"recompute.{key}", wanted[key])


def _partition_activations(known: dict, put, partial: dict) -> Optional[str]:
    """Megatron-DeepSpeed's ``--partition-activations``: read only by DeepSpeed's activation checkpointing
    (``deepspeed.checkpointing.configure``, set up under ``--deepspeed-activation-checkpointing``), which then
    keeps each recomputed chunk's inputs as 1/tp slices per tp rank and gathers them before the recompute.
    Megatron-Core's full recompute does the same with ``distribute_saved_activations`` (the chunk's hidden
    states; the same values): honoured as that where it can act, else the note that says why (None: honoured)."""
    if "--partition-activations" not in known:
        return None
    tp = partial.get("parallel", {}).get("tp", 1)
    if "--deepspeed-activation-checkpointing" not in known:
        return ("Megatron-DeepSpeed reads it only with --deepspeed-activation-checkpointing; without it nothing "
                "is partitioned, here too")
    if partial.get("recompute", {}).get("granularity") != "full":
        return "it partitions the inputs of recomputed layers, and no layer is (add --checkpoint-activations)"
    if tp == 1:
        return "tp 1: nothing to partition, each rank keeps the whole input of a recomputed layer (as DeepSpeed does)"
    if partial.get("parallel", {}).get("sequence_parallel"):
        return ("under --sequence-parallel the recomputed layers' inputs are already split across the tp ranks "
                "along the sequence; Megatron-Core does not split them further")
    put("--partition-activations", "recompute.distribute_saved_activations", True)
    return None


# Flags whose note the device decides (integrations/megatron/accel.py): no note where the device honours them.
DEVICE_FLAGS = ("--transformer-impl", "--attention-backend", "--fp8-format", "--fp8-amax-history-len",
                "--fp8-amax-compute-algo", "--fp8-param-gather", "--moe-grouped-gemm", "--masked-softmax-fusion",
                "--cross-entropy-fusion-impl")
KERNEL_CHOICES = {"--transformer-impl": ("local", "transformer_engine"),
                  "--attention-backend": ("auto", "flash", "fused", "unfused", "local"),
                  "--fp8-format": ("e4m3", "hybrid"), "--fp8-amax-compute-algo": ("most_recent", "max"),
                  "--cross-entropy-fusion-impl": ("native", "te")}


def _kernels(known: dict, put, partial: dict) -> None:
    """Megatron-LM's kernel choices with its defaults (core_v0.16.1's arguments.py and
    core_transformer_config_from_args): bias + activation fusion is ``--bias-swiglu-fusion`` under ``--swiglu``,
    else ``--bias-gelu-fusion`` (cleared without biases); bias + dropout and masked softmax fusions are on
    unless cleared. The config keeps the request; integrations/megatron/accel.py decides what the device runs."""
    if "--bias-gelu-fusion" in known and "--no-bias-gelu-fusion" in known:
        raise ConfigError("--no-bias-gelu-fusion", True, "contradicts --bias-gelu-fusion", "pass one of them")
    biases = "--disable-bias-linear" not in known
    if "--swiglu" in known:
        put("--no-bias-swiglu-fusion", "model.bias_activation_fusion", "--no-bias-swiglu-fusion" not in known)
    else:
        put("--no-bias-gelu-fusion", "model.bias_activation_fusion", "--no-bias-gelu-fusion" not in known and biases)
        if (partial.get("moe", {}).get("num_experts") or 0) > 1 and biases and "--no-bias-gelu-fusion" not in known:
            warnings.warn("--num-experts with GELU and linear biases: Megatron-Core 0.16's experts cannot fuse bias + "
                          "GELU (MLP.forward raises 'Only support fusion of swiglu and quick_gelu with "
                          "per_token_scale in MLP' at the first step, where Megatron-LM 0.16.1 stops); zeromega "
                          "computes the fusion's tanh-approximate GELU unfused, in every layer (Megatron-DeepSpeed's "
                          "experts compute it too); --no-bias-gelu-fusion gives erf GELU", stacklevel=3)
    put("--no-bias-dropout-fusion", "model.bias_dropout_fusion", "--no-bias-dropout-fusion" not in known)
    put("--no-masked-softmax-fusion", "model.masked_softmax_fusion", "--no-masked-softmax-fusion" not in known)
    if "--cross-entropy-loss-fusion" in known:
        put("--cross-entropy-loss-fusion", "model.cross_entropy_loss_fusion", True)
    for flag, name in (("--cross-entropy-fusion-impl", "cross_entropy_fusion_impl"),
                       ("--transformer-impl", "transformer_impl"), ("--attention-backend", "attention_backend"),
                       ("--fp8-format", "fp8"), ("--fp8-amax-compute-algo", "fp8_amax_compute_algo")):
        if flag in known:
            value = _convert(flag, str, known[flag][0])
            if value not in KERNEL_CHOICES[flag]:
                raise ConfigError(flag, value, f"is not one of {', '.join(KERNEL_CHOICES[flag])} (Megatron-LM "
                                  "0.16.1's choices that zeromega runs)", f"pass one of them")
            put(flag, f"model.{name}", value)
    if "--fp8-amax-history-len" in known:
        put("--fp8-amax-history-len", "model.fp8_amax_history_len",
            _convert("--fp8-amax-history-len", int, known["--fp8-amax-history-len"][0]))
    if "--fp8-param-gather" in known:
        put("--fp8-param-gather", "model.fp8_param", True)
    if "--moe-grouped-gemm" in known:
        put("--moe-grouped-gemm", "moe.grouped_gemm", True)


def _device_notes(known: dict, partial: dict, noted: list[str]) -> dict[str, str]:
    """The fallback note of each stated device-dependent flag on this machine (none where it is honoured)."""
    stated = {flag for flag in noted if flag in DEVICE_FLAGS}
    if not stated:
        return {}
    from types import SimpleNamespace

    from zeromega.config.schema import ModelConfig, MoEConfig
    from zeromega.integrations.megatron import accel

    request = SimpleNamespace(model=ModelConfig.model_validate(partial.get("model", {})),
                              moe=MoEConfig.model_validate(partial.get("moe", {})),
                              parallel=SimpleNamespace(cp=partial.get("parallel", {}).get("cp", 1)),
                              precision=partial.get("precision", "fp32"))
    return accel.resolve(request, accel.Device.probe(partial.get("device", "auto")), stated).notes


def _data_parallel(known: dict, put, partial: dict, precision: list) -> None:
    """Megatron-LM core_v0.16.1's validate_args rules of the data-parallel flags."""
    if "--overlap-param-gather" in known:
        if partial.get("zero", {}).get("stage", 0) < 1:
            raise ConfigError("--overlap-param-gather", True, "gathers the distributed optimizer's shards, and there "
                              "is none (Megatron-LM asserts: '--overlap-param-gather only supported with "
                              "distributed optimizer')", "add --use-distributed-optimizer")
        if "--overlap-grad-reduce" not in known:
            raise ConfigError("--overlap-param-gather", True, "without --overlap-grad-reduce (Megatron-LM asserts: "
                              "'Must use --overlap-param-gather with --overlap-grad-reduce')",
                              "add --overlap-grad-reduce")
    if "--ddp-num-buckets" in known:
        buckets = _convert("--ddp-num-buckets", int, known["--ddp-num-buckets"][0])
        if "--ddp-bucket-size" in known:
            raise ConfigError("--ddp-num-buckets", buckets, "given with --ddp-bucket-size (Megatron-LM asserts: "
                              "'Cannot specify both --ddp-num-buckets and --ddp-bucket-size')", "pass one of them")
    if "--overlap-param-gather-with-optimizer-step" in known:  # Megatron-LM's validate_args asserts
        for needed, why in (("--use-distributed-optimizer", "only supported with distributed optimizer"),
                            ("--overlap-param-gather", "Must use --overlap-param-gather-with-optimizer-step with "
                                                       "--overlap-param-gather"),
                            ("--num-layers-per-virtual-pipeline-stage", "only supported with interleaved pipeline "
                                                                        "parallelism")):
            stated = needed in known or needed == "--use-distributed-optimizer" and \
                partial.get("zero", {}).get("stage", 0) >= 1 or needed.startswith("--num-layers-per-virtual") and \
                ("--num-virtual-stages-per-pipeline-rank" in known or partial.get("parallel", {}).get("vpp"))
            if not stated:
                raise ConfigError("--overlap-param-gather-with-optimizer-step", True, f"without {needed} "
                                  f"(Megatron-LM asserts: '{why}')", f"add {needed}")
    in_bf16, in_fp32 = "--grad-reduce-in-bf16" in known, "--accumulate-allreduce-grads-in-fp32" in known
    if in_bf16 or in_fp32:
        # under --bf16, --grad-reduce-in-bf16 clears accumulate_allreduce_grads_in_fp32; otherwise only the latter
        # acts, and without it fp16 gradients are reduced in fp16 (what --grad-reduce-in-bf16 alone means here)
        fp32 = not in_bf16 if precision == ["bf16"] else in_fp32
        put("--grad-reduce-in-bf16" if in_bf16 else "--accumulate-allreduce-grads-in-fp32",
            "ddp.grad_reduce_in_fp32", fp32)


def _architecture(known: dict, put, partial: dict) -> None:
    """The architecture flags whose meaning is a rule (Megatron-LM core_v0.16.1's arguments.py)."""
    if "--normalization" in known:
        name = known["--normalization"][0]
        if name not in NORMALIZATIONS:
            raise ConfigError("--normalization", name, "zeromega builds LayerNorm or RMSNorm (Megatron-Core's "
                              "torch fallback without TransformerEngine)", "pass LayerNorm or RMSNorm")
        put("--normalization", "model.normalization", NORMALIZATIONS[name])
    if "--use-rotary-position-embeddings" in known:  # Megatron-LM: position_embedding_type = 'rope'
        put("--use-rotary-position-embeddings", "model.position_embedding_type", "rope")
    if "--no-position-embedding" in known and partial.get("model", {}).get("position_embedding_type") != "rope":
        raise ConfigError("--no-position-embedding", True, "without rotary embeddings it would leave the model "
                          "no positions (Megatron-LM: '--no-position-embedding is deprecated, use "
                          "--position-embedding-type')", "add --position-embedding-type rope (with rope it is "
                          "accepted: rope has no learned position table)")
    if "--apply-layernorm-1p" in known:
        raise ConfigError("--apply-layernorm-1p", True, "zero-centred norm weights (Megatron-Core's "
                          "layernorm_zero_centered_gamma) need apex or TransformerEngine; zeromega builds "
                          "Megatron-Core's torch-norm fallback, which asserts against them",
                          "drop --apply-layernorm-1p (plain weights: the same function, another parametrisation)")
    # --no-query-key-layer-scaling: Megatron-Core's default since 0.5 (apply_query_key_layer_scaling False,
    # no 1 / layer_number factor on Q K^T), so accepted with nothing to set.
    groups = known.get("--num-query-groups")
    heads = known.get("--num-key-value-heads")  # Megatron-DeepSpeed's name: no switch gates it
    if groups and heads and int(_convert("--num-key-value-heads", int, heads[0])) != \
            _convert("--num-query-groups", int, groups[0]):
        raise ConfigError("--num-key-value-heads", heads[0], f"contradicts --num-query-groups {groups[0]}",
                          "pass one of them")
    if heads:
        put("--num-key-value-heads", "model.num_query_groups", _convert("--num-key-value-heads", int, heads[0]))
    elif "--group-query-attention" in known:  # Megatron-LM: num_query_groups defaults to 1 under the switch
        put("--group-query-attention", "model.num_query_groups",
            _convert("--num-query-groups", int, groups[0]) if groups else 1)
    elif groups:
        warnings.warn(f"--num-query-groups {groups[0]} without --group-query-attention is ignored, as in "
                      "Megatron-LM (every query head keeps its own key/value head); add --group-query-attention "
                      "to group them", stacklevel=2)
    if "--moe-router-load-balancing-type" in known:
        kinds = known["--moe-router-load-balancing-type"]
        if len(kinds) > 1:
            raise ConfigError("--moe-router-load-balancing-type", " ".join(kinds), "combines several load "
                              "balancing losses, which zeromega does not pass on yet", "pass one of them")
        put("--moe-router-load-balancing-type", "moe.router_load_balancing_type", kinds[0])
    if "--moe-layer-freq" in known:
        put("--moe-layer-freq", "moe.layer_freq", moe_layer_freq(known["--moe-layer-freq"][0]))


# Megatron-DeepSpeed's own MoE spellings: any of them (or --deepspeed / --deepspeed_config) makes --num-experts
# mean what it means there. --zero-stage alone is not a marker: zeromega's own scripts take it too, next to
# Megatron-LM's MoE flags.
DS_MOE_FLAGS = ("--expert-interval", "--topk", "--moe-expert-parallel-size", "--moe-train-capacity-factor",
                "--moe-eval-capacity-factor", "--moe-min-capacity", "--moe-loss-coeff", "--disable-moe-token-dropping",
                "--mlp-type", "--create-moe-param-group", "--use-tutel", "--disable-moe-top2-2nd-expert-sampling")
# --create-moe-param-group: Megatron-DeepSpeed puts expert parameters in optimizer groups of their own so that
# DeepSpeed's ZeRO reduces and partitions them over the expert-data-parallel group, not the data-parallel one.
# zeromega always does so: experts are Megatron-Core's, whose engine reduces (and, with the distributed
# optimizer, shards) expert parameters over the expert-data-parallel group; with ep 1 that group is the
# data-parallel group. So the switch is accepted with nothing to set.
DS_MARKERS = ("--deepspeed", "--deepspeed_config", "--deepspeed-config")


def _vocabulary_padding(known: dict, put, partial: dict) -> Optional[int]:
    """Megatron-LM (and Megatron-DeepSpeed) pad the vocabulary to a multiple of
    ``--make-vocab-size-divisible-by`` x ``--tensor-model-parallel-size`` (tokenizer.py,
    ``_vocab_size_with_padding``). The unified field is the multiple itself (zeromega pads to
    lcm(field, tp), which is the field when tp divides it), so the flag is read as value x tp: the run
    builds Megatron-LM's padded vocabulary at the tp these arguments state (default 1). Returns the flag's
    own value, None where it is not given (Megatron's default implied)."""
    tp = partial.get("parallel", {}).get("tp", 1)
    flag = "--make-vocab-size-divisible-by"
    if flag not in known and tp == 1:
        return None  # Megatron's default 128 at tp 1: the unified default
    value = partial.get("model", {}).get("make_vocab_size_divisible_by", RunConfig().model.make_vocab_size_divisible_by)
    if value * tp > limits.MAX_INT:
        raise ConfigError(flag, value, f"times tp {tp} (the multiple Megatron-LM pads the vocabulary to) is beyond "
                          f"the 64-bit limit of {limits.MAX_INT}", f"give {flag} a smaller number")
    put(flag if flag in known else "--tensor-model-parallel-size", "model.make_vocab_size_divisible_by", value * tp)
    return value if flag in known else None


def _deepspeed_moe(known: dict, put) -> None:
    """--num-experts in Megatron-LM's meaning, or in Megatron-DeepSpeed's (its arguments.py defaults: experts
    on every --expert-interval-th layer, interval 2, --topk 1, capacity factor 1.0 with token dropping,
    --moe-loss-coeff 0.1), mapped onto Megatron-Core's MoE."""
    values = [_convert("--num-experts", int, v) for v in known.get("--num-experts", [])]
    ds_flags = [flag for flag in DS_MOE_FLAGS if flag in known]
    if not ds_flags and not any(flag in known for flag in DS_MARKERS):
        if len(values) > 1:
            raise ConfigError("--num-experts", " ".join(map(str, values)), "takes one number in Megatron-LM "
                              "(a list is Megatron-DeepSpeed's spelling, read as such with --deepspeed)",
                              "pass one number")
        if values:
            put("--num-experts", "moe.num_experts", values[0])
        return
    if "--use-tutel" in known:
        raise ConfigError("--use-tutel", True, "Tutel's MoE kernels are not part of Megatron-Core, which runs "
                          "zeromega's experts", "drop --use-tutel (same values without it)")
    mlp_type = known.get("--mlp-type", ["standard"])[0]
    if mlp_type != "standard":
        raise ConfigError("--mlp-type", mlp_type, "residual MoE (a dense MLP beside the experts) has no "
                          "Megatron-Core equivalent", "pass --mlp-type standard")
    if len(set(values)) > 1:
        raise ConfigError("--num-experts", " ".join(map(str, values)), "gives MoE layers different expert "
                          "counts, which Megatron-Core cannot build (one num_moe_experts)", "pass one number")
    experts = values[0] if values else 1  # Megatron-DeepSpeed's default [1]: dense
    if experts <= 1:
        unused = [flag for flag in ds_flags if flag != "--mlp-type"]
        if unused:
            warnings.warn(f"{', '.join(unused)} without --num-experts > 1: a dense model, as in "
                          "Megatron-DeepSpeed", stacklevel=3)
        return
    interval = _convert("--expert-interval", int, known.get("--expert-interval", ["2"])[0])
    if interval < 1:
        raise ConfigError("--expert-interval", interval, "must be at least 1", "pass e.g. --expert-interval 2")
    put("--num-experts", "moe.num_experts", experts)
    if "--disable-bias-linear" not in known:
        # the count Megatron-LM gives: Megatron-DeepSpeed's own is num_experts fewer per MoE layer
        warnings.warn(f"--num-experts {experts} with linear biases: Megatron-Core's router has a bias per expert "
                      f"({experts} per MoE layer) that DeepSpeed's gate does not; the other biases, the experts' "
                      "included, are Megatron-DeepSpeed's", stacklevel=3)
    if interval > 1:
        # Megatron-DeepSpeed: layer n (1-based) is MoE when n % interval == 0; Megatron-Core's integer
        # moe_layer_freq puts MoE first in each group instead, so the pattern goes as a 0/1 list.
        layers = known.get("--num-layers")
        if not layers:
            raise ConfigError("--expert-interval", interval, "needs --num-layers to place the MoE layers",
                              "pass --num-layers")
        n = _convert("--num-layers", int, layers[0])
        if "--moe-layer-freq" in known:
            raise ConfigError("--moe-layer-freq", known["--moe-layer-freq"][0], "contradicts Megatron-DeepSpeed's "
                              f"--expert-interval {interval}", "pass one of them")
        put("--expert-interval", "moe.layer_freq", [1 if (i + 1) % interval == 0 else 0 for i in range(n)])
    if "--moe-router-topk" not in known:
        put("--topk", "moe.topk", _convert("--topk", int, known.get("--topk", ["1"])[0]))
    topk = _convert("--topk", int, known.get("--moe-router-topk", known.get("--topk", ["1"]))[0])
    if topk == 1:  # DeepSpeed's top-1 gate is the full softmax's probability (Megatron-Core asks for this)
        put("--topk", "moe.router_pre_softmax", True)
    if topk == 2 and "--disable-moe-top2-2nd-expert-sampling" not in known:
        # DeepSpeed's top2gating draws the 2nd expert from the logits plus Gumbel noise unless told not to;
        # Megatron-Core never samples. Same gate values and capacity rule, another choice of 2nd expert: a note.
        warnings.warn("Megatron-DeepSpeed MoE: --topk 2 takes the 2nd most probable expert (Megatron-Core's top-k), "
                      "not one sampled with Gumbel noise as DeepSpeed's top2gating does by default; "
                      "--disable-moe-top2-2nd-expert-sampling says the same without this note", stacklevel=3)
    if "--expert-model-parallel-size" not in known and "--moe-expert-parallel-size" in known:
        put("--moe-expert-parallel-size", "parallel.ep",
            _convert("--moe-expert-parallel-size", int, known["--moe-expert-parallel-size"][0]))
    if "--moe-aux-loss-coeff" not in known:
        put("--moe-loss-coeff", "moe.aux_loss_coeff",
            _convert("--moe-loss-coeff", float, known.get("--moe-loss-coeff", ["0.1"])[0]))
    train = _convert("--moe-train-capacity-factor", float, known.get("--moe-train-capacity-factor", ["1.0"])[0])
    evaluation = _convert("--moe-eval-capacity-factor", float, known.get("--moe-eval-capacity-factor", ["1.0"])[0])
    if "--disable-moe-token-dropping" in known:
        return  # dropless: Megatron-Core's default (no capacity factor)
    if evaluation != train:
        raise ConfigError("--moe-eval-capacity-factor", evaluation, f"differs from --moe-train-capacity-factor "
                          f"{train}; Megatron-Core uses one capacity factor in training and evaluation",
                          f"pass --moe-eval-capacity-factor {train}")
    if "--moe-expert-capacity-factor" not in known:
        put("--moe-train-capacity-factor", "moe.expert_capacity_factor", train)
    minimum = _convert("--moe-min-capacity", int, known.get("--moe-min-capacity", ["4"])[0])
    if minimum != 4:
        raise ConfigError("--moe-min-capacity", minimum, "Megatron-Core has no minimum expert capacity (only "
                          "Megatron-DeepSpeed's default 4 is accepted)", "drop --moe-min-capacity")
    warnings.warn("Megatron-DeepSpeed MoE: --moe-min-capacity 4 is not applied (Megatron-Core has no minimum; "
                  "capacity is the factor times the even share), and over-capacity tokens are dropped by lowest "
                  "router probability, not DeepSpeed's random token selection", stacklevel=3)


def unknown_flags_error(unknown: list[str], source: str) -> ConfigError:
    """The one-line refusal of arguments no table knows, with the closest known flag (a typo, or a Megatron
    flag zeromega does not read)."""
    import difflib

    flag = next((t for t in unknown if t.startswith("-")), unknown[0]).split("=")[0]
    known = [*TABLE, *NEGATIONS, *SPECIAL, *NOTED, *ALIASES]
    close = difflib.get_close_matches(flag, known, n=1)
    fix = f"did you mean {close[0]}?" if close else f"drop {flag} (zeromega does not read it)"
    return ConfigError(flag, " ".join(unknown), f"in {source}: not a flag Megatron-LM's reader in zeromega knows",
                       fix)


NOTED_ENV = "ZEROMEGA_NOTED_FLAGS"
"""Set once the note is printed, so the ranks a launch starts (which inherit it) do not print it again."""


def noted_line(flags: list[str], texts: Optional[dict[str, str]] = None) -> Optional[str]:
    """The one line that says what each accepted-but-not-applied flag does here (None when there is none);
    ``texts`` words a flag for this device (:func:`_device_notes`)."""
    if not flags:
        return None
    texts = texts or {}
    return ("accepted, with a fallback: " + "; ".join(f"{flag}: {texts.get(flag, NOTED[flag][1])}"
                                                      for flag in flags))


def _note(flags: list[str], texts: Optional[dict[str, str]] = None) -> None:
    import os
    import sys

    line = noted_line(flags, texts)
    if line is None or os.environ.get(NOTED_ENV) == line:
        return
    if os.environ.get("RANK", "0") == "0":
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "zeromega"
        # the process's own stderr: zeromega launch reads the flags with sys.stderr captured (argparse's errors)
        print(f"{'zeromega' if prog in ('zeromega', '__main__.py', 'cli.py') else prog}: note: {line}",
              file=sys.__stderr__ or sys.stderr, flush=True)
    os.environ[NOTED_ENV] = line


def _schedule(partial: dict) -> None:
    """Megatron-LM's validate_args rules between iteration- and sample-based training (core_v0.16.1), and
    Megatron-DeepSpeed's token-based schedule where zeromega runs it on Megatron-Core's scheduler."""
    s, rampup = partial.get("scheduler", {}), partial.get("batch", {}).get("rampup")
    iters = s.get("train_iters")
    if iters and s.get("train_samples"):
        raise ConfigError("--train-samples", s["train_samples"], "expected iteration-based training: --train-iters "
                          "is given too (Megatron-LM asserts)", "give one of --train-iters and --train-samples")
    if iters:
        for flag, key in (("--lr-decay-samples", "decay_samples"), ("--lr-warmup-samples", "warmup_samples")):
            if s.get(key):
                raise ConfigError(flag, s[key], "expected iteration-based learning-rate schedule with --train-iters "
                                  "(Megatron-LM asserts)", f"use {flag.replace('samples', 'iters')}, or "
                                  "--train-samples instead of --train-iters")
        if rampup:
            raise ConfigError("--rampup-batch-size", " ".join(map(str, rampup)), "expected no batch-size rampup for "
                              "iteration-based training (Megatron-LM asserts)", "give --train-samples instead of "
                              "--train-iters, or drop --rampup-batch-size")
    if s.get("train_samples"):
        for flag, key in (("--lr-decay-iters", "decay_iters"), ("--lr-warmup-iters", "warmup_iters")):
            if s.get(key):
                raise ConfigError(flag, s[key], "expected sample-based schedule with --train-samples (Megatron-LM "
                                  "asserts)", f"use {flag.replace('iters', 'samples')}")
    if s.get("warmup_fraction") is not None:
        for flag, key in (("--lr-warmup-iters", "warmup_iters"), ("--lr-warmup-samples", "warmup_samples")):
            if s.get(key):
                raise ConfigError(flag, s[key], "and --lr-warmup-fraction are both given (Megatron-LM asserts)",
                                  "give one of them")
    if s.get("override") and s.get("use_checkpoint"):
        raise ConfigError("--override-opt_param-scheduler", True, "and --use-checkpoint-opt_param-scheduler are "
                          "both set (Megatron-Core asserts)", "give one of them")
    tokens = s.get("decay_tokens") is not None or s.get("warmup_tokens") is not None
    if tokens and (s.get("decay_tokens") is None or s.get("warmup_tokens") is None) and \
            (s.get("warmup_iters") or s.get("warmup_samples") or s.get("warmup_fraction") or s.get("warmup_tokens")):
        flag = "--lr-warmup-tokens" if s.get("decay_tokens") is not None else "--lr-decay-tokens"
        raise ConfigError(flag, None, "a token-based schedule with warmup needs both --lr-warmup-tokens and "
                          "--lr-decay-tokens (Megatron-DeepSpeed mixes a step warmup with a token decay in a way "
                          "zeromega does not reproduce)", f"add {flag}")


def moe_layer_freq(text: str):
    """Megatron-LM's ``moe_freq_type``: an integer, or a list expression such as ``([1]*3+[0]*1)*3``
    (evaluated here over integer lists, ``+`` and ``*`` only, where Megatron-LM calls eval)."""
    import ast

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.List):
            return [value(item) for item in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Add) and isinstance(left, list) == isinstance(right, list):
                return left + right
            if isinstance(node.op, ast.Mult) and isinstance(left, list) != isinstance(right, list):
                count = right if isinstance(left, list) else left
                if count > 10_000:
                    raise ValueError("repeat count too large")
                return left * right
        raise ValueError(ast.dump(node))

    try:
        result = value(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError, TypeError, RecursionError):
        raise ConfigError("--moe-layer-freq", text, "is neither an integer nor a list expression of 0/1 such as "
                          "([1]*3+[0]*1)*3", "pass N (an MoE layer every N layers) or a list pattern") from None
    return result


def _sequence(known: dict, put) -> None:
    """--cp-comm-type / --hierarchical-context-parallel-sizes / --ds-sequence-parallel-size -> sequence.*"""
    if "--ds-sequence-parallel-size" in known:
        size = _convert("--ds-sequence-parallel-size", int, known["--ds-sequence-parallel-size"][0])
        if size > 1:
            put("--ds-sequence-parallel-size", "sequence.mode", "ulysses")
            put("--ds-sequence-parallel-size", "sequence.ulysses", size)
    kinds = set(known.get("--cp-comm-type", []))
    if not kinds:
        if "--hierarchical-context-parallel-sizes" in known:
            raise ConfigError("--hierarchical-context-parallel-sizes", known["--hierarchical-context-parallel-sizes"],
                              "applies to --cp-comm-type a2a+p2p only", "add --cp-comm-type a2a+p2p")
        return
    if len(kinds) > 1 or not kinds <= set(CP_COMM_TYPES):
        raise ConfigError("--cp-comm-type", " ".join(known["--cp-comm-type"]),
                          "zeromega runs one of p2p (ring), a2a (Ulysses), a2a+p2p (USP) for every layer",
                          "pass one of p2p, a2a, a2a+p2p")
    mode = CP_COMM_TYPES[kinds.pop()]
    put("--cp-comm-type", "sequence.mode", mode)
    sizes = known.get("--hierarchical-context-parallel-sizes")
    if mode == "usp":
        if not sizes or len(sizes) != 2:
            raise ConfigError("--hierarchical-context-parallel-sizes", sizes, "a2a+p2p needs two sizes: "
                              "the a2a (Ulysses) size, then the p2p (ring) size", "pass e.g. 2 4")
        put("--hierarchical-context-parallel-sizes", "sequence.ulysses",
            _convert("--hierarchical-context-parallel-sizes", int, sizes[0]))
        put("--hierarchical-context-parallel-sizes", "sequence.ring",
            _convert("--hierarchical-context-parallel-sizes", int, sizes[1]))
    elif sizes:
        raise ConfigError("--hierarchical-context-parallel-sizes", sizes, "applies to --cp-comm-type a2a+p2p only",
                          "drop it or use a2a+p2p")


# ------------------------------------------------------------------ writing


def _number(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


TARGETS = ("megatron", "megatron-deepspeed")
TARGET_NAMES = {"megatron": "Megatron-LM", "megatron-deepspeed": "Megatron-DeepSpeed"}
# zeromega values that mean the target's unset default: a loss scale of 0 is dynamic scaling (Megatron: None).
SAME_MEANING: dict[str, tuple] = {"--loss-scale": (0.0,)}


def target_flags(target: str) -> dict:
    """The target's flags as data: name -> :class:`~zeromega.launch.targets.flag.Flag`."""
    if target == "megatron":
        from .targets.megatron_lm import FLAGS as table
    elif target == "megatron-deepspeed":
        from .targets.megatron_deepspeed import FLAGS as table
    else:
        raise ValueError(target)
    return table


def to_argv(cfg: RunConfig) -> list[str]:
    """Megatron-LM arguments for the config (:func:`write_argv` for Megatron-LM core 0.16)."""
    return write_argv(cfg)[0]


DS_MOE_PATHS = {"moe.topk", "moe.aux_loss_coeff", "moe.expert_capacity_factor", "parallel.ep", "moe.router_pre_softmax"}


def _write_deepspeed_moe(cfg: RunConfig, emit, lost: list) -> None:
    """Megatron-Core's MoE in Megatron-DeepSpeed's spellings, every value stated (its defaults differ)."""
    moe, freq = cfg.moe, cfg.moe.layer_freq
    n = len(freq) if isinstance(freq, list) else 0
    interval = 1 if freq == 1 else next((k for k in range(1, n + 1) if list(freq) == [
        1 if (i + 1) % k == 0 else 0 for i in range(n)]), None)
    if interval is None:
        lost.append(f"moe.layer_freq {freq} (Megatron-DeepSpeed places experts on every --expert-interval-th "
                    "layer only)")
    else:
        emit("--expert-interval", interval)
    emit("--topk", moe.topk)
    if moe.router_pre_softmax != (moe.topk == 1):
        lost.append(f"moe.router_pre_softmax {moe.router_pre_softmax} (Megatron-DeepSpeed's gate takes the full "
                    "softmax for top-1 only)")
    emit("--moe-loss-coeff", moe.aux_loss_coeff)
    if cfg.parallel.ep > 1:
        emit("--moe-expert-parallel-size", cfg.parallel.ep)
    if moe.expert_capacity_factor is None:
        emit("--disable-moe-token-dropping")
    else:
        emit("--moe-train-capacity-factor", moe.expert_capacity_factor)
        emit("--moe-eval-capacity-factor", moe.expert_capacity_factor)


def write_argv(cfg: RunConfig, target: str = "megatron", layout=None,
               deepspeed_config: Optional[str] = None) -> tuple[list[str], list[str]]:
    """(arguments, what they cannot say) for ``target``: ``megatron`` (NVIDIA Megatron-LM core 0.16) or
    ``megatron-deepspeed`` (adds ``--deepspeed``, ``--deepspeed_config`` and ``--zero-stage``).

    Every value that differs from the target's own default is written (the target's flag table,
    :mod:`zeromega.launch.targets`, holds its defaults and kinds), integers as integers, and the micro batch
    always (Megatron-LM asserts it). A value the target has no flag for, or no flag of that kind (a
    fraction for an integer flag), is left out and named in the second list, never written wrongly.
    """
    table = target_flags(target)
    name = TARGET_NAMES[target]
    argv: list[str] = []
    lost: list[str] = []

    def emit(flag: str, value: Any = None) -> None:
        if flag not in table:
            lost.append(f"{flag}{'' if value is None else ' ' + _plain(value)} (no such flag in {name})")
            return
        fact = table[flag]
        if value is None:  # a switch
            argv.append(flag)
            return
        values = value if isinstance(value, (list, tuple)) and fact.nargs not in (None,) else [value]
        words = []
        for item in values:
            if fact.kind == "int":
                if isinstance(item, float) and not item.is_integer():
                    lost.append(f"{flag} {item!r} ({name} takes an integer)")
                    return
                item = int(item)
            elif fact.kind == "float":
                item = float(item)
            if fact.choices and item not in fact.choices:
                lost.append(f"{flag} {item} ({name} accepts {list(fact.choices)})")
                return
            words.append(_plain(item))
        argv.extend([flag, *words])

    def differs(flag: str, value: Any) -> bool:
        fact = table.get(flag)
        if fact is None:
            return True  # named as lost by emit
        default = fact.default
        if isinstance(default, list) and len(default) == 1 and not isinstance(value, list):
            default = default[0]
        try:
            return not (value == default or (default is not None and float(value) == float(default)))
        except (TypeError, ValueError):
            return True

    handled = {"parallel.cp", "batch.micro", "zero.stage", "batch.global", "model.make_vocab_size_divisible_by"}
    if target == "megatron-deepspeed" and cfg.moe.num_experts:
        handled |= DS_MOE_PATHS  # written in Megatron-DeepSpeed's MoE spellings by _write_deepspeed_moe
    if target == "megatron-deepspeed" and cfg.zero.stage >= 1:
        handled |= {"ddp.overlap_grad_reduce", "ddp.bucket_size"}  # ZeRO's overlap_comm, reduce_bucket_size there
    zeromega_default = RunConfig()
    for flag, (path, kind) in FLAGS.items():
        if path in handled or flag == "--num-layers-per-virtual-pipeline-stage" and cfg.parallel.vpp:
            continue  # cp follows the sequence sizes; vpp is stated once; the batch and ZeRO below
        value = _get(cfg, path)
        if value is None or value is False and kind == SWITCH or SAME_MEANING.get(flag, ()) == (value,):
            continue
        if flag not in table and value == _get(zeromega_default, path):
            continue  # the target lacks the flag, and the config does not state it
        if kind == SWITCH:
            if flag not in table or table[flag].default in (False, None):
                emit(flag)
            continue
        if differs(flag, value) or value != _get(zeromega_default, path):  # stated: explicit even at its default
            emit(flag, value)
    _write_batch(cfg, layout, emit, lost)
    m, moe, default = cfg.model, cfg.moe, RunConfig()
    _write_vocabulary_padding(cfg, emit, differs, lost)
    if moe.num_experts:
        emit("--num-experts", moe.num_experts)
        if target == "megatron-deepspeed":
            _write_deepspeed_moe(cfg, emit, lost)
    if not m.add_bias_linear:
        emit("--disable-bias-linear")
    argv.extend(_write_kernels(cfg, target, emit, lost))
    if not cfg.logging.log_loss_scale_to_tensorboard:
        emit("--no-log-loss-scale-to-tensorboard")
    if not cfg.data.mmap_bin_files:
        emit("--no-mmap-bin-files")
    if not cfg.scheduler.manual_gc_eval:
        emit("--no-manual-gc-eval")
    if target == "megatron" and not cfg.scheduler.check_for_nan_in_loss_and_grad and not _dynamic_fp16(cfg):
        emit("--no-check-for-nan-in-loss-and-grad")  # Megatron-LM checks by default
    elif cfg.scheduler.check_for_nan_in_loss_and_grad and (target != "megatron" or _dynamic_fp16(cfg)):
        lost.append("scheduler.check_for_nan_in_loss_and_grad (" + ("Megatron-DeepSpeed has no NaN check)"
                    if target != "megatron" else "Megatron-LM turns it off under dynamic fp16 loss scaling)"))
    deepspeed = target == "megatron-deepspeed"
    if m.normalization != "LayerNorm":
        emit("--normalization", m.normalization.lower() if deepspeed else m.normalization)
    if m.num_query_groups is not None:
        if deepspeed:
            emit("--num-key-value-heads", m.num_query_groups)
        else:
            emit("--group-query-attention")
            emit("--num-query-groups", m.num_query_groups)
    if moe.router_load_balancing_type != default.moe.router_load_balancing_type:
        emit("--moe-router-load-balancing-type", moe.router_load_balancing_type)
    if moe.layer_freq != default.moe.layer_freq and not (deepspeed and moe.num_experts):  # --expert-interval there
        emit("--moe-layer-freq", str(moe.layer_freq).replace(" ", ""))
    if cfg.precision != "fp32":
        emit(f"--{cfg.precision}")
    if deepspeed:
        pass  # the DeepSpeed JSON carries the reduce dtype (communication_data_type)
    elif cfg.ddp.grad_reduce_in_fp32 is False and cfg.precision == "bf16":
        emit("--grad-reduce-in-bf16")
    elif cfg.ddp.grad_reduce_in_fp32 and cfg.precision == "fp16":  # Megatron-LM reduces fp16 in fp16 without it
        emit("--accumulate-allreduce-grads-in-fp32")
    if not deepspeed:
        for flag, path in (("--no-align-grad-reduce", "align_grad_reduce"),
                           ("--no-align-param-gather", "align_param_gather")):
            if not getattr(cfg.ddp, path):
                emit(flag)
    if differs("--initial-loss-scale", 2 ** cfg.loss_scaling.initial_scale_power):
        emit("--initial-loss-scale", 2 ** cfg.loss_scaling.initial_scale_power)
    if cfg.data.path is not None:
        emit("--data-path", cfg.data.path)
    if cfg.data.blend:
        emit("--data-path", list(cfg.data.blend))
    for split in ("train", "valid", "test"):
        if getattr(cfg.data, f"{split}_path"):
            emit(f"--{split}-data-path", list(getattr(cfg.data, f"{split}_path")))
    if cfg.batch.rampup:
        emit("--rampup-batch-size", list(cfg.batch.rampup))
    if cfg.data.tokenizer_special_tokens:
        emit("--tokenizer-special-tokens", list(cfg.data.tokenizer_special_tokens))
    s = cfg.sequence
    if deepspeed and s.mode == "ulysses" and cfg.parallel.cp > 1:
        emit("--ds-sequence-parallel-size", cfg.parallel.cp)
    elif s.mode in ("ulysses", "ring", "usp") and cfg.parallel.cp > 1:
        comm = {mode: kind for kind, mode in CP_COMM_TYPES.items()}[s.mode]
        emit("--context-parallel-size", cfg.parallel.cp)
        emit("--cp-comm-type", comm)
        if s.mode == "usp":
            emit("--hierarchical-context-parallel-sizes", [s.ulysses, s.ring])
    stage = cfg.zero.stage
    if deepspeed:
        emit("--deepspeed")
        if deepspeed_config:
            emit("--deepspeed_config", deepspeed_config)
        emit("--zero-stage", stage)
    elif stage == 1:
        emit("--use-distributed-optimizer")  # Megatron-LM's sharded optimizer state: ZeRO-1
    elif stage > 1:
        lost.append(f"ZeRO stage {stage} (Megatron-LM has no --zero-stage; its --use-distributed-optimizer is "
                    "ZeRO-1: use --to megatron-deepspeed)")
    return argv, lost


def _dynamic_fp16(cfg) -> bool:
    """fp16 with a dynamic loss scale: where Megatron-LM turns its NaN check off (validate_args)."""
    return cfg.precision == "fp16" and not cfg.loss_scaling.loss_scale


def _write_vocabulary_padding(cfg: RunConfig, emit, differs, lost: list[str]) -> None:
    """The unified multiple (zeromega pads to lcm(it, tp)) as the target's flag, which the target multiplies by
    tp: value / tp, so reading the output back gives the same field. Where tp does not divide it the flag cannot
    say the field itself, only the same padded vocabulary (lcm(field, tp) / tp); said in one line."""
    multiple, tp = cfg.model.make_vocab_size_divisible_by, cfg.parallel.tp
    value = math.lcm(multiple, tp) // tp
    if multiple % tp:
        lost.append(f"model.make_vocab_size_divisible_by {multiple} as such (the target pads to a multiple of its "
                    f"--make-vocab-size-divisible-by x tp {tp}; written as {value}: the same padded vocabulary, a "
                    f"multiple of lcm({multiple}, {tp}) = {value * tp})")
    if differs("--make-vocab-size-divisible-by", value):
        emit("--make-vocab-size-divisible-by", value)


def _write_kernels(cfg: RunConfig, target: str, emit, lost: list[str]) -> list[str]:
    """The kernel choices where they differ from the target's defaults (Megatron-LM: every fusion on and
    TransformerEngine layers; Megatron-DeepSpeed: fusions on, local layers). Emits them; returns the words
    emit cannot check (--attention-backend, whose choices Megatron-LM lists as enum members)."""
    m, deepspeed = cfg.model, target == "megatron-deepspeed"
    if not deepspeed and not m.swiglu and m.add_bias_linear and m.bias_activation_fusion and cfg.moe.num_experts:
        lost.append("tanh-approximate GELU in MoE experts (Megatron-LM 0.16.1 stops at the first step with the bias "
                    "+ GELU fusion in experts; --no-bias-gelu-fusion there computes erf GELU)")
    if m.swiglu:
        if not m.bias_activation_fusion and not deepspeed:  # Megatron-DeepSpeed has no SwiGLU fusion switch
            emit("--no-bias-swiglu-fusion")
    elif m.add_bias_linear and not m.bias_activation_fusion:
        emit("--no-bias-gelu-fusion")  # without biases Megatron-LM clears the fusion itself
    if not m.bias_dropout_fusion:
        emit("--no-bias-dropout-fusion")
    if not m.masked_softmax_fusion:
        emit("--no-masked-softmax-fusion")
    if not deepspeed or m.transformer_impl != "local":
        # stated for Megatron-LM: its default is transformer_engine, the reader's (zeromega's) is local
        emit("--transformer-impl", m.transformer_impl)
    if deepspeed:
        return []  # Megatron-DeepSpeed has none of the flags below
    if m.cross_entropy_loss_fusion:
        emit("--cross-entropy-loss-fusion")
        if m.cross_entropy_fusion_impl != "native":
            emit("--cross-entropy-fusion-impl", m.cross_entropy_fusion_impl)
    if m.fp8:
        emit("--fp8-format", m.fp8)
        if m.fp8_amax_history_len != 1:
            emit("--fp8-amax-history-len", m.fp8_amax_history_len)
        if m.fp8_amax_compute_algo != "most_recent":
            emit("--fp8-amax-compute-algo", m.fp8_amax_compute_algo)
        if m.fp8_param:
            emit("--fp8-param-gather")
    if cfg.moe.grouped_gemm and cfg.moe.num_experts:
        emit("--moe-grouped-gemm")
    return [] if m.attention_backend == "auto" else ["--attention-backend", m.attention_backend]


def _write_batch(cfg: RunConfig, layout, emit, lost: list[str]) -> None:
    """--micro-batch-size always (Megatron-LM asserts it), --global-batch-size where it is not micro x dp."""
    b = cfg.batch
    micro = layout.micro if layout is not None else b.micro
    if micro is None and b.global_ is None:
        micro = 1  # zeromega's meaning of a config that states no batch (RunConfig.layout)
    if micro is None:
        lost.append(f"--micro-batch-size (global batch {b.global_} with no micro batch: pass --world-size to "
                    "derive it, or state it)")
    else:
        emit("--micro-batch-size", micro)
    if b.global_ is not None:
        emit("--global-batch-size", b.global_)
    elif layout is not None and layout.accumulation > 1:
        emit("--global-batch-size", layout.global_batch)
    elif b.accumulation not in (None, 1):
        lost.append(f"gradient accumulation {b.accumulation} (Megatron-LM states it as --global-batch-size: pass "
                    "--world-size to write it)")


def _plain(value: Any) -> str:
    """A value as a command-line word: integers as integers, floats as Python reads them back."""
    return repr(value) if isinstance(value, float) else str(value)


def _get(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, "global_" if part == "global" else part)
    return cfg


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def transformer_config(cfg: RunConfig, **fields: Any):
    """Megatron-Core's ``TransformerConfig`` for ``cfg``; ``fields`` add to or override the translated ones."""
    import torch
    from megatron.core.transformer import TransformerConfig

    merged = {**megatron_core_fields(cfg), **fields}
    for name in ("params_dtype", "pipeline_dtype"):
        if isinstance(merged.get(name), str):
            merged[name] = getattr(torch, merged[name])
    if isinstance(merged.get("activation_func"), str):
        merged["activation_func"] = getattr(torch.nn.functional, merged["activation_func"])
    if isinstance(merged.get("attention_backend"), str):
        from megatron.core.transformer.enums import AttnBackend

        merged["attention_backend"] = AttnBackend[merged["attention_backend"]]
    if not merged.get("gated_linear_unit") and not merged.get("add_bias_linear", True):
        merged["bias_activation_fusion"] = False  # Megatron-LM clears --bias-gelu-fusion without biases
    return TransformerConfig(**merged)


def megatron_core_fields(cfg: RunConfig) -> dict:
    """Keyword arguments for Megatron-Core's ``TransformerConfig`` (and its ``ModelParallelConfig`` part).

    Model-shape fields appear only when the config states them; the caller
    adds the ones it lacks (``num_layers``, ``hidden_size``,
    ``num_attention_heads`` are required by ``TransformerConfig``). Dtypes
    are torch attribute names (``"bfloat16"``) so the dict prints as JSON;
    :func:`transformer_config` turns them into dtypes.
    """
    p, s = cfg.parallel, cfg.sequence
    fields: dict[str, Any] = {
        "tensor_model_parallel_size": p.tp,
        "pipeline_model_parallel_size": p.pp,
        "context_parallel_size": p.cp,
        "expert_model_parallel_size": p.ep,
        "expert_tensor_parallel_size": p.etp or p.tp,
        "sequence_parallel": p.sequence_parallel,
        "bf16": cfg.precision == "bf16",
        "fp16": cfg.precision == "fp16",
        "params_dtype": DTYPES[cfg.precision],
    }
    if p.pp > 1:
        fields["pipeline_dtype"] = DTYPES[cfg.precision]
    vpp = p.vpp
    if vpp is None and p.layers_per_virtual_stage and cfg.model.num_layers:
        vpp = cfg.model.num_layers // p.pp // p.layers_per_virtual_stage
    if vpp is not None:
        fields["virtual_pipeline_model_parallel_size"] = vpp
    if p.cp > 1:
        fields["cp_comm_type"] = {mode: kind for kind, mode in CP_COMM_TYPES.items()}[s.mode]
        if s.mode == "usp":
            fields["hierarchical_context_parallel_sizes"] = [s.ulysses, s.ring]
    moe = cfg.moe
    if moe.num_experts:
        fields.update(num_moe_experts=moe.num_experts, moe_router_topk=moe.topk,
                      moe_aux_loss_coeff=moe.aux_loss_coeff, moe_expert_capacity_factor=moe.expert_capacity_factor,
                      moe_token_dispatcher_type=moe.token_dispatcher_type,
                      moe_router_load_balancing_type=moe.router_load_balancing_type,
                      moe_layer_freq=moe.layer_freq, moe_token_drop_policy=moe.token_drop_policy,
                      moe_router_pre_softmax=moe.router_pre_softmax)
        if moe.ffn_hidden_size:
            fields["moe_ffn_hidden_size"] = moe.ffn_hidden_size
    r = cfg.recompute
    if r.granularity:
        fields.update(recompute_granularity=r.granularity, recompute_method=r.method,
                      recompute_num_layers=r.num_layers)
    from dataclasses import fields as dataclass_fields

    from megatron.core.transformer import TransformerConfig

    known = {f.name for f in dataclass_fields(TransformerConfig)}
    for name, value in cfg.model.model_dump().items():
        if value is not None and name in known:
            fields[name] = value
    m = cfg.model
    if m.swiglu:  # Megatron-LM's core_transformer_config_from_args, and its ffn rule (validate_args)
        fields.update(gated_linear_unit=True, activation_func="silu")
        if m.ffn_hidden_size is None and m.hidden_size:
            fields["ffn_hidden_size"] = int((4 * m.hidden_size * 2 / 3) / 64) * 64
    elif not m.add_bias_linear or moe.num_experts:  # no biases, or experts (Megatron-Core's bias + GELU fusion
        # refuses the routing probabilities its expert MLP passes, mlp.py): no bias + GELU fusion
        fields["bias_activation_fusion"] = False
    return fields
