"""``zeromega plan --gpus N``: the layout search, its rejected families, the written config, and the fixes
table for a layout that does not fit."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from zeromega.plugins.plan import search
from zeromega.plugins.plan.devices import DEVICES
from zeromega.plugins.plan.timing import Cluster, PlanLayout

LLAMA_70B = dict(num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8, seq_length=4096,
                 vocab_size=128256, ffn_hidden_size=28672, swiglu=True, normalization="RMSNorm",
                 add_bias_linear=False, position_embedding_type="rope", untie_embeddings_and_output_weights=True)
MIXTRAL_8X7B = dict(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8, seq_length=4096,
                    vocab_size=32000, ffn_hidden_size=14336, swiglu=True, normalization="RMSNorm",
                    add_bias_linear=False, position_embedding_type="rope", untie_embeddings_and_output_weights=True,
                    num_experts=8, moe_router_topk=2)
LLAMA_ARGS = ("--num-layers 80 --hidden-size 8192 --num-attention-heads 64 --group-query-attention "
              "--num-query-groups 8 --ffn-hidden-size 28672 --swiglu --normalization RMSNorm --disable-bias-linear "
              "--position-embedding-type rope --untie-embeddings-and-output-weights --seq-length 4096 "
              "--max-position-embeddings 4096 --vocab-size 128256 --micro-batch-size 1 --global-batch-size 512 --bf16\n")


def _search(shape, gpus, batch):
    start = time.perf_counter()
    result = search.search(shape, Cluster(DEVICES["h100"], gpus), batch)
    return result, time.perf_counter() - start


def test_llama_70b_on_64_h100s():
    result, seconds = _search(LLAMA_70B, 64, 512)
    assert seconds < 20, seconds
    assert len(result.fits) >= 10
    times = [c.time.seconds for c in result.fits]
    assert times == sorted(times)
    cap = 80 * 2**30
    assert all(c.need <= cap for c in result.fits)
    best = result.fits[0].layout
    assert best.tp * best.pp * best.cp * best.dp == 64 and best.tp <= 8
    reasons = " | ".join(result.rejected.values())
    assert "tp crosses nodes of 8" in result.rejected["tp16 pp1 dp4"]
    assert "not divisible by pp 32" in reasons and "memory:" in reasons
    # a memory rejection is real: the family's smallest variant does not fit
    assert float(result.rejected["tp1 pp2 dp32"].split("needs ")[1].split(" GiB")[0].replace(",", "")) > 80


def test_mixtral_8x7b_on_32_h100s():
    result, seconds = _search(MIXTRAL_8X7B, 32, 256)
    assert seconds < 20, seconds
    assert result.fits and all(c.layout.engine == "megatron" for c in result.fits)  # MoE runs on Megatron-Core
    assert any(c.layout.ep > 1 for c in result.fits)
    assert any("ep crosses nodes" in why for why in result.rejected.values())
    assert any(why.startswith("memory") for why in result.rejected.values())


def test_more_memory_admits_more_layouts():
    small, _ = _search(LLAMA_70B, 64, 512)
    big = search.search(LLAMA_70B, Cluster(DEVICES["h200"], 64), 512)
    assert len(big.fits) > len(small.fits)


def test_fixes_for_a_layout_that_does_not_fit():
    layout = PlanLayout(tp=8, pp=1, dp=8, global_batch=512, sequence_parallel=True, engine="deepspeed",
                        zero_stage=1)
    cluster = Cluster(DEVICES["h100"], 64)
    assert search.memory_plan(LLAMA_70B, layout, "bf16").peak("cuda") > 80 * 2**30
    rows = search.fixes(LLAMA_70B, layout, cluster, 80)
    changes = {c: (need, t) for c, _, need, t in rows}
    assert any(c.startswith("pp 1 -> ") for c in changes)
    assert {"recompute selective", "recompute full", "ZeRO-2", "ZeRO-3"} <= set(changes)
    assert changes["recompute selective"][0] <= 80 * 2**30  # this one fits, at a time cost the table states
    assert changes["recompute full"][1].seconds > changes["recompute selective"][1].seconds


def _cli(argv, capsys):
    from test_zero_plan import _cli as cli

    return cli(["plan", *argv], capsys)


def test_cli_search_writes_a_config_launch_reads(tmp_path, capsys):
    from zeromega.launch.translate import resolve, sources

    args = tmp_path / "llama70b.args"
    args.write_text(LLAMA_ARGS)
    out_cfg = tmp_path / "best.yaml"
    code, out = _cli([str(args), "--gpus", "64", "--gpu", "h100", "--tokens", "1e12", "--top", "3",
                      "--write-config", str(out_cfg)], capsys)
    assert code == 0, out
    assert "64 x H100" in out and "rejected:" in out and "tp16 pp1 dp4: tp crosses nodes of 8 GPUs" in out
    first = out.splitlines()[2].split()
    assert first[0] == "1"
    cfg = resolve(sources(out_cfg)[0])  # what zeromega launch --config reads
    layout = cfg.layout(64)
    assert f"tp{layout.tp} pp{layout.pp}" in " ".join(first) and layout.world == 64
    assert cfg.launch.nproc_per_node == 8 and cfg.launch.nnodes == 8
    # the written config plans to the same worst-rank bytes and step time
    code, again = _cli([str(out_cfg), "--world-size", "64", "--gpu", "h100", "--json"], capsys)
    data = json.loads(again[:again.rindex("}") + 1])
    assert data["verdict"]["fits"]
    assert data["time"]["step_s"] == pytest.approx(float(first[-4]), abs=0.01)


def test_cli_search_refusals(tmp_path, capsys):
    args = tmp_path / "m.args"
    args.write_text(LLAMA_ARGS.replace(" --global-batch-size 512", ""))
    code, out = _cli([str(args), "--gpus", "64"], capsys)
    assert code == 2 and "add --gpu" in out
    code, out = _cli([str(args), "--gpus", "64", "--gpu", "h100"], capsys)
    assert code == 2 and "--global-batch-size" in out
    code, out = _cli([str(args), "--write-config", str(tmp_path / "x.yaml")], capsys)
    assert code == 2 and "--gpus" in out


def test_cli_time_warning_and_fixes(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    model = yaml.safe_dump({k: v for k, v in LLAMA_70B.items()}, default_flow_style=True).strip()
    cfg.write_text(f"parallel: {{tp: 4, sequence_parallel: true}}\nzero: {{stage: 1}}\nprecision: bf16\n"
                   f"batch: {{micro: 1, global: 512}}\nmodel: {model}\n")
    code, out = _cli([str(cfg), "--world-size", "64", "--gpu", "h100", "--nodes-of", "2", "--tokens", "1e12"], capsys)
    assert code == 0, out
    assert "does not fit by" in out and "tokens/s, MFU" in out and "days" in out
    assert "warning: the tp group (tp 4, spanning 4 consecutive ranks) crosses nodes of 2 GPUs" in out
    assert "what would make it fit" in out and "recompute selective" in out
    assert "the fastest layout of 64 GPUs that fits" in out
