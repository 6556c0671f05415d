"""``gpt_size`` / ``gpt_count`` against the models zeromega really builds: every architecture flag the run
accepts changes the planned count exactly as it changes the built model (1 process and tp 2, CPU)."""

from __future__ import annotations

import json

import pytest

from distributed import run_world
from zeromega.plugins.zero import plan as zplan

BASE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=257)
LLAMA = dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=2, seq_length=32,
             vocab_size=1000, swiglu=True, normalization="RMSNorm", add_bias_linear=False,
             position_embedding_type="rope", untie_embeddings_and_output_weights=True,
             make_vocab_size_divisible_by=64)
MIXTRAL = {**LLAMA, "num_layers": 3, "num_experts": 4, "moe_ffn_hidden_size": 96, "moe_layer_freq": [1, 0, 1]}
SHAPES = {
    "base": BASE,
    "swiglu": {**BASE, "swiglu": True},
    "swiglu-ffn": {**BASE, "swiglu": True, "ffn_hidden_size": 100},
    "gqa-kv": {**BASE, "num_attention_heads": 8, "num_query_groups": 2, "kv_channels": 16},
    "untied": {**BASE, "untie_embeddings_and_output_weights": True},
    "no-bias": {**BASE, "add_bias_linear": False},
    "rmsnorm": {**BASE, "normalization": "RMSNorm"},
    "rope": {**BASE, "position_embedding_type": "rope"},
    "vocab-pad": {**BASE, "vocab_size": 1001, "make_vocab_size_divisible_by": 96},
    "llama": LLAMA,
    "moe-8": {**BASE, "num_experts": 8},
    "moe-freq2": {**BASE, "num_layers": 4, "num_experts": 4, "moe_layer_freq": 2, "moe_ffn_hidden_size": 48},
    "mixtral": MIXTRAL,
}


def count_built(cfg: dict, shapes: dict) -> dict[str, int]:
    """Parameters of this rank's built chunks, per named shape."""
    from zeromega.config.schema import RunConfig
    from zeromega.integrations.megatron import model, parallel

    run = RunConfig.model_validate(cfg)
    parallel.initialize(run, seed=1)
    try:
        return {name: sum(p.numel() for c in model.build_gpt_chunks(model.GPTShape(**shape), run, run.parallel.vpp)
                          for p in c.parameters())
                for name, shape in shapes.items()}
    finally:
        parallel.shutdown()


def test_flags_change_the_count():
    """Each flag alone moves the count (none is silently ignored)."""
    base = zplan.gpt_size(**BASE).params
    for name, shape in SHAPES.items():
        if name != "base":
            assert zplan.gpt_size(**shape).params != base, name
    assert zplan.gpt_size(**{**BASE, "num_experts": 8}).params > zplan.gpt_size(**{**BASE, "num_experts": 4}).params


def test_count_equals_the_built_model_one_process():
    built = run_world(1, count_built, {"precision": "fp32"}, SHAPES)[0]
    planned = {name: zplan.gpt_size(**shape).params for name, shape in SHAPES.items()}
    assert planned == built


def test_count_equals_the_built_model_tp2():
    shapes = {k: SHAPES[k] for k in ("base", "swiglu", "gqa-kv", "untied", "vocab-pad", "llama", "mixtral")}
    built = run_world(2, count_built, {"precision": "fp32", "parallel": {"tp": 2}}, shapes)
    planned = {name: zplan.gpt_size(tp=2, **shape).params for name, shape in shapes.items()}
    assert built[0] == built[1] == planned


def _stage_counts(shape: dict, pp: int, vpp=None, tp: int = 1, first=None, last=None, emb=False) -> list[int]:
    count = zplan.gpt_count(tp=tp, **shape)
    out = []
    for r, chunks in enumerate(zplan.stage_layers(shape["num_layers"], pp, vpp, first, last, emb)):
        out.append(sum(count.stage(f, n, r == 0 and i == 0, r == pp - 1 and i == len(chunks) - 1)
                       for i, (f, n) in enumerate(chunks)))
    return out


