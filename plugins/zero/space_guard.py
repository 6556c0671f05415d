"""Stop a run whose nvme swap path has filled up, naming the path, before DeepSpeed reads a short file.

DeepSpeed 0.19.8 does not notice a swap write that the disk could not hold:
it leaves a short ``.swp`` file and the next swap-in aborts the process in
C++ (``deepspeed_py_io_handle.cpp: is_valid_bytes_to_read`` assertion,
reproduced with a 64 MB ext4 loop mount as the nvme path). The pre-flight
checks the space before launch; this guard covers what fills the disk
afterwards (other jobs, a growing log, a checkpoint on the same drive). It
runs after engine set-up and after every optimizer step, before the next
forward swaps anything in, so a run stops with the path and the bytes it
needs named, and checkpoints written at earlier steps are left as they were.
A disk that fills while DeepSpeed is still writing (inside
``deepspeed.initialize``, which swaps every state out and reads some back, or
within a step) is caught one layer lower: :func:`check_swap_reads` makes
every swap-in first compare each file's size with the bytes about to be read,
the condition DeepSpeed's C++ asserts, and raise :class:`OffloadSpaceError`
with the path and the free space instead of aborting the process.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

LOW_WATER_BYTES = 1 << 20
"""Below one aio block (1 MiB) of free space a swap write has most likely been cut short."""


class OffloadSpaceError(RuntimeError):
    """The nvme path ran out of space during training."""


def _free_bytes(path: str) -> int:
    """Bytes this process can still write under ``path`` (root may use the reserved blocks)."""
    st = os.statvfs(path)
    blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail
    return blocks * st.f_frsize


class SwapSpaceGuard:
    """Check each nvme swap path after a step; raise OffloadSpaceError when one is full."""

    def __init__(self, paths: dict[str, str], needed_bytes: int, free_bytes: Callable[[str], int] = _free_bytes):
        self.paths = paths  # path -> the config field that names it
        self.needed_bytes = needed_bytes
        self._free = free_bytes

    @classmethod
    def for_deepspeed(cls, ds: dict, needed_bytes: int = 0) -> "SwapSpaceGuard | None":
        """The guard for a DeepSpeed dict's nvme paths; None when nothing is swapped to nvme."""
        zero = ds.get("zero_optimization") or {}
        paths = {}
        for key in ("offload_optimizer", "offload_param"):
            block = zero.get(key) or {}
            if block.get("device") == "nvme" and block.get("nvme_path"):
                paths.setdefault(str(block["nvme_path"]), f"zero_optimization.{key}.nvme_path")
        return cls(paths, needed_bytes) if paths else None

    def check(self) -> None:
        for path, field in self.paths.items():
            free = self._free(path)
            if free < LOW_WATER_BYTES:
                need = f"; the plan needs {self.needed_bytes / 2**30:.2f} GiB there per rank" if self.needed_bytes else ""
                raise OffloadSpaceError(
                    f"{field}={path!r}: the disk filled up during training ({free} bytes free){need}; DeepSpeed "
                    "cannot swap its states back in from cut-short files. Fix: free space on that drive or point "
                    f"{field} at a drive with room, then resume from the last checkpoint")

    def wrap_step(self, engine) -> None:
        """Run :meth:`check` after each ``engine.step()``."""
        step = engine.step

        def checked_step(*args, **kwargs):
            out = step(*args, **kwargs)
            self.check()
            return out

        engine.step = checked_step


# DeepSpeed 0.19.8 reads every swap file through swap_tensor.utils.swap_in_tensors; these
# modules import it by name, so each binding is replaced.
_SWAP_IN_USERS = ("utils", "partitioned_optimizer_swapper", "partitioned_param_swapper", "optimizer_utils",
                  "pipelined_optimizer_swapper")


def _checked_swap_in(original: Callable, free_bytes: Callable[[str], int] = _free_bytes) -> Callable:
    """``swap_in_tensors`` that refuses to read a swap file shorter than the buffer it fills."""

    def swap_in_tensors(swap_handle, tensor_buffers, swap_paths):
        for buffer, path in zip(tensor_buffers, swap_paths):
            want = buffer.numel() * buffer.element_size()
            have = os.path.getsize(path) if os.path.exists(path) else 0
            if have < want:
                folder = os.path.dirname(path) or "."
                raise OffloadSpaceError(
                    f"nvme swap file {path} holds {have} of the {want} bytes DeepSpeed is about to read back: a "
                    f"write was cut short ({free_bytes(folder)} bytes free in {folder}). Fix: free space on that "
                    "drive or point the nvme_path at a drive with room, then resume from the last checkpoint")
        return original(swap_handle, tensor_buffers, swap_paths)

    swap_in_tensors.zeromega_checked = True
    return swap_in_tensors


