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


PROBES = {
    "megatron.core.utils.torch": probe_memory_buffer,
    "megatron.core.tensor_parallel.random.torch": probe_seed_tracker,
    "megatron.core.tensor_parallel.random._get_cuda_rng_state": probe_fork_reads_state,
    "megatron.core.tensor_parallel.random._set_cuda_rng_state": probe_fork_restores_state,
    "megatron.core.fusions.fused_softmax.get_default_causal_mask": probe_causal_softmax,
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
