"""The sequence modules on other libraries' token layouts: exact against full attention, or refused.

The shards are cut the way those libraries' own tests cut them (written here
from their descriptions, not imported): ring-flash-attention's basic ring
test gives rank ``p`` chunk ``p`` of ``P`` (contiguous), its zigzag test
chunks ``p`` and ``2P-1-p``, its stripe test every ``P``-th token; yunchang
(USP) cuts ``2R`` chunks, gives ring rank ``r`` chunks ``r`` and ``2R-1-r``
and splits those over the Ulysses ranks (``zigzag``), or stripes over the
ring first (``strip``), or chunks contiguously (``basic``). Each case states
the layout name zeromega uses for that cut (checked against
``layout.token_index``), runs forward and backward on a gloo world, and is
compared with one-process SDPA (fp32, max abs error < 1e-5), or must be
refused with a message naming the layout to use and the helper.
"""

from __future__ import annotations

import functools

import pytest
import torch

from distributed import run_world
from seq_workers import make_inputs
from test_sequence_attention import reference

from zeromega.plugins.sequence.layout import shard, unshard


# --- the other libraries' cuts of a [b, s, ...] tensor, in our words ---

def rfa_basic(x, rank, world, ring, ulysses):
    return x.chunk(world, dim=1)[rank]


def rfa_zigzag(x, rank, world, ring, ulysses):
    chunks = x.chunk(2 * world, dim=1)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=1)


def rfa_stripe(x, rank, world, ring, ulysses):
    return x[:, rank::world]


def yunchang_zigzag(x, rank, world, ring, ulysses):
    r, u = divmod(rank, ulysses)
    chunks = x.chunk(2 * ring, dim=1)
    return torch.cat([chunks[r], chunks[2 * ring - 1 - r]], dim=1).chunk(ulysses, dim=1)[u]


