"""Every random generator a training step draws from, as plain tensors and numbers.

Dropout draws from torch's generator (CPU) or CUDA's, inside and outside
Megatron's model-parallel RNG tracker; data shuffles are fixed at dataset
build time, but user code may use ``random`` or numpy. Each rank's states are
saved in its own file, because ranks draw different streams (the tracker
offsets by tp rank). Everything is stored as tensors, ints and tuples so
``weights_only`` loading accepts it.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def _tracker():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return get_cuda_rng_tracker()


def capture() -> dict[str, Any]:
    """This rank's RNG states."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "tracker": {k: v.clone() for k, v in _tracker().get_states().items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _as_tuple(value):
    """``random.setstate`` needs tuples all the way down; a round trip may hand back lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def restore(state: dict[str, Any]) -> None:
    """Put back what :func:`capture` returned (on the same rank of the same layout)."""
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    _tracker().set_states(state["tracker"])
