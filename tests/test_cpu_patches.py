"""Each Megatron-Core CPU patch is needed: its probe passes with every patch and fails without it.

A probe exercises the exact Megatron-Core call site the patch exists for.
"""

from __future__ import annotations

import pytest
import torch

from zeromega.integrations.megatron import cpu_patches


def probe_memory_buffer():
    from megatron.core.utils import GlobalMemoryBuffer

    assert GlobalMemoryBuffer().get_tensor([4, 4], torch.float32, "probe").device.type == "cpu"


def probe_seed_tracker():
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)


def probe_fork_reads_state():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
    with get_cuda_rng_tracker().fork():
        torch.rand(1)


def probe_fork_restores_state():
    """Inside fork() draws come from the tp stream (seed + 2718 + tp_rank); outside, the caller's stream resumes."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        inside = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before), "fork() did not restore the caller's RNG state"
    assert torch.equal(inside, torch.rand(3, generator=torch.Generator().manual_seed(7 + 2718)))


def probe_causal_softmax():
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.utils import attention_mask_func

    softmax = FusedScaleMaskSoftmax(False, False, AttnMaskType.causal, False, attention_mask_func, True, None)
    probs = softmax(torch.zeros(1, 1, 3, 3), None)
    assert torch.allclose(probs[0, 0, 0], torch.tensor([1.0, 0.0, 0.0]))


def _sp_config():
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, tensor_model_parallel_size=2,
                             sequence_parallel=True, use_cpu_initialization=True)


def probe_sp_layer_norm():
    """The layers' norm under sequence parallel builds, and marks its params for the tp grad sum."""
    from megatron.core.models.backends import LocalSpecProvider

    norm = LocalSpecProvider().layer_norm()(config=_sp_config(), hidden_size=8)
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())


def probe_sp_final_norm():
    from megatron.core.transformer import transformer_block

    norm = transformer_block.LayerNormImpl(config=_sp_config(), hidden_size=8)
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())


def probe_sp_rms_norm():
    """--normalization RMSNorm under sequence parallel: the local spec's norm builds a torch RMSNorm, marked."""
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = dataclasses.replace(_sp_config(), normalization="RMSNorm")
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    norm = spec.submodules.input_layernorm(config=config, hidden_size=8)
    assert isinstance(norm, torch.nn.RMSNorm)
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())


def probe_sp_moe_block_final_norm():
    """An MoE model's decoder block spec (--moe-layer-freq) builds its final norm under sequence parallel."""
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    config = dataclasses.replace(_sp_config(), num_moe_experts=2, add_bias_linear=False)
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False, pp_rank=0)
    norm = block.layer_norm(config=config, hidden_size=8)
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())


class _TwoRanks:
    """A stand-in tp group: mappings only ask its size before allocating."""

    def size(self):
        return 2


def probe_sp_gather_buffer():
    from megatron.core.tensor_parallel import mappings

    real = mappings.dist_all_gather_func
    mappings.dist_all_gather_func = lambda out, inp, group=None: out.copy_(torch.cat([inp, inp]))
    try:
        gathered = mappings._gather_along_first_dim(torch.ones(2, 3), _TwoRanks())
    finally:
        mappings.dist_all_gather_func = real
    assert gathered.shape == (4, 3)


def probe_distributed_saved_activations():
    from megatron.core.tensor_parallel import utils

    class SecondOfTwo(_TwoRanks):
        def rank(self):
            return 1

    real = utils.get_tensor_model_parallel_group_if_none
    utils.get_tensor_model_parallel_group_if_none = lambda group, **kwargs: group  # no process group here
    try:
        kept = utils.split_tensor_into_1d_equal_chunks(torch.arange(6.0), new_buffer=True, tp_group=SecondOfTwo())
    finally:
        utils.get_tensor_model_parallel_group_if_none = real
    assert kept.tolist() == [3.0, 4.0, 5.0]


def probe_fp32_optimizer_scale():
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import FP32Optimizer

    param = torch.nn.Parameter(torch.ones(2))
    FP32Optimizer(torch.optim.SGD([param], lr=0.1), OptimizerConfig(lr=0.1), None)


def probe_bf16_optimizer_params():
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    param = torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
    try:
        optimizer = Float16OptimizerWithFloat16Params(torch.optim.SGD([param], lr=0.1),
                                                      OptimizerConfig(lr=0.1, bf16=True), None, lambda opt: None)
    except TypeError as err:  # upstream's own failure for a CPU tensor
        raise RuntimeError(err) from err
    main = optimizer.optimizer.param_groups[0]["params"][0]
    assert main.dtype == torch.float32 and main is param.main_param, "bf16 params need fp32 main copies"


