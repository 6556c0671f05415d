"""Logging and ops flags of the published scripts, honoured (issue 15): ``--log-params-norm``,
``--log-num-zeros-in-grad``, Megatron-DeepSpeed's ``--log-optimizer-states-to-tensorboard``,
``--log-batch-size-to-tensorboard`` and ``--checkpoint-activations``, ``--empty-unused-memory-level``.

The parameter norm, the zero count and the optimizer-state scalars are whole-model figures, so they must not
change with the layout: a 1-process run (DeepSpeed's engine) is checked against a direct computation over its
one full model, and dp2 under ZeRO-1 (fragments of the flat partitions) and ZeRO-3 (partitions gathered), tp2
(shards summed, tp-replicated norms and biases once) and pp2 (Megatron-Core's engine: stages summed, the last
stage's copy of the tied embedding not counted, the zeros counted by Megatron-Core's optimizer) against it;
an MoE model on Megatron-Core's engine at ep1 against ep2 with the distributed optimizer. The vocabulary is
512, which tp2 with --make-vocab-size-divisible-by 64 pads as tp1 with the default 128 does: the same model in
every layout. Known zeros: the gradient of an embedding row whose token is absent from the step's batch is
exactly zero, and every other gradient entry of this model is not, so the count is (padded vocabulary -
distinct input tokens) x hidden.
"""

from __future__ import annotations

import math
import sys

import pytest

from distributed import run_world

BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--split", "1,0,0", "--no-progress", "--lr", "1e-3", "--train-iters", "2", "--vocab-size", "512",
        "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
        "--log-params-norm", "--log-num-zeros-in-grad", "--log-interval", "1"]
HIDDEN, VOCAB = 32, 512


def run_logged(argv: list[str]) -> dict:
    """A run; its records, log lines, the input tokens each step drew on this rank, the number of cache
    empties, and (one process) the parameters' norm computed directly from the full model."""
    import torch

    from zeromega.launch import script_args
    from zeromega.run import Run, loop

    try:
        from zeromega.run import model_stats
    except ImportError:  # a tree without the module (this test's run before the change)
        model_stats = None

    tokens: list = []
    original = loop.train

    def tapped(engine, batches, **kwargs):
        def tap():
            for batch in batches:
                tokens.append(batch["tokens"].flatten().tolist())
                yield batch
        return original(engine, tap(), **kwargs)

    loop.train = tapped
    empties = []
    if model_stats is not None:
        model_stats.empty_unused_memory = lambda: empties.append(1)
    lines: list[str] = []
    run = Run(script_args.read(argv, "pretrain_gpt.py"), log=lines.append)
    records = run.train()
    direct = None
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        direct = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for m in run.engine.modules
                               for p in m.parameters()))
    config = getattr(run.engine.modules[0], "config", None)  # the built model's Megatron-Core TransformerConfig
    recompute = tuple(getattr(config, f"recompute_{k}", None) for k in ("granularity", "method", "num_layers"))
    return {"records": [r.__dict__ for r in records], "lines": lines, "tokens": tokens, "empties": len(empties),
            "direct": direct, "engine": run.engine.name, "recompute": recompute}


def _expected_zeros(tokens_per_rank: list[list], steps: int, micro_per_step: int) -> list[int]:
    """(padded vocabulary - distinct input tokens of the step, over every rank) x hidden, per step."""
    out = []
    for step in range(steps):
        seen = set()
        for rank_tokens in tokens_per_rank:
            for batch in rank_tokens[step * micro_per_step:(step + 1) * micro_per_step]:
                seen.update(batch)
        out.append((VOCAB - len(seen)) * HIDDEN)
    return out


@pytest.fixture(scope="module")
def one_process(small_corpus, tmp_path_factory):
    board = tmp_path_factory.mktemp("tb")
    argv = ["--data-path", small_corpus, *BASE, "--tensorboard-dir", str(board),
            "--log-optimizer-states-to-tensorboard", "--empty-unused-memory-level", "2", "--checkpoint-activations",
            "--log-batch-size-to-tensorboard"]
    (result,) = run_world(1, run_logged, argv)
    result["board"] = board
    return result


def test_params_norm_and_zeros_on_one_process(one_process):
    """Before: --log-params-norm and --log-num-zeros-in-grad were only noted; records had neither field."""
    records = one_process["records"]
    assert records[-1]["params_norm"] == pytest.approx(one_process["direct"], rel=1e-9)
    assert [r["num_zeros_in_grad"] for r in records] == _expected_zeros([one_process["tokens"]], 2, 2)
    logged = [line for line in one_process["lines"] if line.startswith(" iteration")]
    assert f"params norm: {records[0]['params_norm']:.3f} |" in logged[0]
    assert f"num zeros: {float(records[0]['num_zeros_in_grad'])} |" in logged[0]
    # level 2: before each optimizer step and after it (CPU: the call does nothing)
    assert one_process["empties"] == 2 * len(records)
    # --checkpoint-activations reached the model Megatron-Core built (the layout runs recompute nothing: same
    # figures either way)
    assert one_process["recompute"] == ("full", "uniform", 1)


