"""The two communication patterns sequence parallelism needs, safe on gloo.

Legend: ``P`` ranks in the group, ``r`` this rank's index in it.

- :func:`all_to_all`: split one dim into ``P`` parts, send part ``p`` to rank
  ``p``, concatenate what arrives along another dim (rank-major). Its
  backward is the same exchange with the dims swapped. Every buffer handed to
  the backend is freshly made contiguous: gloo writes silently wrong values
  into non-contiguous buffers (pytorch issue 192920), and the gradients that
  reach a collective's backward are often non-contiguous (an einsum's or a
  transpose's backward). Split sizes go as lists (gloo rejects tensors).
- :class:`Ring`: post the send of a block to ``r+1`` and the receive of the
  next one from ``r-1``, return handles, let the caller compute meanwhile.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _exchange(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    size = dist.get_world_size(group)
    if size == 1:
        return x
    if x.size(scatter_dim) % size:
        raise ValueError(f"all_to_all: dim {scatter_dim} of size {x.size(scatter_dim)} does not split "
                         f"over {size} ranks")
    send = x.unflatten(scatter_dim, (size, -1)).movedim(scatter_dim, 0).contiguous()  # [P, ...]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, [1] * size, [1] * size, group=group)
    # recv[p] came from rank p and belongs at position p of the gathered dim.
    return recv.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1).contiguous()


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _exchange(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _exchange(grad.contiguous(), ctx.group, gather_dim, scatter_dim), None, None, None


def all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Differentiable all-to-all: ``x`` split along ``scatter_dim``, gathered along ``gather_dim``."""
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


class Ring:
    """Neighbours of this rank in ``group`` and asynchronous block passing to the next one."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def source(self, step: int) -> int:
        """Group rank whose block this rank holds after ``step`` passes."""
        return (self.rank - step) % self.size

    def pass_on(self, block: torch.Tensor, tag: int) -> tuple[torch.Tensor, list]:
        """Send ``block`` to the next rank and receive the previous rank's into a new buffer.

        Returns (buffer, handles); the buffer is valid after every handle's ``wait()``.
        """
        block = block.contiguous()
        buffer = torch.empty_like(block)
        handles = [dist.isend(block, self.next, group=self.group, tag=tag),
                   dist.irecv(buffer, self.prev, group=self.group, tag=tag)]
        return buffer, handles


def wait_all(handles: list) -> None:
    for handle in handles:
        handle.wait()