def _grads_to_clip():
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.full((3,), 4.0)
    return param


def probe_clip_scale_buffer():
    from megatron.core.optimizer import clip_grads

    param = _grads_to_clip()
    with cpu_patches.cuda_tensor_methods_on_cpu():
        clip_grads.clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=8.0)
    assert torch.allclose(param.grad, torch.full((3,), 0.5), atol=1e-5)


def probe_clip_type_check():
    from megatron.core.optimizer import optimizer

    param = _grads_to_clip()
    optimizer.clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=8.0)
    assert torch.allclose(param.grad, torch.full((3,), 0.5), atol=1e-5)


def probe_router_gemm():
    from megatron.core.transformer.moe import moe_utils

    try:
        logits = moe_utils.router_gating_linear(torch.ones(3, 4), torch.ones(2, 4), None, torch.float32)
    except NameError as err:  # upstream's own failure without TransformerEngine
        raise RuntimeError(err) from err
    assert torch.equal(logits, torch.full((3, 2), 4.0))


def probe_dispatch_splits():
    import numpy as np

    from megatron.core.transformer.moe import token_dispatcher

    splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3, 1]), as_numpy=True)
    assert isinstance(splits, np.ndarray), "gloo's all_to_all_single takes split sizes as a list or array"


def probe_rotary_table():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    table = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True)(4)
    assert table.shape == (4, 1, 1, 8) and table.device.type == "cpu"


class _CpRank:
    """A stand-in cp group: the rotary slicing only asks its size and this rank."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def probe_rope_cp_slices():
    """Each cp rank's rows of the rotary table are the positions of the tokens shard_batch gives it (zigzag)."""
    from megatron.core.models.common.embeddings import rotary_pos_embedding

    from zeromega.plugins.sequence.layout import token_index

    seq = 16
    table = torch.arange(float(seq)).view(seq, 1, 1, 1)  # row i holds position i
    for size in (2, 4):
        for rank in range(size):
            rows = rotary_pos_embedding.get_pos_emb_on_this_cp_rank(table, 0, _CpRank(rank, size))
            assert torch.equal(rows.flatten().long(), token_index(seq, rank, size, "zigzag")), (rank, size)