@pytest.mark.parametrize("layout", [["--zero-stage", "1"], ["--zero-stage", "3"],
                                    ["--tensor-model-parallel-size", "2", "--make-vocab-size-divisible-by", "64"],
                                    ["--pipeline-model-parallel-size", "2"]],
                         ids=["dp2-zero1", "dp2-zero3", "tp2", "pp2"])
def test_params_norm_and_zeros_do_not_depend_on_the_layout(one_process, small_corpus, layout, tmp_path):
    results = run_world(2, run_logged, ["--data-path", small_corpus, *BASE, *layout, "--tensorboard-dir",
                                        str(tmp_path), "--log-optimizer-states-to-tensorboard"])
    want = one_process["records"]
    for result in results:  # every rank holds the whole-model figures
        for got, ref in zip(result["records"], want):
            assert got["params_norm"] == pytest.approx(ref["params_norm"], rel=1e-5), layout
            assert got["num_zeros_in_grad"] == ref["num_zeros_in_grad"], layout
    # the optimizer's fp32 weights (ZeRO-3's partitions, tp shards, each stage's) make the same whole model
    assert _scalars(tmp_path, "optimizer/weight_l2") == pytest.approx([r["params_norm"] for r in want], rel=1e-5)
    for tag in ("optimizer/momentum_l2", "optimizer/variance_sqrt_l1", "optimizer/variance_abs_max"):
        assert _scalars(tmp_path, tag) == pytest.approx(_scalars(one_process["board"], tag), rel=1e-4), (layout, tag)
    if "--pipeline-model-parallel-size" in layout:
        assert results[0]["engine"] == "megatron"  # the zeros counted by Megatron-Core's optimizer
    if "--zero-stage" in layout:  # dp2: each rank drew half the batch; the count is over both halves
        assert [r["num_zeros_in_grad"] for r in want] == _expected_zeros([r["tokens"] for r in results], 2, 1)


MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--disable-bias-linear"]


def test_moe_figures_do_not_depend_on_expert_parallelism(small_corpus, tmp_path):
    """Megatron-Core's engine with experts: ep1 on one process against ep2 with the distributed optimizer over
    dp2 (each rank two experts, its shard of the dense main params and Adam's states); with
    --overlap-param-gather the updated weights are gathered before the norm is taken."""
    one = run_world(1, run_logged, ["--data-path", small_corpus, *BASE, *MOE, "--tensorboard-dir",
                                    str(tmp_path / "one"), "--log-optimizer-states-to-tensorboard"])[0]
    two = run_world(2, run_logged, ["--data-path", small_corpus, *BASE, *MOE, "--expert-model-parallel-size", "2",
                                    "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
                                    "--tensorboard-dir", str(tmp_path / "two"),
                                    "--log-optimizer-states-to-tensorboard"])
    assert one["engine"] == "megatron" and one["records"][-1]["params_norm"] == pytest.approx(one["direct"], rel=1e-9)
    norms = [r["params_norm"] for r in one["records"]]
    for result in two:
        assert [r["params_norm"] for r in result["records"]] == pytest.approx(norms, rel=1e-5)
        assert [r["num_zeros_in_grad"] for r in result["records"]] == [r["num_zeros_in_grad"]
                                                                       for r in one["records"]]
    for board in ("one", "two"):
        assert _scalars(tmp_path / board, "optimizer/weight_l2") == pytest.approx(norms, rel=1e-5)
    for tag in ("optimizer/momentum_l2", "optimizer/variance_l1", "optimizer/momentum_abs_max"):
        assert _scalars(tmp_path / "two", tag) == pytest.approx(_scalars(tmp_path / "one", tag), rel=1e-4)


def _scalars(board, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(board))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def test_tensorboard_scalars(one_process):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(one_process["board"]))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    records = one_process["records"]
    for tag, key in (("params-norm", "params_norm"), ("num-zeros", "num_zeros_in_grad")):
        assert [e.value for e in events.Scalars(tag)] == pytest.approx([r[key] for r in records], rel=1e-6)
        assert f"{tag} vs samples" in tags
    states = {"optimizer/variance_l2", "optimizer/variance_sqrt_l2", "optimizer/momentum_l2", "optimizer/weight_l2",
              "optimizer/variance_l1", "optimizer/variance_sqrt_l1", "optimizer/momentum_l1", "optimizer/weight_l1",
              "optimizer/variance_abs_max", "optimizer/variance_sqrt_abs_max", "optimizer/momentum_abs_max",
              "optimizer/weight_abs_max"}
    assert states <= tags and {f"{t} vs tokens" for t in states} <= tags
    # fp32 without ZeRO: the optimizer's weights are the model's, so their L2 is the params norm
    assert [e.value for e in events.Scalars("optimizer/weight_l2")] == \
        pytest.approx([r["params_norm"] for r in records], rel=1e-6)
    assert all(e.value > 0 for t in states for e in events.Scalars(t))
    assert [e.value for e in events.Scalars("batch-size")] == [4, 4]
    # Megatron-DeepSpeed's --log-batch-size-to-tensorboard tags (before: noted, not written)
    assert [(e.step, e.value) for e in events.Scalars("batch-size/batch-size vs tokens")] == [(4 * 32, 4), (8 * 32, 4)]
    assert [e.value for e in events.Scalars("batch-size/batch-size")] == [4, 4]


