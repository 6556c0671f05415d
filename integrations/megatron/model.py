"""Megatron-Core GPT models built from Megatron-LM-style shape arguments.

Local layer spec (no TransformerEngine), CPU-side initialisation (so weights
are the same for every tp size and the same seed), learned absolute or
rotary position embeddings, dense or mixture-of-experts MLPs (Megatron-Core
MoE layers, sequential experts). :func:`build_gpt_chunks` builds this
pipeline stage's model chunks (one per virtual stage); :func:`init_by_name`
gives every layout the same initial weights, whatever its pp / vpp / ep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from zeromega.config.schema import RunConfig


@dataclass
class GPTShape:
    """The model's shape, named as Megatron-LM's flags name it."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    seq_length: int
    vocab_size: int
    ffn_hidden_size: Optional[int] = None
    num_query_groups: Optional[int] = None
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    position_embedding_type: str = "learned_absolute"
    untie_embeddings_and_output_weights: bool = False
    make_vocab_size_divisible_by: int = 128
    num_experts: Optional[int] = None
    """Experts per MoE layer (None: dense MLP), Megatron's ``--num-experts``."""
    moe_router_topk: int = 2
    """Experts each token is routed to (``--moe-router-topk``)."""
    moe_ffn_hidden_size: Optional[int] = None
    """Hidden size of each expert's MLP (None: ffn_hidden_size)."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of the load-balancing auxiliary loss (``--moe-aux-loss-coeff``)."""
    moe_expert_capacity_factor: Optional[float] = None
    """Tokens an expert takes, as a multiple of its even share; excess tokens are dropped
    (``--moe-expert-capacity-factor``; None: dropless)."""
    moe_token_dispatcher_type: str = "alltoall"
    """How tokens reach experts on other ep ranks: ``alltoall`` or ``allgather``."""
    moe_router_load_balancing_type: str = "aux_loss"
    """The router's load balancing (``--moe-router-load-balancing-type``)."""
    moe_layer_freq: Union[int, list] = 1
    """MoE layer every N layers, or a 0/1 pattern per layer (``--moe-layer-freq``)."""
    moe_token_drop_policy: str = "probs"
    moe_router_pre_softmax: bool = False
    """Which tokens an expert over capacity drops: ``probs`` or ``position`` (``--moe-token-drop-policy``)."""
    swiglu: bool = False
    """Gated SiLU MLP (``--swiglu``): gated_linear_unit, silu."""
    normalization: str = "LayerNorm"
    """``LayerNorm`` or ``RMSNorm`` (``--normalization``)."""
    add_bias_linear: bool = True
    """Biases in the linear layers (``--disable-bias-linear`` clears it)."""
    kv_channels: Optional[int] = None
    """Head width (``--kv-channels``; None: hidden_size / num_attention_heads)."""
    rotary_base: int = 10000
    """Rotary frequencies' base (``--rotary-base``)."""
    rotary_percent: float = 1.0
    """Fraction of each head the rotary embeddings rotate (``--rotary-percent``)."""

    @property
    def resolved_ffn_hidden_size(self) -> int:
        """The MLP width Megatron-LM builds: ``--ffn-hidden-size``, else ``4 h``, or under ``--swiglu``
        ``int(4 h x 2/3 / 64) x 64`` (megatron/training/arguments.py, validate_args)."""
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.swiglu:
            return int((4 * self.hidden_size * 2 / 3) / 64) * 64
        return 4 * self.hidden_size


