"""The one place that decides which device and collective backend a run uses.

Everything else in zeromega asks this module instead of calling ``torch.cuda``
directly, so the same code runs on CUDA with NCCL and on CPU with gloo.
The choice is made once per process: explicit argument > ``"auto"``
(CUDA when ``torch.cuda.is_available()``, otherwise CPU).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
from dataclasses import dataclass
from typing import Optional

import torch

_DEFAULT_BACKEND = {"cuda": "nccl", "cpu": "gloo"}
_current: Optional["Accelerator"] = None


@dataclass(frozen=True)
class Accelerator:
    """A device type and the collective backend that goes with it."""

    device_type: str
    """``"cuda"`` or ``"cpu"``."""
    backend: str
    """torch.distributed backend: ``"nccl"`` or ``"gloo"``."""

    @property
    def is_cuda(self) -> bool:
        return self.device_type == "cuda"

    def device(self, local_rank: int = 0) -> torch.device:
        """The device this rank computes on."""
        if self.is_cuda:
            return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        return torch.device("cpu")

    def bind(self, local_rank: int) -> torch.device:
        """Make ``local_rank``'s device current; returns it."""
        dev = self.device(local_rank)
        if self.is_cuda:
            torch.cuda.set_device(dev)
        return dev

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize()

    def reset_peak_memory(self) -> None:
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_memory_bytes(self) -> int:
        """Peak device memory: allocator peak on CUDA (since the last reset),
        process peak resident set size on CPU (since the process started;
        the kernel keeps no resettable peak)."""
        if self.is_cuda:
            return int(torch.cuda.max_memory_allocated())
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def deepspeed_accelerator(self):
        """DeepSpeed's accelerator object for this device, installed as current."""
        from deepspeed.accelerator import real_accelerator

        if self.is_cuda:
            from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator as impl
        else:
            from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator as impl
        current = real_accelerator.ds_accelerator
        if current is None or current._name != self.device_type:
            real_accelerator.set_accelerator(impl())
        return real_accelerator.get_accelerator()


def select(device: str = "auto", backend: str = "auto") -> Accelerator:
    """Pick the accelerator for this process and remember it.

    ``device`` is ``"auto" | "cuda" | "cpu"``; ``backend`` is ``"auto"`` or any
    torch.distributed backend name.
    """
    global _current
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in _DEFAULT_BACKEND:
        raise ValueError(f"device={device!r} is not supported; use 'cuda', 'cpu' or 'auto'")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch sees no CUDA device; use device='cpu'")
    if backend == "auto":
        backend = _DEFAULT_BACKEND[device]
    _current = Accelerator(device, backend)
    if device == "cpu":
        return_large_frees_to_os()
    # DeepSpeed reads this when it first resolves its accelerator.
    os.environ["DS_ACCELERATOR"] = device
    return _current


HOST_MMAP_THRESHOLD = 1 << 20
"""Bytes from which glibc serves an allocation by mmap (and unmaps it when freed)."""


def return_large_frees_to_os() -> bool:
    """Make freed tensors of 1 MiB and more leave the resident set at once (glibc ``mallopt``).

    On a CPU rank every tensor lives in the process heap. glibc's dynamic mmap
    threshold climbs as large blocks are freed, after which they come from the
    heap and stay resident once freed: the transients of model construction and
    engine set-up then stay in the resident set for the rest of the run. With
    the threshold fixed at 1 MiB (what ``MALLOC_MMAP_THRESHOLD_=1048576`` does),
    bench/zero_memory.py measured the peak resident set per rank 6-20% lower
    (57M-parameter GPT, ZeRO-0..3). Kept as it is when the user set that
    variable; a no-op off glibc. Returns whether the setting was applied.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, HOST_MMAP_THRESHOLD))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def trim_host_heap_after_each_step(engine) -> bool:
    """On a CPU rank, give the heap's freed pages back to the OS after every ``engine.backward()``
    and ``engine.step()``.

    Tensors under the 1 MiB mmap threshold (activations of a small model,
    biases, norms, autograd's buffers) come from glibc's heap; freed, they
    leave holes that only ``malloc_trim`` returns. Backward frees the
    activations just before the optimizer's temporaries arrive, so a trim
    there lowers the step's peak; the trim after the step stops the resident
    set from creeping up (57M-parameter ZeRO-3 rank: +50 MiB a step without
    it). Each trim took 6-18 ms there, but pages handed back fault in again:
    the step took 7% longer (ZeRO-2, 57M parameters, 2 ranks) for a peak up to
    9% lower, so ``ZEROMEGA_HEAP_TRIM=0`` turns it off (README).
    Returns whether the hooks were attached (CPU ranks with glibc only).
    """
    if current().device_type != "cpu" or os.environ.get("ZEROMEGA_HEAP_TRIM", "1") == "0":
        return False
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False

    def then_trim(method):
        def call_then_trim(*args, **kwargs):
            out = method(*args, **kwargs)
            trim(0)
            return out

        return call_then_trim

    engine.backward = then_trim(engine.backward)
    engine.step = then_trim(engine.step)
    return True


def current() -> Accelerator:
    """The accelerator chosen by :func:`select` (auto-selected on first use)."""
    return _current if _current is not None else select()