def test_tensorboard_batch_size_is_the_steps_under_a_rampup(small_corpus, tmp_path):
    """Before: ``batch-size`` was the final global batch at every step, also while --rampup-batch-size grew it."""
    at = BASE.index("--train-iters")
    argv = ["--data-path", small_corpus, *BASE[:at], *BASE[at + 2:],
            "--rampup-batch-size", "2", "2", "8", "--train-samples", "16", "--tensorboard-dir", str(tmp_path)]
    (result,) = run_world(1, run_logged, argv)
    batches = [r["global_batch"] for r in result["records"]]
    assert batches[0] == 2 and batches[-1] == 4
    assert _scalars(tmp_path, "batch-size") == batches


def test_checkpoint_activations_is_full_uniform_recompute():
    """Megatron-DeepSpeed's --checkpoint-activations: whole layers in chunks of --checkpoint-num-layers (1).
    Before: noted ('use --recompute-activations') and dropped, so nothing was recomputed."""
    from zeromega.config import ConfigError
    from zeromega.launch import megatron_args, translate

    cfg = translate.build(None, megatron_argv=["--train-iters", "1", "--checkpoint-activations"])
    assert (cfg.recompute.granularity, cfg.recompute.method, cfg.recompute.num_layers) == ("full", "uniform", 1)
    fields = megatron_args.megatron_core_fields(cfg)
    assert (fields["recompute_granularity"], fields["recompute_method"], fields["recompute_num_layers"]) == \
        ("full", "uniform", 1)
    two = translate.build(None, megatron_argv=["--train-iters", "1", "--checkpoint-activations",
                                               "--checkpoint-num-layers", "2", "--num-layers", "4"])
    assert two.recompute.num_layers == 2
    with pytest.raises(ConfigError, match="--checkpoint-activations"):
        megatron_args.parse(["--checkpoint-activations", "--recompute-activations"])
    with pytest.raises(ConfigError) as err:
        megatron_args.parse(["--empty-unused-memory-level", "3"])
    assert "empty_unused_memory_level" in str(err.value.field) or "--empty-unused-memory-level" in str(err.value)


@pytest.mark.parametrize("name", ["megatron_deepspeed_ulysses_32k.sh", "megatron_deepspeed_moe_125m.sh"])
def test_published_deepspeed_scripts_recompute(name):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "bench"))
    import flag_census

    from zeromega.launch import megatron_args, shell_script

    path = flag_census.PUBLISHED / name if hasattr(flag_census, "PUBLISHED") else None
    if path is None:
        path = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples" / "published" / name
    script = shell_script.read(path.read_text(), dict(flag_census.SCRIPT_ENV.get(name, {})), name=str(path),
                               base=path.parent)
    argv, _ = shell_script.config_flag(script.argv)
    assert "--checkpoint-activations" in argv and "--deepspeed-activation-checkpointing" in argv
    recompute = megatron_args.parse(argv).partial["recompute"]
    assert recompute == {"granularity": "full", "method": "uniform", "num_layers": 1}


def test_flags_written_back_for_each_target():
    """``zeromega translate --to megatron / megatron-deepspeed``: the new fields as each target spells them (a flag
    the target lacks is named, not dropped), and read back to the same config."""
    from zeromega.launch import megatron_args, translate

    argv = ["--train-iters", "1", "--num-layers", "2", "--log-params-norm", "--log-num-zeros-in-grad",
            "--log-optimizer-states-to-tensorboard", "--log-batch-size-to-tensorboard",
            "--empty-unused-memory-level", "2", "--checkpoint-activations", "--checkpoint-num-layers", "2"]
    cfg = translate.build(None, megatron_argv=argv)
    written, lost = megatron_args.write_argv(cfg, "megatron")
    assert {"--log-params-norm", "--log-num-zeros-in-grad", "--empty-unused-memory-level"} <= set(written)
    assert written[written.index("--recompute-granularity") + 1] == "full"
    assert sorted(n.split()[0] for n in lost) == ["--log-batch-size-to-tensorboard",
                                                  "--log-optimizer-states-to-tensorboard"]
    written, lost = megatron_args.write_argv(cfg, "megatron-deepspeed")
    assert [n.split()[0] for n in lost] == ["scheduler.check_for_nan_in_loss_and_grad"]  # Megatron-LM's alone
    back = translate.build(None, megatron_argv=written)
    assert (back.logging, back.recompute, back.scheduler.empty_unused_memory_level) == \
        (cfg.logging, cfg.recompute, 2)
