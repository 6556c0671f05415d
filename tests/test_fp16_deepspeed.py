"""fp16 with DeepSpeed's own loss scaling on DeepSpeed's engine on CPU (issue 15, item 3).

DeepSpeed 0.19's CPU accelerator says fp16 is unsupported unless oneDNN has
native fp16 kernels, so ``deepspeed.initialize`` refused fp16 on this CPU;
zeromega's patch (``cpu_patches.DEEPSPEED_FP16``) answers for torch, which
computes fp16 anyway. DeepSpeed's optimizers and loss scaler are used as
they are. The tests: the probe and the patch; ZeRO-3 (2 ranks) follows
DeepSpeed's dynamic-scale rule from a DeepSpeed JSON's fp16 block, with
skipped steps in Megatron's log line; ZeRO-0's loss is scaled (DeepSpeed
0.19's engine.backward leaves it unscaled there); a static scale on ZeRO-1
(2 ranks) and on Megatron-Core's engine (pp 2) gives the same model and
follows the fp32 single-process curve. Slow: ZeRO-0/1/2, CPU offload and
resume. Last, ``--to deepspeed`` keeps the optimizer type as spelled.
"""

from __future__ import annotations

import json

import pytest

from distributed import run_world

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--micro-batch-size", "2", "--split", "1,0,0",
        "--no-progress", "--lr", "1e-3", "--lr-decay-style", "constant", "--global-batch-size", "4"]
PATCH = "deepspeed.accelerator.cpu_accelerator:CPU_Accelerator.is_fp16_supported"


def train(argv: list[str]) -> dict:
    """zeromega.Run on the command line: step records, log lines, the engine, the model's parameter dtypes."""
    from zeromega.launch import script_args
    from zeromega.run import Run

    lines: list[str] = []
    run = Run(script_args.read(argv, "pretrain_gpt.py"), log=lines.append)
    records = run.train()
    dtypes = sorted({str(p.dtype) for module in run.engine.modules for p in module.parameters()})
    return {"records": [r.__dict__ for r in records], "lines": [line for line in lines if "iteration" in line],
            "engine": run.engine.name, "dtypes": dtypes}


# ------------------------------------------------------------------ the probe and the patch


@pytest.fixture
def patches():
    from zeromega.integrations.megatron import cpu_patches

    yield cpu_patches
    cpu_patches.revert()


def test_probe_follows_deepspeeds_answer(patches, monkeypatch):
    """The probe reports DeepSpeed's own answer; where DeepSpeed says yes (a CPU with native fp16 kernels, or a
    DeepSpeed that stops asking oneDNN) the patch is not installed."""
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    upstream = bool(CPU_Accelerator().is_fp16_supported())
    assert patches.deepspeed_refuses_cpu_fp16() is (not upstream)
    assert patches.torch_computes_fp16()
    if not upstream:  # this machine: installed, DeepSpeed then says yes, and revert() restores its answer
        assert patches.apply_deepspeed_fp16() and CPU_Accelerator().is_fp16_supported()
        assert patches.deepspeed_refuses_cpu_fp16(), "the probe must read DeepSpeed's answer, not the patch's"
        patches.revert()
        assert not CPU_Accelerator().is_fp16_supported()
    assert not patches.apply_deepspeed_fp16(skip=(PATCH,))
    fixed = lambda self: True  # noqa: E731
    monkeypatch.setattr(CPU_Accelerator, "is_fp16_supported", fixed)
    assert not patches.deepspeed_refuses_cpu_fp16() and patches.deepspeed_fp16_on_cpu()
    assert not patches.apply_deepspeed_fp16() and CPU_Accelerator.is_fp16_supported is fixed


def initialize_fp16(patch: bool) -> str:
    """deepspeed.initialize of a Linear in fp16 (ZeRO-0, one rank) and one step; 'ok' or the error's text."""
    import deepspeed
    import torch

    from zeromega.integrations import accelerator
    from zeromega.integrations.megatron import cpu_patches

    accelerator.select("cpu").deepspeed_accelerator()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    if patch:
        cpu_patches.apply_deepspeed_fp16()
    model = torch.nn.Linear(4, 4)
    try:
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                          config={"train_micro_batch_size_per_gpu": 1, "fp16": {"enabled": True}})
    except ValueError as err:
        return str(err)
    engine.backward(engine(torch.ones(1, 4, dtype=torch.float16)).float().sum())
    engine.step()
    return "ok"