def yunchang_strip(x, rank, world, ring, ulysses):
    b, s = x.shape[:2]
    rest = x.shape[2:]
    striped = x.reshape(b, s // ring, ring, -1).transpose(1, 2).reshape(b, s, *rest)
    return striped.chunk(world, dim=1)[rank]


CUTS = {"rfa_basic": (rfa_basic, "contiguous"), "rfa_zigzag": (rfa_zigzag, "zigzag"),
        "rfa_stripe": (rfa_stripe, "stripe"), "yunchang_zigzag": (yunchang_zigzag, "ring_zigzag"),
        "yunchang_strip": (yunchang_strip, "ring_stripe"), "yunchang_basic": (rfa_basic, "contiguous")}


def _run_cases(mode: str, ulysses: int, cases: list[dict]) -> list[dict]:
    """Each case on this rank: local out/dq/dk/dv (numpy) or the error message."""
    import torch.distributed as dist

    from zeromega.plugins.sequence import build_usp_groups, ring_attention, ulysses_attention, usp_attention

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = build_usp_groups(ulysses) if mode == "usp" else None
    ring = world // ulysses if mode == "usp" else (1 if mode == "ulysses" else world)
    u = ulysses if mode == "usp" else (world if mode == "ulysses" else 1)
    results = []
    for case in cases:
        full = make_inputs(case)
        cut = CUTS[case["cut"]][0]
        local = {n: cut(t, rank, world, ring, u).contiguous() for n, t in full.items()}
        q, k, v = (local[n].clone().requires_grad_() for n in "qkv")
        kwargs = {} if case["layout"] == "omitted" else {"layout": case["layout"]}
        try:
            if mode == "ring":
                out = ring_attention(q, k, v, dist.group.WORLD, case["causal"], **kwargs)
            elif mode == "ulysses":
                out = ulysses_attention(q, k, v, dist.group.WORLD, case["causal"], **kwargs)
            else:
                out = usp_attention(q, k, v, groups, case["causal"], **kwargs)
            out.backward(local["dout"])
        except ValueError as err:
            results.append({"error": str(err)})
            continue
        results.append({n: t.detach().numpy() for n, t in (("out", out), ("dq", q.grad), ("dk", k.grad),
                                                           ("dv", v.grad))})
    return results


def case(cut, layout, causal=True, s=24, kv=2, seed=5):
    return dict(seed=seed, b=2, s=s, h=4, kv=kv, d=8, causal=causal, cut=cut, layout=layout)


# (mode, ranks, Ulysses size for USP) -> cases
WORLDS = {
    ("ring", 2, 1): [case("rfa_basic", "contiguous"), case("rfa_basic", "contiguous", kv=4, s=22),
                     case("rfa_zigzag", "zigzag"), case("rfa_stripe", "stripe"),
                     case("rfa_stripe", "stripe", causal=False), case("rfa_basic", "omitted"),
                     case("rfa_basic", "zigzag"),  # negative control: the wrong name gives a wrong result
                     case("rfa_basic", "zigzag", s=6), case("rfa_zigzag", "zigzag", s=8)],
    ("ring", 4, 1): [case("rfa_basic", "contiguous", kv=1, s=32), case("rfa_zigzag", "zigzag", s=32)],
    ("ulysses", 2, 1): [case("rfa_stripe", "stripe"), case("rfa_zigzag", "zigzag"), case("rfa_basic", "omitted")],
    ("usp", 4, 2): [case("yunchang_zigzag", "ring_zigzag"), case("yunchang_basic", "contiguous"),
                    case("rfa_zigzag", "zigzag"), case("yunchang_strip", "ring_stripe"),
                    case("yunchang_strip", "ring_stripe", causal=False), case("yunchang_zigzag", "omitted")],
}


@functools.lru_cache(maxsize=None)
def _results(mode, ranks, ulysses):
    return run_world(ranks, _run_cases, mode, ulysses, WORLDS[(mode, ranks, ulysses)])


def _cut_matches_layout(cut_name, layout, world, ring, ulysses):
    cut, _ = CUTS[cut_name]
    x = torch.arange(2 * 24 * world).reshape(2, -1)
    for rank in range(world):
        assert torch.equal(cut(x, rank, world, ring, ulysses), shard(x, 1, rank, world, layout, ulysses)), \
            f"{cut_name} is not zeromega's {layout!r} on rank {rank}"


def _max_errors(results, index, c, layout, ulysses):
    ref = reference(c)
    errors = {}
    for name in ("out", "dq", "dk", "dv"):
        got = unshard([torch.from_numpy(r[index][name]) for r in results], 1, layout, ulysses)
        errors[name] = (got - ref[name]).abs().max().item()
    return errors


REFUSED = ("omitted", "stripe", "ring_stripe")
EXACT = [(w, i) for w, cases in WORLDS.items() for i, c in enumerate(cases)
         if c["layout"] not in REFUSED or not c["causal"] or (w[0] == "ulysses" and c["layout"] != "omitted")]
EXACT = [(w, i) for w, i in EXACT if not (WORLDS[w][i]["cut"] == "rfa_basic" and WORLDS[w][i]["layout"] == "zigzag")
         and WORLDS[w][i]["s"] != 6]


def _case_id(world, index):
    c = WORLDS[world][index]
    return f"{world[0]}{world[1]}-{c['cut']}-{c['layout']}-{'causal' if c['causal'] else 'full'}-s{c['s']}"


@pytest.mark.parametrize("world,index", EXACT, ids=[_case_id(w, i) for w, i in EXACT])
def test_other_libraries_layouts_are_exact(world, index):
    mode, ranks, ulysses = world
    c = WORLDS[world][index]
    u = ulysses if mode == "usp" else (ranks if mode == "ulysses" else 1)
    _cut_matches_layout(c["cut"], c["layout"], ranks, ranks // u, u)
    results = _results(*world)
    assert all("error" not in r[index] for r in results), results[0][index]
    for name, err in _max_errors(results, index, c, c["layout"], u).items():
        assert err < 1e-5, f"{name}: max abs error {err:.2e}"


def test_the_layout_name_matters():
    """Negative control: contiguous shards declared zigzag give a wrong result (so the cases above can fail)."""
    world = ("ring", 2, 1)
    index = next(i for i, c in enumerate(WORLDS[world])
                 if c["cut"] == "rfa_basic" and c["layout"] == "zigzag" and c["s"] == 24)
    errors = _max_errors(_results(*world), index, WORLDS[world][index], "contiguous", 1)
    assert errors["out"] > 0.1, errors


@pytest.mark.parametrize("world,cut,expect", [
    (("ring", 2, 1), "rfa_stripe", "layout='stripe' is not supported under a causal mask"),
    (("ring", 2, 1), "rfa_basic", "layout=None"),
    (("ulysses", 2, 1), "rfa_basic", "layout=None"),
    (("usp", 4, 2), "yunchang_strip", "layout='ring_stripe' over 2 x 2 ranks"),
    (("usp", 4, 2), "yunchang_zigzag", "layout=None"),
])
def test_unsupported_or_unnamed_causal_layouts_are_refused(world, cut, expect):
    index = next(i for i, c in enumerate(WORLDS[world]) if c["cut"] == cut and c["causal"]
                 and c["layout"] in REFUSED and (expect != "layout=None") == (c["layout"] != "omitted"))
    for rank_result in _results(*world):
        message = rank_result[index].get("error", "")
        assert expect in message, message
        assert "fix:" in message and "zigzag" in message and "shard_batch" in message, message


def test_odd_local_length_error_names_a_fix_that_works():
    """s = 6 over 2 zigzag ranks (3 tokens each) is refused; the message's fix (pad to 8, then shard) is exact."""
    world = ("ring", 2, 1)
    cases = WORLDS[world]
    odd = next(i for i, c in enumerate(cases) if c["s"] == 6)
    message = _results(*world)[0][odd]["error"]
    assert "local sequence length 3" in message and "pad the full sequence to 8" in message, message
    padded = next(i for i, c in enumerate(cases) if c["s"] == 8)
    results = _results(*world)
    out = unshard([torch.from_numpy(r[padded]["out"]) for r in results], 1, "zigzag")
    full = make_inputs(cases[padded])
    short = {n: t[:, :6] for n, t in full.items()}  # the 6 real tokens: padding after them cannot be seen
    q, k, v = (short[n].repeat_interleave(4 // short[n].size(2), 2).transpose(1, 2) for n in "qkv")
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    assert (out[:, :6] - ref).abs().max().item() < 1e-5
