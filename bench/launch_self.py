"""Benchmarks re-launch themselves on N ranks through ``zeromega launch`` when started plainly."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable


def run_on_ranks(script: str, nproc: int, worker: Callable, args) -> None:
    """Inside a launched rank, ``worker(args)``; otherwise start ``script`` on ``nproc`` ranks and exit with its code."""
    if "RANK" in os.environ:
        worker(args)
        return
    cmd = [sys.executable, "-m", "zeromega", "launch", "--nproc-per-node", str(nproc), script, *sys.argv[1:]]
    raise SystemExit(subprocess.call(cmd))
