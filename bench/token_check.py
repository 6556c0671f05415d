"""What the vocabulary check costs a run: the largest token id of a ~200 MB ``.bin``, before and after.

Before (zeromega up to 35c38d7): every rank mapped the whole ``.bin`` and took ``max()`` over it, on every
run. After: :func:`zeromega.integrations.megatron.data.largest_token_id` scans in 64 MiB chunks once per
version of the file (rank 0, before the barrier) and every later look-up, on any rank or run, reads a small
cache entry keyed by the file's size, modification time and inode.

    python bench/token_check.py [--mib 200] [--ranks 8] [--repeat 5]

The file is generated (uint16 ids, 12 documents) in a temporary directory; times are the median of
``--repeat`` and include opening the files. Each is measured twice: "warm", the file in the page cache (a
node that just wrote or read it), and "cold", its pages dropped from the cache before every pass
(``posix_fadvise(DONTNEED)`` on this file only), so the scan reads it from the disk.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from zeromega.integrations.megatron import data


def whole_file_max(prefix: Path) -> int:
    """The check as it was: one memory map over the whole file, ``max()`` at once."""
    with open(f"{prefix}.idx", "rb") as f:
        f.seek(17)
        dtype = DType.dtype_from_code(f.read(1)[0])
    tokens = np.memmap(f"{prefix}.bin", dtype=dtype, mode="r")
    return int(tokens.max()) if tokens.size else -1


def evict(path: Path) -> None:
    """Drop this file's pages from the page cache (written pages are flushed first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn, repeat: int, cold: Path | None = None) -> tuple[float, int]:
    times, value = [], None
    for _ in range(repeat):
        if cold is not None:
            evict(cold)
        started = time.perf_counter()
        value = fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=200, help="size of the generated .bin in MiB (default 200)")
    p.add_argument("--ranks", type=int, default=8, help="ranks of the job the totals are for (default 8)")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ZEROMEGA_DATA"] = str(Path(tmp, "cache"))
        prefix = Path(tmp, "data")
        tokens = args.mib * 2**20 // 2
        builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
        rng = np.random.default_rng(0)
        for doc in np.array_split(np.arange(tokens), 12):
            builder.add_document(rng.integers(0, 50_000, doc.size, dtype=np.uint16), [doc.size])
        builder.finalize(f"{prefix}.idx")
        size = Path(f"{prefix}.bin").stat().st_size
        rows = {}
        for name, cold in (("warm", None), ("cold", Path(f"{prefix}.bin"))):
            before, a = timed(lambda: whole_file_max(prefix), args.repeat, cold)
            scan, b = timed(lambda: data.largest_token_id(prefix, cache=False), args.repeat, cold)
            data.largest_token_id(prefix)  # fills the cache
            cached, c = timed(lambda: data.largest_token_id(prefix), args.repeat, cold)
            assert a == b == c, (a, b, c)
            rows[name] = before, scan, cached
    print(f"{size / 2**20:.0f} MiB .bin, {tokens:,} uint16 ids, largest {a}; median of {args.repeat}")
    print(f"{'':34}{'warm ms':>10}{'x before':>10}{'cold ms':>10}{'x before':>10}")
    labels = ("before: whole-file max, per rank", "after: chunked scan (cache miss)", "after: cached look-up")
    for i, label in enumerate(labels):
        cells = "".join(f"{rows[k][i]:10.3f}{rows[k][0] / rows[k][i]:10.1f}" for k in ("warm", "cold"))
        print(f"{label:34}{cells}")
    n = args.ranks
    for name, (before, scan, cached) in rows.items():
        print(f"{name}, a job of {n} ranks per run: before {n} x {before:.1f} = {n * before:.0f} ms of scanning; "
              f"after, first run {scan:.1f} + {n - 1} x {cached:.3f} = {scan + (n - 1) * cached:.1f} ms, later "
              f"runs {n} x {cached:.3f} = {n * cached:.2f} ms")


if __name__ == "__main__":
    main()
