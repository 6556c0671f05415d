"""Ulysses, ring and USP attention match full single-process attention, forward and backward.

Each mode runs on a forked gloo world of 2 or 4 ranks (one world per
mode and size, every case inside it); the test reassembles the ranks' local
out/dq/dk/dv and compares them with torch SDPA on the full tensors.

Tolerances: fp32, max abs error < 1e-5 (values are O(1); measured errors
are ~1e-6: the ring merges blocks in fp32 through their log-sum-exp, so it
only reorders sums). bf16, max abs error < 2e-2 x max |reference| against
the fp32 reference on the same bf16-rounded inputs: single-process bf16
SDPA itself is off by up to ~1e-2 of the scale (bf16 keeps 8 bits), and a
lost or doubled block shows up as an O(1) error. Ulysses with as many kv
heads as query heads runs the very same local kernel on the same numbers,
so in bf16 it must equal single-process bf16 bit for bit.
"""

from __future__ import annotations

import functools

import pytest
import torch

from distributed import run_world
from seq_workers import attention_cases, layout_of, make_inputs, noncontiguous_grads, rejected

from zeromega.plugins.sequence.layout import check_seq_len, gather_plan, shard, token_index, unshard

H = 4
WORLDS = [("ulysses", 2), ("ulysses", 4), ("ulysses-zigzag", 2), ("ring", 2), ("ring", 4), ("usp", 4)]


def _cases(mode: str, size: int) -> list[dict]:
    # full lengths that are not powers of two; contiguous Ulysses even gets an odd local length
    lengths = (3 * size, 10 * size) if mode == "ulysses" else (6 * size, 10 * size)
    grid = [(s, kv, c) for s in lengths for kv in (H, 2, 1) for c in (True, False)]
    cases = [dict(seed=11 + i, b=2, s=s, h=H, kv=kv, d=8, causal=causal, dtype="float32")
             for i, (s, kv, causal) in enumerate(grid)]
    cases += [dict(seed=50 + i, b=2, s=20 * size, h=H, kv=kv, d=16, causal=causal, dtype="bfloat16")
              for i, (kv, causal) in enumerate((kv, c) for kv in (H, 1) for c in (True, False))]
    return cases


def _case_id(case: dict) -> str:
    return f"s{case['s']}-kv{case['kv']}-{'causal' if case['causal'] else 'full'}-{case['dtype']}"


@functools.lru_cache(maxsize=None)
def _world_results(mode: str, size: int) -> list[list[dict]]:
    return run_world(size, attention_cases, mode, _cases(mode, size))


def reference(case: dict, dtype=torch.float32, dout=None) -> dict[str, torch.Tensor]:
    """Full attention on one process: torch SDPA, kv heads expanded for GQA."""
    full = make_inputs(case)
    q, k, v = (full[n].to(torch.bfloat16 if case.get("dtype") == "bfloat16" else torch.float32)
               .to(dtype).requires_grad_() for n in "qkv")
    group = q.size(2) // k.size(2)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(group, 2).transpose(1, 2),
        v.repeat_interleave(group, 2).transpose(1, 2), is_causal=case.get("causal", True)).transpose(1, 2)
    out.backward((full["dout"] if dout is None else dout).to(dtype))
    return {"out": out.detach().float(), "dq": q.grad.float(), "dk": k.grad.float(), "dv": v.grad.float()}


def _gathered(results, index, name, layout):
    return unshard([torch.from_numpy(rank[index][name]) for rank in results], 1, layout)


PARAMS = [(m, p, i) for m, p in WORLDS for i in range(len(_cases(m, p)))]


@pytest.mark.parametrize("mode,size,index", PARAMS,
                         ids=[f"{m}{p}-{_case_id(_cases(m, p)[i])}" for m, p, i in PARAMS])
def test_matches_full_attention(mode, size, index):
    case = _cases(mode, size)[index]
    results = _world_results(mode, size)
    ref = reference(case)
    for name in ("out", "dq", "dk", "dv"):
        got = _gathered(results, index, name, layout_of(mode))
        err = (got - ref[name]).abs().max().item()
        if case["dtype"] == "float32":
            assert err < 1e-5, f"{name}: max abs error {err:.2e} (fp32 tolerance 1e-5)"
        else:
            bound = 2e-2 * ref[name].abs().max().item()
            assert err < bound, f"{name}: max abs error {err:.2e} > 2e-2 x scale = {bound:.2e} (bf16)"


@pytest.mark.parametrize("size", [2, 4])
def test_ulysses_bf16_is_bit_exact_with_the_local_kernel(size):
    cases = _cases("ulysses", size)
    index = next(i for i, c in enumerate(cases) if c["dtype"] == "bfloat16" and c["kv"] == H)
    ref = reference(cases[index], dtype=torch.bfloat16)
    results = _world_results("ulysses", size)
    for name in ("out", "dq", "dk", "dv"):
        assert torch.equal(_gathered(results, index, name, "contiguous"), ref[name]), name