PP_SHAPES = {"base": {**BASE, "num_layers": 4}, "llama": {**LLAMA, "num_layers": 4},
             "mixtral": {**MIXTRAL, "num_layers": 4, "moe_layer_freq": [1, 0, 1, 1]}}


@pytest.mark.parametrize("vpp,first,emb", [(None, None, False), (2, None, False), (None, 1, False),
                                           (None, None, True)])
def test_stage_counts_equal_the_built_stages(vpp, first, emb):
    """pp 2: embedding on the first stage, output (or the tied copy Megatron-Core keeps) on the last;
    first = 1: Megatron-LM's --decoder-first-pipeline-num-layers 1 (1 layer, then 3); emb: 5 layers with
    --account-for-embedding-in-pipeline-split (the embedding counts as a layer: 2, then 3); built as planned."""
    parallel = {"pp": 2, **({"vpp": vpp} if vpp else {}), **({"first_stage_layers": first} if first else {}),
                **({"embedding_in_split": True} if emb else {})}
    shapes = {k: {**v, "num_layers": 5, "moe_layer_freq": [1, 0, 1, 1, 0]} if "moe_layer_freq" in v
              else {**v, "num_layers": 5} for k, v in PP_SHAPES.items()} if emb else PP_SHAPES
    built = run_world(2, count_built, {"precision": "fp32", "parallel": parallel}, shapes)
    for name, shape in shapes.items():
        assert [b[name] for b in built] == _stage_counts(shape, 2, vpp, first=first, emb=emb), name
    if first:  # not the even split's counts
        assert _stage_counts(PP_SHAPES["base"], 2, first=1) != _stage_counts(PP_SHAPES["base"], 2)
    if emb:
        assert zplan.stage_layers(5, 2, embedding_in_split=True) == [[(0, 2)], [(2, 3)]]
    # the tied copy: both stages together hold one word embedding more than the 1-process model
    base = PP_SHAPES["base"]
    assert sum(_stage_counts(base, 2)) == zplan.gpt_size(**base).params + zplan.gpt_count(**base).word_embedding


def test_uneven_splits():
    with pytest.raises(ValueError, match="do not split evenly"):
        zplan.stage_layers(7, 2)
    assert zplan.stage_layers(8, 2, 2) == [[(0, 2), (4, 2)], [(2, 2), (6, 2)]]
    # Megatron-LM's --decoder-first/last-pipeline-num-layers: the stages between split the rest
    assert zplan.stage_layers(7, 2, first=3) == [[(0, 3)], [(3, 4)]]
    assert zplan.stage_layers(10, 4, first=2, last=2) == [[(0, 2)], [(2, 3)], [(5, 3)], [(8, 2)]]
    assert zplan.stage_layers(9, 4, last=3) == [[(0, 2)], [(2, 2)], [(4, 2)], [(6, 3)]]
    with pytest.raises(ValueError, match="split evenly"):
        zplan.stage_layers(10, 4, first=3)
    with pytest.raises(ValueError, match="vpp"):
        zplan.stage_layers(8, 2, 2, first=3)
    # --account-for-embedding/loss-in-pipeline-split: (L + 1 + 1) / pp, one layer fewer on the first and last
    assert zplan.stage_layers(6, 4, embedding_in_split=True, loss_in_split=True) == [[(0, 1)], [(1, 2)], [(3, 2)],
                                                                                     [(5, 1)]]
    with pytest.raises(ValueError, match="do not split evenly"):
        zplan.stage_layers(8, 4, embedding_in_split=True)


