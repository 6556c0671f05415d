#!/usr/bin/env python
"""Bytes per second DeepSpeed's NVMe offload moves to and from the nvme path, against the raw disk.

Method, in one run on the same directory:

1. raw sequential bandwidth: DeepSpeed's own ``aio_handle`` (the path the
   swapper uses: O_DIRECT, ``block_size`` 1 MiB, queue depth 8, 1 thread)
   writes then reads one ``--raw-mb`` file from a page-locked buffer;
   also plain buffered ``write``+``fsync`` / ``read`` after dropping the
   file from the page cache (``posix_fadvise DONTNEED``) for reference;
2. training: ZeRO-3 with optimizer and parameters offloaded to nvme, one
   process, a few steps; per step the bytes read and written
   (``/proc/self/io``, which counts the aio threads' O_DIRECT requests) over
   the step time, and over the time the swapper itself spent in I/O
   (DeepSpeed's swap timers are not exposed; the step time bounds it).

Printed: each as GB/s and as a fraction of the raw aio bandwidth.

    python bench/offload_throughput.py --nvme /work/nvme_bench     # ~2-3 min
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def raw_aio(path: str, nbytes: int) -> tuple[float, float]:
    """(write GB/s, read GB/s) of one file through DeepSpeed's aio handle."""
    import torch
    from deepspeed.ops.op_builder import AsyncIOBuilder

    aio = AsyncIOBuilder().load(verbose=False)
    handle = aio.aio_handle(1048576, 8, False, True, 1)
    buf = handle.new_cpu_locked_tensor(nbytes // 4, torch.empty(0, dtype=torch.float32))
    buf.uniform_()
    name = os.path.join(path, "raw.bin")
    t = time.perf_counter()
    handle.sync_pwrite(buf, name)
    w = nbytes / (time.perf_counter() - t) / 1e9
    back = handle.new_cpu_locked_tensor(nbytes // 4, torch.empty(0, dtype=torch.float32))
    t = time.perf_counter()
    handle.sync_pread(back, name)
    r = nbytes / (time.perf_counter() - t) / 1e9
    assert torch.equal(buf, back), "aio round trip differs"
    handle.free_cpu_locked_tensor(buf)
    handle.free_cpu_locked_tensor(back)
    os.unlink(name)
    return w, r


def raw_buffered(path: str, nbytes: int) -> tuple[float, float]:
    """(write GB/s, read GB/s) with plain write+fsync and an uncached read."""
    name = os.path.join(path, "raw_buffered.bin")
    chunk = os.urandom(1 << 20) * 16
    t = time.perf_counter()
    with open(name, "wb") as f:
        for _ in range(nbytes // len(chunk)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    w = nbytes / (time.perf_counter() - t) / 1e9
    fd = os.open(name, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    t = time.perf_counter()
    while os.read(fd, 16 << 20):
        pass
    r = nbytes / (time.perf_counter() - t) / 1e9
    os.close(fd)
    os.unlink(name)
    return w, r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nvme", default=None, help="directory on the disk to measure (default: a temp dir under /work)")
    p.add_argument("--raw-mb", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    base = args.nvme or tempfile.mkdtemp(prefix="offload_throughput-", dir="/work" if os.path.isdir("/work") else None)
    os.makedirs(base, exist_ok=True)
    nbytes = args.raw_mb << 20
    aw, ar = raw_aio(base, nbytes)
    bw, br = raw_buffered(base, nbytes)
    print(f"raw, {args.raw_mb} MiB sequential on {base}:")
    print(f"  DeepSpeed aio (O_DIRECT, 1 MiB blocks, qd 8): write {aw:.2f} GB/s, read {ar:.2f} GB/s")
    print(f"  buffered write+fsync / uncached read:        write {bw:.2f} GB/s, read {br:.2f} GB/s")

    from distributed import run_world
    from zero_workers import train_offload_steps

    from zeromega.integrations.megatron import data

    corpus = str(data.build_corpus(os.path.join(base, "corpus", "stdlib"), max_bytes=300_000))
    shape = dict(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.hidden // 64,
                 seq_length=64, vocab_size=257, hidden_dropout=0.0, attention_dropout=0.0)
    nv = {"device": "nvme", "nvme_path": os.path.join(base, "swap"), "pin_memory": False}
    os.makedirs(nv["nvme_path"], exist_ok=True)
    cfg = {"zero": {"stage": 3, "offload_optimizer": nv, "offload_param": nv}, "precision": "fp32",
           "batch": {"micro": 1, "global": 1}, "optimizer": {"lr": 1e-4}}
    steps = run_world(1, train_offload_steps, cfg, shape, corpus, args.steps, timeout=1800)[0]
    print(f"training: ZeRO-3, optimizer + params on nvme, fp32, {args.layers} layers x hidden {args.hidden}, 1 rank")
    print(f"{'step':>4} {'s':>6} {'read GB':>8} {'wrote GB':>9} {'read GB/s':>10} {'(of raw)':>9} "
          f"{'write GB/s':>11} {'(of raw)':>9}")
    for s in steps:
        r, w = s["read"] / s["s"] / 1e9, s["written"] / s["s"] / 1e9
        print(f"{s['step']:>4} {s['s']:>6.1f} {s['read'] / 1e9:>8.2f} {s['written'] / 1e9:>9.2f} {r:>10.2f} "
              f"{r / ar:>9.2f} {w:>11.2f} {w / aw:>9.2f}")
    import shutil

    shutil.rmtree(nv["nvme_path"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
