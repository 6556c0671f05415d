"""Megatron-LM's data-parallel overlap flags on Megatron-Core's engine: ``--overlap-grad-reduce`` (bucketed
reduces started from backward hooks), ``--overlap-param-gather`` (the distributed optimizer's all-gather left
to the next forward's pre-hooks) give the same training as without them, on 2 gloo ranks.

Each world trains twice in the same processes, off then on, from the same weights (drawn by 1-process name)
and the same micro-batches (each dp rank its own, so a missing or doubled reduction shows). fp32: overlap
changes when the reduces run, not what they sum, so losses, grad norms and weights agree to float rounding
(1e-6 relative; the loss falls by > 1e-2 a step). Buckets are a few thousand elements, so the model's
gradients span several buckets and the hooks start reduces while the backward pass still runs. Between
steps the overlapped run's weights are stale until the next forward gathers them; a checkpoint's state
gathers first (its masters then agree with the weights).

And the rule Megatron-LM asserts (``--overlap-param-gather`` needs ``--use-distributed-optimizer`` and
``--overlap-grad-reduce``) refuses the flags before any rank starts; the reduce-dtype flags follow Megatron-LM's
validate_args and write back; DeepSpeed's engine gets ZeRO's counterparts, or one line saying what runs
instead; ``zeromega plan`` hides an overlapped reduce behind the backward.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from distributed import run_world

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4
SHAPE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32, vocab_size=257,
             hidden_dropout=0.0, attention_dropout=0.0)
BUCKET = 4000  # elements: ~40 k parameters in ~10 buckets


def _cfg(pp: int, overlap: bool, vpp=None) -> dict:
    cfg = {"parallel": {"pp": pp, **({"vpp": vpp} if vpp else {})}, "zero": {"stage": 1},
           "batch": {"micro": 2, "global": 8}, "optimizer": {"lr": 1e-2, "weight_decay": 0.01, "clip_grad": 1.0},
           "model": {"num_layers": SHAPE["num_layers"] * pp}}
    if overlap:
        cfg["ddp"] = {"overlap_grad_reduce": True, "overlap_param_gather": True, "bucket_size": BUCKET}
    return cfg


def _train_off_then_on(pp: int, vpp) -> dict:
    """Both runs in this rank's process: per-step loss and grad norm, final weights, and what the overlapped
    run's DDP was built with."""
    import torch
    from megatron.core import parallel_state as ps

    from zeromega.config.schema import RunConfig
    from zeromega.integrations import comm
    from zeromega.integrations.megatron import model, parallel
    from zeromega.plugins.megatron.pipeline import MegatronTrainer

    comm.install()
    shape = model.GPTShape(**dict(SHAPE, num_layers=SHAPE["num_layers"] * pp))  # 2 layers per stage
    out = {}
    layout = parallel.initialize(RunConfig.model_validate(_cfg(pp, False, vpp)), seed=1)
    dp_rank = ps.get_data_parallel_rank()
    generator = torch.Generator().manual_seed(100 + dp_rank)
    steps = []
    for _ in range(STEPS):
        batches = []
        for _ in range(layout.accumulation):
            tokens = torch.randint(0, 64, (layout.micro, shape.seq_length), generator=generator)
            batches.append({"tokens": tokens, "labels": tokens.roll(-1, 1), "loss_mask": torch.ones(tokens.shape),
                            "position_ids": torch.arange(shape.seq_length).expand_as(tokens)})
        steps.append(batches)
    for overlap in (False, True):
        trainer = MegatronTrainer(shape, RunConfig.model_validate(_cfg(pp, overlap, vpp)), layout, init_seed=7)
        # per started reduce: whether it started before finalize_model_grads (which waits for the reduces, or
        # runs them when not overlapped), i.e. from a backward hook or the schedule while backward work remains
        early, finalizing = [], [False]
        for chunk in trainer.chunks:
            for group in chunk.bucket_groups:
                def probe(*args, _start=group.start_grad_sync, **kwargs):
                    early.append(not finalizing[0])
                    return _start(*args, **kwargs)

                group.start_grad_sync = probe

        def finalize(*args, _finalize=trainer.config.finalize_model_grads_func, **kwargs):
            finalizing[0] = True
            try:
                return _finalize(*args, **kwargs)
            finally:
                finalizing[0] = False

        trainer.config.finalize_model_grads_func = finalize
        losses, norms = [], []
        for batches in steps:
            result = trainer.train_step(batches)
            losses.append(result.loss)
            norms.append(result.grad_norm)

        def weights():
            return {f"{i}.{name}": p.detach().double().clone()
                    for i, chunk in enumerate(trainer.chunks) for name, p in chunk.module.named_parameters()}

        after_step = weights()  # under overlapped gathers: the other dp rank's shard is still last step's
        # what a checkpoint save holds: the weights gathered first, so the optimizer's masters agree with them
        from zeromega.checkpoint.megatron import _refuse_misplaced_masters, sharded_state_dict

        _refuse_misplaced_masters(sharded_state_dict(trainer, loading=False))
        eval_loss = trainer.eval_step(steps[0])  # gathers first (Megatron-LM turns the gather hooks off)
        trainer.sync_params()
        final = weights()
        ddp = trainer.chunks[0].ddp_config
        out["on" if overlap else "off"] = {
            "loss": losses, "grad_norm": norms, "eval": eval_loss,
            "weights": {k: v.flatten().tolist() for k, v in final.items()},
            "stale_after_step": any(not torch.equal(after_step[k], final[k]) for k in final),
            "dp": ps.get_data_parallel_world_size(),
            "overlap": (ddp.overlap_grad_reduce, ddp.overlap_param_gather),
            "buckets": len(trainer.chunks[0].bucket_groups), "pp_rank": ps.get_pipeline_model_parallel_rank(),
            "early_reduces": sum(early), "reduces": len(early)}
        del trainer
    parallel.shutdown()
    return out


