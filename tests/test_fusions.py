"""Megatron-LM's kernel flags: the fusions with Megatron-LM's defaults, and the GPU-only choices per device.

(a) A Megatron-flag GPT with biases computes Megatron-LM's MLP: ``--bias-gelu-fusion`` is on by default there
and Megatron-Core's fused bias + GELU is the tanh approximation, so the activation is tanh-GELU, not erf GELU;
``--no-bias-gelu-fusion`` gives erf GELU; the SwiGLU and bias-dropout fusions and the native fused cross
entropy give the unfused values, eagerly (no torch.compile on CPU). (b) The decision table of
``integrations/megatron/accel.py`` for stubbed devices (CPU; an A100 without and with TransformerEngine; an
H100 with it) and the Megatron-Core config and layer spec each would build. (c) The one note before launch,
per device. (d) ``--to megatron`` writes the choices back. The GPU rows are decisions only: no GPU here.
"""

from __future__ import annotations

import math

import pytest

from distributed import run_world
from zeromega.config.schema import RunConfig
from zeromega.integrations.megatron import accel
from zeromega.launch import megatron_args

H = 32
BASE = ["--num-layers", "1", "--hidden-size", str(H), "--num-attention-heads", "2", "--seq-length", "16",
        "--max-position-embeddings", "16", "--micro-batch-size", "2", "--global-batch-size", "2",
        "--train-iters", "1", "--lr", "1e-3", "--mock-data", "--hidden-dropout", "0", "--attention-dropout", "0"]


def tanh_gelu(x):
    """GELU's tanh approximation, written out (Megatron-Core's fused_bias_gelu computes it)."""
    import torch

    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _mlp_in_out(gpt_model, hidden):
    """(fc1 output with its bias, the activation fc2 receives) of layer 0's MLP for ``hidden``."""
    import torch

    mlp, seen = gpt_model.decoder.layers[0].mlp, {}
    h1 = mlp.linear_fc1.register_forward_hook(lambda m, i, o: seen.update(fc1=o[0] + (0 if o[1] is None else o[1])))
    h2 = mlp.linear_fc2.register_forward_pre_hook(lambda m, i: seen.update(act=i[0]))
    with torch.no_grad():
        mlp(hidden)
    h1.remove()
    h2.remove()
    return seen["fc1"], seen["act"]


def fused_models(argvs: list[list[str]]) -> list[dict]:
    """Each command line's GPT (flags -> config -> Megatron-Core model, as Run builds it), layer 0's MLP on
    activations of unit scale, and the loss with the model's cross entropy and with the unfused one."""
    import torch
    import torch.nn.functional as F

    from megatron.core.fusions import fused_bias_dropout, fused_bias_gelu
    from zeromega.integrations import comm
    from zeromega.integrations.megatron import model, parallel
    from zeromega.launch import script_args
    from zeromega.run import gpt

    comm.install()
    parallel.initialize(script_args.read(argvs[0], "pretrain_gpt.py"))
    out = []
    try:
        for argv in argvs:
            cfg = script_args.read(argv, "pretrain_gpt.py")
            gpt_model = model.build_gpt(gpt.shape(cfg, 257), cfg)
            c = gpt_model.config
            with torch.no_grad():  # fc1 outputs of order 1, where tanh-GELU and erf GELU part
                gpt_model.decoder.layers[0].mlp.linear_fc1.weight.normal_(0.0, 1.0 / math.sqrt(H))
            hidden = torch.randn(16, 2, H, generator=torch.Generator().manual_seed(3))
            fc1, act = _mlp_in_out(gpt_model, hidden)
            if c.gated_linear_unit:
                gate, up = torch.chunk(fc1, 2, dim=-1)
                unfused, approx = F.silu(gate) * up, None
            else:
                unfused, approx = F.gelu(fc1), tanh_gelu(fc1)
                b = torch.zeros(fc1.shape[-1])
                assert torch.allclose(fused_bias_gelu.bias_gelu_impl(fc1, b), approx, atol=1e-6)  # the formula
            tokens = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(5))
            position = torch.arange(16).expand(2, 16)
            with torch.no_grad():
                loss = gpt_model(tokens, position, None, labels=tokens).mean().item()
                fusion, c.cross_entropy_loss_fusion = c.cross_entropy_loss_fusion, False
                unfused_loss = gpt_model(tokens, position, None, labels=tokens).mean().item()
                c.cross_entropy_loss_fusion = fusion
            out.append({
                "fields": {k: getattr(c, k) for k in ("bias_activation_fusion", "bias_dropout_fusion",
                                                      "masked_softmax_fusion", "cross_entropy_loss_fusion",
                                                      "gradient_accumulation_fusion", "transformer_impl")},
                "to_erf": float((act - F.gelu(fc1)).abs().max()) if approx is not None else None,
                "to_tanh": float((act - approx).abs().max()) if approx is not None else None,
                "to_unfused": float((act - unfused).abs().max()),
                "loss": loss, "unfused_loss": unfused_loss,
                "compiled": [name for name in ("bias_gelu", "bias_gelu_back")
                             if hasattr(getattr(fused_bias_gelu, name), "_torchdynamo_orig_callable")]
                + [name for name in ("bias_dropout_add_fused_train",)
                   if hasattr(getattr(fused_bias_dropout, name), "_torchdynamo_orig_callable")],
            })
    finally:
        parallel.shutdown()
    return out