def padded_vocab_size(vocab: int, multiple: int, tp: int) -> int:
    """Pad to a multiple of lcm(``multiple``, tp) so every tp shard is equal.

    ``multiple`` is the unified ``model.make_vocab_size_divisible_by``: in zeromega's own dialect one
    padded size for every tp that divides it (layouts stay comparable, checkpoints move between them).
    Megatron-LM pads to ``--make-vocab-size-divisible-by`` x tp; its flags are read as that product
    (``launch/megatron_args.py``), so a Megatron-flag run builds Megatron-LM's padded vocabulary.
    """
    step = math.lcm(multiple, tp)
    return ((vocab + step - 1) // step) * step


def megatron_divisible_by(multiple: int, tp: int) -> int:
    """Megatron-LM's ``--make-vocab-size-divisible-by`` at ``tp`` for the unified ``multiple``: the padded
    vocabulary is the same (its multiple, flag x tp, is lcm(multiple, tp))."""
    return math.lcm(multiple, tp) // tp


def padding_note(vocab: int, multiple: int, tp: int) -> Optional[str]:
    """One line where the padded vocabulary is not a multiple of ``multiple`` alone (tp does not divide it, so
    lcm(multiple, tp) is larger), naming Megatron-LM's flag for this model; None otherwise. A Megatron-flag run
    never gets it: its ``multiple`` is Megatron-LM's flag x tp."""
    step = math.lcm(multiple, tp)
    if step == multiple:
        return None
    return (f"note: vocabulary {vocab} padded to {padded_vocab_size(vocab, multiple, tp)}, a multiple of "
            f"lcm({multiple}, tp {tp}) = {step} so the tp shards are equal; Megatron-LM builds this model with "
            f"--make-vocab-size-divisible-by {megatron_divisible_by(multiple, tp)} (x tp {tp} = {step})")


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _moe_fields(shape: GPTShape) -> dict:
    if not shape.num_experts:
        return {}
    return dict(
        num_moe_experts=shape.num_experts,
        moe_router_topk=shape.moe_router_topk,
        moe_ffn_hidden_size=shape.moe_ffn_hidden_size or shape.resolved_ffn_hidden_size,
        moe_aux_loss_coeff=shape.moe_aux_loss_coeff,
        moe_router_load_balancing_type=shape.moe_router_load_balancing_type,
        moe_layer_freq=shape.moe_layer_freq,
        moe_token_drop_policy=shape.moe_token_drop_policy,
        moe_router_pre_softmax=shape.moe_router_pre_softmax,
        moe_expert_capacity_factor=shape.moe_expert_capacity_factor,
        moe_token_dispatcher_type=shape.moe_token_dispatcher_type,
    )


def _pipeline_fields(cfg: RunConfig, virtual_stages: Optional[int]) -> dict:
    if cfg.parallel.pp == 1:
        return {}
    from zeromega.integrations import accelerator as accel

    interleaved = bool(virtual_stages and virtual_stages > 1)
    # One p2p op at a time unless on NCCL without interleaving: batched p2p with
    # interleaving is silently wrong on gloo (docs/cpu-internals.md,
    # gotcha 4), gloo runs a batch as single ops anyway, and torch.distributed.P2POp
    # rejects the counted isend that zeromega.integrations.comm installs.
    fields = dict(pipeline_dtype=_DTYPES[cfg.precision],
                  batch_p2p_comm=accel.current().is_cuda and not interleaved)
    if interleaved:
        fields.update(virtual_pipeline_model_parallel_size=virtual_stages)
    p = cfg.parallel  # Megatron-LM's --decoder-first/last-pipeline-num-layers
    fields.update(num_layers_in_first_pipeline_stage=p.first_stage_layers,
                  num_layers_in_last_pipeline_stage=p.last_stage_layers,
                  account_for_embedding_in_pipeline_split=p.embedding_in_split,
                  account_for_loss_in_pipeline_split=p.loss_in_split)
    return fields


def _recompute_fields(cfg: RunConfig) -> dict:
    """Megatron-Core's activation recomputation from ``cfg.recompute`` (Megatron-LM's ``--recompute-*``).

    selective: the core attention (scores, softmax, dropout) is recomputed in backward
    (``recompute_modules`` stays Megatron's default, ``["core_attn"]``); full: whole layers,
    ``uniform`` (chunks of ``num_layers``) or ``block`` (the first ``num_layers`` of each stage);
    ``distribute_saved_activations`` keeps 1/tp of each chunk's input per tp rank (its CheckpointFunction).
    Bad combinations are refused earlier by ``zeromega.config.rules`` (``_recompute``).
    """
    r = cfg.recompute
    if r.granularity is None:
        return {}
    return dict(recompute_granularity=r.granularity, recompute_method=r.method, recompute_num_layers=r.num_layers,
                distribute_saved_activations=r.distribute_saved_activations)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation: what Megatron-Core's fused bias + GELU computes (fused_bias_gelu)."""
    return torch.nn.functional.gelu(x, approximate="tanh")


def _kernel_fields(shape: GPTShape, cfg: RunConfig) -> dict:
    """The kernel and precision fields this device runs of ``cfg.model``'s request (fusions, layer
    implementation, attention backend, fp8, grouped GEMM): :func:`zeromega.integrations.megatron.accel.resolve`,
    whose fallbacks the translator has already said before launch."""
    from megatron.core.transformer.enums import AttnBackend

    from zeromega.integrations.megatron import accel

    device = accel.Device.probe(cfg.device)
    fields = accel.resolve(cfg, device).fields
    if not shape.swiglu and not _architecture_fields(shape)["add_bias_linear"]:
        fields["bias_activation_fusion"] = False  # Megatron-LM clears --bias-gelu-fusion without biases
    if not shape.swiglu and fields["bias_activation_fusion"] and (shape.num_experts or not device.cuda):
        # The fusion's function (GELU's tanh approximation), computed unfused by torch: Megatron-Core's experts
        # fuse bias + SwiGLU only (MLP.forward raises for GELU with the routing probs; the Megatron-flag reader
        # says so before launch), and on CPU its fused bias + GELU is eager Python (cpu_patches), 3.3x slower
        # than torch's own tanh GELU for the same values (bench/gelu_fusion.py)
        fields.update(bias_activation_fusion=False, activation_func=gelu_tanh)
    if not shape.num_experts:
        fields.pop("moe_grouped_gemm")
    fields["attention_backend"] = AttnBackend[fields["attention_backend"]]
    return fields


def _architecture_fields(shape: GPTShape) -> dict:
    """Llama-class architecture, as Megatron-LM's core_transformer_config_from_args passes it."""
    # Linear biases exactly as asked, MoE models included (attention, dense MLPs, the router, every expert), as
    # Megatron-LM builds them; an MoE model with biases at expert tensor parallel > 1 is refused before launch
    # (zeromega.config.rules, as Megatron-Core's TransformerConfig asserts "Bias in Moe ... ETP==1").
    fields = dict(normalization=shape.normalization, add_bias_linear=shape.add_bias_linear,
                  kv_channels=shape.kv_channels)
    if shape.swiglu:
        import torch.nn.functional as F

        fields.update(gated_linear_unit=True, activation_func=F.silu)
    return fields


def transformer_config(shape: GPTShape, cfg: RunConfig, virtual_stages: Optional[int] = None):
    """Megatron-Core's TransformerConfig for ``shape`` under ``cfg``'s parallel sizes and precision.

    ``virtual_stages``: model chunks per pipeline stage (interleaved schedule), None or 1 for plain 1F1B.
    """
    from megatron.core.transformer import TransformerConfig

    p = cfg.parallel
    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        ffn_hidden_size=shape.resolved_ffn_hidden_size,
        hidden_dropout=shape.hidden_dropout,
        attention_dropout=shape.attention_dropout,
        init_method_std=shape.init_method_std,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        context_parallel_size=p.cp,
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=p.etp or p.tp,
        sequence_parallel=p.sequence_parallel,
        use_cpu_initialization=True,
        params_dtype=_DTYPES[cfg.precision],
        bf16=cfg.precision == "bf16",
        fp16=cfg.precision == "fp16",
        **_kernel_fields(shape, cfg),
        **_architecture_fields(shape),
        **_pipeline_fields(cfg, virtual_stages),
        **_moe_fields(shape),
        **_recompute_fields(cfg),
    )


