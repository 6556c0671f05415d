"""Sample- and token-based schedules, batch-size ramp-up and the scheduler's resume rules (issue 15, item 3).

Each lr curve is compared step by step with Megatron-Core's own
``OptimizerParamScheduler`` built the way Megatron-LM core_v0.16.1's
``get_optimizer_param_scheduler`` builds it (counts in samples, stepped by
each step's global batch), the ramp-up with Megatron-Core's global
``num_microbatches_calculator`` driven as Megatron-LM's ``update_train_iters``
and training loop drive it, and Megatron-DeepSpeed's token schedule with
its ``get_lr`` restated below (that repository is not installed).
"""

from __future__ import annotations

import math

import pytest
import torch

from distributed import run_world
from run_workers import run_logging

from zeromega.config import ConfigError
from zeromega.launch import translate
from zeromega.run import schedule

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--micro-batch-size", "2", "--split", "1,0,0",
        "--no-progress", "--lr", "1e-3"]


def cfg_of(*argv: str):
    return translate.build(None, megatron_argv=["--lr", "1e-3", "--seq-length", "32", *argv])


def optimizer():
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)


def megatron_lrs(batches: list[int], *, warmup, decay, style, min_lr=0.0, init_lr=0.0, max_lr=1e-3) -> list[float]:
    """Megatron-Core's scheduler as Megatron-LM builds and steps it: the lr each step trains with."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt = optimizer()
    sched = OptimizerParamScheduler(opt, init_lr=init_lr, max_lr=max_lr, min_lr=min_lr, lr_warmup_steps=warmup,
                                    lr_decay_steps=decay, lr_decay_style=style, start_wd=0.0, end_wd=0.0,
                                    wd_incr_steps=1, wd_incr_style="constant", use_checkpoint_opt_param_scheduler=False,
                                    override_opt_param_scheduler=False)
    out = []
    for batch in batches:
        out.append(opt.param_groups[0]["lr"])
        sched.step(increment=batch)
    return out


def ours(cfg, batches: list[int], global_batch: int) -> list[float]:
    opt = optimizer()
    s = schedule.build(cfg, opt, global_batch, cfg.model.seq_length)
    out = []
    for batch in batches:
        out.append(s.lr)
        s.step(batch)
    return out


def test_train_samples_sets_the_steps_and_the_schedule_runs_on_samples():
    """--train-samples 42 at global batch 4: 10 steps (a partial batch dropped); warmup 6 / decay 30 samples."""
    cfg = cfg_of("--train-samples", "42", "--lr-warmup-samples", "6", "--lr-decay-samples", "30",
                 "--lr-decay-style", "cosine", "--min-lr", "1e-4", "--global-batch-size", "4", "--micro-batch-size",
                 "2")
    batching = schedule.Batching(cfg, 4, 2, 2)
    assert batching.iterations(cfg) == 42 // 4
    expected = megatron_lrs([4] * 10, warmup=6, decay=30, style="cosine", min_lr=1e-4)
    assert ours(cfg, [4] * 10, 4) == pytest.approx(expected, rel=1e-12)
    assert expected[1] == pytest.approx(1e-3 * 4 / 6)  # mid-warmup: a step of 4 samples out of 6


def test_warmup_fraction_is_a_fraction_of_the_decay_samples():
    """--lr-warmup-fraction 0.15 of --lr-decay-iters 8 x global batch 4 = 4.8 samples: not a whole step."""
    cfg = cfg_of("--train-iters", "10", "--lr-decay-iters", "8", "--lr-warmup-fraction", "0.15",
                 "--lr-decay-style", "linear", "--global-batch-size", "4", "--micro-batch-size", "4",
                 "--lr-warmup-init", "1e-5")
    expected = megatron_lrs([4] * 10, warmup=0.15 * 32, decay=32, style="linear", init_lr=1e-5)
    assert ours(cfg, [4] * 10, 4) == pytest.approx(expected, rel=1e-12)
    assert expected[1] < 1e-3 and expected[2] < 1e-3  # 4 samples < 4.8: the second step still warms up


def test_rampup_batch_size_follows_megatron_cores_calculator():
    """--rampup-batch-size 2 2 20 up to 8 (micro 2, dp 1), --train-samples 70: the steps Megatron-LM's
    update_train_iters counts, each step's batch from the global calculator, the lr stepped by it."""
    from megatron.core import num_microbatches_calculator as calc

    cfg = cfg_of("--train-samples", "70", "--rampup-batch-size", "2", "2", "20", "--global-batch-size", "8",
                 "--micro-batch-size", "2", "--lr-decay-style", "linear", "--lr-warmup-samples", "10")
    calc.init_num_microbatches_calculator(0, [2, 2, 20], 8, 2, 1, False)
    try:  # Megatron-LM's update_train_iters, then its loop's per-step update
        iters = consumed = 0
        while consumed <= 20 and consumed <= 70:
            calc.update_num_microbatches(consumed, consistency_check=False)
            consumed += calc.get_current_global_batch_size()
            iters += 1
        calc.update_num_microbatches(0, consistency_check=False)
        iters += (70 - consumed) // 8
        batches, seen = [], 0
        for _ in range(iters):
            calc.update_num_microbatches(seen, consistency_check=True)
            batches.append((calc.get_current_global_batch_size(), calc.get_num_microbatches()))
            seen += batches[-1][0]
    finally:
        calc.destroy_num_microbatches_calculator()
    batching = schedule.Batching(cfg, 8, 2, 1)
    assert batching.iterations(cfg) == iters
    ours_batches, seen = [], 0
    for _ in range(iters):
        ours_batches.append(batching.at(seen))
        seen += ours_batches[-1][0]
    assert ours_batches == batches
    sizes = [b for b, _ in batches]
    assert sizes[0] == 2 and {4, 6} <= set(sizes) and sizes[-1] == 8 and sizes == sorted(sizes)  # it ramps
    assert ours(cfg, sizes, 8) == pytest.approx(megatron_lrs(sizes, warmup=10, decay=70, style="linear"), rel=1e-12)


