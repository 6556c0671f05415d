"""The memory report: what a rank measured beside what the plan said.

Measured per rank: the peak (``accelerator.peak_memory_bytes``: the
process's ``ru_maxrss`` on CPU, ``torch.cuda.max_memory_allocated`` on
CUDA), the bytes lying under the nvme path(s) and the storage bytes the
process read and wrote (``/proc/self/io``, which counts the O_DIRECT
requests DeepSpeed's async I/O threads issue). A report is a plain dict so
ranks can gather it and the benchmarks can print it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

from .plan import MemoryPlan, MiB


def proc_io() -> dict:
    """This process's storage I/O so far: ``read_bytes``, ``write_bytes`` (0s where /proc has none)."""
    out = {"read_bytes": 0, "write_bytes": 0}
    try:
        with open("/proc/self/io") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in out:
                    out[key] = int(value)
    except OSError:
        pass
    return out


def bytes_under(paths: Iterable[Optional[str]]) -> int:
    """Bytes of the files under each path (DeepSpeed's swap files for every rank of this host)."""
    total = 0
    for root in {str(p) for p in paths if p}:
        for dirpath, _, files in os.walk(root):
            for name in files:
                try:
                    total += os.path.getsize(os.path.join(dirpath, name))
                except OSError:
                    pass
    return total


def current_rss() -> int:
    """This process's resident set now (bytes)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Measured:
    """What one rank measured over a run."""

    peak_bytes: int
    """Peak memory (RSS on CPU, allocator peak on CUDA)."""
    nvme_bytes: int = 0
    """Bytes in swap files under the nvme path(s) at the end (every rank of the host)."""
    read_bytes: int = 0
    """Storage bytes this rank read during training."""
    write_bytes: int = 0
    """Storage bytes this rank wrote during training (init included)."""
    init_bytes: Optional[int] = None
    """Resident bytes after the engine was built."""


class IOWatch:
    """Storage bytes read/written between :meth:`start` and :meth:`stop` (per process)."""

    def __init__(self):
        self._start = proc_io()
        self.read_bytes = self.write_bytes = 0

    def start(self) -> "IOWatch":
        self._start = proc_io()
        return self

    def stop(self) -> "IOWatch":
        now = proc_io()
        self.read_bytes = now["read_bytes"] - self._start["read_bytes"]
        self.write_bytes = now["write_bytes"] - self._start["write_bytes"]
        return self


def measure(nvme_paths: Iterable[Optional[str]] = (), io: Optional[IOWatch] = None,
            init_bytes: Optional[int] = None) -> Measured:
    from zeromega.integrations import accelerator as accel

    return Measured(peak_bytes=accel.current().peak_memory_bytes(), nvme_bytes=bytes_under(nvme_paths),
                    read_bytes=io.read_bytes if io else 0, write_bytes=io.write_bytes if io else 0,
                    init_bytes=init_bytes)


def compare(plan: MemoryPlan, measured: Measured, device_type: str = "cpu", ranks_on_host: int = 1) -> dict:
    """Measured beside planned: ``peak`` and ``nvme`` as (measured, planned, ratio)."""
    peak = plan.peak(device_type)
    nvme = plan.nvme_bytes * ranks_on_host
    out = {"peak": (measured.peak_bytes, peak, measured.peak_bytes / peak if peak else None)}
    if nvme or measured.nvme_bytes:
        out["nvme"] = (measured.nvme_bytes, nvme, measured.nvme_bytes / nvme if nvme else None)
    out["read_bytes"], out["write_bytes"] = measured.read_bytes, measured.write_bytes
    return out


def format_report(plan: MemoryPlan, measured: list[Measured], device_type: str = "cpu") -> str:
    """The plan table followed by each rank's measurement and its ratio to the plan."""
    lines = [plan.table(device_type), "measured per rank:"]
    for rank, m in enumerate(measured):
        c = compare(plan, m, device_type, len(measured))
        got, want, ratio = c["peak"]
        line = f"  rank {rank}: peak {got / MiB:,.0f} MiB vs plan {want / MiB:,.0f} MiB (x{ratio:.2f})"
        if "nvme" in c:
            line += f"; nvme files {c['nvme'][0] / MiB:,.0f} MiB vs plan {c['nvme'][1] / MiB:,.0f} MiB"
        if m.read_bytes or m.write_bytes:
            line += f"; read {m.read_bytes / MiB:,.0f} MiB, wrote {m.write_bytes / MiB:,.0f} MiB"
        lines.append(line)
    return "\n".join(lines)


def as_dict(m: Measured) -> dict:
    return asdict(m)