def _layer_spec(shape: GPTShape, config, vp_stage: Optional[int] = None):
    """Megatron-Core's local spec, or TransformerEngine's where ``config.transformer_impl`` says so (decided by
    :mod:`~zeromega.integrations.megatron.accel`), chosen as Megatron-LM's gpt_builders does: an MoE model gets
    the decoder block spec (dense and MoE layers per ``moe_layer_freq``, this stage's slice), a dense one the
    layer spec; both build ``shape.normalization``'s norms."""
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_decoder_block_spec, get_gpt_layer_local_spec,
                                                          get_gpt_layer_with_transformer_engine_spec)

    te = config.transformer_impl == "transformer_engine"
    if shape.num_experts:
        return get_gpt_decoder_block_spec(config, use_transformer_engine=te, normalization=shape.normalization,
                                          vp_stage=vp_stage)
    if te:  # TransformerEngine's norms follow config.normalization
        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization=shape.normalization)


def mark_gated_fc1(model) -> None:
    """Mark the fused gate/up fc1 weights (and biases) of a gated MLP (``--swiglu``).

    Megatron-Core keeps fc1 as one ColumnParallelLinear of ``2 x ffn`` rows and each rank's output splits
    into its gate and up halves (``torch.chunk(x, 2, -1)`` in ``MLP.forward``): rank r holds rows
    ``[gate_r; up_r]`` of the 1-process ``[gate; up]``, not the r-th contiguous block (the layout
    ``apply_swiglu_sharded_factory`` describes for checkpoints). :func:`tp_shard` reads the mark.
    """
    if not model.config.gated_linear_unit:
        return
    for name, param in model.named_parameters():
        if ".linear_fc1." in name:
            param.gated_halves = True