@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_noncontiguous_upstream_gradient(mode):
    """Regression for the gloo trap: a non-contiguous gradient (an einsum's backward) reaching the
    collectives' backward must still give exact dq/dk/dv (gloo writes non-contiguous buffers wrongly)."""
    results = run_world(2, noncontiguous_grads, mode)
    case = dict(seed=7, b=2, s=16, h=4, kv=2, d=8, causal=True)
    dout = unshard([torch.from_numpy(r["grad_of_out"]) for r in results], 1, layout_of(mode))
    ref = reference(case, dout=dout)
    for name in ("dq", "dk", "dv"):
        got = unshard([torch.from_numpy(r[name]) for r in results], 1, layout_of(mode))
        err = (got - ref[name]).abs().max().item()
        trap = "present" if not all(r["gloo_noncontiguous_scatter_ok"] for r in results) else "absent"
        assert err < 1e-5, f"{name}: max abs error {err:.2e} (gloo non-contiguous scatter trap {trap} upstream)"


def test_bad_heads_and_lengths_are_rejected():
    ulysses = run_world(4, rejected, "ulysses", [(1, 4, 6, 6, 8), (1, 4, 12, 3, 8), (1, 4, 8, 2, 8)])[0]
    assert "num_attention_heads=6" in ulysses[0] and "fix:" in ulysses[0]
    assert "num_query_groups=3" in ulysses[1] and "fix:" in ulysses[1]
    assert ulysses[2] == "accepted"  # 2 kv heads over 4 ranks: replicated, not rejected
    ring = run_world(2, rejected, "ring", [(1, 3, 4, 4, 8), (1, 4, 4, 3, 8)])[0]
    assert "local sequence length 3" in ring[0] and "pad the full sequence to 8" in ring[0]
    assert "num_query_groups=3" in ring[1]


def test_input_layout_is_enforced():
    from zeromega.plugins.sequence import ring_attention, ulysses_attention

    q = torch.zeros(2, 8, 4, 8)
    with pytest.raises(ValueError, match=r"expected \[b, s_l, heads, d\]"):
        ulysses_attention(q[0], q[0], q[0], group=None)
    with pytest.raises(ValueError, match="disagree"):
        ring_attention(q, q[:, :4], q[:, :4], group=None)
    with pytest.raises(ValueError, match=r"seq_length=10: a zigzag split over 4 ranks needs a multiple of 8; "
                                         r"fix: pad the sequence to 16"):
        check_seq_len(10, 4, "zigzag")


def test_layouts():
    assert token_index(8, 0, 2, "zigzag").tolist() == [0, 1, 6, 7]
    assert token_index(8, 1, 2, "zigzag").tolist() == [2, 3, 4, 5]
    assert token_index(6, 1, 2, "contiguous").tolist() == [3, 4, 5]
    x = torch.arange(2 * 24).reshape(2, 24)
    for layout in ("contiguous", "zigzag"):
        parts = [shard(x, 1, r, 4, layout) for r in range(4)]
        assert torch.equal(unshard(parts, 1, layout), x)
    # USP (U=2, R=2): ring rank 1 gathers cp ranks 2 and 3, i.e. chunks [2, 5] and [3, 4] of 8;
    # sorted they are big chunks 1 ([2, 3]) and 2 ([4, 5]) of the ring's zigzag over 4
    order, ring_layout = gather_plan(4, "zigzag", 2, 2, 1, True, "test")  # s_l=4 -> chunks of 2 tokens
    chunk_of_slot = [2, 5, 3, 4]
    assert [chunk_of_slot[i // 2] for i in order.tolist()[::2]] == [2, 3, 4, 5] and ring_layout == "zigzag"


def test_zigzag_balances_causal_work():
    """Every rank's causal ring work (query x key pairs over all steps) is the same."""
    from zeromega.plugins.sequence.ring import _block

    for size in (2, 3, 4, 8):
        s_l = 6
        work = []
        for rank in range(size):
            total = 0
            for step in range(size):
                rows, cols, causal = _block(step, (rank - step) % size, rank, True, s_l)
                n_rows, n_cols = rows.stop - rows.start, cols.stop - cols.start
                total += n_rows * (n_cols + 1) // 2 if causal else n_rows * n_cols
            work.append(total)
        assert len(set(work)) == 1, f"ring of {size}: per-rank work {work}"
        s = size * s_l
        assert sum(work) == s * (s + 1) // 2, "the blocks must cover the causal triangle exactly once"
