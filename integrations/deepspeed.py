"""DeepSpeed glue for a Megatron-Core model: Megatron's groups as DeepSpeed's mpu, deepspeed.comm.

DeepSpeed partitions optimizer state (ZeRO) and reduces gradients only over
the data-parallel group it gets from the mpu; Megatron-Core's own layers do
the tensor-parallel communication. :class:`MegatronMPU` is the seam. The
engine itself (``build_engine``, ``model_init_context``) is built one layer
up, in :mod:`zeromega.plugins.zero.engine`.
"""

from __future__ import annotations

import functools

import torch

from . import accelerator as accel


class MegatronMPU:
    """Megatron-Core's ``parallel_state`` in the shape DeepSpeed's ``mpu`` argument expects.

    DeepSpeed's "model parallel" is Megatron's tensor parallel (the DeepSpeed
    engine runs whole models, pp == 1); its "data parallel" is Megatron's
    data-parallel group including context-parallel ranks, because gradients
    are averaged over both.
    """

    @staticmethod
    def _ps():
        from megatron.core import parallel_state

        return parallel_state

    def get_model_parallel_group(self):
        return self._ps().get_tensor_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return self._ps().get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self._ps().get_tensor_model_parallel_world_size()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps().get_tensor_model_parallel_src_rank()

    def get_data_parallel_group(self):
        return self._ps().get_data_parallel_group(with_context_parallel=True)

    def get_data_parallel_rank(self) -> int:
        return self._ps().get_data_parallel_rank(with_context_parallel=True)

    def get_data_parallel_world_size(self) -> int:
        return self._ps().get_data_parallel_world_size(with_context_parallel=True)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(torch.distributed.get_process_group_ranks(self.get_data_parallel_group()))


def _deepspeed_comm() -> None:
    """Attach deepspeed.comm to the torch.distributed job zeromega started (it reads
    ranks and world size through its own module, not torch's)."""
    import deepspeed

    device = accel.current()
    device.deepspeed_accelerator()
    deepspeed.init_distributed(dist_backend=device.backend, auto_mpi_discovery=False)


def gathered_init(init_method):
    """An init method that also works on a ZeRO-3-partitioned parameter.

    Under ``zero.Init`` a child module's parameters are partitioned as soon as
    the child is built, before Megatron-Core's parent module initialises them
    (the position embedding, for one): the init would touch an empty shard and
    the model would differ from the one built without ZeRO-3. Gathering the
    full parameter around the init keeps the same values and RNG stream.
    """

    @functools.wraps(init_method)
    def init(tensor):
        if not hasattr(tensor, "ds_id"):
            return init_method(tensor)
        import deepspeed

        with deepspeed.zero.GatheredParameters(tensor, modifier_rank=0):
            return init_method(tensor)

    return init