def test_uneven_split_in_the_config_and_the_cli(tmp_path, capsys):
    """The flags reach the config (rules check them as Megatron-LM splits) and the plan's stage rows."""
    from pydantic import ValidationError

    from zeromega.config.schema import RunConfig

    base = {"model": {"num_layers": 7, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
                      "vocab_size": 257}}
    with pytest.raises(ValidationError, match="not divisible by pp"):
        RunConfig.model_validate({**base, "parallel": {"pp": 2}})
    assert RunConfig.model_validate({**base, "parallel": {"pp": 2, "first_stage_layers": 3}}).parallel.pp == 2
    with pytest.raises(ValidationError, match="split evenly"):
        RunConfig.model_validate({**base, "parallel": {"pp": 3, "first_stage_layers": 2}})
    with pytest.raises(ValidationError, match="virtual stages"):
        RunConfig.model_validate({**base, "parallel": {"pp": 2, "vpp": 2, "first_stage_layers": 3}})
    assert RunConfig.model_validate({**base, "parallel": {"pp": 2, "loss_in_split": True}}).parallel.loss_in_split
    with pytest.raises(ValidationError, match="split evenly"):
        RunConfig.model_validate({**base, "parallel": {"pp": 3, "embedding_in_split": True}})
    with pytest.raises(ValidationError, match="cannot be combined"):
        RunConfig.model_validate({**base, "parallel": {"pp": 2, "embedding_in_split": True, "first_stage_layers": 3}})
    args = tmp_path / "run.args"
    args.write_text("--num-layers 7 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --vocab-size 257 "
                    "--micro-batch-size 1 --global-batch-size 4 --pipeline-model-parallel-size 2 "
                    "--decoder-last-pipeline-num-layers 2 --bf16\n")
    code, out = _plan_cli([str(args), "--world-size", "2"], capsys)
    assert code == 0, out
    assert "stage 0 (layers 0-4 + embedding)" in out and "stage 1 (layers 5-6 + tied output copy)" in out


def test_in_flight_micro_batches_under_1f1b():
    assert [zplan.in_flight_chunks(r, 4, 8) for r in range(4)] == [4, 3, 2, 1]
    assert zplan.in_flight_chunks(0, 4, 2) == 2  # fewer micro-batches than stages
    # interleaved, first stage: p (1 + (p-1)/(p v)) micro-batches of L/p layers = that many chunks x v
    p, v = 4, 2
    assert zplan.in_flight_chunks(0, p, 16, v) / v == p * (1 + (p - 1) / (p * v))