def _gather_uneven_shards() -> list:
    """Rank r holds r + 1 rows of r; gathered over a 2-rank gloo world with Megatron's uneven split sizes."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        return mappings._gather_along_first_dim(torch.full((rank + 1, 2), float(rank)), dist.group.WORLD,
                                                output_split_sizes=[1, 2]).tolist()
    finally:
        dist.destroy_process_group()


def probe_uneven_gather():
    from distributed import run_world

    for gathered in run_world(2, _gather_uneven_shards, timeout=60):
        assert gathered == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]], gathered


_TINY = dict(num_layers=2, hidden_size=16, num_attention_heads=2, seq_length=8, vocab_size=64,
             hidden_dropout=0.0, attention_dropout=0.0)
_TINY_MOE = dict(_TINY, num_experts=2, moe_router_topk=2, moe_ffn_hidden_size=16)


def _step_in_world(world: int, parallel: dict, shape: dict, clip: float = 1.0, virtual_stages=None):
    """One Megatron-engine step in a forked world, leaving out the patches this process has left out."""
    from distributed import run_world
    from hybrid_workers import one_training_step

    skipped = [f"{p.module}.{p.attribute}" for p in cpu_patches.PATCHES
               if (p.module, p.attribute) not in cpu_patches._originals]
    cfg = {"parallel": parallel, "precision": "fp32", "batch": {"micro": 1, "global": 2 * world},
           "optimizer": {"lr": 1e-3, "clip_grad": clip}}
    losses = run_world(world, one_training_step, cfg, shape, skipped, virtual_stages, timeout=120)
    assert all(loss > 0 for loss in losses)


def probe_grad_buffers():
    _step_in_world(1, {}, _TINY)


def probe_distributed_optimizer():
    _step_in_world(1, {}, _TINY, clip=0.0)


def probe_schedule_token_count():
    _step_in_world(1, {}, _TINY, clip=0.0)


def probe_pipeline_p2p():
    _step_in_world(2, {"pp": 2}, dict(_TINY, untie_embeddings_and_output_weights=True), clip=0.0)


def probe_tied_embedding_stages():
    _step_in_world(2, {"pp": 2}, _TINY, clip=0.0)


def probe_sp_linear_grad_buffer():
    _step_in_world(2, {"tp": 2, "sequence_parallel": True}, _TINY, clip=0.0)


def probe_moe_router():
    _step_in_world(1, {}, _TINY_MOE, clip=0.0)


def probe_moe_dispatcher_stream():
    _step_in_world(1, {}, _TINY_MOE, clip=0.0)


def _save_dist_checkpoint():
    """A one-rank torch_dist save (checkpoint.megatron's path), leaving out the skipped patches."""
    import tempfile

    from ckpt_megatron_workers import save_tiny_dist_checkpoint
    from distributed import run_world

    skipped = [f"{p.module}.{p.attribute}" for p in cpu_patches.PATCHES
               if (p.module, p.attribute) not in cpu_patches._originals]
    with tempfile.TemporaryDirectory() as path:
        run_world(1, save_tiny_dist_checkpoint, path, skipped, timeout=120)


def probe_dist_checkpoint_staging():
    _save_dist_checkpoint()


def probe_dist_checkpoint_finalize():
    _save_dist_checkpoint()


def probe_fp16_grad_scaler():
    from megatron.core.optimizer.grad_scaler import DynamicGradScaler

    scaler = DynamicGradScaler(initial_scale=2.0 ** 16, min_scale=1.0, growth_factor=2.0, backoff_factor=0.5,
                               growth_interval=1000, hysteresis=1)
    scaler.update(found_inf=True)
    assert scaler.scale.device.type == "cpu" and float(scaler.scale) == 2.0 ** 15


def probe_fp16_grad_scaler_resume():
    from megatron.core.optimizer.grad_scaler import DynamicGradScaler

    scaler = DynamicGradScaler(initial_scale=2.0 ** 16, min_scale=1.0, growth_factor=2.0, backoff_factor=0.5,
                               growth_interval=1000, hysteresis=2)
    state = {"scale": torch.tensor([8.0]), "growth_tracker": 3, "hysteresis_tracker": 1}
    scaler.load_state_dict(state)
    assert float(scaler.scale) == 8.0 and scaler.scale.device.type == "cpu"


def _not_compiled(call):
    """``call()`` with torch.compile made to raise on any compile: a jit_fuser wrapper left on a fused
    function fails at once (instead of compiling C++ for seconds on this CPU rank)."""
    with torch.compiler.set_stance("fail_on_recompile"):
        call()


def probe_fused_bias_gelu():
    from megatron.core.fusions.fused_bias_gelu import bias_gelu_impl

    x = torch.randn(4, 8, requires_grad=True)
    _not_compiled(lambda: bias_gelu_impl(x, torch.zeros(8, requires_grad=True)).sum().backward())


def probe_fused_bias_swiglu():
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    x = torch.randn(4, 8, requires_grad=True)
    _not_compiled(lambda: bias_swiglu_impl(x, torch.zeros(8, requires_grad=True)).sum().backward())
    _not_compiled(lambda: bias_swiglu_impl(x, None).sum().backward())


def probe_fused_bias_dropout():
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

    x, residual = torch.randn(4, 8), torch.randn(4, 8)
    for training in (True, False):
        _not_compiled(lambda: get_bias_dropout_add(training, True)((x, torch.zeros(8)), residual, 0.1))


def probe_fused_cross_entropy():
    """The native fused cross entropy's four functions, in the order its autograd function calls them (one tp
    rank: the all-reduces between them are identities)."""
    from megatron.core.fusions import fused_cross_entropy as f

    def loss_and_grad():
        logits, target = torch.randn(3, 2, 5), torch.tensor([[0, 4], [1, 2], [3, 3]])
        logits, logits_max = f.calculate_logits_max(logits)
        mask, masked, predicted_sum_exp, exp = f.calculate_predicted_logits(logits, target, logits_max, 0, 5)
        softmax, loss = f.calculate_cross_entropy_loss(exp, predicted_sum_exp)
        f.calculate_gradients(softmax, torch.ones_like(loss), mask, masked)

    _not_compiled(loss_and_grad)


PROBES = {
    "megatron.core.utils.torch": probe_memory_buffer,
    "megatron.core.tensor_parallel.random.torch": probe_seed_tracker,
    "megatron.core.tensor_parallel.random._get_cuda_rng_state": probe_fork_reads_state,
    "megatron.core.tensor_parallel.random._set_cuda_rng_state": probe_fork_restores_state,
    "megatron.core.fusions.fused_softmax.get_default_causal_mask": probe_causal_softmax,
    "megatron.core.models.backends.LNImpl": probe_sp_layer_norm,
    "megatron.core.transformer.transformer_block.LayerNormImpl": probe_sp_final_norm,
    "megatron.core.models.backends:LocalSpecProvider.layer_norm": probe_sp_rms_norm,
    "megatron.core.models.gpt.gpt_layer_specs.LNImpl": probe_sp_moe_block_final_norm,
    "megatron.core.tensor_parallel.mappings.torch": probe_sp_gather_buffer,
    "megatron.core.tensor_parallel.mappings._gather_along_first_dim": probe_uneven_gather,
    "megatron.core.tensor_parallel.layers.torch": probe_sp_linear_grad_buffer,
    "megatron.core.tensor_parallel.utils.torch": probe_distributed_saved_activations,
    "megatron.core.distributed.param_and_grad_buffer.torch": probe_grad_buffers,
    "megatron.core.optimizer.optimizer.torch": probe_fp32_optimizer_scale,
    "megatron.core.optimizer.clip_grads.torch": probe_clip_scale_buffer,
    "megatron.core.optimizer.optimizer.clip_grad_by_total_norm_fp32": probe_clip_type_check,
    "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.__init__": probe_distributed_optimizer,
    "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.__init__": probe_bf16_optimizer_params,
    "megatron.core.optimizer.grad_scaler.torch": probe_fp16_grad_scaler,
    "megatron.core.optimizer.grad_scaler:DynamicGradScaler.load_state_dict": probe_fp16_grad_scaler_resume,
    "megatron.core.pipeline_parallel.schedules.torch": probe_schedule_token_count,
    "megatron.core.pipeline_parallel.p2p_communication.torch": probe_pipeline_p2p,
    "megatron.core.models.common.language_module.language_module:LanguageModule."
    "setup_embeddings_and_output_layer": probe_tied_embedding_stages,
    "megatron.core.models.common.embeddings.rotary_pos_embedding.torch": probe_rotary_table,
    "megatron.core.models.common.embeddings.rotary_pos_embedding.get_pos_emb_on_this_cp_rank": probe_rope_cp_slices,
    "megatron.core.transformer.moe.router.torch": probe_moe_router,
    "megatron.core.transformer.moe.token_dispatcher.torch": probe_moe_dispatcher_stream,
    "megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu": probe_dispatch_splits,
    "megatron.core.transformer.moe.moe_utils.te_general_gemm": probe_router_gemm,
    "megatron.core.dist_checkpointing.strategies.filesystem_async.torch": probe_dist_checkpoint_staging,
    "megatron.core.dist_checkpointing.strategies.state_dict_saver.torch": probe_dist_checkpoint_finalize,
    **{f"megatron.core.fusions.fused_bias_gelu.{name}": probe_fused_bias_gelu
       for name in ("bias_gelu", "bias_gelu_back")},
    **{f"megatron.core.fusions.fused_bias_swiglu.{name}": probe_fused_bias_swiglu
       for name in ("swiglu", "bias_swiglu", "swiglu_back", "bias_swiglu_back")},
    **{f"megatron.core.fusions.fused_bias_dropout.{name}": probe_fused_bias_dropout
       for name in ("bias_dropout_add_fused_train", "bias_dropout_add_fused_inference")},
    **{f"megatron.core.fusions.fused_cross_entropy.{name}": probe_fused_cross_entropy
       for name in ("calculate_logits_max", "calculate_predicted_logits", "calculate_cross_entropy_loss",
                    "calculate_gradients")},
}


def test_every_patch_has_a_probe():
    assert sorted(PROBES) == sorted(f"{p.module}.{p.attribute}" for p in cpu_patches.PATCHES)
    assert all(p.reason for p in cpu_patches.PATCHES)


@pytest.fixture
def patched():
    yield cpu_patches
    cpu_patches.revert()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU patches are for ranks without CUDA")
@pytest.mark.parametrize("name", PROBES)
def test_patch_is_needed(name, patched):
    patched.apply()
    PROBES[name]()  # passes with every patch
    patched.revert()
    patched.apply(skip=(name,))
    with pytest.raises((AssertionError, RuntimeError)):
        PROBES[name]()


def test_revert_restores_upstream(patched):
    import megatron.core.utils as mutils

    original = mutils.torch
    patched.apply()
    assert mutils.torch is cpu_patches.TORCH_ON_CPU
    patched.revert()
    assert mutils.torch is original
