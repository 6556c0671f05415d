#!/usr/bin/env python
"""Bytes each rank hands to torch.distributed for one attention layer (fwd+bwd), against theory.

Counted by ``zeromega.integrations.comm`` (``install()`` wraps the
collectives, ``take()`` reads and resets): an all-to-all counts the tensor
it is handed, a send counts what is sent. Theory, per rank, with
``e`` bytes per element, ``s_l`` local tokens, ``h`` query heads and
``h_kv' = max(h_kv, U)`` key/value heads after GQA replication:

- Ulysses (U ranks): forward all-to-alls of q, k, v and out, backward of
  their gradients: ``2 x b s_l d (2h + 2h_kv') e``; of that, ``(U-1)/U``
  actually leaves the rank.
- Ring (P ranks): forward ``P-1`` key/value blocks ``2 b s_l h_kv d e``;
  backward the same ``P-1`` blocks again plus ``P`` passes of their fp32
  gradients (the last pass brings each block's gradient home).
- USP (U x R): Ulysses over U on the local tokens, then ring over R on
  ``U s_l`` tokens with ``h_kv'/U`` key/value heads.

    python bench/seq_comm.py          # a few seconds
"""

from __future__ import annotations

import argparse

from seq_common import MODES, init_world, inputs, mode_fn, run_world

B, S, H, D = 2, 1024, 8, 32


def ulysses_bytes(s_l: int, h: int, kv: int, u: int, e: int) -> int:
    return 2 * B * s_l * D * (2 * h + 2 * max(kv, u)) * e


def ring_bytes(s_l: int, kv: int, p: int, e: int) -> int:
    block = 2 * B * s_l * kv * D
    return (p - 1) * block * e * 2 + p * block * 4


def theory(name: str, kv: int, e: int) -> int:
    world, u = MODES[name]
    s_l = S // world
    if name.startswith("ulysses"):
        return ulysses_bytes(s_l, H, kv, world, e)
    if name.startswith("ring"):
        return ring_bytes(s_l, kv, world, e)
    r = world // u
    return ulysses_bytes(s_l, H, kv, u, e) + ring_bytes(u * s_l, max(kv, u) // u, r, e)


def counted(name: str, kv: int) -> dict:
    from zeromega.integrations import comm

    dist = init_world()
    comm.install()
    fn = mode_fn(name)
    q, k, v, dout = inputs(B, S // dist.get_world_size(), H, kv, D)
    comm.take()
    fn(q, k, v, True).backward(dout)
    return comm.take()


def main():
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    mib = 2.0**20
    print(f"one attention layer fwd+bwd, b={B} s={S} h={H} d={D} fp32 causal; MiB per rank (max over ranks)")
    print(f"{'mode':>9} {'h_kv':>4} {'all_to_all':>10} {'p2p':>8} {'total':>8} {'theory':>8} {'ratio':>6}")
    for name, (world, _) in MODES.items():
        for kv in (H, 2):
            per_rank = run_world(world, counted, name, kv)
            a2a = max(r.get("all_to_all", 0) for r in per_rank)
            p2p = max(r.get("p2p", 0) for r in per_rank)
            other = {k for r in per_rank for k in r} - {"all_to_all", "p2p"}
            want = theory(name, kv, 4)
            print(f"{name:>9} {kv:>4} {a2a / mib:10.2f} {p2p / mib:8.2f} {(a2a + p2p) / mib:8.2f} "
                  f"{want / mib:8.2f} {(a2a + p2p) / want:6.3f}" + (f"  also: {sorted(other)}" if other else ""),
                  flush=True)


if __name__ == "__main__":
    main()