def test_megatron_engine_bytes_per_parameter():
    """bf16: 2 (params) + 4 (fp32 grad buffer) + 12/N (master, m, v) with the distributed optimizer, + 12 without;
    an fp32 model has no master copy."""
    P = 1_000_000
    m = zplan.ModelSize(params=P, total_params=P, largest_tensor=P, largest_layer=P)

    def states(precision, distopt, dp):
        plan = zplan.plan_megatron(precision, m, dp=dp, distributed_optimizer=distopt)
        return sum(r.bytes for r in plan.rows if not r.transient)

    assert states("bf16", True, 4) == 2 * P + 4 * P + 12 * P // 4
    assert states("bf16", False, 4) == 18 * P
    assert states("fp32", True, 2) == 8 * P + 8 * P // 2
    # experts shard over expert-dp
    plan = zplan.plan_megatron("bf16", m, dp=4, expert_params=P // 2, expert_dp=1)
    assert {r.name: r.bytes for r in plan.rows}["Adam m, v"] == 8 * (P // 2 // 4 + P // 2)


def test_pipeline_plan_stages_and_worst():
    from types import SimpleNamespace

    layout = SimpleNamespace(pp=4, tp=1, dp=2, cp=1, ep=1, etp=None, vpp=None, micro=1, accumulation=8)
    shape = dict(num_layers=8, hidden_size=256, num_attention_heads=8, seq_length=512, vocab_size=50257)
    plan = zplan.for_run({"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}, layout, shape=shape)
    assert len(plan.stages) == 4 and plan.stages[0].engine == "megatron"
    acts = [{r.name: r.bytes for r in st.rows}["activations"] for st in plan.stages]
    assert acts[0] == 4 * acts[3] and acts[1] == 3 * acts[3]  # 4, 3, 2, 1 micro-batches in flight
    assert "logits + loss" in {r.name for r in plan.stages[3].rows}
    assert plan.peak() == max(st.peak() for st in plan.stages)
    text = plan.table()
    assert "stage 3" in text and "worst" in text


def test_pipeline_stage_backward_working_set():
    """Backward holds one layer-micro-batch's activation gradients beside its saved activations, and the largest
    weight's gradient until DDP's hook adds it into the fp32 buffer: one layer's bytes + lp x largest tensor."""
    from types import SimpleNamespace

    layout = SimpleNamespace(pp=2, tp=2, dp=1, cp=1, ep=1, etp=None, vpp=None, micro=2, accumulation=4)
    shape = dict(num_layers=8, hidden_size=256, num_attention_heads=8, seq_length=128, vocab_size=257)
    for precision, lp in (("fp32", 4), ("bf16", 2)):
        ds = {"zero_optimization": {"stage": 1}, "bf16": {"enabled": precision == "bf16"}}
        plan = zplan.for_run(ds, layout, shape=shape)
        one_layer, _ = zplan.activation_bytes({**shape, "num_layers": 1}, zplan.Activations(128, 2), precision, tp=2)
        largest = zplan.gpt_size(tp=2, **shape).largest_tensor
        for st in plan.stages:
            rows = {r.name: r for r in st.rows}
            assert rows["backward working set"].bytes == one_layer + lp * largest
            assert rows["backward working set"].transient and rows["backward working set"].phase == "backward"


def _plan_cli(argv, capsys):
    from test_zero_plan import _cli

    return _cli(["plan", *argv], capsys)


def test_plan_cli_pipeline_rows_and_verdict(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("zero: {stage: 1}\nparallel: {pp: 2}\nbatch: {micro: 2, global: 8}\nmodel: {num_layers: 8, "
                   "hidden_size: 512, num_attention_heads: 8, seq_length: 128, vocab_size: 257}\n")
    code, out = _plan_cli([str(cfg), "--world-size", "2", "--gpu", "h100"], capsys)
    assert code == 0, out
    assert "stage 0 (layers 0-3 + embedding)" in out and "stage 1 (layers 4-7 + tied output copy)" in out
    assert "Megatron-Core DDP + distributed optimizer" in out and "gradient buffer (fp32)" in out
    assert "verdict: fits: the worst rank (pipeline stage 0)" in out and "h100, 80 GiB" in out
    code, out = _plan_cli([str(cfg), "--world-size", "2", "--gpu-memory", "0.1"], capsys)
    assert code == 0 and "verdict: does not fit by 0.2 GiB" in out
    code, out = _plan_cli([str(cfg), "--world-size", "2", "--gpu-memory", "0.1", "--json"], capsys)
    result = json.loads(out[:out.rindex("}") + 1])["verdict"]
    assert result["fits"] is False and result["need_bytes"] > result["capacity_bytes"]
    code, out = _plan_cli([str(cfg), "--world-size", "2", "--params", "1e8"], capsys)
    assert code == 2 and "cannot be staged" in out


def test_plan_cli_reads_architecture_from_the_config(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    arch = "swiglu: true, normalization: RMSNorm, add_bias_linear: false, untie_embeddings_and_output_weights: true"
    cfg.write_text(f"batch: {{micro: 1, global: 1}}\nmodel: {{num_layers: 2, hidden_size: 64, num_attention_heads: 4, "
                   f"seq_length: 32, vocab_size: 257, {arch}}}\n")
    code, out = _plan_cli([str(cfg), "--world-size", "1", "--json"], capsys)
    assert code == 0, out
    shape = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=257, swiglu=True,
                 normalization="RMSNorm", add_bias_linear=False, untie_embeddings_and_output_weights=True)
    params = {r["name"]: r["bytes"] for r in json.loads(out[:out.rindex("}") + 1])["rows"]}["parameters"] // 4
    assert params == zplan.gpt_size(**shape).params != zplan.gpt_size(**BASE).params


# (name, hidden, ranks, tp, pp, dp): the DeepSpeed engine at pp 1, Megatron-Core's at pp 2 and tp 2 x pp 2
MEASURED_LAYOUTS = [("pp1-dp2", 512, 2, 1, 1, 2), ("pp2", 1024, 2, 1, 2, 1), ("tp2-pp2", 1024, 4, 2, 2, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("name,hidden,ranks,tp,pp,dp", MEASURED_LAYOUTS, ids=[m[0] for m in MEASURED_LAYOUTS])
def test_plan_against_the_measured_peak(tmp_path, small_corpus, name, hidden, ranks, tp, pp, dp):
    """examples/pretrain_gpt.py under zeromega launch, fp32, ZeRO-1 config, 8 layers, seq 128, micro 2, global 8,
    3 steps: the plan's worst rank within 10% of the peak resident set the run measures (max over ranks).
    Measured 2026-12-07 (plan / measured MiB): pp1 dp2 8 x 512 954 / 956-974 (0.98-1.00; 8 x 1024: 2,179 /
    2,173-2,175); pp2 8 x 1024 1,368 / 1,393-1,415 (0.97-0.98); tp2 x pp2 8 x 1024 908 / 957-971 (0.94-0.95).
    Not held, and not tested here: pp2 at 8 x 512 (699 / 795-805, 0.87), where every activation is a 512 KiB
    tensor below glibc's 1 MiB mmap threshold and the heap fragments under 1F1B (716 MiB, 0.98, with
    MALLOC_MMAP_THRESHOLD_=65536); docs/planning.md. ~2-5 min each on 2 busy cores."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    script = str(Path(__file__).resolve().parent.parent / "examples" / "pretrain_gpt.py")
    metrics = tmp_path / "m.jsonl"
    ds = tmp_path / "z1.json"
    ds.write_text('{"zero_optimization": {"stage": 1}, "bf16": {"enabled": false}}')
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "ZEROMEGA_CONFIG",
                                                                "MALLOC_MMAP_THRESHOLD_", "ZEROMEGA_HEAP_TRIM")}
    proc = subprocess.run([sys.executable, "-m", "zeromega", "launch", "--nproc-per-node", str(ranks), "--config",
                           str(ds), script, "--data-path", small_corpus, "--split", "1,0,0", "--num-layers", "8",
                           "--hidden-size", str(hidden), "--num-attention-heads", "8", "--seq-length", "128",
                           "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "3",
                           "--pipeline-model-parallel-size", str(pp), "--tensor-model-parallel-size", str(tp),
                           "--lr", "1e-3", "--no-progress", "--metrics-out", str(metrics)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = max(json.loads(line)["peak_mem_bytes"] for line in metrics.read_text().splitlines())
    layout = SimpleNamespace(pp=pp, tp=tp, dp=dp, cp=1, ep=1, etp=None, vpp=None, micro=2, accumulation=8 // (2 * dp))
    shape = dict(num_layers=8, hidden_size=hidden, num_attention_heads=8, seq_length=128, vocab_size=257)
    from zeromega.plugins.zero import defaults

    run_ds, _ = defaults.tuned(json.loads(ds.read_text()), "cpu")  # the buckets the engine gets on a CPU rank
    plan = zplan.for_run(run_ds, layout, shape=shape)
    assert 0.90 <= plan.peak("cpu") / measured <= 1.10, (name, plan.peak("cpu") / 2**20, measured / 2**20)


@pytest.mark.slow
def test_uneven_pp2_trains_as_one_process(tmp_path, small_corpus):
    """examples/pretrain_gpt.py, 3 layers, pp 2 with --decoder-first-pipeline-num-layers 1 (1 + 2 layers) against
    one process: the same loss at every step (rel 1e-5; measured 2e-8). ~90 s on 2 busy cores; the fast
    test_stage_counts_equal_the_built_stages[None-1] checks the built stages."""
    from pathlib import Path

    from ckpt_workers import pretrain

    tiny = ["--num-layers", "3", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--hidden-dropout", "0", "--attention-dropout", "0", "--train-iters", "3", "--lr", "3e-3",
            "--split", "1,0,0", "--no-progress", "--micro-batch-size", "2", "--global-batch-size", "8",
            "--data-path", small_corpus]

    def curve(world, flags, name):
        metrics = Path(tmp_path) / f"{name}.jsonl"
        run_world(world, pretrain, [*tiny, *flags, "--metrics-out", str(metrics)])
        return [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]

    reference = curve(1, [], "one")
    got = curve(2, ["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1"], "uneven")
    assert len(got) == len(reference) == 3
    for g, r in zip(got, reference):
        assert abs(g - r) <= 1e-5 * abs(r), (got, reference)
