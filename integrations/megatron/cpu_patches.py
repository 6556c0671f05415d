"""Megatron-Core on a rank without CUDA: every patch zeromega applies, in one table.

Megatron-Core 0.16 calls ``torch.cuda`` directly where it means "this rank's
device" (buffer allocation, the model-parallel RNG tracker, p2p shapes) and
writes ``device="cuda"`` in a few mask helpers. zeromega never edits its
source. Each patch swaps one name inside one Megatron-Core module, and is:

- applied only when the accelerator is the CPU (on CUDA nothing changes);
- idempotent and revertible (``revert()``), so each one has a test that
  shows the run breaks without it;
- listed in :data:`PATCHES` with the reason it exists.

Only sites that zeromega's supported paths reach are patched; a path that
reaches a new one fails loudly ("Torch not compiled with CUDA enabled"), and
``docs/cpu-internals.md`` lists the sites other features
reach (sequence parallel, pipeline p2p, MoE, the distributed optimizer).

Four kinds of swap cover every site reached so far:

1. ``torch`` in a module's globals becomes :data:`TORCH_ON_CPU`, a view of
   torch whose ``torch.cuda`` answers for the CPU: ``current_device()`` is
   ``"cpu"``, the RNG calls act on the CPU generator, ``synchronize`` and
   streams are no-ops; its tensor factories read ``device="cuda"`` as the
   CPU and ``pin_memory=True`` as False (the schedules', optimizer's and
   grad-norm helpers' literals). Everything else is the real torch.
2. A small helper function is replaced by one that takes the device from
   its inputs (for ``device="cuda"`` literals inside helpers).
3. A function or method that asks a *tensor* about CUDA (``t.type() ==
   "torch.cuda.FloatTensor"``, ``t.cuda()``) runs inside
   :func:`cuda_tensor_methods_on_cpu`, which answers those two methods for
   CPU tensors only for the duration of that call. A patch target may name
   a class attribute as ``"module:Class"``.
4. A fused function that Megatron-Core wrapped in ``torch.compile`` at import
   (its ``jit_fuser``) becomes the function itself (:data:`EAGER`): the same
   math, without inductor's compile per shape on every CPU rank.

One DeepSpeed patch lives here too, :data:`DEEPSPEED_FP16` (fp16 on DeepSpeed's
engine on CPU): installed only for an fp16 run on the CPU accelerator, and only
while its probe, :func:`deepspeed_refuses_cpu_fp16`, finds the refusal upstream.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import logging
import math
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch


class _NoStream:
    """The one "stream" of a CPU rank: work is already ordered, so waiting, recording
    events and synchronizing are no-ops (any method returns another no-op object)."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: _NO_STREAM


_NO_STREAM = _NoStream()


class _CudaOnCpu(types.ModuleType):
    """``torch.cuda`` as Megatron-Core must see it on a CPU rank."""

    def __init__(self):
        super().__init__("torch.cuda")
        cpu = torch.device("cpu")
        self.current_device = lambda: cpu
        self.synchronize = lambda *a, **k: None
        self.get_rng_state = lambda device=None: torch.get_rng_state()
        self.set_rng_state = lambda state, device=None: torch.set_rng_state(state)
        self.manual_seed = lambda seed: torch.manual_seed(seed)
        self.manual_seed_all = lambda seed: torch.manual_seed(seed)
        self.current_stream = lambda *a, **k: _NO_STREAM
        self.default_stream = lambda *a, **k: _NO_STREAM
        self.Stream = lambda *a, **k: _NO_STREAM
        self.stream = lambda *a, **k: contextlib.nullcontext()
        self.nvtx = types.SimpleNamespace(range_push=lambda *a, **k: None, range_pop=lambda *a, **k: None)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


def _cuda_literal_is_cpu(factory: Callable) -> Callable:
    """``factory(..., device="cuda", pin_memory=True)`` as the CPU build can run it."""

    @functools.wraps(factory)
    def on_cpu(*args: Any, **kwargs: Any):
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return factory(*args, **kwargs)

    return on_cpu


_FACTORIES = frozenset({"tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange",
                        "rand", "randn", "randint", "zeros_like", "ones_like", "empty_like"})


