"""Megatron-LM's evaluation and run-length flags on a real run: --eval-interval / --eval-iters (validation
every N steps, validation and test at the end, forward only, on both engines), --exit-duration-in-mins."""

from __future__ import annotations

import json
import math
import os

import pytest

from distributed import run_world
from eval_workers import run_eval

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--micro-batch-size", "2", "--no-progress",
        "--lr", "1e-3", "--global-batch-size", "4"]
EVAL = ["--split", "8,1,1", "--eval-interval", "2", "--eval-iters", "2"]


def test_eval_interval_logs_megatrons_validation_lines_and_records_without_touching_training(tmp_path,
                                                                                             small_corpus):
    metrics = tmp_path / "m.jsonl"
    argv = ["--data-path", small_corpus, *TINY, "--train-iters", "4", "--split", "8,1,1"]
    (plain,) = run_world(1, run_eval, argv)
    (evaluated,) = run_world(1, run_eval, argv + EVAL[2:] + ["--metrics-out", str(metrics)])
    # forward only: the training curve is the one of a run without evaluation
    assert [r["loss"] for r in evaluated["records"]] == [r["loss"] for r in plain["records"]]
    assert plain["evaluations"] == []
    kinds = [(e["kind"], e["step"]) for e in evaluated["evaluations"]]
    assert kinds == [("valid", 2), ("valid", 4), ("valid", 4), ("test", 4)]
    for e in evaluated["evaluations"]:
        assert e["ppl"] == pytest.approx(math.exp(e["loss"])) and 0 < e["loss"] < math.log(384) + 1
    assert evaluated["evaluations"][1]["loss"] < evaluated["evaluations"][0]["loss"]  # it learns
    framed = [entry.splitlines() for entry in evaluated["lines"] if "validation loss at" in entry]
    assert all(len(f) == 3 and f[0] == f[2] == "-" * (len(f[1]) + 1) for f in framed)  # Megatron's frame
    lines = [f[1] for f in framed]
    assert [line.split("|")[0].strip() for line in lines] == [
        "validation loss at iteration 2", "validation loss at iteration 4",
        "validation loss at iteration 4 on validation set", "validation loss at iteration 4 on test set"]
    assert all("lm loss value:" in line and "lm loss PPL:" in line for line in lines)
    written = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [(r.get("kind", "train"), r["step"]) for r in written] == [
        ("train", 1), ("train", 2), ("valid", 2), ("train", 3), ("train", 4), ("valid", 4), ("valid", 4),
        ("test", 4)]


@pytest.mark.parametrize("layout", [["--pipeline-model-parallel-size", "2"], []], ids=["pp2-megatron", "dp2"])
def test_validation_loss_is_the_same_on_both_engines_and_averaged_over_dp(small_corpus, layout):
    """pp1 (DeepSpeed's engine, 1 rank), pp2 (Megatron-Core's, forward_only) and dp2 see one model and one
    validation batch: one loss."""
    argv = ["--data-path", small_corpus, *TINY, "--train-iters", "2", *EVAL]
    (single,) = run_world(1, run_eval, argv)
    other = run_world(2, run_eval, argv + layout)[0]
    assert other["engine"] == ("megatron" if layout else "deepspeed")
    ours = [e["loss"] for e in single["evaluations"]]
    assert len(ours) == 3
    assert [e["loss"] for e in other["evaluations"]] == pytest.approx(ours, rel=1e-5)


def test_a_split_without_validation_data_trains_without_evaluating(small_corpus):
    (result,) = run_world(1, run_eval, ["--data-path", small_corpus, *TINY, "--train-iters", "2", "--split",
                                        "1,0,0", "--eval-interval", "1", "--eval-iters", "1"])
    assert len(result["records"]) == 2 and result["evaluations"] == []
    assert any("leaves no validation data" in line for line in result["lines"])