def test_megatron_flags_compute_megatron_lms_gelu_and_fusions():
    gelu, no_fusion, swiglu, cross_entropy = run_world(1, fused_models, [
        BASE, BASE + ["--no-bias-gelu-fusion", "--no-bias-dropout-fusion", "--no-masked-softmax-fusion"],
        BASE + ["--swiglu", "--disable-bias-linear"], BASE + ["--cross-entropy-loss-fusion"]], timeout=180)[0]
    # Megatron-LM's defaults: bias + GELU fused (tanh approximation), bias + dropout fused; the masked softmax
    # fusion needs a CUDA kernel, so the torch softmax runs on CPU; no fused weight-gradient accumulation.
    # (on CPU the fusion's function is computed unfused by torch's tanh GELU: same values, 3.3x faster here)
    assert gelu["fields"] == {"bias_activation_fusion": False, "bias_dropout_fusion": True,
                              "masked_softmax_fusion": False, "cross_entropy_loss_fusion": False,
                              "gradient_accumulation_fusion": False, "transformer_impl": "local"}
    assert gelu["to_tanh"] < 1e-5 and gelu["to_erf"] > 1e-4, gelu  # another function than erf GELU
    assert no_fusion["fields"]["bias_activation_fusion"] is False and not no_fusion["fields"]["bias_dropout_fusion"]
    assert no_fusion["to_erf"] < 1e-6 and no_fusion["to_tanh"] > 1e-4, no_fusion
    assert swiglu["fields"]["bias_activation_fusion"] is True and swiglu["to_unfused"] < 1e-6  # same values
    assert cross_entropy["fields"]["cross_entropy_loss_fusion"] is True
    assert cross_entropy["loss"] == pytest.approx(cross_entropy["unfused_loss"], rel=1e-6)
    assert gelu["compiled"] == []  # cpu_patches runs Megatron-Core's fused functions eagerly


def test_moe_with_gelu_and_biases_computes_the_fusions_function_unfused():
    """Megatron-Core 0.16's experts get the routing probabilities (per_token_scale) and fuse bias + SwiGLU only
    (Megatron-LM stops at the first step): said before launch, and the fusion's tanh-GELU runs unfused."""
    import torch

    from megatron.core.fusions.fused_bias_gelu import bias_gelu_impl
    from zeromega.integrations.megatron import model
    from zeromega.run import gpt

    with pytest.warns(UserWarning, match="Only support fusion of swiglu"):
        cfg = _request(["--num-experts", "4"])
    assert cfg.model.bias_activation_fusion is True  # the request, as Megatron-LM's flags state it
    assert any("MoE experts" in line for line in megatron_args.write_argv(cfg)[1])  # not expressible there
    fields = model._kernel_fields(gpt.shape(cfg, 257), cfg)
    assert fields["bias_activation_fusion"] is False and fields["activation_func"] is model.gelu_tanh
    x = torch.linspace(-6, 6, 1001)
    assert torch.allclose(model.gelu_tanh(x), bias_gelu_impl(x, torch.zeros(1)), atol=1e-6)
    assert "activation_func" not in model._kernel_fields(gpt.shape(cfg, 257), _request(["--num-experts", "4",
                                                                                       "--no-bias-gelu-fusion"]))
    swiglu = _request(["--num-experts", "4", "--swiglu"])
    assert model._kernel_fields(gpt.shape(swiglu, 257), swiglu)["bias_activation_fusion"] is True


def test_zeromega_dialect_keeps_erf_gelu():
    cfg = RunConfig()
    assert not cfg.model.bias_activation_fusion and not cfg.model.bias_dropout_fusion


# ------------------------------------------------------------------ (b) the decision table, stubbed devices