class _TorchOnCpu(types.ModuleType):
    """The real ``torch`` with :class:`_CudaOnCpu` in place of ``torch.cuda``
    and tensor factories that place ``device="cuda"`` on the CPU."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaOnCpu()

    def __getattr__(self, name: str) -> Any:
        value = getattr(torch, name)
        if name in _FACTORIES:
            value = _cuda_literal_is_cpu(value)
        setattr(self, name, value)  # cache: later lookups skip __getattr__
        return value


TORCH_ON_CPU = _TorchOnCpu()


def _rng_state_cpu(device: Any = None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _set_rng_state_cpu(new_state: torch.Tensor, device: Any = None, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _causal_mask_on_cpu(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


_CUDA_TYPE_NAMES = {torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
                    torch.bfloat16: "torch.cuda.BFloat16Tensor"}


@contextlib.contextmanager
def cuda_tensor_methods_on_cpu():
    """Inside: a CPU tensor's ``type()`` names its CUDA type and ``cuda()`` returns the tensor.

    Megatron-Core checks ``param.type() == "torch.cuda.FloatTensor"`` to pick
    the fp32 branch (distributed optimizer, grad clipping) and moves the tied
    output weight with ``.cuda()``; a CPU tensor is the right answer to both
    on a CPU rank. Scoped to one upstream call, never process-wide.
    """
    real_type, real_cuda = torch.Tensor.type, torch.Tensor.cuda

    def type_name(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        return real_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_name
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.type, torch.Tensor.cuda = real_type, real_cuda


def _with_cuda_tensor_methods(target: str, attribute: str) -> Callable:
    """The original ``target.attribute``, called inside :func:`cuda_tensor_methods_on_cpu`."""

    def call(*args: Any, **kwargs: Any):
        with cuda_tensor_methods_on_cpu():
            return _originals[(target, attribute)](*args, **kwargs)

    call.__name__ = call.__qualname__ = attribute
    return call


def _splits_to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """MoE's ``maybe_move_tensor_to_cpu`` for a CPU rank: upstream only converts a *CUDA*
    tensor to numpy, so CPU split sizes stay tensors, which gloo's ``all_to_all_single`` rejects."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.detach().numpy()
    return tensor


def _gather_first_dim_uneven_on_gloo(input_: torch.Tensor, group: Any, output_split_sizes: Any = None,
                                     use_global_buffer: bool = False) -> torch.Tensor:
    """Megatron's ``_gather_along_first_dim`` with uneven ``output_split_sizes`` on gloo.

    Upstream gathers uneven shards with the list form of ``all_gather``, whose
    gloo backend requires every rank's tensor to have the input's shape
    (``ProcessGroupGloo::allgather: invalid tensor size``). Every rank knows
    every size, so each shard is padded to the longest, gathered with
    ``all_gather_into_tensor`` and cut back. Even sizes take upstream's path.
    """
    original = _originals[("megatron.core.tensor_parallel.mappings", "_gather_along_first_dim")]
    sizes = None if output_split_sizes is None else [int(n) for n in output_split_sizes]
    if sizes is None or group.size() == 1 or len(set(sizes)) == 1:
        return original(input_, group, output_split_sizes, use_global_buffer)
    longest = max(sizes)
    padded = input_.new_zeros((longest, *input_.shape[1:]))
    padded[: input_.shape[0]] = input_
    gathered = input_.new_empty((longest * len(sizes), *input_.shape[1:]))
    torch.distributed.all_gather_into_tensor(gathered, padded, group=group)
    return torch.cat([gathered[i * longest: i * longest + n] for i, n in enumerate(sizes)])


def _pos_emb_on_this_cp_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group: Any) -> torch.Tensor:
    """Megatron's ``get_pos_emb_on_this_cp_rank`` with its chunk index on ``pos_emb``'s device.

    Upstream builds the index ``[r, 2C-1-r]`` in pinned memory and moves it
    with ``.cuda()``; the slicing itself is unchanged: the table of the whole
    sequence is cut into ``2C`` chunks and cp rank ``r`` keeps chunks ``r``
    and ``2C-1-r``, the zigzag layout of ``plugins.sequence.layout``.
    """
    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    size, rank = cp_group.size(), cp_group.rank()
    index = torch.tensor([rank, 2 * size - rank - 1], device=pos_emb.device)
    shape = pos_emb.shape
    chunks = pos_emb.view(*shape[:seq_dim], 2 * size, -1, *shape[seq_dim + 1:])
    mine = chunks.index_select(seq_dim, index)
    return mine.view(*shape[:seq_dim], -1, *shape[seq_dim + 1:])