def test_exit_duration_in_mins_saves_and_stops_every_rank_at_one_step(tmp_path, small_corpus):
    save = tmp_path / "ckpt"
    results = run_world(2, run_eval, ["--data-path", small_corpus, *TINY, "--train-iters", "50", "--split",
                                      "1,0,0", "--exit-duration-in-mins", "1e-6", "--save-interval", "1000", "--save", str(save),
                                      "--eval-interval", "1", "--eval-iters", "1"])
    assert [len(r["records"]) for r in results] == [1, 1]
    assert any("--exit-duration-in-mins" in line for line in results[0]["lines"])
    assert os.listdir(save)  # saved before stopping


def test_tensorboard_dir_writes_megatrons_scalars(tmp_path, small_corpus):
    """--tensorboard-dir with its switches: the event file read back holds the loss of every step (the same
    values as the run's records), lr, validation loss and ppl, memory, iteration time and world size."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = tmp_path / "tb"
    (result,) = run_world(1, run_eval, ["--data-path", small_corpus, *TINY, "--train-iters", "4", *EVAL,
                                        "--tensorboard-dir", str(board), "--log-validation-ppl-to-tensorboard",
                                        "--log-memory-to-tensorboard", "--log-timers-to-tensorboard",
                                        "--log-world-size-to-tensorboard", "--no-log-loss-scale-to-tensorboard"])
    events = EventAccumulator(str(board))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert ("grad-norm" in tags) == (result["records"][0]["grad_norm"] is not None)
    assert {"lm loss", "lm loss vs samples", "learning-rate", "batch-size", "world-size",
            "mem-max-allocated-bytes", "iteration-time", "lm loss validation", "lm loss validation ppl",
            "lm loss test"} <= tags
    assert "loss-scale" not in tags
    loss = [(e.step, e.value) for e in events.Scalars("lm loss")]
    assert [s for s, _ in loss] == [1, 2, 3, 4]
    assert [v for _, v in loss] == pytest.approx([r["loss"] for r in result["records"]], rel=1e-6)
    assert [e.value for e in events.Scalars("learning-rate")] == pytest.approx(
        [r["lr"] for r in result["records"]], rel=1e-6)
    valid = [e for e in result["evaluations"] if e["kind"] == "valid"]
    assert [e.step for e in events.Scalars("lm loss validation")] == [2, 4, 4]
    assert [e.value for e in events.Scalars("lm loss validation")] == pytest.approx([e["loss"] for e in valid])


def test_loss_scale_scalar_on_megatron_cores_engine(tmp_path, small_corpus):
    """loss-scale is on by default (1 without fp16), read from Megatron-Core's optimizer under pp2."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = tmp_path / "tb"
    run_world(2, run_eval, ["--data-path", small_corpus, *TINY, "--train-iters", "2", "--split", "1,0,0",
                            "--pipeline-model-parallel-size", "2", "--tensorboard-dir", str(board)])
    assert len(list(board.iterdir())) == 1  # one writer (rank 0)
    events = EventAccumulator(str(board))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss-scale")] == [(1, 1.0), (2, 1.0)]
    assert [e.step for e in events.Scalars("lm loss")] == [1, 2]


def test_a_resumed_run_evaluates_the_validation_batches_an_uninterrupted_one_does(tmp_path, small_corpus):
    """Megatron-LM's rule: a run resumed at step k skips the (k // eval_interval) x eval_iters validation
    batches its earlier evaluations read, so the curve of validation losses continues unchanged."""
    argv = ["--data-path", small_corpus, *TINY, "--train-iters", "4", *EVAL]
    (whole,) = run_world(1, run_eval, argv)
    save = str(tmp_path / "ckpt")
    (first,) = run_world(1, run_eval, argv + ["--save-interval", "1000", "--save", save, "--exit-interval", "2"])
    (second,) = run_world(1, run_eval, argv + ["--save-interval", "1000", "--save", save, "--load", save])
    assert [len(first["records"]), len(second["records"])] == [2, 2]
    losses = [e["loss"] for e in first["evaluations"] + second["evaluations"]]
    assert losses == pytest.approx([e["loss"] for e in whole["evaluations"]], rel=1e-6)
