"""Shared by bench/seq_*.py: the modes, a fork world, inputs, and tensor-byte accounting.

Legend: ``b`` batch, ``s`` full sequence, ``s_l = s / P`` local tokens,
``h`` / ``h_kv`` query / key-value heads, ``d`` head dim, ``P`` ranks.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from distributed import run_world  # noqa: E402  (the tests' fork world: one import of torch for all ranks)

# name -> (ranks, Ulysses size for USP)
MODES = {"ulysses2": (2, None), "ring2": (2, None), "ulysses4": (4, None), "ring4": (4, None), "usp4": (4, 2)}


def mode_fn(name: str) -> Callable:
    """``fn(q, k, v, causal)`` for mode ``name`` over the whole (already initialised) world."""
    import torch.distributed as dist

    from zeromega.plugins.sequence import build_usp_groups, ring_attention, ulysses_attention, usp_attention

    world = dist.group.WORLD
    if name.startswith("ulysses"):
        return lambda q, k, v, causal: ulysses_attention(q, k, v, world, causal, layout="contiguous")
    if name.startswith("ring"):
        return lambda q, k, v, causal: ring_attention(q, k, v, world, causal, layout="zigzag")
    groups = build_usp_groups(MODES[name][1])
    return lambda q, k, v, causal: usp_attention(q, k, v, groups, causal, layout="zigzag")


def full_fn(q, k, v, causal):
    """One process, whole sequence: the local fused SDPA kernel Ulysses also uses."""
    from zeromega.plugins.sequence import local_attention

    return local_attention(q, k, v, causal, q.size(-1) ** -0.5)


def math_fn(q, k, v, causal):
    """One process, whole sequence, scores materialised (``[b, h, s, s]``): the unfused baseline."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return full_fn(q, k, v, causal)


def inputs(b: int, s_l: int, h: int, kv: int, d: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s_l, h, d, generator=g).to(dtype).requires_grad_()
    k = torch.randn(b, s_l, kv, d, generator=g).to(dtype).requires_grad_()
    v = torch.randn(b, s_l, kv, d, generator=g).to(dtype).requires_grad_()
    dout = torch.randn(b, s_l, h, d, generator=g).to(dtype)
    return q, k, v, dout


def init_world():
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist


class TensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage created inside the ``with`` block and alive at once.

    Every aten op's outputs pass through ``__torch_dispatch__`` (forward and
    backward, autograd's saved tensors, communication buffers); each new
    storage is remembered by a weak reference and dropped from the count
    once it has been freed (checked at every op). Resolution is one op:
    memory an op allocates and frees inside itself (a fused kernel's scratch)
    is not seen; the tensors that outlive ops (activations, saved tensors,
    gradients, buffers) are.
    """

    def __enter__(self):
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self.live: dict[int, tuple] = {}
        self.current = self.peak = 0
        return super().__enter__()

    def _sweep(self):
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        # outputs that alias an input (views, in-place ops) are not new memory
        aliased = {self._ref(t.untyped_storage()).cdata for t in tree_flatten((args, kwargs))[0]
                   if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ref = self._ref(storage)
                if ref.cdata not in self.live and ref.cdata not in aliased:
                    self.live[ref.cdata] = (ref, storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out