def _assert_same_training(results, weights_atol=1e-6):
    for rank, result in enumerate(results):
        off, on = result["off"], result["on"]
        assert on["overlap"] == (True, True) and off["overlap"] == (False, False)
        if on["pp_rank"] == 0:  # Megatron-Core buckets the first stage only; later stages reduce one bucket
            assert on["buckets"] > 1, "the gradients must span several buckets"
        assert off["reduces"] and off["early_reduces"] == 0
        # the overlapped all-gather waits for the next forward (with dp 1 there is no other shard to wait for)
        assert on["stale_after_step"] == (on["dp"] > 1) and not off["stale_after_step"]
        # from the 2nd step on (the 1st teaches Megatron-Core how many grads each bucket waits for) every bucket's
        # reduce starts before the step's backward work is done
        assert on["early_reduces"] >= (STEPS - 1) * on["buckets"], (on["early_reduces"], on["buckets"])
        assert off["loss"][-1] < off["loss"][0] - 1e-2, "the run must learn"
        for what in ("loss", "grad_norm"):
            for step, (a, b) in enumerate(zip(on[what], off[what]), 1):
                assert abs(a - b) <= 1e-6 * abs(b), f"rank {rank} {what} step {step}: {a!r} on vs {b!r} off"
        assert abs(on["eval"] - off["eval"]) <= 1e-6 * abs(off["eval"])
        assert on["weights"].keys() == off["weights"].keys()
        for name, values in off["weights"].items():
            worst = max(abs(a - b) for a, b in zip(on["weights"][name], values))
            assert worst <= weights_atol, f"rank {rank} {name}: weights differ by {worst}"


def test_overlapped_grad_reduce_and_param_gather_train_as_without_dp2():
    _assert_same_training(run_world(2, _train_off_then_on, 1, None))


def test_overlapped_grad_reduce_and_param_gather_train_as_without_pp2_interleaved():
    # dp 1 per stage: the schedule's no_sync / grad_sync / param_sync functions (Megatron-LM's wiring for
    # virtual stages) drive the reduces and gathers
    _assert_same_training(run_world(2, _train_off_then_on, 2, 2))


@pytest.mark.slow
@pytest.mark.parametrize("vpp", [None, 2])
def test_overlapped_grad_reduce_and_param_gather_train_as_without_pp2xdp2(vpp):
    # 4 ranks. The distributed optimizer's shards follow the buckets, so the grad norm sums its squares in another
    # order (measured: 8e-8 relative), clipping scales by a factor that far off, and Adam carries it into the
    # weights (at most 5e-6 after 4 steps at lr 1e-2); losses agree to 5e-8
    _assert_same_training(run_world(4, _train_off_then_on, 2, vpp), weights_atol=1e-5)


