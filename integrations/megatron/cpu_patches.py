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
``../shared/notes/megatron-core-on-cpu.md`` lists the sites other features
reach (sequence parallel, pipeline p2p, MoE, the distributed optimizer).

Two kinds of swap cover every site reached so far:

1. ``torch`` in a module's globals becomes :data:`TORCH_ON_CPU`, a view of
   torch whose ``torch.cuda`` answers for the CPU: ``current_device()`` is
   ``"cpu"``, the RNG calls act on the CPU generator, ``synchronize`` and
   streams are no-ops. Everything else is the real torch.
2. A small helper function is replaced by one that takes the device from
   its inputs (for ``device="cuda"`` literals).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import types
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch


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
        self.current_stream = lambda *a, **k: None
        self.stream = lambda *a, **k: contextlib.nullcontext()
        self.nvtx = types.SimpleNamespace(range_push=lambda *a, **k: None, range_pop=lambda *a, **k: None)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _TorchOnCpu(types.ModuleType):
    """The real ``torch`` with :class:`_CudaOnCpu` in place of ``torch.cuda``."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaOnCpu()

    def __getattr__(self, name: str) -> Any:
        value = getattr(torch, name)
        setattr(self, name, value)  # cache: later lookups skip __getattr__
        return value


TORCH_ON_CPU = _TorchOnCpu()


def _rng_state_cpu(device: Any = None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _set_rng_state_cpu(new_state: torch.Tensor, device: Any = None, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _causal_mask_on_cpu(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


@dataclass(frozen=True)
class Patch:
    """Replace ``module.attribute`` by ``replacement`` on CPU ranks."""

    module: str
    attribute: str
    replacement: Any
    reason: str


def _torch_view(module: str, reason: str) -> Patch:
    return Patch(module, "torch", TORCH_ON_CPU, reason)


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
)

_originals: dict[tuple[str, str], Any] = {}


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
        module = importlib.import_module(patch.module)
        if key not in _originals:
            _originals[key] = getattr(module, patch.attribute)
        setattr(module, patch.attribute, patch.replacement)


def revert() -> None:
    """Restore every patched name (used by the tests that prove each patch is needed)."""
    for (module_name, attribute), original in _originals.items():
        setattr(importlib.import_module(module_name), attribute, original)
    _originals.clear()
