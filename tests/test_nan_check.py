"""Megatron-LM's ``--check-for-nan-in-loss-and-grad`` (on by default there, off under fp16's dynamic loss
scaling): a Megatron-flag run stops at the first NaN or infinite loss or gradient norm with one line naming the
iteration, where zeromega used to count NaN iterations and finish with exit code 0."""

from __future__ import annotations

import pytest

from distributed import run_world

BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "1", "--global-batch-size", "2", "--train-iters", "4", "--mock-data",
        "--no-progress", "--log-interval", "1"]


@pytest.mark.parametrize("extra, on", [([], True), (["--no-check-for-nan-in-loss-and-grad"], False),
                                       (["--bf16"], True), (["--fp16"], False),
                                       (["--fp16", "--loss-scale", "128"], True)])
def test_megatron_flags_check_for_nan_as_megatron_lm(extra, on):
    from zeromega.config import RunConfig
    from zeromega.launch import megatron_args, translate

    cfg = translate.build(None, megatron_argv=BASE + extra)
    assert cfg.scheduler.check_for_nan_in_loss_and_grad is on
    argv = megatron_args.to_argv(cfg)
    assert ("--no-check-for-nan-in-loss-and-grad" in argv) is (not on and extra != ["--fp16"])
    assert translate.build(None, megatron_argv=argv).scheduler.check_for_nan_in_loss_and_grad is on  # read back
    assert RunConfig().scheduler.check_for_nan_in_loss_and_grad is False  # zeromega's own default: DeepSpeed's


def _run(argv: list[str]):
    """A one-process run of pretrain_gpt.py's reading of ``argv``: (exit code, stderr, [(step, nan)])."""
    import contextlib
    import io

    from zeromega.launch import script_args

    err, code, records = io.StringIO(), 0, []
    with contextlib.redirect_stderr(err):
        try:
            records = script_args.run(argv, "pretrain_gpt.py")
        except SystemExit as stop:
            code = stop.code
    return code, err.getvalue(), [(r.step, r.nan) for r in records]


def test_a_nan_loss_stops_a_megatron_flag_run_in_one_line():
    diverging = BASE + ["--lr", "1e30", "--seed", "3"]
    code, err, _ = run_world(1, _run, diverging)[0]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 1 and len(lines) == 1, err
    assert "iteration 2: loss nan" in lines[0] and "--no-check-for-nan-in-loss-and-grad" in lines[0], lines
    code, err, records = run_world(1, _run, diverging + ["--no-check-for-nan-in-loss-and-grad"])[0]
    assert code == 0 and len(records) == 4 and sum(nan for _, nan in records) >= 2, (err, records)  # as before
