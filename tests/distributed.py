"""Run a function on N ranks of a CPU/gloo world and collect what each returns.

Children are forked from the test process, so Megatron-Core and DeepSpeed
are imported once (a spawned child pays ~7 s to import them again). The test
process itself never joins a process group, which keeps forking safe.
Results travel as plain Python objects (tensors from a forked child do not
outlive it).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn: Callable, rank: int, world: int, port: int, args: tuple, queue) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    try:
        queue.put((rank, "ok", fn(*args)))
    except BaseException:  # report every failure to the parent, then die
        queue.put((rank, "error", traceback.format_exc()))
        raise


def run_world(world: int, fn: Callable, *args: Any, timeout: float = 240.0) -> list[Any]:
    """``fn(*args)`` on ranks 0..world-1; returns the results in rank order or raises."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world, port, args, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        while len(results) < world:
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