def test_overlap_param_gather_without_the_distributed_optimizer_is_refused_before_launch(tmp_path):
    marker = tmp_path / "a-rank-started"  # pretrain_gpt.py never runs: the launcher stops first
    done = subprocess.run(
        [sys.executable, "-m", "zeromega", "launch", "--nproc-per-node", "2", str(ROOT / "examples/pretrain_gpt.py"),
         "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
         "--micro-batch-size", "1", "--train-iters", "2", "--mock-data", "--save", str(marker),
         "--overlap-grad-reduce", "--overlap-param-gather"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "--overlap-param-gather" in lines[0], done.stderr
    assert "fix: add --use-distributed-optimizer" in lines[0]
    assert not marker.exists()


@pytest.mark.parametrize("argv, fix", [
    (["--use-distributed-optimizer", "--overlap-param-gather"], "add --overlap-grad-reduce"),
    (["--zero-stage", "0", "--overlap-grad-reduce", "--overlap-param-gather"], "add --use-distributed-optimizer"),
])
def test_megatron_lms_rule_for_overlap_param_gather(argv, fix):
    from zeromega.config import ConfigError
    from zeromega.launch import megatron_args

    with pytest.raises(ConfigError) as err:
        megatron_args.parse(argv)
    assert err.value.field == "--overlap-param-gather" and err.value.fix == fix


@pytest.mark.parametrize("ddp, zero, fix", [
    ({"overlap_param_gather": True, "overlap_grad_reduce": True}, 0, "zero.stage 1"),
    ({"overlap_param_gather": True}, 1, "overlap_grad_reduce true"),
])
def test_the_same_rule_for_a_run_config(ddp, zero, fix):
    from zeromega.config import ConfigError, validate

    with pytest.raises(ConfigError) as err:
        validate({"ddp": ddp, "zero": {"stage": zero}})
    assert err.value.field == "ddp.overlap_param_gather" and fix in err.value.fix


# Megatron-LM core_v0.16.1's validate_args: under --bf16, --grad-reduce-in-bf16 clears
# accumulate_allreduce_grads_in_fp32 (on by default for bf16); under --fp16 only --accumulate-allreduce-grads-in-fp32
# acts (fp16 gradients are otherwise reduced in fp16). None: unstated, Megatron-LM's rule on Megatron-Core's engine
# (the flags' parse alone; resolved without a DeepSpeed JSON, --bf16's None becomes True: see below).
# Written back, each says to Megatron-LM what zeromega's Megatron-Core engine runs: (argv, read, written, read back).
REDUCE_DTYPE = [
    (["--bf16"], None, [], None),
    (["--bf16", "--grad-reduce-in-bf16"], False, ["--grad-reduce-in-bf16"], False),
    (["--bf16", "--grad-reduce-in-bf16", "--accumulate-allreduce-grads-in-fp32"], False, ["--grad-reduce-in-bf16"],
     False),
    (["--bf16", "--accumulate-allreduce-grads-in-fp32"], True, [], None),  # Megatron-LM's bf16 default
    (["--fp16"], None, [], None),
    (["--fp16", "--accumulate-allreduce-grads-in-fp32"], True, ["--accumulate-allreduce-grads-in-fp32"], True),
    (["--fp16", "--accumulate-allreduce-grads-in-fp32", "--grad-reduce-in-bf16"], True,
     ["--accumulate-allreduce-grads-in-fp32"], True),
    (["--fp16", "--grad-reduce-in-bf16"], False, [], None),  # Megatron-LM's fp16 default: the same meaning
]


@pytest.mark.parametrize("argv, fp32, written, read_back", REDUCE_DTYPE)
def test_megatron_lms_reduce_dtype_flags(argv, fp32, written, read_back):
    from zeromega.config import validate
    from zeromega.launch import megatron_args

    cfg = validate(megatron_args.parse(argv).partial)
    assert cfg.ddp.grad_reduce_in_fp32 is fp32
    out = megatron_args.to_argv(cfg)
    assert [flag for flag in out if flag in ("--grad-reduce-in-bf16", "--accumulate-allreduce-grads-in-fp32")] == written
    assert validate(megatron_args.parse(out).partial).ddp.grad_reduce_in_fp32 is read_back


def test_the_ddp_section_goes_to_megatron_flags_and_back():
    from zeromega.config import validate
    from zeromega.launch import megatron_args

    ddp = {"overlap_grad_reduce": True, "overlap_param_gather": True, "grad_reduce_in_fp32": False,
           "bucket_size": 123456, "average_in_collective": True, "num_buckets": None,
           "pad_buckets_for_high_nccl_busbw": True, "align_grad_reduce": False, "align_param_gather": False}
    cfg = validate({"ddp": ddp, "zero": {"stage": 1}, "precision": "bf16"})
    argv = megatron_args.to_argv(cfg)
    for flag in ("--overlap-grad-reduce", "--overlap-param-gather", "--grad-reduce-in-bf16",
                 "--ddp-average-in-collective", "--use-distributed-optimizer", "--ddp-pad-buckets-for-high-nccl-busbw",
                 "--no-align-grad-reduce", "--no-align-param-gather"):
        assert flag in argv
    assert argv[argv.index("--ddp-bucket-size") + 1] == "123456"
    assert validate(megatron_args.parse(argv).partial).ddp.model_dump() == ddp


def test_deepspeeds_counterparts_and_what_falls_back():
    from zeromega.config import validate
    from zeromega.plugins.zero.ds_config import ddp_fallbacks, to_deepspeed

    ddp = {"overlap_grad_reduce": True, "overlap_param_gather": True, "grad_reduce_in_fp32": False, "bucket_size": 5000}
    zero1 = validate({"ddp": ddp, "zero": {"stage": 1}, "precision": "bf16"})
    ds = to_deepspeed(zero1)
    assert ds["zero_optimization"]["overlap_comm"] is True and ds["zero_optimization"]["reduce_bucket_size"] == 5000
    assert ds["communication_data_type"] == "bf16"
    # overlap_comm and the bucket are honoured; ZeRO-1 gathers the parameters in the step: one line says so
    lines = ddp_fallbacks(zero1)
    assert len(lines) == 1 and "--overlap-param-gather" in lines[0]
    # unset: DeepSpeed's own defaults (overlap_comm on for ZeRO-3 only, reduce in the parameters' dtype)
    plain = to_deepspeed(validate({"zero": {"stage": 3}, "precision": "bf16"}))
    assert "overlap_comm" not in plain["zero_optimization"] and "communication_data_type" not in plain
    zero0 = validate({"ddp": {"overlap_grad_reduce": True}, "precision": "bf16"})
    assert "overlap_comm" not in to_deepspeed(zero0)["zero_optimization"]
    assert [line.split(":")[0] for line in ddp_fallbacks(zero0)] == ["ddp.overlap_grad_reduce (--overlap-grad-reduce)"]
    fp32 = validate({"ddp": {"grad_reduce_in_fp32": True}, "zero": {"stage": 2}, "precision": "bf16"})
    assert to_deepspeed(fp32)["communication_data_type"] == "fp32"


def test_plan_hides_the_overlapped_reduce_behind_backward(tmp_path, capsys):
    import re

    from zeromega.launch import cli

    steps = {}
    for overlap in (False, True):
        path = tmp_path / f"{overlap}.yaml"
        path.write_text(f"parallel: {{pp: 2}}\nzero: {{stage: 1}}\nprecision: bf16\nbatch: {{micro: 1, global: 64}}\n"
                        f"ddp: {{overlap_grad_reduce: {str(overlap).lower()}}}\nmodel: {{num_layers: 8, hidden_size: "
                        "4096, num_attention_heads: 32, seq_length: 2048, vocab_size: 32000}\n")
        assert cli.main(["plan", str(path), "--world-size", "16", "--gpu", "h100"]) == 0
        steps[overlap] = re.search(r"^  step ([\d.]+) s \((.*)\)", capsys.readouterr().out, re.M)
    assert " dp " in steps[False].group(2) and " dp " not in steps[True].group(2)  # all of it behind backward
    assert float(steps[True].group(1)) < float(steps[False].group(1))


@pytest.mark.slow
def test_a_checkpoint_under_overlapped_param_gather_resumes_bit_for_bit(tmp_path, small_corpus):
    """Between steps the other dp rank's shard of the weights is the last step's until the next forward; the
    checkpoint gathers first (without it the save refuses: its masters disagree with the weights)."""
    from test_checkpoint_megatron import HALF, MOE, STEPS, full_then_resumed

    layout = [*MOE, "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
              "--ddp-bucket-size", "20000"]  # MoE, dp 2: Megatron-Core's engine, the distributed optimizer over 2
    full, resumed = full_then_resumed(tmp_path, small_corpus, 2, layout)
    assert sorted(full) == list(range(1, STEPS + 1)) and sorted(resumed) == list(range(HALF + 1, STEPS + 1))
    for step in resumed:
        assert resumed[step] == full[step], f"step {step}: resumed {resumed[step]!r} vs {full[step]!r}"


def _gradient_buffer_dtypes() -> dict:
    """The Megatron-Core engine's gradient buffer dtype per precision and ddp.grad_reduce_in_fp32."""
    from zeromega.config.schema import RunConfig
    from zeromega.integrations import comm
    from zeromega.integrations.megatron import model, parallel
    from zeromega.plugins.megatron.pipeline import MegatronTrainer

    comm.install()
    out = {}
    for precision in ("bf16", "fp16"):
        for fp32 in (None, True, False):
            cfg = RunConfig.model_validate({**_cfg(1, False), "precision": precision,
                                            "ddp": {"grad_reduce_in_fp32": fp32}})
            layout = parallel.initialize(cfg, seed=1)
            trainer = MegatronTrainer(model.GPTShape(**SHAPE), cfg, layout)
            out[precision, fp32] = {str(buffer.grad_dtype) for chunk in trainer.chunks for buffer in chunk.buffers}
            parallel.shutdown()
    return out


def test_megatron_cores_gradient_buffer_dtype_is_megatron_lms():
    # unset: fp32 for bf16 (accumulate_allreduce_grads_in_fp32's default), the parameters' dtype for fp16
    assert run_world(1, _gradient_buffer_dtypes)[0] == {
        ("bf16", None): {"torch.float32"}, ("bf16", True): {"torch.float32"}, ("bf16", False): {"torch.bfloat16"},
        ("fp16", None): {"torch.float16"}, ("fp16", True): {"torch.float32"}, ("fp16", False): {"torch.float16"}}


@pytest.mark.parametrize("precision, stated, buffer", [
    ("bf16", None, 4), ("bf16", False, 2), ("fp16", None, 2), ("fp16", True, 4), ("fp32", None, 4)])
def test_the_memory_plan_counts_the_gradient_buffer_megatron_core_builds(precision, stated, buffer):
    from types import SimpleNamespace

    from zeromega.config import validate
    from zeromega.plugins.zero import plan as zplan
    from zeromega.plugins.zero.ds_config import to_deepspeed

    cfg = validate({"parallel": {"pp": 2}, "zero": {"stage": 1}, "precision": precision,
                    "ddp": {"grad_reduce_in_fp32": stated}})
    layout = SimpleNamespace(tp=1, pp=2, dp=1, cp=1, ep=1, etp=1, micro=1, accumulation=4, global_batch=4, vpp=None)
    stage = zplan.for_run(to_deepspeed(cfg), layout, shape=dict(SHAPE, num_layers=4)).stages[0]
    grads = [r for r in stage.rows if r.name.startswith("gradient buffer")]
    assert len(grads) == 1 and grads[0].bytes == buffer * stage.model.params


# ------------------------------------------------------------------ Megatron-LM's fp32 gradients for bf16 on DeepSpeed

MEGATRON_BF16 = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
                 "--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "1e-4", "--bf16"]


def test_megatron_flags_alone_mean_megatron_lms_fp32_gradients_for_bf16(tmp_path):
    # core_v0.16.1's validate_args: --bf16 sets accumulate_allreduce_grads_in_fp32 unless --grad-reduce-in-bf16.
    # Before, the unset field left DeepSpeed's engine reducing and accumulating in bf16.
    import json

    from zeromega.launch import megatron_args, translate
    from zeromega.plugins.zero.ds_config import ddp_fallbacks, to_deepspeed

    cfg = translate.build(None, MEGATRON_BF16)
    assert cfg.ddp.grad_reduce_in_fp32 is True
    assert not [flag for flag in megatron_args.to_argv(cfg) if "grad" in flag]  # Megatron-LM's default: unsaid
    assert translate.build(None, MEGATRON_BF16 + ["--grad-reduce-in-bf16"]).ddp.grad_reduce_in_fp32 is False
    by_stage = {stage: to_deepspeed(translate.build(None, MEGATRON_BF16 + ["--zero-stage", str(stage)]))
                for stage in (0, 1, 2, 3)}
    for stage, ds in by_stage.items():
        assert ds["communication_data_type"] == "fp32", stage
        assert ds.get("data_types") == ({"grad_accum_dtype": "fp32"} if stage >= 2 else None), stage
    # ZeRO-0/1 accumulate in bf16 (DeepSpeed refuses, or swaps the optimizer for, fp32 accumulation): one line
    zero1 = translate.build(None, MEGATRON_BF16 + ["--use-distributed-optimizer"])
    assert len(ddp_fallbacks(zero1)) == 1 and "accumulates a step's micro-batches in bf16" in ddp_fallbacks(zero1)[0]
    assert ddp_fallbacks(translate.build(None, MEGATRON_BF16 + ["--zero-stage", "2"])) == []
    # with a DeepSpeed JSON the gradients are DeepSpeed's (Megatron-DeepSpeed), and a JSON alone is DeepSpeed's
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}}))
    assert translate.build(str(config), MEGATRON_BF16).ddp.grad_reduce_in_fp32 is None
    assert translate.build(str(config)).ddp.grad_reduce_in_fp32 is None