def megatron_deepspeed_lrs(tokens_per_step: int, steps: int, *, warmup_tokens, decay_tokens, max_lr, min_lr, style):
    """Megatron-DeepSpeed's token schedule (megatron/optimizer_param_scheduler.py get_lr, token branches), with
    its order in train(): the update after a step sees consumed_train_tokens from before that step."""
    def lr_at(tokens):
        if warmup_tokens > 0 and tokens <= warmup_tokens:
            return max_lr * tokens / warmup_tokens
        if style == "constant":
            return max_lr
        if tokens > decay_tokens:
            return min_lr
        ratio = (tokens - warmup_tokens) / (decay_tokens - warmup_tokens)
        coeff = 1.0 - ratio if style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return min_lr + coeff * (max_lr - min_lr)

    consumed, out = 0, []
    lr = lr_at(0)  # the scheduler's step(0) at construction
    for _ in range(steps):
        out.append(lr)
        lr = lr_at(consumed)  # opt_param_scheduler.step inside train_step, before the tokens are added
        consumed += tokens_per_step
    return out


def test_token_schedule_is_megatron_deepspeeds():
    """--lr-warmup-tokens 300 / --lr-decay-tokens 1000 at 4 x 32 tokens a step, cosine to --min-lr."""
    cfg = cfg_of("--train-iters", "12", "--lr-warmup-tokens", "300", "--lr-decay-tokens", "1000",
                 "--lr-decay-style", "cosine", "--min-lr", "1e-4", "--global-batch-size", "4", "--micro-batch-size",
                 "4")
    expected = megatron_deepspeed_lrs(128, 12, warmup_tokens=300, decay_tokens=1000, max_lr=1e-3, min_lr=1e-4,
                                      style="cosine")
    assert ours(cfg, [4] * 12, 4) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert expected[-1] == pytest.approx(1e-4)


def test_train_tokens_ends_the_run_before_the_step_that_would_pass_it():
    cfg = cfg_of("--train-iters", "100", "--train-tokens", "1000", "--global-batch-size", "4",
                 "--micro-batch-size", "4")
    # Megatron-DeepSpeed: while consumed_train_tokens < train_tokens; 128 tokens a step -> 8 steps (1024)
    assert schedule.Batching(cfg, 4, 4, 1).iterations(cfg) == 8


@pytest.mark.parametrize("argv, flag", [
    (["--train-iters", "10", "--train-samples", "40"], "--train-samples"),
    (["--train-iters", "10", "--lr-warmup-samples", "4"], "--lr-warmup-samples"),
    (["--train-samples", "40", "--lr-decay-iters", "4"], "--lr-decay-iters"),
    (["--train-iters", "10", "--rampup-batch-size", "2", "2", "8"], "--rampup-batch-size"),
    (["--train-iters", "10", "--lr-warmup-iters", "2", "--lr-warmup-fraction", "0.1"], "--lr-warmup-iters"),
    (["--train-iters", "10", "--override-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler"],
     "--override-opt_param-scheduler"),
    (["--train-iters", "10", "--lr-decay-tokens", "100", "--lr-warmup-iters", "2"], "--lr-warmup-tokens"),
    (["--train-iters", "10", "--optimizer", "sgd"], "--optimizer"),
])
def test_megatrons_asserts_are_one_line_refusals(argv, flag):
    with pytest.raises(ConfigError) as err:
        cfg_of(*argv)
    assert str(err.value).startswith(flag) and "\n" not in str(err.value)


