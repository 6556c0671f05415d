"""Run a function on N ranks of a CPU/gloo world and collect what each returns.

Children are forked from the test process, so Megatron-Core and DeepSpeed
are imported once (a spawned child pays ~7 s to import them again). The test
process itself never joins a process group, which keeps forking safe.
Results travel as plain Python objects (tensors from a forked child do not
outlive it).

Also the helpers of the tests that run ``zeromega launch`` as a subprocess
(tests/test_launch.py, tests/test_multinode.py): :func:`launch_env` gives a
job a token in its environment, :func:`survivors` finds any process of that
job still alive.
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


LAUNCH_ENV_DROPPED = ("OMP_NUM_THREADS", "ZEROMEGA_CONFIG")
"""What a launched job must not inherit from the test's environment (the launcher sets or checks them)."""


def launch_env(token: str, extra: dict | None = None, drop: tuple = ()) -> dict:
    """The environment of a ``zeromega launch`` subprocess: this one's, less :data:`LAUNCH_ENV_DROPPED` and
    ``drop``, plus ``extra`` and ``ZEROMEGA_TEST_TOKEN=token``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV_DROPPED + tuple(drop)}
    env.update(extra or {}, ZEROMEGA_TEST_TOKEN=token)
    return env


def survivors(token: str) -> list:
    """Processes (psutil) still alive that carry the job's token in their environment."""
    import psutil

    alive = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("ZEROMEGA_TEST_TOKEN") == token and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.Error:
            continue
    return alive
