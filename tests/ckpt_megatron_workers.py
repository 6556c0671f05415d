"""What each rank runs in the Megatron-engine checkpoint tests: the real ``examples/pretrain_gpt.py``.

Megatron-Core's torch_dist writer starts processes of its own (one forked
writer per rank, and once per process a spawned ``multiprocessing.Manager``
whose queue carries the writers' results back), which ``multiprocessing``
refuses inside the daemonic ranks of ``tests/distributed.py``; each rank here
drops that flag first (torchrun's ranks are not daemonic, so the script
needs nothing).

The spawned Manager imports torch to unpickle the first result: ~6 s per
rank per run on 2 shared cores, the largest cost of these tests. A
synchronous save puts and gets that result in the same process, so with
``in_process_queue`` the ranks pre-seed Megatron's queue with a plain
``queue.Queue``; one test keeps the Manager, the path real runs take.

The failure tests add two hooks: a fault raised at one point of one rank's
save (what ``ckpt_workers`` does to DeepSpeed's engine), and a tripwire on
Megatron's ``dist_checkpointing.load`` for runs that must load nothing.
"""

from __future__ import annotations

import multiprocessing
from typing import Any, Optional

from ckpt_workers import pretrain as _pretrain


def allow_child_processes() -> None:
    multiprocessing.current_process()._config.pop("daemon", None)


def use_in_process_queue() -> None:
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._results_queue = queue.Queue()


def inject_fault(point: str, rank: int, after: int) -> None:
    """Every MegatronCheckpointer of this process raises at ``point`` on global rank ``rank``, in the
    save after ``after`` complete ones (the hook the checkpointer offers as ``fault``)."""
    import torch.distributed as dist

    from zeromega.checkpoint.megatron import MegatronCheckpointer

    original = MegatronCheckpointer.__init__

    def init(self, *args, **kwargs):
        seen = []

        def fault(where: str) -> None:
            if where == point and dist.get_rank() == rank:
                seen.append(where)
                if len(seen) > after:
                    raise RuntimeError(f"injected fault at {where}")

        original(self, *args, **{**kwargs, "fault": fault})

    MegatronCheckpointer.__init__ = init


def forbid_dist_loads() -> None:
    """Any read of a dist checkpoint's tensors fails the run with a message the test looks for."""
    from megatron.core import dist_checkpointing

    def load(*args, **kwargs):
        raise AssertionError("dist_checkpointing.load was called")

    dist_checkpointing.load = load


def pretrain(argv: list[str], in_process_queue: bool = True, fault: Optional[tuple[str, int, int]] = None,
             forbid_loads: bool = False) -> Any:
    """``ckpt_workers.pretrain`` in a rank that may start processes; ``fault`` = (point, rank, complete
    saves before it) as :func:`inject_fault` takes them."""
    allow_child_processes()
    if in_process_queue:
        use_in_process_queue()
    if fault is not None:
        inject_fault(*fault)
    if forbid_loads:
        forbid_dist_loads()
    return _pretrain(argv)


def save_tiny_dist_checkpoint(path: str, skip_patches: list[str]) -> None:
    """One rank saves a one-tensor dist checkpoint with ``skip_patches`` left out (the CPU-patch probes)."""
    import os

    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    from zeromega.integrations.megatron import parallel
    from zeromega.config.schema import RunConfig

    allow_child_processes()
    use_in_process_queue()
    os.environ["ZEROMEGA_SKIP_PATCH"] = ",".join(skip_patches)
    parallel.initialize(RunConfig.model_validate({"batch": {"micro": 1, "global": 1}}), seed=1)
    try:
        tensor = ShardedTensor.from_rank_offsets("probe", torch.ones(4))
        dist_checkpointing.save({"probe": tensor}, path, sharded_strategy=TorchDistSaveShardedStrategy("torch_dist", 1))
    finally:
        parallel.shutdown()
