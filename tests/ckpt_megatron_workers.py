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
"""

from __future__ import annotations

import multiprocessing
from typing import Any

from ckpt_workers import pretrain as _pretrain


def allow_child_processes() -> None:
    multiprocessing.current_process()._config.pop("daemon", None)


def use_in_process_queue() -> None:
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._results_queue = queue.Queue()


def pretrain(argv: list[str], in_process_queue: bool = True) -> Any:
    """``ckpt_workers.pretrain`` in a rank that may start processes."""
    allow_child_processes()
    if in_process_queue:
        use_in_process_queue()
    return _pretrain(argv)


def save_tiny_dist_checkpoint(path: str, skip_patches: list[str]) -> None:
    """One rank saves a one-tensor dist checkpoint with ``skip_patches`` left out (the CPU-patch probes)."""
    import os

    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    from zeromega.integrations.megatron import parallel
    from zeromega.launch.config import RunConfig

    allow_child_processes()
    use_in_process_queue()
    os.environ["ZEROMEGA_SKIP_PATCH"] = ",".join(skip_patches)
    parallel.initialize(RunConfig.model_validate({"batch": {"micro": 1, "global": 1}}), seed=1)
    try:
        tensor = ShardedTensor.from_rank_offsets("probe", torch.ones(4))
        dist_checkpointing.save({"probe": tensor}, path, sharded_strategy=TorchDistSaveShardedStrategy("torch_dist", 1))
    finally:
        parallel.shutdown()
