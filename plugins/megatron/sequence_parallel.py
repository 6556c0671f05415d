"""Megatron tp-sp under an engine that does not know about it (DeepSpeed).

With sequence parallelism each tp rank runs the norms, dropouts and
row-parallel biases on its own ``s/tp`` slice of the sequence, so the
gradients of those replicated parameters are *partial sums*: the full
gradient is their sum over the tp group. Megatron's own DDP adds that sum
in ``finalize_model_grads``; DeepSpeed reduces only over data parallel and
would apply a different, partial gradient on every tp rank (the replicas
drift apart). :func:`sum_sequence_parallel_grads` closes the gap with a
gradient hook per marked parameter, so the sum lands before DeepSpeed's own
hooks (ZeRO 0/1/2 reduce or partition in backward) see the gradient.

Which parameters: every one Megatron marks ``sequence_parallel=True``
(row-parallel biases upstream; the torch-norm weights and biases through the
CPU patch ``_SequenceParallelTorchNorm``, as apex's fused norm marks them).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def sequence_parallel_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable parameters whose gradient is a partial sum over the tp group."""
    return [p for p in model.parameters() if p.requires_grad and getattr(p, "sequence_parallel", False)]


def sum_sequence_parallel_grads(model: torch.nn.Module, tp_group=None) -> int:
    """Hook every sequence-parallel parameter so its gradient is summed over ``tp_group``.

    Call once, before the engine wraps the model. Returns the number of
    parameters hooked (0 when tp == 1 or sequence parallelism is off).
    """
    if tp_group is None:
        from megatron.core import parallel_state

        tp_group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(tp_group) == 1:
        return 0

    def summed(grad: torch.Tensor) -> torch.Tensor:
        # A hook must not modify its argument; a contiguous copy also keeps gloo
        # away from non-contiguous buffers (docs/cpu-internals.md).
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=tp_group)
        return grad

    params = sequence_parallel_params(model)
    for param in params:
        param.register_hook(summed)
    return len(params)