def expert_biases_as_megatron_means(model) -> None:
    """Two faults of Megatron-Core 0.16's local expert MLP with linear biases (expert tp 1), mended on the model.

    1. Its fc2 bias is added in place (``output += bias x prob``, mlp.py). At ep 1 and expert tp 1 the fc2
       output has passed the tp reduction over a one-rank group, an autograd Function that returns its input
       as a view, and autograd refuses the in-place add ("Output 0 of _ReduceFromModelParallelRegion is a
       view and is being modified inplace"). ``explicit_expert_comm``, which Megatron-Core itself sets at
       ep > 1 or expert tp > 1 (and on shared experts), skips those reductions: over one rank they are the
       identity, so only the view goes.
    2. Under sequence parallelism the fc2 bias is marked ``sequence_parallel`` like a dense row-parallel bias,
       so ``finalize_model_grads`` sums its gradient over the tp ranks, which at expert tp 1 hold other experts
       (measured: the curve leaves the 1-process one at tp 2 x ep 2), or replicas that DDP already reduces
       over the expert-data-parallel group. The mark is cleared: the bias is then reduced as the weights are.

    The expert optimizer's grad norm is mended where the optimizer is built (plugins/megatron/pipeline.py).
    """
    config = model.config
    if not (config.num_moe_experts and config.add_bias_linear):
        return
    for module in model.modules():
        if getattr(module, "is_expert", False) and hasattr(module, "explicit_expert_comm"):
            module.explicit_expert_comm = True
            if getattr(module, "bias", None) is not None:
                module.bias.sequence_parallel = False


def _zero3_ready(config, cfg: RunConfig):
    """Under ZeRO-3 the init methods must see whole parameters (see ``gathered_init``)."""
    if cfg.zero.stage == 3:
        from zeromega.integrations.deepspeed import gathered_init

        for name in ("init_method", "output_layer_init_method", "embedding_init_method"):
            setattr(config, name, gathered_init(getattr(config, name)))
    return config


def build_gpt(shape: GPTShape, cfg: RunConfig, layer_spec=None):
    """A Megatron-Core ``GPTModel`` for this rank (whole model: pp == 1).

    ``layer_spec``: the transformer layer's spec; None is Megatron-Core's
    local one. With cp > 1 the attention must be a context-parallel one
    (zeromega's Ulysses / ring / USP: :func:`zeromega.plugins.sequence.megatron.gpt_layer_spec`,
    which :class:`zeromega.Run` passes), so None is refused there.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if layer_spec is None and cfg.parallel.cp > 1:
        raise ValueError(f"build_gpt at cp {cfg.parallel.cp} needs a context-parallel layer_spec "
                         "(zeromega.plugins.sequence.megatron.gpt_layer_spec); Megatron-Core's local "
                         "attention would attend within each rank's chunk only")
    config = _zero3_ready(transformer_config(shape, cfg), cfg)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec or _layer_spec(shape, config),
        vocab_size=padded_vocab_size(shape.vocab_size, shape.make_vocab_size_divisible_by, cfg.parallel.tp),
        max_sequence_length=shape.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not shape.untie_embeddings_and_output_weights,
        position_embedding_type=shape.position_embedding_type,
        rotary_base=shape.rotary_base,
        rotary_percent=shape.rotary_percent,
    )
    mark_gated_fc1(model)
    expert_biases_as_megatron_means(model)
    return model


def build_gpt_chunks(shape: GPTShape, cfg: RunConfig, virtual_stages: Optional[int] = None) -> list:
    """This pipeline stage's model chunks: one ``GPTModel`` per virtual stage, sharing one config.

    With ``virtual_stages = v`` the ``L`` layers are cut into ``pp x v`` chunks
    of ``L / (pp v)`` layers and stage ``r`` holds chunks ``r, r + pp, ...``
    (Megatron's interleaving); only the very first chunk embeds and only the
    very last one computes the loss. Sets parallel_state's virtual size,
    which the interleaved schedule reads.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.enums import ModelType

    v = virtual_stages if virtual_stages and virtual_stages > 1 else None
    parallel_state.set_virtual_pipeline_model_parallel_world_size(v)
    parallel_state.set_virtual_pipeline_model_parallel_rank(0 if v else None)
    config = transformer_config(shape, cfg, v)
    chunks = []
    for stage in range(v or 1):
        vp_stage = stage if v else None
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=_layer_spec(shape, config, vp_stage),
            vocab_size=padded_vocab_size(shape.vocab_size, shape.make_vocab_size_divisible_by, cfg.parallel.tp),
            max_sequence_length=shape.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=not shape.untie_embeddings_and_output_weights,
            position_embedding_type=shape.position_embedding_type,
            rotary_base=shape.rotary_base,
            rotary_percent=shape.rotary_percent,
            vp_stage=vp_stage,
        )
        mark_gated_fc1(chunk)
        expert_biases_as_megatron_means(chunk)
        chunk.model_type = ModelType.encoder_or_decoder
        if cfg.precision != "fp32":
            # What Megatron-LM's Float16Module does at wrap time: ``params_dtype`` reaches the linear
            # layers, but the torch-norm fallback (no apex) builds fp32 weights, whose fp32 output
            # the next bf16 matmul rejects. Tokens are integers and the cross entropy upcasts the logits, so
            # the wrapper's input/output casts have nothing left to do.
            chunk.to(_DTYPES[cfg.precision])
        chunks.append(chunk)
    return chunks