class _SequenceParallelTorchNorm:
    """Megatron's torch-norm fallback, allowed under sequence parallelism.

    ``WrappedTorchNorm`` asserts ``not config.sequence_parallel`` only because
    upstream never marked its parameters: a LayerNorm over the hidden dim is
    the same on a sequence shard. Built with the flag off, its weight and bias
    are then marked ``sequence_parallel`` (as apex's FusedLayerNorm marks
    them) so that their partial gradients get summed over the tp group
    (Megatron DDP's ``finalize_model_grads``; ``plugins.megatron.sequence_parallel``
    on the DeepSpeed path).
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs: Any):
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        sequence_parallel = bool(config.sequence_parallel)
        if sequence_parallel:
            config = copy.copy(config)
            config.sequence_parallel = False
        norm = WrappedTorchNorm(config, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            setattr(param, "sequence_parallel", sequence_parallel)
        return norm


def _local_layer_norm(self: Any, rms_norm: bool = False, for_qk: bool = False) -> Any:
    """``LocalSpecProvider.layer_norm`` without its side effect: upstream, ``rms_norm=True`` rebinds the
    module's ``LNImpl`` to ``WrappedTorchNorm`` (for every later spec of the process too) and returns it.
    The patched ``LNImpl`` already builds the norm ``config.normalization`` names (``WrappedTorchNorm``
    picks ``torch.nn.RMSNorm`` from it), so it is returned for both kinds."""
    from megatron.core.models import backends

    return backends.LNImpl


@dataclass(frozen=True)
class Patch:
    """Replace ``module.attribute`` by ``replacement`` on CPU ranks.

    ``module`` is a module path, or ``"module:Class"`` for a class attribute.
    """

    module: str
    attribute: str
    replacement: Any
    reason: str


def _torch_view(module: str, reason: str) -> Patch:
    return Patch(module, "torch", TORCH_ON_CPU, reason)


EAGER = object()
"""A patch's replacement meaning: the function itself, without the ``torch.compile`` wrapper that
Megatron-Core's ``jit_fuser`` put on it at import (``megatron.core.jit``)."""


def _eager(module: str, names: tuple[str, ...]) -> tuple[Patch, ...]:
    reason = ("Megatron-Core decorates its fused functions with jit_fuser, torch.compile on torch >= 2.2; on a "
              "CPU rank inductor compiles C++ for each function and shape (bench: about 12 s for bias + GELU's "
              "forward and backward, 2 s more per new shape) and draws a compiled dropout's mask from its own "
              "RNG, not the generator Megatron's RNG tracker forks. The eager function is the same math")
    return tuple(Patch(module, name, EAGER, reason) for name in names)


def _unwrapped(function: Any) -> Any:
    """The function a ``torch.compile`` wrapper holds (the function itself when it has no wrapper)."""
    return getattr(function, "_torchdynamo_orig_callable", function)