def _deepspeed_accumulates_and_reduces(ds: dict) -> dict:
    """Two bf16 micro-batches through ``deepspeed.initialize(config=ds)``: the optimizer DeepSpeed builds, the
    dtype its ZeRO-2 gradient partitions accumulate in, and the dtypes of its all-reduces."""
    import deepspeed
    import torch
    import torch.distributed as dist

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    ds = dict(ds, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=2, train_batch_size=4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=ds)
    reduced, accumulated = set(), set()
    all_reduce = dist.all_reduce

    def recording(tensor, *args, **kwargs):
        reduced.add(str(tensor.dtype))
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = recording
    try:
        for micro in range(2):
            x = torch.randn(1, 16, dtype=torch.bfloat16) * (dist.get_rank() + 1)
            engine.backward(engine(x).float().pow(2).mean())
            if micro == 0:
                accumulated |= {str(g.dtype) for g in getattr(engine.optimizer, "averaged_gradients", {}).get(0, [])}
            engine.step()
    finally:
        dist.all_reduce = all_reduce
    return {"optimizer": type(engine.optimizer).__name__, "accumulated": accumulated,
            "reduced": reduced - {"torch.uint8"}}  # uint8: the overflow flag


def test_deepspeed_zero2_accumulates_and_reduces_megatron_lms_bf16_gradients_in_fp32():
    # 2 gloo ranks: the keys the bf16 Megatron-flag run gets make DeepSpeed's ZeRO-2 keep its gradient partition
    # in fp32 across micro-batches and all-reduce in fp32 (its default: bf16 both)
    from zeromega.launch import translate
    from zeromega.plugins.zero.ds_config import to_deepspeed

    ds = to_deepspeed(translate.build(None, MEGATRON_BF16 + ["--zero-stage", "2"]))
    ds = {key: ds[key] for key in ("zero_optimization", "bf16", "communication_data_type", "data_types")}
    result = run_world(2, _deepspeed_accumulates_and_reduces, ds)[0]
    assert result == {"optimizer": "DeepSpeedZeroOptimizer", "accumulated": {"torch.float32"},
                      "reduced": {"torch.float32"}}