CPU = accel.Device(cuda=False)
A100 = accel.Device(cuda=True, capability=(8, 0))
A100_TE = accel.Device(cuda=True, capability=(8, 0), te_version="2.8.0")
H100_TE = accel.Device(cuda=True, capability=(9, 0), te_version="2.8.0", softmax_kernels=True)
GPU_FLAGS = ["--transformer-impl", "transformer_engine", "--attention-backend", "flash", "--fp8-format", "hybrid",
             "--fp8-amax-history-len", "1024", "--fp8-amax-compute-algo", "max", "--moe-grouped-gemm",
             "--num-experts", "4", "--disable-bias-linear"]


def _request(argv: list[str]) -> RunConfig:
    return RunConfig.model_validate(megatron_args.parse(BASE + argv).partial)


DECISIONS = {
    "cpu": (CPU, dict(transformer_impl="local", attention_backend="auto", moe_grouped_gemm=False,
                      masked_softmax_fusion=False)),
    "a100": (A100, dict(transformer_impl="local", attention_backend="auto", moe_grouped_gemm=False,
                        masked_softmax_fusion=False)),
    "a100+te": (A100_TE, dict(transformer_impl="transformer_engine", attention_backend="flash",
                              moe_grouped_gemm=True, masked_softmax_fusion=False)),
    "h100+te": (H100_TE, dict(transformer_impl="transformer_engine", attention_backend="flash",
                              moe_grouped_gemm=True, masked_softmax_fusion=True, fp8="hybrid",
                              fp8_amax_history_len=1024, fp8_amax_compute_algo="max", fp8_param=False)),
}


@pytest.mark.parametrize("name", DECISIONS)
def test_each_device_gets_what_it_can_run(name):
    device, expected = DECISIONS[name]
    fields = accel.resolve(_request(GPU_FLAGS), device).fields
    common = dict(bias_activation_fusion=False, bias_dropout_fusion=True, cross_entropy_loss_fusion=False,
                  cross_entropy_fusion_impl="native", gradient_accumulation_fusion=False, persist_layer_norm=False)
    assert fields == {**common, **expected}


def test_context_parallel_keeps_the_local_layers_with_transformer_engine():
    cfg = _request(["--transformer-impl", "transformer_engine", "--context-parallel-size", "2"])
    resolved = accel.resolve(cfg, H100_TE)
    assert resolved.fields["transformer_impl"] == "local" and "context-parallel" in resolved.notes["--transformer-impl"]