def test_deepspeed_refuses_fp16_on_cpu_without_the_patch(patches):
    if not patches.deepspeed_refuses_cpu_fp16():
        pytest.skip("DeepSpeed's CPU accelerator computes fp16 on this machine: nothing to patch")
    assert run_world(1, initialize_fp16, False) == ["Type fp16 is not supported on your device."]
    assert run_world(1, initialize_fp16, True) == ["ok"]


def test_plan_and_preflight_no_longer_refuse_fp16_on_cpu(tmp_path, capsys):
    """``zeromega plan`` and the launcher's pre-flight refused fp16 on this CPU ("the cpu device does not compute
    in fp16"); they ask the patch's probe now."""
    from zeromega.launch import cli
    from zeromega.plugins.zero import preflight

    assert preflight.machine_facts("cpu").fp16_supported
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "fp16": {"enabled": True},
                                "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}))
    code = cli.main(["plan", str(path), "--params", "1e6", "--device", "cpu", "--world-size", "2"])
    out, err = capsys.readouterr()
    assert code == 0 and "ZeRO-3 fp16, offload optimizer: cpu" in out, err


# ------------------------------------------------------------------ DeepSpeed's dynamic loss scale


def deepspeed_scale_rule(skipped: list[bool], initial: float, window: int, min_scale: float) -> list[float]:
    """The scale after each step by DeepSpeed's DynamicLossScaler with hysteresis 1 (as its docs state it): an
    overflow skips the step and halves the scale (not below min_scale); after ``window`` overflow-free steps
    since the last overflow it doubles."""
    scale, last_overflow, out = initial, -1, []
    for it, skip in enumerate(skipped):
        if skip:
            scale, last_overflow = max(scale / 2, min_scale), it
        elif it - last_overflow - 1 > 0 and (it - last_overflow - 1) % window == 0:
            scale *= 2
        out.append(scale)
    return out


def test_zero3_fp16_follows_deepspeeds_dynamic_loss_scale(small_corpus, tmp_path):
    """A DeepSpeed JSON's fp16 block (loss_scale 0: dynamic) on ZeRO-3, 2 ranks: 2**19 overflows this model's
    gradients, so the first steps are skipped and halve the scale until it fits; window 2 then doubles it.
    Megatron's log line and the step records carry the scale and the skips."""
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
        "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 19, "loss_scale_window": 2,
                 "hysteresis": 1, "min_loss_scale": 1}}))
    results = run_world(2, train, ["--config", str(config), "--data-path", small_corpus, *TINY,
                                   "--train-iters", "9", "--log-interval", "1"])
    result = results[0]
    assert result["engine"] == "deepspeed" and result["dtypes"] == ["torch.float16"]
    records = result["records"]
    skipped, scales = [r["skipped"] for r in records], [r["loss_scale"] for r in records]
    assert skipped[0] and not all(skipped), skipped
    assert scales == deepspeed_scale_rule(skipped, 2.0 ** 19, 2, 1.0)
    assert any(b > a for a, b in zip(scales, scales[1:])), str((scales, skipped))  # grew after 2 clean steps
    trained = [r["loss"] for r, skip in zip(records, skipped) if not skip]
    assert all(loss == loss and loss < 6 for loss in trained)
    for line, record in zip(result["lines"], records):
        assert f"loss scale: {record['loss_scale']:.1f}" in line
        assert f"number of skipped iterations: {int(record['skipped']):3d}" in line
        assert ("grad norm:" in line) is (not record["skipped"])  # Megatron logs no norm for a skipped step
    assert [(r["skipped"], r["loss_scale"]) for r in results[1]["records"]] == list(zip(skipped, scales))


def test_zero0_fp16_loss_is_scaled_once(small_corpus, tmp_path):
    """ZeRO-0 (DeepSpeed's FP16_UnfusedOptimizer, 1 rank): 2**24 overflows, so the first steps are skipped and
    halve the scale. DeepSpeed 0.19's engine.backward left the loss unscaled there: no step was ever skipped.
    With a static scale 1024 the logged grad norm is the fp32 run's (the optimizer keeps it scaled)."""
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 0},
                                  "fp16": {"enabled": True, "initial_scale_power": 24, "hysteresis": 1}}))
    argv = ["--data-path", small_corpus, *TINY, "--global-batch-size", "2", "--zero-stage", "0"]
    (result,) = run_world(1, train, ["--config", str(config), *argv, "--train-iters", "2"])
    records = result["records"]
    assert [(r["skipped"], r["loss_scale"]) for r in records] == [(True, 2.0 ** 23), (True, 2.0 ** 22)]
    (fp32,) = run_world(1, train, argv + ["--train-iters", "1"])
    (fp16,) = run_world(1, train, argv + ["--train-iters", "1", "--fp16", "--loss-scale", "1024"])
    assert fp16["records"][0]["grad_norm"] == pytest.approx(fp32["records"][0]["grad_norm"], rel=1e-3)