def test_a_deepspeed_jsons_own_overlap_bucket_and_reduce_dtype_reach_megatron_flags():
    # overlap_comm and communication_data_type were passed through to DeepSpeed only, so --to megatron lost
    # them; read into the ddp fields, they are written as Megatron-LM's flags, and the JSON written back holds
    # the same keys (reduce_bucket_size stays DeepSpeed's: "auto" or zeromega's CPU default look the same)
    from zeromega.launch import megatron_args, translate
    from zeromega.launch.deepspeed_json import from_deepspeed
    from zeromega.plugins.zero.ds_config import to_deepspeed

    def read(ds: dict):
        return translate.resolve([("DeepSpeed", from_deepspeed({"train_micro_batch_size_per_gpu": 1, **ds}))])

    stated = {"bf16": {"enabled": True}, "communication_data_type": "bf16",
              "zero_optimization": {"stage": 1, "overlap_comm": True, "reduce_bucket_size": 5000}}
    cfg = read(stated)
    assert cfg.ddp.model_dump(exclude_defaults=True) == {"overlap_grad_reduce": True, "grad_reduce_in_fp32": False}
    argv = megatron_args.to_argv(cfg)
    assert {"--overlap-grad-reduce", "--grad-reduce-in-bf16"} <= set(argv)
    written = to_deepspeed(cfg, standalone=True)
    assert written["zero_optimization"]["overlap_comm"] is True and written["communication_data_type"] == "bf16"
    assert written["zero_optimization"]["reduce_bucket_size"] == 5000
    # ZeRO-2's fp32 pair reads as fp32 gradients (Megatron-LM's bf16 default: no flag); fp32 reduce alone at
    # ZeRO-2 (bf16 accumulation) has no Megatron-LM meaning and stays DeepSpeed's
    zero2 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}, "communication_data_type": "fp32"}
    assert read({**zero2, "data_types": {"grad_accum_dtype": "fp32"}}).ddp.grad_reduce_in_fp32 is True
    alone = read(zero2)
    assert alone.ddp.grad_reduce_in_fp32 is None and alone.deepspeed_extra["communication_data_type"] == "fp32"
    # unstated overlap_comm stays unstated (DeepSpeed's default differs by stage); ZeRO-0 has no overlap_comm
    assert read({"zero_optimization": {"stage": 3}}).ddp.overlap_grad_reduce is None
    zero0 = read({"zero_optimization": {"stage": 0, "overlap_comm": True}})
    assert zero0.ddp.overlap_grad_reduce is None and zero0.deepspeed_extra["zero_optimization"]["overlap_comm"]