def test_te_cross_entropy_falls_back_to_native_without_transformer_engine():
    cfg = _request(["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "te"])
    assert accel.resolve(cfg, CPU).fields["cross_entropy_fusion_impl"] == "native"
    assert accel.resolve(cfg, A100_TE).fields["cross_entropy_fusion_impl"] == "te"


def test_probe_reads_cuda_capability_and_libraries(monkeypatch):
    import importlib.metadata
    import importlib.util

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name in ("transformer_engine", "grouped_gemm") else real(name, *a))
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.8.0")
    assert accel.Device.probe() == accel.Device(cuda=True, capability=(9, 0), te_version="2.8.0", grouped_gemm=True)
    assert accel.Device.probe("cpu") == accel.Device(cuda=False, te_version="2.8.0", grouped_gemm=True)


def test_h100_builds_transformer_engines_config_and_spec(monkeypatch):
    """The Megatron-Core TransformerConfig fields and the layer spec model.py would build on an H100 with
    TransformerEngine (the spec function is stubbed: TransformerEngine is not installed here)."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.enums import AttnBackend

    from zeromega.integrations.megatron import model
    from zeromega.run import gpt

    monkeypatch.setattr(accel.Device, "probe", classmethod(lambda cls, device="auto": H100_TE))
    cfg = _request(["--transformer-impl", "transformer_engine", "--attention-backend", "fused", "--fp8-format",
                    "e4m3", "--bf16"])
    shape = gpt.shape(cfg, 257)
    fields = model._kernel_fields(shape, cfg)
    assert fields == dict(transformer_impl="transformer_engine", attention_backend=AttnBackend.fused, fp8="e4m3",
                          fp8_amax_history_len=1, fp8_amax_compute_algo="most_recent", fp8_param=False,
                          bias_activation_fusion=True, bias_dropout_fusion=True, masked_softmax_fusion=True,
                          cross_entropy_loss_fusion=False, cross_entropy_fusion_impl="native",
                          gradient_accumulation_fusion=False, persist_layer_norm=False)
    picked = []
    monkeypatch.setattr(gpt_layer_specs, "get_gpt_layer_with_transformer_engine_spec",
                        lambda **kw: picked.append(kw) or "te-spec")
    config = type("Config", (), {"transformer_impl": fields["transformer_impl"]})()
    assert model._layer_spec(shape, config) == "te-spec" and picked == [{}]
    monkeypatch.setattr(accel.Device, "probe", classmethod(lambda cls, device="auto": CPU))
    assert model._kernel_fields(shape, cfg)["transformer_impl"] == "local"


# ------------------------------------------------------------------ (c) the note before launch, per device

def _note(monkeypatch, capfd, device, argv) -> str:
    monkeypatch.setattr(accel.Device, "probe", classmethod(lambda cls, d="auto": device))
    monkeypatch.delenv(megatron_args.NOTED_ENV, raising=False)
    monkeypatch.setenv("RANK", "0")
    megatron_args.parse(BASE + argv)
    return capfd.readouterr().err


def test_cpu_note_names_each_fallback_and_the_device(monkeypatch, capfd):
    err = _note(monkeypatch, capfd, CPU, GPU_FLAGS + ["--masked-softmax-fusion"])
    lines = [line for line in err.splitlines() if "accepted, with a fallback" in line]
    assert len(lines) == 1, err  # one line
    line = lines[0]
    for flag in ("--transformer-impl", "--attention-backend", "--fp8-format", "--fp8-amax-history-len",
                 "--fp8-amax-compute-algo", "--moe-grouped-gemm", "--masked-softmax-fusion"):
        assert f"{flag}: " in line, flag
    assert "this device is the CPU" in line and "the run keeps fp32" in line


def test_h100_note_is_empty_where_everything_is_honoured(monkeypatch, capfd):
    err = _note(monkeypatch, capfd, H100_TE, GPU_FLAGS)
    assert "accepted, with a fallback" not in err


def test_a100_note_names_the_compute_capability_for_fp8_only(monkeypatch, capfd):
    err = _note(monkeypatch, capfd, A100_TE, GPU_FLAGS)
    line = next(line for line in err.splitlines() if "accepted, with a fallback" in line)
    assert "--fp8-format: " in line and "compute capability 8.0 < 8.9" in line
    assert "--transformer-impl" not in line and "--moe-grouped-gemm" not in line and "--attention-backend" not in line


def test_fusion_switches_are_honoured_without_a_note(monkeypatch, capfd):
    err = _note(monkeypatch, capfd, CPU, ["--no-bias-gelu-fusion", "--no-bias-dropout-fusion",
                                          "--no-masked-softmax-fusion", "--no-gradient-accumulation-fusion"])
    assert "accepted, with a fallback" not in err


# ------------------------------------------------------------------ (d) written back

@pytest.mark.parametrize("extra", [[], ["--no-bias-gelu-fusion"], ["--swiglu", "--no-bias-swiglu-fusion"],
                                   ["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "te"],
                                   ["--transformer-impl", "transformer_engine", "--attention-backend", "flash",
                                    "--fp8-format", "hybrid", "--fp8-amax-history-len", "16"]])
def test_to_megatron_writes_the_kernel_choices_back(extra):
    cfg = _request(extra)
    argv = megatron_args.write_argv(cfg)[0]
    again = RunConfig.model_validate(megatron_args.parse(argv).partial)
    assert again.model == cfg.model
    impl = argv.index("--transformer-impl")  # always stated: Megatron-LM's default is transformer_engine
    assert argv[impl + 1] == cfg.model.transformer_impl


@pytest.mark.parametrize("argv, flag", [
    (["--bias-gelu-fusion", "--no-bias-gelu-fusion"], "--no-bias-gelu-fusion"),
    (["--transformer-impl", "inference_optimized"], "--transformer-impl"),
    (["--attention-backend", "sdpa"], "--attention-backend"),
    (["--fp8-format", "e5m2"], "--fp8-format"),
])
def test_bad_kernel_flags_are_refused_by_name(argv, flag):
    from zeromega.config import ConfigError

    with pytest.raises(ConfigError) as err:
        megatron_args.parse(BASE + argv)
    assert err.value.field == flag


def test_to_megatron_deepspeed_writes_its_own_spellings():
    cfg = RunConfig()  # zeromega's defaults: no fusions, local layers
    argv, lost = megatron_args.write_argv(cfg, "megatron-deepspeed")
    assert {"--no-bias-gelu-fusion", "--no-bias-dropout-fusion", "--no-masked-softmax-fusion"} <= set(argv)
    assert "--transformer-impl" not in argv and not [line for line in lost if "fusion" in line]