def test_zero0_scaling_hook_leaves_a_scaled_loss_alone():
    """The hook's probe: the gradient reaching the loss is 1 / accumulation when DeepSpeed did not scale it (then
    it is multiplied by the scale), scale / accumulation when a fixed DeepSpeed did (then it is left alone)."""
    import types

    import torch

    from zeromega.run.engines import DeepSpeedEngine

    wrapper = DeepSpeedEngine.__new__(DeepSpeedEngine)
    wrapper.engine = types.SimpleNamespace(fp16_enabled=lambda: True, zero_optimization=lambda: 0,
                                           _get_optimizer_loss_scale=lambda: 1024.0,
                                           gradient_accumulation_steps=lambda: 2)
    for deepspeed_scales in (False, True):
        x = torch.tensor(1.0, requires_grad=True)
        loss = wrapper._scaled_for_zero0_fp16(3 * x)
        ((loss * 1024.0 if deepspeed_scales else loss) / 2).backward()
        assert float(x.grad) == 3 * 1024 / 2


# ------------------------------------------------------------------ a static scale; the same model on both engines


# fp32 reference: DeepSpeed's engine, 1 process. A static scale (fp16.loss_scale, --loss-scale) takes the engines'
# two dynamic-scale rules out of the comparison. Measured over 8 steps: fp16 on ZeRO-1 and on Megatron's engine
# stay within 2.5e-5 of the fp32 curve and within 4e-6 of each other; the loss falls ~1 % per step, so a dropped,
# doubled or mis-scaled gradient leaves these tolerances at once.
FP16_LOSS_RTOL, ENGINES_RTOL = 2e-4, 5e-5


def _close(got: list[float], ref: list[float], rtol: float) -> float:
    worst = max(abs(g - r) / abs(r) for g, r in zip(got, ref))
    assert worst <= rtol, (worst, got, ref)
    return worst


def test_static_scale_same_model_on_both_engines(small_corpus):
    """fp16 with a static loss scale 128 on DeepSpeed's engine (ZeRO-1, dp 2) and Megatron-Core's (pp 2): the
    same first loss (the same fp16 model from the seed), then the same curve to 5e-5 and the fp32 1-process
    curve to 2e-4. Not bit-equal: DeepSpeed averages fp16 gradients over dp into flat fp32 partitions,
    Megatron's optimizer copies its fp16 grads into fp32 main grads per parameter, in another order."""
    argv = ["--data-path", small_corpus, *TINY, "--train-iters", "8"]
    fp16 = ["--fp16", "--loss-scale", "128"]
    (reference,) = run_world(1, train, argv)
    deepspeed = run_world(2, train, argv + fp16 + ["--zero-stage", "1"])[0]
    megatron = run_world(2, train, argv + fp16 + ["--pipeline-model-parallel-size", "2"])[0]
    assert (deepspeed["engine"], megatron["engine"]) == ("deepspeed", "megatron")
    assert deepspeed["dtypes"] == megatron["dtypes"] == ["torch.float16"]
    losses = {name: [r["loss"] for r in result["records"]] for name, result in
              (("fp32", reference), ("deepspeed", deepspeed), ("megatron", megatron))}
    assert losses["fp32"][-1] < losses["fp32"][0] - 0.3, "the reference run must learn"
    for result in (deepspeed, megatron):
        assert {r["loss_scale"] for r in result["records"]} == {128.0}
        assert not any(r["skipped"] for r in result["records"])
    assert losses["deepspeed"][0] == losses["megatron"][0]
    _close(losses["deepspeed"], losses["megatron"], ENGINES_RTOL)
    assert _close(losses["deepspeed"], losses["fp32"], FP16_LOSS_RTOL) > 1e-7, "the curve of fp32: not fp16"
    _close(losses["megatron"], losses["fp32"], FP16_LOSS_RTOL)


# ------------------------------------------------------------------ the other stages and offload (slow)


