"""Fields that used to be read and then dropped, each shown acting on a real run (issue: every field applied).

Each test trains a tiny GPT for a few steps through ``zeromega.Run`` (what
``examples/pretrain_gpt.py`` runs) and checks the effect the field must
have: the lr curve of a DeepSpeed JSON's scheduler block, of
``--lr-decay-iters`` and of ``--min-lr`` on Megatron-Core's engine, the
vocabulary of ``--vocab-size``, the log lines of ``--log-interval``, the
metrics file a config's ``logging.metrics_path`` names, and the same
initial model on both engines.
"""

from __future__ import annotations

import json
import math

import pytest

from distributed import run_world
from run_workers import run_logging, run_refused

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--micro-batch-size", "2", "--split", "1,0,0",
        "--no-progress", "--lr", "1e-3"]


def lrs(result) -> list[float]:
    return [r["lr"] for r in result["records"]]


def test_a_deepspeed_scheduler_block_drives_the_lr(tmp_path, small_corpus):
    """WarmupDecayLR, warmup 4 (DeepSpeed's log warmup), 10 steps: the lrs are those of DeepSpeed's own class."""
    import torch
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    config = tmp_path / "ds.json"
    config.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 4, "total_num_steps": 10,
                                                          "warmup_max_lr": 1e-3, "warmup_min_lr": 1e-5}}}))
    (result,) = run_world(1, run_logging, ["--config", str(config), "--data-path", small_corpus, *TINY,
                                           "--train-iters", "10"])
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    scheduler = WarmupDecayLR(reference, total_num_steps=10, warmup_min_lr=1e-5, warmup_max_lr=1e-3,
                              warmup_num_steps=4)
    expected = []
    for _ in range(10):
        expected.append(reference.param_groups[0]["lr"])
        scheduler.step()
    assert lrs(result) == pytest.approx(expected, rel=1e-12)
    assert lrs(result)[0] == pytest.approx(1e-5) and max(lrs(result)) > 5e-4  # warms up, then decays


@pytest.mark.parametrize("pp", [1, 2])
def test_lr_decay_iters_and_min_lr_act_on_both_engines(small_corpus, pp):
    """Linear decay over --lr-decay-iters 4 of an 8-step run ends at --min-lr, and stays there."""
    argv = ["--data-path", small_corpus, *TINY, "--train-iters", "8", "--lr", "1e-3", "--lr-decay-style", "linear",
            "--lr-decay-iters", "4", "--min-lr", "1e-4", "--global-batch-size", "4",
            "--pipeline-model-parallel-size", str(pp)]
    results = run_world(pp, run_logging, argv)
    assert results[0]["engine"] == ("megatron" if pp > 1 else "deepspeed")
    curve = lrs(results[0])
    assert curve[:5] == pytest.approx([1e-3, 7.75e-4, 5.5e-4, 3.25e-4, 1e-4], rel=1e-9)
    assert curve[5:] == pytest.approx([1e-4] * 3, rel=1e-9)


def test_vocab_size_sets_the_model_and_is_checked_against_the_data(small_corpus):
    argv = ["--data-path", small_corpus, *TINY, "--train-iters", "1"]
    (wide,) = run_world(1, run_logging, argv + ["--vocab-size", "50257"])
    (byte,) = run_world(1, run_logging, argv)
    assert (wide["vocab"], byte["vocab"]) == (50257, 257)
    # a random model's first loss is about ln(padded vocabulary): 50304 vs 384 outputs
    assert wide["records"][0]["loss"] > math.log(50304) - 1 > byte["records"][0]["loss"] + 3


def test_a_vocabulary_smaller_than_the_data_is_refused(small_corpus):
    (line,) = run_world(1, run_refused, ["--data-path", small_corpus, *TINY, "--train-iters", "1",
                                         "--vocab-size", "100"])
    assert line.startswith("model.vocab_size=100") and "--vocab-size" in line and "token id" in line, line


def test_log_interval_prints_megatron_lines_and_the_config_names_the_metrics_file(tmp_path, small_corpus):
    metrics = tmp_path / "m.jsonl"
    config = tmp_path / "run.yaml"
    config.write_text(f"logging:\n  metrics_path: {metrics}\n")
    (result,) = run_world(1, run_logging, ["--config", str(config), "--data-path", small_corpus, *TINY,
                                           "--train-iters", "6", "--log-interval", "3"])
    logged = [line for line in result["lines"] if line.lstrip().startswith("iteration")]
    assert [int(line.split()[1].split("/")[0]) for line in logged] == [3, 6]
    assert "lm loss:" in logged[0] and "learning rate:" in logged[0] and "consumed samples:" in logged[0]
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_both_engines_start_from_the_same_model(small_corpus):
    """pp1 (DeepSpeed's engine) and pp2 (Megatron-Core's) draw the same weights for a seed: same first loss."""
    argv = ["--data-path", small_corpus, *TINY, "--num-layers", "4", "--train-iters", "2",
            "--global-batch-size", "4", "--lr", "1e-3"]
    (deepspeed,) = run_world(1, run_logging, argv)
    megatron = run_world(2, run_logging, argv + ["--pipeline-model-parallel-size", "2"])[0]
    assert (deepspeed["engine"], megatron["engine"]) == ("deepspeed", "megatron")
    first = [deepspeed["records"][0]["loss"], megatron["records"][0]["loss"]]
    assert first[0] == pytest.approx(first[1], rel=1e-6)
    second = [deepspeed["records"][1]["loss"], megatron["records"][1]["loss"]]
    assert second[0] == pytest.approx(second[1], rel=1e-5)