PATCHES: tuple[Patch, ...] = (
    _torch_view("megatron.core.utils",
                "GlobalMemoryBuffer.get_tensor allocates on torch.cuda.current_device() (core attention's matmul buffer)"),
    _torch_view("megatron.core.tensor_parallel.random",
                "the model-parallel RNG tracker seeds and forks torch.cuda RNG states; on CPU they are the CPU generator"),
    Patch("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", _rng_state_cpu,
          "the tracker's fork() reads the state through torch.cuda.default_generators, which a CPU build lacks"),
    Patch("megatron.core.tensor_parallel.random", "_set_cuda_rng_state", _set_rng_state_cpu,
          "the tracker's fork() restores states through torch.cuda's lazy-call queue, which a CPU build "
          "never runs: silently, the tracker's states are never installed nor the caller's restored"),
    Patch("megatron.core.fusions.fused_softmax", "get_default_causal_mask", _causal_mask_on_cpu,
          "the causal mask the unfused softmax builds is created with device='cuda'"),
    # Sequence parallel (tp-sp): the norm fallback and the sequence gather/scatter buffers.
    Patch("megatron.core.models.backends", "LNImpl", _SequenceParallelTorchNorm,
          "the layers' norms: without apex, WrappedTorchNorm asserts not sequence_parallel"),
    Patch("megatron.core.transformer.transformer_block", "LayerNormImpl", _SequenceParallelTorchNorm,
          "the final norm of the block: same assert as the layers' norms"),
    Patch("megatron.core.models.backends:LocalSpecProvider", "layer_norm", _local_layer_norm,
          "--normalization RMSNorm: the local spec's layer_norm(rms_norm=True) rebinds backends.LNImpl to "
          "WrappedTorchNorm, undoing the norm patch above (sequence parallel then asserts)"),
    Patch("megatron.core.models.gpt.gpt_layer_specs", "LNImpl", _SequenceParallelTorchNorm,
          "MoE models' decoder block spec (get_gpt_decoder_block_spec, for --moe-layer-freq) names its final "
          "norm from this module's own LNImpl: same assert as the layers' norms"),
    _torch_view("megatron.core.tensor_parallel.mappings",
                "sequence-parallel all-gather / reduce-scatter outputs are allocated on torch.cuda.current_device()"),
    _torch_view("megatron.core.tensor_parallel.utils",
                "recompute.distribute_saved_activations: the 1/tp slice each rank keeps of a recomputed chunk's input, "
                "and the buffer it is gathered into, are allocated on torch.cuda.current_device()"),
    _torch_view("megatron.core.tensor_parallel.layers",
                "the linear layers' sequence-parallel input all-gather buffer is allocated on "
                "torch.cuda.current_device()"),
    # Megatron's DDP and (distributed) optimizer: the pipeline / MoE trainer (plugins.megatron.pipeline).
    _torch_view("megatron.core.distributed.param_and_grad_buffer",
                "DDP's contiguous param and grad buffers are allocated on torch.cuda.current_device()"),
    _torch_view("megatron.core.optimizer.optimizer",
                "the optimizer's found-inf / scale tensors are created with device='cuda'"),
    _torch_view("megatron.core.optimizer.clip_grads",
                "the grad-norm and clipping helpers create their norm and overflow tensors with device='cuda'"),
    Patch("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32",
          _with_cuda_tensor_methods("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),
          "clipping asserts every grad's type() is 'torch.cuda.FloatTensor'"),
    Patch("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer", "__init__",
          _with_cuda_tensor_methods("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer", "__init__"),
          "the distributed optimizer picks its fp32 / fp16 branch by param.type() == 'torch.cuda.*' and "
          "raises TypeError for a CPU tensor"),
    Patch("megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params", "__init__",
          _with_cuda_tensor_methods("megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params",
                                    "__init__"),
          "bf16 / fp16 without the distributed optimizer: the mixed-precision optimizer makes fp32 main params "
          "of the params whose type() is 'torch.cuda.BFloat16Tensor' / 'HalfTensor' and raises TypeError for "
          "a CPU tensor"),
    # fp16 loss scaling (--fp16 on the Megatron engine: pp > 1 or MoE).
    _torch_view("megatron.core.optimizer.grad_scaler",
                "fp16's ConstantGradScaler / DynamicGradScaler create their scale, min-scale and growth / backoff "
                "factors with device='cuda'"),
    Patch("megatron.core.optimizer.grad_scaler:DynamicGradScaler", "load_state_dict",
          _with_cuda_tensor_methods("megatron.core.optimizer.grad_scaler:DynamicGradScaler", "load_state_dict"),
          "resuming fp16: the scaler moves the checkpoint's scale with .cuda(torch.cuda.current_device())"),
    # Pipeline parallel: the schedules and their p2p.
    _torch_view("megatron.core.pipeline_parallel.schedules",
                "each schedule counts tokens in a device='cuda' tensor"),
    _torch_view("megatron.core.pipeline_parallel.p2p_communication",
                "received activations and gradients are allocated on torch.cuda.current_device(); "
                "batched p2p ends with torch.cuda.synchronize()"),
    Patch("megatron.core.models.common.language_module.language_module:LanguageModule",
          "setup_embeddings_and_output_layer",
          _with_cuda_tensor_methods("megatron.core.models.common.language_module.language_module:LanguageModule",
                                    "setup_embeddings_and_output_layer"),
          "with pp > 1 the last stage's copy of the tied word embedding is moved with .cuda() before the "
          "first-last stage all-reduce"),
    # Rotary position embeddings (--position-embedding-type rope), with and without context parallel.
    _torch_view("megatron.core.models.common.embeddings.rotary_pos_embedding",
                "the rotary table moves its inv_freq to torch.cuda.current_device() on first use, at any cp size"),
    Patch("megatron.core.models.common.embeddings.rotary_pos_embedding", "get_pos_emb_on_this_cp_rank",
          _pos_emb_on_this_cp_rank,
          "with cp > 1 each rank's zigzag slice of the rotary table is picked by an index built with "
          "pin_memory=True and moved with .cuda()"),
    # Mixture of experts: the router and the all-to-all token dispatcher.
    _torch_view("megatron.core.transformer.moe.router",
                "the router moves its weight to torch.cuda.current_device() on every forward"),
    _torch_view("megatron.core.transformer.moe.token_dispatcher",
                "the all-to-all dispatcher makes a torch.cuda.Stream for its device-to-host copies of the splits"),
    Patch("megatron.core.transformer.moe.token_dispatcher", "maybe_move_tensor_to_cpu", _splits_to_host,
          "the all-to-all split sizes must reach all_to_all_single as numpy (gloo rejects a tensor of splits)"),
    Patch("megatron.core.tensor_parallel.mappings", "_gather_along_first_dim", _gather_first_dim_uneven_on_gloo,
          "with tp > 1 the all-to-all dispatcher all-gathers each rank's routed tokens over the expert-tp group "
          "in uneven shards, which gloo's list all_gather rejects (invalid tensor size)"),
    # Dist checkpointing (torch_dist): the Megatron-engine checkpoints (checkpoint.megatron).
    _torch_view("megatron.core.dist_checkpointing.strategies.filesystem_async",
                "the torch_dist writer stages tensors for its writer processes, then calls torch.cuda.synchronize()"),
    _torch_view("megatron.core.dist_checkpointing.strategies.state_dict_saver",
                "the save's finalize step broadcasts its failure flag from a tensor on torch.cuda.current_device()"),
    Patch("megatron.core.transformer.moe.moe_utils", "te_general_gemm", None,
          "the router's gating GEMM tests `te_general_gemm is not None`, a name bound only when "
          "TransformerEngine imports (NameError without it); None selects the torch matmul"),
    # Megatron-Core's torch-code fusions (Megatron-LM's default --bias-gelu-fusion / --bias-swiglu-fusion /
    # --bias-dropout-fusion, and --cross-entropy-loss-fusion): run eagerly.
    *_eager("megatron.core.fusions.fused_bias_gelu", ("bias_gelu", "bias_gelu_back")),
    *_eager("megatron.core.fusions.fused_bias_swiglu", ("swiglu", "bias_swiglu", "swiglu_back", "bias_swiglu_back")),
    *_eager("megatron.core.fusions.fused_bias_dropout",
            ("bias_dropout_add_fused_train", "bias_dropout_add_fused_inference")),
    *_eager("megatron.core.fusions.fused_cross_entropy",
            ("calculate_logits_max", "calculate_predicted_logits", "calculate_cross_entropy_loss",
             "calculate_gradients")),
)

_originals: dict[tuple[str, str], Any] = {}
_MISSING = object()  # an attribute upstream forgot to define: revert() deletes it again


def _owner(target: str) -> Any:
    """The module (``"pkg.mod"``) or class (``"pkg.mod:Class"``) a patch sets its attribute on."""
    module, _, qualname = target.partition(":")
    owner: Any = importlib.import_module(module)
    for part in filter(None, qualname.split(".")):
        owner = getattr(owner, part)
    return owner


class _SameGeneratorNotice(logging.Filter):
    """On CPU the tracker's states live in the one CPU generator, so the tracker's
    check "CPU RNG state changed within GPU RNG context" fires on every dropout
    inside a fork; it reports the design, not a fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


_NOTICE_FILTER = _SameGeneratorNotice()


def apply(skip: tuple[str, ...] = ()) -> None:
    """Install every patch (except those whose ``module.attribute`` is in ``skip``)."""
    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_NOTICE_FILTER)
    for patch in PATCHES:
        key = (patch.module, patch.attribute)
        if f"{patch.module}.{patch.attribute}" in skip:
            continue
        owner = _owner(patch.module)
        if key not in _originals:
            _originals[key] = getattr(owner, patch.attribute, _MISSING)
        replacement = _unwrapped(_originals[key]) if patch.replacement is EAGER else patch.replacement
        setattr(owner, patch.attribute, replacement)


def revert() -> None:
    """Restore every patched name (used by the tests that prove each patch is needed)."""
    for (target, attribute), original in _originals.items():
        if original is _MISSING:
            delattr(_owner(target), attribute)
        else:
            setattr(_owner(target), attribute, original)
    _originals.clear()


# ------------------------------------------------------------------ DeepSpeed's engine on a CPU rank: fp16
#
# Not a Megatron-Core site, but the same kind of swap, kept in this one table of what zeromega changes
# upstream on CPU. Applied only by the ZeRO engine builder (zeromega.plugins.zero.engine) for an fp16 run
# on the CPU accelerator, never at import, and only while the probe says DeepSpeed still refuses.


def _fp16_supported_on_cpu(self: Any) -> bool:
    """What DeepSpeed's CPU accelerator should answer: torch's CPU build computes every op zeromega trains
    with in fp16 (without AVX512-FP16 / AMX-FP16, oneDNN and ATen widen to fp32 inside the kernel)."""
    return True


DEEPSPEED_FP16 = Patch(
    "deepspeed.accelerator.cpu_accelerator:CPU_Accelerator", "is_fp16_supported", _fp16_supported_on_cpu,
    "DeepSpeed 0.19's CPU accelerator answers 'fp16 unsupported' unless oneDNN has native fp16 kernels "
    "(torch.ops.mkldnn._is_mkldnn_fp16_supported(), False without AVX512-FP16 / AMX-FP16), so "
    "DeepSpeedEngine._do_sanity_check raises 'Type fp16 is not supported on your device.' and ZeRO-0's "
    "gradient all-reduce (split_half_float_double_sparse) asserts on fp16 gradients; torch computes them anyway")


def _accelerator_says_fp16() -> bool:
    """DeepSpeed's own (unpatched) answer on this machine."""
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    method = _originals.get((DEEPSPEED_FP16.module, DEEPSPEED_FP16.attribute), CPU_Accelerator.is_fp16_supported)
    return bool(method(CPU_Accelerator.__new__(CPU_Accelerator)))


def torch_computes_fp16() -> bool:
    """torch's CPU build runs an fp16 matmul, its backward and a log-softmax, with the right numbers."""
    try:
        a = torch.full((4, 4), 0.5, dtype=torch.float16, requires_grad=True)
        out = torch.log_softmax(a @ a, dim=-1)
        out.sum().backward()
    except (RuntimeError, NotImplementedError):
        return False
    return out.dtype == torch.float16 and abs(float(out.detach()[0, 0]) + math.log(4)) < 1e-3 and a.grad is not None


def deepspeed_refuses_cpu_fp16() -> bool:
    """The probe: DeepSpeed's CPU accelerator still says fp16 is unsupported on this machine (the behaviour
    :data:`DEEPSPEED_FP16` works around). False on a CPU with native fp16 kernels, or once DeepSpeed stops
    asking oneDNN; then the patch is not installed."""
    return not _accelerator_says_fp16()


def deepspeed_fp16_on_cpu() -> bool:
    """Whether fp16 trains on DeepSpeed's engine on this CPU: natively, or with :data:`DEEPSPEED_FP16`."""
    return not deepspeed_refuses_cpu_fp16() or torch_computes_fp16()


def apply_deepspeed_fp16(skip: tuple[str, ...] = ()) -> bool:
    """Install :data:`DEEPSPEED_FP16` where it is needed and works (the probe says DeepSpeed refuses, torch
    computes fp16) and ``skip`` does not name it; returns whether it is installed. ``revert()`` removes it."""
    key = (DEEPSPEED_FP16.module, DEEPSPEED_FP16.attribute)
    if key in _originals:
        return True
    if f"{DEEPSPEED_FP16.module}.{DEEPSPEED_FP16.attribute}" in skip:
        return False
    if not deepspeed_refuses_cpu_fp16() or not torch_computes_fp16():
        return False
    owner = _owner(DEEPSPEED_FP16.module)
    _originals[key] = getattr(owner, DEEPSPEED_FP16.attribute)
    setattr(owner, DEEPSPEED_FP16.attribute, DEEPSPEED_FP16.replacement)
    return True