# ZeRO-0 is DeepSpeed's FP16_(Unfused)Optimizer, whose loss DeepSpeed 0.19's engine.backward leaves unscaled
# (zeromega.run.engines scales it): without that, 2**26 never overflowed, the scale only grew, and every update
# was divided by it.
@pytest.mark.slow
@pytest.mark.parametrize("zero, power", [
    ({"stage": 0}, 18), ({"stage": 1}, 18), ({"stage": 2}, 18),
    ({"stage": 2, "offload_optimizer": {"device": "cpu"}}, 18),
    ({"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}, 18),
], ids=["zero0", "zero1", "zero2", "zero2-offload", "zero3-offload"])
def test_every_stage_trains_fp16_with_deepspeeds_scaler(small_corpus, tmp_path, zero, power):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 2, "zero_optimization": zero,
        "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": power, "loss_scale_window": 2,
                 "hysteresis": 1, "min_loss_scale": 1}}))
    (result, _) = run_world(2, train, ["--config", str(config), "--data-path", small_corpus, *TINY,
                                       "--train-iters", "8"], timeout=400)
    records = result["records"]
    skipped, scales = [r["skipped"] for r in records], [r["loss_scale"] for r in records]
    assert skipped[0] and not all(skipped) and result["dtypes"] == ["torch.float16"], str((skipped, scales))
    assert scales == deepspeed_scale_rule(skipped, 2.0 ** power, 2, 1.0)
    trained = [r["loss"] for r, skip in zip(records, skipped) if not skip]
    assert trained[-1] < trained[0]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["0", "1", "3"])
def test_fp16_resume_keeps_deepspeeds_scaler(small_corpus, tmp_path, stage):
    """Saved after step 4 and resumed: steps 5-8 (loss, scale, skips) are those of the continuous run."""
    argv = ["--data-path", small_corpus, *TINY, "--fp16", "--initial-loss-scale", str(2 ** 18),
            "--loss-scale-window", "2", "--hysteresis", "1", "--zero-stage", stage, "--train-iters", "8"]

    def trace(result):
        return [(r["step"], r["loss"], r["loss_scale"], r["skipped"]) for r in result["records"]]

    full = trace(run_world(2, train, argv)[0])
    first = trace(run_world(2, train, argv + ["--save", str(tmp_path), "--save-interval", "4",
                                              "--exit-interval", "4"])[0])
    resumed = trace(run_world(2, train, argv + ["--load", str(tmp_path)])[0])
    assert first + resumed == full and any(skip for *_, skip in resumed), full


# ------------------------------------------------------------------ the optimizer's spelling in a written JSON


@pytest.mark.parametrize("kind", ["Adam", "adamw"])
def test_written_deepspeed_json_keeps_the_optimizer_type_as_spelled(kind):
    """DeepSpeed 0.19 runs "Adam" as AdamW unless adam_w_mode is false (engine._configure_basic_optimizer), so
    zeromega trains both with its AdamW; ``--to deepspeed`` writes the type back as the user spelled it (it
    wrote "AdamW"), and DeepSpeed reads the written file as the same decoupled-decay Adam. adam_w_mode false
    (L2-decay Adam, left to DeepSpeed) keeps its block as written."""
    from deepspeed.runtime.config import ADAM_W_MODE_DEFAULT, get_optimizer_name, get_optimizer_params

    from zeromega.launch import translate

    def read(ds):
        return translate.resolve([("DeepSpeed config", translate.from_deepspeed(json.loads(json.dumps(ds))))])

    ds = {"train_micro_batch_size_per_gpu": 2,
          "optimizer": {"type": kind, "params": {"lr": 3e-4, "betas": [0.9, 0.95]}}}
    cfg = read(ds)
    assert "optimizer" not in cfg.deepspeed_extra  # zeromega's own AdamW runs it, whatever the spelling
    written = translate.to_deepspeed_file(cfg)
    assert written["optimizer"] == ds["optimizer"]
    assert get_optimizer_name(written).lower() in ("adam", "adamw") and ADAM_W_MODE_DEFAULT is True
    assert "adam_w_mode" not in get_optimizer_params(written) and read(written) == cfg
    classic = {**ds, "optimizer": {"type": kind, "params": {"lr": 3e-4, "adam_w_mode": False}}}
    if kind.lower() == "adam":
        assert translate.to_deepspeed_file(read(classic))["optimizer"] == classic["optimizer"]