SWAP_FOLDER = "zero_stage_3"
"""What DeepSpeed 0.19.8 creates under an nvme_path (``optimizer/rankN``, ``<dtype>params/rankN``)."""
OWNERS = ".zeromega-owners"
"""Inside it: one empty file ``HOST-PID`` per rank process of zeromega that swaps there."""


def mark_swap_owner(paths) -> None:
    """Record this process as a user of each nvme path's swap folder (the pre-flight of a later run tells a
    crashed run's leftovers from a live run's files by these)."""
    import socket

    for path in paths:
        owners = os.path.join(path, SWAP_FOLDER, OWNERS)
        try:
            os.makedirs(owners, exist_ok=True)
            open(os.path.join(owners, f"{socket.gethostname()}-{os.getpid()}"), "w").close()
        except OSError:
            pass  # the pre-flight names an unwritable path; a rank does not stop for its bookkeeping


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tree_bytes(path: str) -> int:
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def stale_swap(path: str, remove: bool = True) -> tuple[int, str]:
    """Swap files under ``path`` that the next run may take: (bytes, what was done) for the pre-flight.

    - written by zeromega ranks that are all dead (a crashed or killed run): removed (with ``remove``) and
      counted as free;
    - written by a process zeromega did not record (DeepSpeed alone, an older zeromega): not removed, but
      counted as free, since DeepSpeed's ranks overwrite the same ``rankN`` files (and clear the parameter
      folder) when they start;
    - a live zeromega rank on this host still uses them: (0, note), nothing touched.
    """
    import shutil
    import socket

    folder = os.path.join(path, SWAP_FOLDER)
    if not os.path.isdir(folder):
        return 0, ""
    nbytes = _tree_bytes(folder)
    owners_dir = os.path.join(folder, OWNERS)
    owners = sorted(os.listdir(owners_dir)) if os.path.isdir(owners_dir) else []
    host = socket.gethostname()
    pids = [int(name.rsplit("-", 1)[1]) for name in owners
            if name.rsplit("-", 1)[0] == host and name.rsplit("-", 1)[-1].isdigit()]
    live = [pid for pid in pids if _alive(pid)]
    if live:
        return 0, f"{folder} is in use by live rank(s) {live[:4]} (another run on this nvme path)"
    if owners and len(pids) == len(owners) and remove:
        shutil.rmtree(folder, ignore_errors=True)
        return nbytes, f"removed {nbytes} bytes of swap files that a run which is no longer alive left in {folder}"
    return nbytes, f"{nbytes} bytes of earlier swap files in {folder} counted as free (the run overwrites them)"


def check_swap_reads(ds: dict) -> None:
    """Before ``deepspeed.initialize``: when ``ds`` swaps to nvme, check every swap read (see module doc), and
    record this rank as the user of the swap folders (:func:`mark_swap_owner`)."""
    guard = SwapSpaceGuard.for_deepspeed(ds)
    if guard is None:
        return
    mark_swap_owner(guard.paths)
    import importlib

    for name in _SWAP_IN_USERS:
        module = importlib.import_module(f"deepspeed.runtime.swap_tensor.{name}")
        current = getattr(module, "swap_in_tensors", None)
        if current is not None and not getattr(current, "zeromega_checked", False):
            module.swap_in_tensors = _checked_swap_in(current)


def guard_engine(engine, ds: dict, needed_bytes: int = 0) -> None:
    """Attach a :class:`SwapSpaceGuard` to ``engine`` when ``ds`` swaps to nvme; check once now, since
    engine set-up already swaps every state out."""
    guard = SwapSpaceGuard.for_deepspeed(ds, needed_bytes)
    if guard is not None:
        guard.check()
        guard.wrap_step(engine)


__all__ = ["LOW_WATER_BYTES", "OffloadSpaceError", "SwapSpaceGuard", "check_swap_reads", "guard_engine",
           "mark_swap_owner", "stale_swap"]
