#!/usr/bin/env python
"""Peak attention memory per rank as the sequence grows: each mode against one process.

Method: forward + backward of one attention layer (b=1, h=8, h_kv=8, d=32, fp32,
causal) inside :class:`seq_common.TensorBytes`, which adds up the bytes of every
tensor storage an aten op creates and subtracts them when the storage is freed,
so its peak is the most tensor memory alive at once (outputs, autograd's saved
tensors, gradients, all-to-all and ring buffers), plus this rank's inputs
(q, k, v and the output gradient, each ``[b, s_l, h, d]``). CPU has no
allocator statistics like ``torch.cuda.max_memory_allocated``; memory a fused
kernel allocates and frees inside one call is not seen. Two one-process
baselines: the same fused kernel (memory O(s)) and the unfused math path, whose
``[b, h, s, s]`` scores are what sequence parallelism exists to avoid.
Printed: max over ranks, and its ratio to the fused one-process peak (goal 1/P).

    python bench/seq_memory.py                  # about a minute on 2 cores
    python bench/seq_memory.py --seq 2048 8192
"""

from __future__ import annotations

import argparse

import torch

from seq_common import MODES, TensorBytes, full_fn, init_world, inputs, math_fn, mode_fn, run_world

B, H, KV, D = 1, 8, 8, 32


def peak_bytes(fn, s_l: int) -> int:
    q, k, v, dout = inputs(B, s_l, H, KV, D)
    with TensorBytes() as meter:
        fn(q, k, v, True).backward(dout)
    return meter.peak + sum(t.nbytes for t in (q, k, v, dout))  # plus this rank's inputs


def rank_peak(name: str, seq: int) -> int:
    dist = init_world()
    return peak_bytes(mode_fn(name), seq // dist.get_world_size())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--math-max-seq", type=int, default=4096, help="skip the unfused baseline above this")
    args = p.parse_args()
    torch.set_num_threads(2)
    mib = 2.0**20
    print(f"attention fwd+bwd, b={B} h={H} h_kv={KV} d={D} fp32 causal; peak tensor MiB per rank "
          "(ratio to one-process fused)")
    print(f"{'seq':>6} {'1p math':>9} {'1p fused':>9} " + " ".join(f"{m:>16}" for m in MODES))
    for seq in args.seq:
        fused = peak_bytes(full_fn, seq)
        math = peak_bytes(math_fn, seq) if seq <= args.math_max_seq else None
        row = [f"{seq:>6}", f"{math / mib:9.1f}" if math else f"{'-':>9}", f"{fused / mib:9.1f}"]
        for name, (world, _) in MODES.items():
            peak = max(run_world(world, rank_peak, name, seq))
            row.append(f"{peak / mib:8.1f} ({peak / fused:4.2f})")
        print(" ".join(row), flush=True)


if __name__ == "__main__":
    main()