def test_a_changed_schedule_on_resume_needs_a_switch():
    """Megatron-Core's scheduler refuses checkpoint values that differ, unless overridden or taken over."""
    saved = schedule.build(cfg_of("--train-iters", "8", "--global-batch-size", "4", "--micro-batch-size", "4"),
                           optimizer(), 4).state_dict()
    longer = ["--train-iters", "16", "--global-batch-size", "4", "--micro-batch-size", "4"]
    with pytest.raises(ConfigError, match="--override-opt_param-scheduler"):
        schedule.build(cfg_of(*longer), optimizer(), 4).load_state_dict(saved)
    schedule.build(cfg_of(*longer, "--override-opt_param-scheduler"), optimizer(), 4).load_state_dict(saved)
    taken = schedule.build(cfg_of(*longer, "--use-checkpoint-opt_param-scheduler"), optimizer(), 4)
    taken.load_state_dict(saved)
    assert taken.scheduler.lr_decay_steps == 32  # the checkpoint's 8 x 4


def test_a_train_samples_run_trains_its_steps_on_the_sample_schedule(small_corpus):
    """Before: --train-samples was dropped and the run trained the default 300 steps."""
    argv = ["--data-path", small_corpus, *TINY, "--train-samples", "26", "--global-batch-size", "4",
            "--lr-warmup-samples", "6", "--lr-decay-style", "linear"]
    (result,) = run_world(1, run_logging, argv)
    records = result["records"]
    assert len(records) == 6 and records[-1]["consumed_samples"] == 24
    expected = megatron_lrs([4] * 6, warmup=6, decay=26, style="linear")
    assert [r["lr"] for r in records] == pytest.approx(expected, rel=1e-12)


def test_rampup_trains_the_same_growing_batches_on_both_engines(small_corpus):
    """DeepSpeed's engine (pp 1) follows the ramp with set_train_batch_size and explicit accumulation boundaries
    (its micro_steps % gas would misplace them once gas changes); Megatron-Core's (pp 2) takes each step's
    micro-batch count. Same samples, same losses."""
    argv = ["--data-path", small_corpus, *TINY, "--train-samples", "20", "--global-batch-size", "6",
            "--rampup-batch-size", "2", "2", "4", "--lr-decay-style", "linear"]
    (deepspeed,) = run_world(1, run_logging, argv)
    megatron = run_world(2, run_logging, argv + ["--pipeline-model-parallel-size", "2"])[0]
    assert (deepspeed["engine"], megatron["engine"]) == ("deepspeed", "megatron")
    sizes = [r["global_batch"] for r in deepspeed["records"]]
    consumed = [r["consumed_samples"] for r in deepspeed["records"]]
    assert sizes == [2, 4, 6, 6], sizes  # Megatron-Core: +2 every 2 of the 4 ramp-up samples
    assert consumed == [sum(sizes[:i + 1]) for i in range(len(sizes))]
    assert [r["global_batch"] for r in megatron["records"]] == sizes
    assert [r["loss"] for r in deepspeed["records"]] == pytest.approx([r["loss"] for r in megatron["records"]],
                                                                      rel=1e-5)
    assert [r["lr"] for r in deepspeed["records"]] == pytest.approx(
        megatron_lrs(sizes, warmup=0, decay=20, style="linear"), rel=1e-12)


def run_groups(argv: list[str]) -> dict:
    """Train; then each optimizer group's (lr now, is it the embedding/output group)."""
    from zeromega.launch import script_args
    from zeromega.run import Run

    run = Run(script_args.read(argv, "pretrain_gpt.py"), log=lambda line: None)
    run.train()
    groups = []
    for group in run.engine.optimizer.param_groups:
        apart = any(getattr(p, "is_embedding_or_output_parameter", False) for p in group["params"])
        groups.append((float(group["lr"]), apart))
    return {"groups": groups, "engine": run.engine.name}


@pytest.mark.parametrize("moe", [False, True])
def test_decoupled_lr_drives_the_embedding_and_output_groups(small_corpus, moe):
    """--decoupled-lr / --decoupled-min-lr: the embedding and output weights decay from their own peak to their
    own floor, on DeepSpeed's engine (dense) and Megatron-Core's (MoE); the other groups keep --lr / --min-lr."""
    argv = ["--data-path", small_corpus, *TINY, "--train-iters", "3", "--global-batch-size", "2",
            "--lr-decay-style", "linear", "--lr-decay-iters", "8", "--min-lr", "1e-4", "--decoupled-lr", "5e-3",
            "--decoupled-min-lr", "2e-4",
            "--untie-embeddings-and-output-weights"] + (["--num-experts", "2"] if moe else [])
    (result,) = run_world(1, run_groups, argv)
    assert result["engine"] == ("megatron" if moe else "deepspeed")
    after = [2] * 3  # three steps of 2 samples: the lr the next step would use
    plain = megatron_lrs(after + [2], warmup=0, decay=16, style="linear", min_lr=1e-4)[-1]
    apart = megatron_lrs(after + [2], warmup=0, decay=16, style="linear", min_lr=2e-4, max_lr=5e-3)[-1]
    for flag, expected in ((True, apart), (False, plain)):
        found = [lr for lr, a in result["groups"] if a == flag]
        assert found and found == pytest.approx([expected] * len(found), rel=1e-9), result["groups"]
