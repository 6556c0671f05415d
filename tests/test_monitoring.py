"""Monitoring as Megatron-LM users expect it (issue 15, item 4): TFLOP/s and MFU, Megatron's log-line fields,
Weights & Biases, the profiler, fp16 loss scaling on CPU, ``zeromega plot``, and the one-line note for flags
that only change speed.

The FLOP count is checked against torch's own ``FlopCounterMode`` over a real
training step: it sees every matmul, so it equals Megatron-LM's formula plus
exactly the two things that formula leaves out on purpose (the masked half
of causal attention's scores, and the MoE router's small GEMM).
"""

from __future__ import annotations

import gc
import json
import sys
import types

import pytest

from distributed import run_world

TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--micro-batch-size", "2", "--split", "1,0,0",
        "--no-progress", "--lr", "1e-3"]
LLAMA = ["--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear", "--group-query-attention",
         "--num-query-groups", "2", "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
         "--ffn-hidden-size", "96"]
MIXTRAL = ["--num-experts", "4", "--moe-router-topk", "2", "--swiglu", "--disable-bias-linear", "--ffn-hidden-size",
           "96"]


def count_flops(argv: list[str]) -> dict:
    """One training step under torch's FlopCounterMode; the formula's count beside it."""
    from torch.utils.flop_counter import FlopCounterMode

    from zeromega.integrations.megatron import model as gpt_model
    from zeromega.launch import script_args
    from zeromega.run import Run, flops

    flops.cpu_peak()  # measured (and cached) outside the counter
    run = Run(script_args.read(argv, "pretrain_gpt.py"), log=lambda line: None)
    counter = FlopCounterMode(display=False)
    with counter:
        records = run.train()
    shape = run.shape
    padded = gpt_model.padded_vocab_size(shape.vocab_size, shape.make_vocab_size_divisible_by, 1)
    return {"counted": counter.get_total_flops(), "formula": flops.flops_per_sample(shape, 32, padded),
            "batch": records[0].global_batch, "record": records[0].__dict__}


@pytest.mark.parametrize("name, extra", [("llama", LLAMA), ("mixtral", MIXTRAL)])
def test_flops_per_sample_is_what_a_step_computes(small_corpus, tmp_path, monkeypatch, name, extra):
    monkeypatch.setenv("ZEROMEGA_CACHE", str(tmp_path))
    argv = ["--data-path", small_corpus, *TINY, "--train-iters", "1", "--global-batch-size", "4", *extra]
    (got,) = run_world(1, count_flops, argv)
    s, layers, h, batch = 32, 2, 64, got["batch"]
    query = 64  # kv_channels 16 x 4 heads
    masked_half = 3 * 2 * s * s * query * layers  # Megatron counts s/2 of the s x s scores (causal)
    router = 3 * 2 * s * h * 4 * layers if name == "mixtral" else 0  # h x experts gate, not in Megatron's count
    assert got["counted"] == batch * (got["formula"] + masked_half + router)
    record = got["record"]
    assert record["tflops_per_gpu"] == pytest.approx(got["formula"] * batch / record["step_time_s"] / 1e12)
    assert record["mfu"] > 0 and record["grad_norm"] > 0


def test_gpt3_175b_count_is_megatrons_closed_form():
    """Megatron-LM's count for a dense GPT reduces to 72 B s L h^2 (1 + s / (12 h) + V / (12 L h))."""
    from zeromega.integrations.megatron.model import GPTShape
    from zeromega.run import flops

    shape = GPTShape(num_layers=96, hidden_size=12288, num_attention_heads=96, seq_length=2048, vocab_size=51200)
    s, L, h, V = 2048, 96, 12288, 51200
    assert flops.flops_per_sample(shape, s, V) == pytest.approx(72 * s * L * h * h * (1 + s / (12 * h)
                                                                                  + V / (12 * L * h)), rel=1e-12)


