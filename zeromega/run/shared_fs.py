"""Directories a multi-node job needs every node to share, checked before anything is built or loaded.

Rank 0 alone writes some files that every rank then reads: Megatron-Core's
shuffle/sample index cache (rank 0 builds it, the others load it after a
barrier) and a checkpoint's ``latest`` (each rank writes its own shard;
on resume every rank reads ``latest`` and its shard). On nodes without a
shared filesystem the other nodes do not find them: a rank fails on a
missing ``.npy``, or resumes from another step than rank 0 (or from none).

So when the job spans nodes, rank 0 leaves a uniquely named file in each
such directory, every rank looks for it, and a node that does not see it
is refused in one line, before training, naming the directory and the fix.
One-node jobs skip the check.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from zeromega.config import ConfigError

_SETTLE_S = 2.0  # how long a rank keeps looking for rank 0's file (a network filesystem's lookup may lag)


def spans_nodes() -> bool:
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    return dist.is_initialized() and 0 < per_node < dist.get_world_size()


def nodes_not_seeing(directory: str | Path, create: bool = True) -> Optional[list[int]]:
    """The nodes (rank // LOCAL_WORLD_SIZE) whose ranks do not see a file rank 0 writes in ``directory``;
    None when rank 0 could not write there, or it does not exist and ``create`` is false (nothing to check).
    Collective: every rank calls it."""
    box = [None]
    if dist.get_rank() == 0 and (create or os.path.isdir(directory)):
        name = Path(directory) / f".zeromega-shared-{uuid.uuid4().hex}"
        try:
            name.parent.mkdir(parents=True, exist_ok=True)
            name.write_text("written by rank 0 to see which nodes share this directory\n")
            box[0] = str(name)
        except OSError:
            pass
    dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        return None
    end = time.monotonic() + _SETTLE_S
    seen = os.path.exists(box[0])
    while not seen and time.monotonic() < end:
        time.sleep(0.1)
        seen = os.path.exists(box[0])
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, seen)
    if dist.get_rank() == 0:
        try:
            os.unlink(box[0])
        except OSError:
            pass
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or dist.get_world_size()
    return sorted({rank // per_node for rank, ok in enumerate(everyone) if not ok})


def _refuse(field: str, value: str, nodes: list[int], what: str, fix: str) -> ConfigError:
    which = "node " + ", ".join(map(str, nodes)) if len(nodes) < 4 else f"{len(nodes)} nodes"
    return ConfigError(field, value, f"{which} do{'es' if len(nodes) == 1 else ''} not see the files rank 0 writes "
                       f"there (no filesystem shared by every node): {what}", fix)


def check(cfg, data_prefixes: list[str]) -> None:
    """Refuse, on every rank alike, a multi-node job whose data index cache or checkpoint directory is not
    shared by every node."""
    if not spans_nodes():
        return
    if data_prefixes:
        cache = cfg.data.cache_path or str(Path(data_prefixes[0]).parent)
        nodes = nodes_not_seeing(cache)
        if nodes:
            field = "data.cache_path" if cfg.data.cache_path else "data.path"
            raise _refuse(field, cache, nodes, "Megatron-Core's index cache is built once by rank 0 and read by "
                          "every rank", "put --data-cache-path on a filesystem every node mounts (the data "
                          "itself may be a copy on each node)")
    for field, directory in (("checkpoint.save", cfg.checkpoint.save), ("checkpoint.load", cfg.checkpoint.load)):
        if directory:
            nodes = nodes_not_seeing(directory, create=field == "checkpoint.save")
            if nodes:
                raise _refuse(field, directory, nodes, "each rank writes its shard there and resumes from the "
                              "'latest' rank 0 writes", f"put --{field.split('.')[1]} on a filesystem every "
                              "node mounts")
            if cfg.checkpoint.save == cfg.checkpoint.load:
                break