def global_param_names(chunk) -> dict[str, str]:
    """This chunk's parameter names -> the names the same tensors have in a 1-process model.

    Layers are renumbered through ``layer_number`` (global, 1-based, counts
    earlier stages and virtual chunks), local experts through the ep rank,
    and the last stage's copy of a tied output weight is the word embedding.
    """
    import re

    from megatron.core import parallel_state

    layer_index = {i: layer.layer_number - 1 for i, layer in enumerate(getattr(chunk.decoder, "layers", []))}
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    names = {}
    for name, _ in chunk.named_parameters():
        new = re.sub(r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{layer_index[int(m[1])]}.", name)
        match = re.search(r"\.local_experts\.(\d+)\.", new)
        if match:
            experts = chunk.decoder.layers[int(name.split(".")[2])].mlp.experts
            expert = ep_rank * experts.num_local_experts + int(match[1])
            new = new[:match.start()] + f".local_experts.{expert}." + new[match.end():]
        if new == "output_layer.weight" and chunk.share_embeddings_and_output_weights:
            new = "embedding.word_embeddings.weight"
        names[name] = new
    return names


def tp_split(param: torch.nn.Parameter) -> tuple[int, int, int]:
    """(partition dim or -1 when whole, tp size, tp rank) of a parameter; experts use the expert tp group."""
    from megatron.core import parallel_state as ps

    expert = not getattr(param, "allreduce", True)
    tp_size = ps.get_expert_tensor_parallel_world_size() if expert else ps.get_tensor_model_parallel_world_size()
    tp_rank = ps.get_expert_tensor_parallel_rank() if expert else ps.get_tensor_model_parallel_rank()
    dim = getattr(param, "partition_dim", -1) if getattr(param, "tensor_model_parallel", False) else -1
    return dim, tp_size, tp_rank


def tp_shard(param: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """This rank's tp shard of ``full``, the parameter's whole 1-process tensor (a gated fc1: this rank's
    slice of the gate half, then of the up half; see :func:`mark_gated_fc1`)."""
    dim, tp_size, tp_rank = tp_split(param)
    if dim < 0:
        return full
    if getattr(param, "gated_halves", False):
        return torch.cat([half.chunk(tp_size, dim)[tp_rank] for half in full.chunk(2, dim)], dim)
    return full.chunk(tp_size, dim)[tp_rank]


def init_by_name(chunks: list, shape: GPTShape, seed: int) -> None:
    """Re-draw every matrix from a generator seeded by its 1-process name, then keep this rank's shard.

    Megatron's init consumes one RNG stream per stage and per ep rank, so pp
    and ep layouts start from different weights than one process does. Here
    each weight is drawn whole (normal, Megatron's std: ``init_method_std``,
    scaled by ``1/sqrt(2 L)`` for the output projections) from its own
    generator and cut to this rank's tp shard, so every layout, one process
    included, starts from the same model. The MoE router's bias, which
    Megatron-Core draws as it draws the weights, is re-drawn the same way;
    the other vectors (biases 0, expert biases included, norm weights 1) are
    already layout-independent and are left alone.
    """
    import zlib

    scaled_std = shape.init_method_std / math.sqrt(2.0 * shape.num_layers)
    for chunk in chunks:
        names = global_param_names(chunk)
        for name, param in chunk.named_parameters():
            global_name = names[name]
            if len(getattr(param, "ds_shape", param.shape)) < 2 and not global_name.endswith(".router.bias"):
                continue
            std = scaled_std if global_name.endswith(("linear_proj.weight", "linear_fc2.weight")) else \
                shape.init_method_std
            with _whole(param):
                dim, tp_size, _ = tp_split(param)
                full_shape = list(param.shape)
                if dim >= 0:
                    full_shape[dim] *= tp_size
                generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(global_name.encode()))
                full = torch.empty(full_shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
                with torch.no_grad():
                    param.copy_(tp_shard(param, full).to(param.dtype))


def _whole(param: torch.nn.Parameter):
    """The whole parameter while inside (ZeRO-3 gathers its partition and re-partitions what was written)."""
    import contextlib

    if not hasattr(param, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=0)