def test_peaks_come_from_the_table_or_a_cached_measurement(tmp_path, monkeypatch):
    from zeromega.run import flops

    assert flops.gpu_peak("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert flops.gpu_peak("NVIDIA H100 PCIe")[0] == 756e12
    assert flops.gpu_peak("NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert flops.gpu_peak("Some Future GPU") is None
    monkeypatch.setenv("ZEROMEGA_CACHE", str(tmp_path))
    calls = []
    first, how = flops.cpu_peak(measure=lambda: calls.append(1) or 5e10)
    again, cached = flops.cpu_peak(measure=lambda: calls.append(1) or 1.0)
    assert (first, again, len(calls)) == (5e10, 5e10, 1) and "cached" in cached
    assert (tmp_path / "cpu_peak.json").is_file()


class FakeWandb(types.ModuleType):
    """The part of wandb Megatron-LM calls: init(...) -> run; run.log(values, step); run.finish()."""

    def __init__(self):
        super().__init__("wandb")
        self.calls = []
        self.gc_enabled = []  # Python's automatic collector, at each log call (during training)

    def init(self, **kwargs):
        self.calls.append(("init", {k: kwargs[k] for k in ("dir", "name", "project", "entity") if k in kwargs}))
        module = self

        class Run:
            def log(self, values, step=None):
                module.calls.append(("log", step, dict(values)))
                module.gc_enabled.append(gc.isenabled())

            def finish(self):
                module.calls.append(("finish",))

        return Run()


def run_monitored(argv: list[str]) -> dict:
    """A run with wandb faked in; its log lines, records and wandb calls."""
    from zeromega.launch import script_args
    from zeromega.run import Run

    fake = FakeWandb()
    sys.modules["wandb"] = fake
    lines: list[str] = []
    records = Run(script_args.read(argv, "pretrain_gpt.py"), log=lines.append).train()
    return {"lines": lines, "records": [r.__dict__ for r in records], "wandb": fake.calls,
            "gc_in_training": fake.gc_enabled, "gc_after": gc.isenabled()}


def test_log_line_metrics_wandb_and_profiler(small_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROMEGA_CACHE", str(tmp_path / "cache"))
    metrics, board = tmp_path / "m.jsonl", tmp_path / "tb"
    argv = ["--data-path", small_corpus, *TINY, "--train-iters", "4", "--log-interval", "2", "--log-throughput",
            "--metrics-out", str(metrics), "--wandb-project", "p", "--wandb-exp-name", "e", "--wandb-save-dir",
            str(tmp_path / "wb"), "--profile", "--profile-step-start", "2", "--profile-step-end", "3",
            "--tensorboard-dir", str(board), "--wandb-entity", "team", "--manual-gc", "--manual-gc-interval", "2"]
    (result,) = run_world(1, run_monitored, argv)
    logged = [line for line in result["lines"] if line.startswith(" iteration")]
    assert len(logged) == 2
    for field in ("throughput per GPU (TFLOP/s/GPU):", "loss scale: 1.0", "grad norm:",
                  "number of skipped iterations:   0", "number of nan iterations:   0"):
        assert all(field in line for line in logged), (field, logged[0])
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert all(r["tflops_per_gpu"] > 0 and 0 < r["mfu"] and r["grad_norm"] > 0 for r in rows)
    assert result["wandb"][0] == ("init", {"dir": str(tmp_path / "wb"), "name": "e", "project": "p", "entity": "team"})
    # --manual-gc: the automatic collector is off while training and back on after it
    assert result["gc_in_training"] and not any(result["gc_in_training"]) and result["gc_after"]
    logs = [c for c in result["wandb"] if c[0] == "log"]
    assert [c[1] for c in logs] == [1, 2, 3, 4] and logs[0][2]["lm loss"] == rows[0]["loss"]
    assert "learning-rate" in logs[0][2] and "throughput" in logs[0][2] and result["wandb"][-1] == ("finish",)
    traces = list(board.glob("*.pt.trace.json"))
    assert len(traces) == 1 and "ProfilerStep#" in traces[0].read_text()


def test_fp16_on_megatrons_engine_trains_on_cpu_with_its_loss_scale_logged(small_corpus, tmp_path, monkeypatch):
    """pp2 fp16: Megatron-Core's DynamicGradScaler (a CPU patch: it allocated on CUDA) starts at Megatron-LM's
    2**32, overflows, skips and halves after each 2 overflows (hysteresis 2); the log line counts the skips."""
    monkeypatch.setenv("ZEROMEGA_CACHE", str(tmp_path))
    argv = ["--data-path", small_corpus, *TINY, "--train-iters", "6", "--log-interval", "2", "--fp16",
            "--pipeline-model-parallel-size", "2", "--global-batch-size", "2"]
    results = run_world(2, run_monitored, argv)
    records = results[0]["records"]
    scales = [r["loss_scale"] for r in records]
    assert scales[0] <= 2.0 ** 32 and scales[-1] < scales[0] and all(a >= b for a, b in zip(scales, scales[1:]))
    skipped = [r["skipped"] for r in records]
    assert any(skipped) and all(math_ok(r["loss"]) for r in records)
    logged = [line for line in results[0]["lines"] if line.startswith(" iteration")]
    counts = [int(line.split("number of skipped iterations:")[1].split("|")[0]) for line in logged]
    assert sum(counts) == sum(skipped) and "loss scale: " in logged[0]


def math_ok(value: float) -> bool:
    import math

    return math.isfinite(value)


def test_missing_wandb_is_one_line_before_launch(tmp_path, monkeypatch):
    from zeromega.config import ConfigError
    from zeromega.launch import translate
    from zeromega.run import wandb

    cfg = translate.build(None, megatron_argv=["--train-iters", "1", "--wandb-project", "p", "--wandb-exp-name",
                                               "e"])
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a, **k: None)
    with pytest.raises(ConfigError, match="pip install wandb"):
        wandb.check(cfg)
    named = translate.build(None, megatron_argv=["--train-iters", "1", "--wandb-project", "p"])
    with pytest.raises(ConfigError, match="--wandb-exp-name"):
        wandb.check(named)


def test_plot_draws_the_four_curves(tmp_path, capsys):
    rows = [{"step": i, "loss": 5 - 0.1 * i, "lr": 1e-3, "tokens_per_s": 1000 + i, "peak_mem_bytes": 2 ** 28,
             "tflops_per_gpu": 0.1} for i in range(1, 6)] + [{"kind": "valid", "step": 5, "loss": 4.6, "ppl": 99.5}]
    metrics = tmp_path / "m.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "curves.png"
    from zeromega.launch import plot_cli
    from zeromega.launch.cli import main

    plot_cli.draw([str(metrics)], str(out))  # what `zeromega plot METRICS -o PNG` calls
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    capsys.readouterr()
    assert main(["plot", str(tmp_path / "no.jsonl"), "-o", str(out)]) == 2  # the subcommand, bad input
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


GPU_FLAGS = ["--use-flash-attn", "--attention-backend", "auto", "--overlap-grad-reduce", "--overlap-param-gather",
             "--moe-grouped-gemm", "--cross-entropy-loss-fusion", "--fp8-format", "hybrid", "--fp8-amax-history-len",
             "1024", "--bias-gelu-fusion", "--masked-softmax-fusion",
             "--no-gradient-accumulation-fusion", "--use-mcore-models", "--transformer-impl", "local",
             "--num-workers", "2", "--timing-log-level", "2", "--distributed-backend", "nccl",
             "--log-timers-to-tensorboard", "--use-distributed-optimizer", "--calculate-per-token-loss",
             "--data-impl", "mmap", "--optimizer", "adam"]


def test_speed_only_flags_are_accepted_with_one_line(capfd, monkeypatch):
    """Before: each of these was refused ('not a flag this script or zeromega knows')."""
    from zeromega.launch import megatron_args

    monkeypatch.delenv(megatron_args.NOTED_ENV, raising=False)
    monkeypatch.setenv("RANK", "0")
    capfd.readouterr()
    assert megatron_args.parse(["--train-iters", "1", *GPU_FLAGS]).unknown == []
    megatron_args.parse(["--train-iters", "1", *GPU_FLAGS])  # a second read (a rank after the launcher): silent
    notes = [line for line in capfd.readouterr().err.splitlines() if "note:" in line]
    assert len(notes) == 1 and "--use-flash-attn" in notes[0] and "--fp8-format" in notes[0], notes