# ------------------------------------------------------------------ Megatron-LM 0.16.1's other DDP flags

def _ddp_wiring(ddp: dict) -> dict:
    """What Megatron-Core's engine builds for a ddp section: DDP's config fields and the schedule's sync hooks."""
    from zeromega.config.schema import RunConfig
    from zeromega.integrations import comm
    from zeromega.integrations.megatron import model, parallel
    from zeromega.plugins.megatron.pipeline import MegatronTrainer

    comm.install()
    cfg = RunConfig.model_validate({**_cfg(1, False), "ddp": ddp})
    layout = parallel.initialize(cfg, seed=1)
    trainer = MegatronTrainer(model.GPTShape(**SHAPE), cfg, layout)
    chunk = trainer.chunks[0]
    params = sum(p.numel() for p in chunk.module.parameters())
    out = {"bucket_size": chunk.ddp_config.bucket_size, "params": params, "buckets": len(chunk.buffers[0].buckets),
           "pad": chunk.ddp_config.pad_buckets_for_high_nccl_busbw,
           "grad_sync": trainer.config.grad_sync_func is not None}
    parallel.shutdown()
    return out


def test_megatron_lms_ddp_num_buckets_pad_and_align_flags_reach_megatron_cores_ddp():
    # before, the flags were refused as unknown; now --ddp-num-buckets sizes the buckets as Megatron-LM's
    # get_model does (the rank's parameters // N), the pad flag is DDP's own field, and --no-align-grad-reduce
    # leaves each stage's reduces to its buckets (no grad_sync_func for the schedule)
    from zeromega.launch import megatron_args

    ddp = megatron_args.parse(["--overlap-grad-reduce", "--ddp-num-buckets", "3", "--no-align-grad-reduce",
                               "--ddp-pad-buckets-for-high-nccl-busbw", "--no-align-param-gather"]).partial["ddp"]
    assert ddp == {"overlap_grad_reduce": True, "num_buckets": 3, "align_grad_reduce": False,
                   "pad_buckets_for_high_nccl_busbw": True, "align_param_gather": False}
    built = run_world(1, _ddp_wiring, ddp)[0]
    assert built["bucket_size"] == built["params"] // 3 and built["buckets"] >= 3
    assert built["pad"] is True and built["grad_sync"] is False
    assert run_world(1, _ddp_wiring, {"overlap_grad_reduce": True})[0]["grad_sync"] is True


@pytest.mark.parametrize("argv, fix", [
    (["--ddp-num-buckets", "2", "--ddp-bucket-size", "1000"], "pass one of them"),
    (["--overlap-param-gather-with-optimizer-step"], "add --use-distributed-optimizer"),
    (["--use-distributed-optimizer", "--overlap-param-gather-with-optimizer-step"], "add --overlap-param-gather"),
    (["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
      "--overlap-param-gather-with-optimizer-step"], "add --num-layers-per-virtual-pipeline-stage"),
])
def test_megatron_lms_asserts_on_the_other_ddp_flags_refuse_before_launch(argv, fix):
    from zeromega.config import ConfigError
    from zeromega.launch import megatron_args

    with pytest.raises(ConfigError) as err:
        megatron_args.parse(argv)
    assert err.value.fix == fix
