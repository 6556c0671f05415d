"""An MoE model gets linear biases exactly as asked, as Megatron-LM builds it: on by default (attention, dense
MLPs, the router, every expert), off with --disable-bias-linear (model.add_bias_linear: false). Megatron-Core
keeps MoE biases only at expert tensor parallel 1, so biases at a larger expert tp (Megatron-LM's default expert
tp is tp) are refused before launch, in one line naming the field and both fixes. The same seed gives the same
model, biases included, in every layout; the training parity of MoE with biases under ep and tp x ep (expert tp
1) is in tests/test_hybrid.py."""

from __future__ import annotations

import warnings

from distributed import run_world
from run_workers import build_architectures
from zeromega.plugins.zero import plan as zplan

H, LAYERS, EXPERTS, SEQ, VOCAB = 64, 2, 4, 32, 257
ARGV = ["--num-layers", str(LAYERS), "--hidden-size", str(H), "--num-attention-heads", "4", "--seq-length",
        str(SEQ), "--max-position-embeddings", str(SEQ), "--lr", "1e-3", "--train-iters", "1", "--num-experts",
        str(EXPERTS)]


def _megatron_count(bias: bool) -> int:
    """Megatron's count of this GPT-2-block MoE model: per layer two LayerNorms (2h each), attention (4h^2, biases
    3h + h), a router (E h, bias E) and E experts (fc1 4h x h and fc2 h x 4h, biases 4h + h); a 257-token
    vocabulary padded to 384, learned positions, the final LayerNorm, the output layer tied."""
    f = 4 * H
    attention = 4 * H * H + (4 * H if bias else 0)
    experts = EXPERTS * (2 * f * H + (f + H if bias else 0))
    router = EXPERTS * H + (EXPERTS if bias else 0)
    return LAYERS * (2 * 2 * H + attention + router + experts) + 384 * H + SEQ * H + 2 * H


def test_a_moe_model_has_the_biases_asked_and_megatrons_parameter_count():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with_bias, without = run_world(1, build_architectures, [ARGV, ARGV + ["--disable-bias-linear"]])[0]
    names = set(with_bias["params"])
    for layer in range(LAYERS):
        prefix = f"decoder.layers.{layer}."
        assert {prefix + "self_attention.linear_qkv.bias", prefix + "self_attention.linear_proj.bias",
                prefix + "mlp.router.bias"} <= names
        for expert in range(EXPERTS):
            for fc in ("linear_fc1", "linear_fc2"):
                assert f"{prefix}mlp.experts.local_experts.{expert}.{fc}.bias" in names
    linear_biases = [n for n in without["params"] if n.endswith(".bias") and "layernorm" not in n]
    assert linear_biases == []
    for built, bias in ((with_bias, True), (without, False)):
        count = sum(_prod(shape) for shape in built["params"].values())
        assert count == _megatron_count(bias)
        planned = zplan.gpt_size(LAYERS, H, 4, SEQ, VOCAB, num_experts=EXPERTS, add_bias_linear=bias).params
        assert planned == count  # what `zeromega plan` prints


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def initial_weights(cfg: dict, shape: dict, seed: int) -> dict:
    """This rank's initial weights (zeromega's init by 1-process name) as {1-process name: (shape, bytes hash)}."""
    import hashlib

    from zeromega.config.schema import RunConfig
    from zeromega.integrations import comm
    from zeromega.integrations.megatron import model, parallel

    comm.install()
    run = RunConfig.model_validate(cfg)
    parallel.initialize(run, seed=seed)
    try:
        gpt_shape = model.GPTShape(**shape)
        chunks = model.build_gpt_chunks(gpt_shape, run)
        model.init_by_name(chunks, gpt_shape, seed)
        out = {}
        for chunk in chunks:
            names = model.global_param_names(chunk)
            for name, p in chunk.named_parameters():
                data = p.detach().float().contiguous().numpy().tobytes()
                out[names[name]] = (tuple(p.shape), hashlib.sha1(data).hexdigest())
        return out
    finally:
        parallel.shutdown()


def test_a_moe_model_with_biases_is_the_same_model_at_ep_and_pp():
    """Expert biases by their 1-process expert number at ep 2, and the router's bias (which Megatron-Core draws
    like a weight, from each stage's own stream) re-drawn by name: ep 2 and pp 2 hold the 1-process tensors."""
    shape = dict(num_layers=LAYERS, hidden_size=H, num_attention_heads=4, seq_length=SEQ, vocab_size=VOCAB,
                 num_experts=EXPERTS, moe_router_topk=2)

    def cfg(**parallel):
        return {"parallel": parallel, "batch": {"micro": 1, "global": 2}, "optimizer": {"lr": 1e-3}}

    reference = run_world(1, initial_weights, cfg(), shape, 11)[0]
    assert sum(name.endswith(".router.bias") for name in reference) == LAYERS
    assert sum(".local_experts." in name and name.endswith(".bias") for name in reference) == 2 * EXPERTS * LAYERS
    for layout in (dict(ep=2), dict(pp=2)):
        seen = {}
        for rank_weights in run_world(2, initial_weights, cfg(**layout), shape, 11):
            for name, value in rank_weights.items():
                assert value == reference[name], (layout, name)
                seen[name] = value
        assert seen.keys() == reference.keys(), layout


def test_moe_biases_at_expert_tensor_parallel_above_1_are_refused_before_launch(tmp_path, capsys, monkeypatch):
    """Megatron-Core asserts "Bias in Moe is only supported when ETP==1" inside every rank; zeromega says it
    first (exit 2, one line) for Megatron flags and for its own YAML, and runs the layouts that keep biases."""
    from zeromega.launch import cli

    base = " ".join(ARGV + ["--micro-batch-size", "1"])

    def yaml(model: str = "") -> str:
        return (f"model: {{num_layers: 2, hidden_size: 64, num_attention_heads: 4, seq_length: 32{model}}}\n"
                "moe: {num_experts: 4}\nbatch: {micro: 1}\noptimizer: {lr: 0.1}\n"
                "parallel: {tp: 2, sequence_parallel: true}\n")
    cases = {
        # Megatron-LM's expert tp is tp: biases at tp 2 need --expert-tensor-parallel-size 1 (and then ep > 1)
        "tp2.args": (base + " --tensor-model-parallel-size 2 --sequence-parallel", "model.add_bias_linear=True"),
        "etp2.args": (base + " --tensor-model-parallel-size 2 --sequence-parallel --expert-tensor-parallel-size 2 "
                             "--expert-model-parallel-size 1", "model.add_bias_linear=True"),
        "tp2.yaml": (yaml(), "model.add_bias_linear=True"),
        # expert tp below tp at ep 1: Megatron-Core would let each tp rank's copy of an expert drift
        "etp1-ep1.args": (base + " --tensor-model-parallel-size 2 --sequence-parallel --expert-tensor-parallel-size 1",
                          "parallel.etp=1"),
        "tp2-etp1-ep2.args": (base + " --tensor-model-parallel-size 2 --sequence-parallel "
                                     "--expert-tensor-parallel-size 1 --expert-model-parallel-size 2", None),
        "tp2-no-bias.args": (base + " --tensor-model-parallel-size 2 --sequence-parallel --disable-bias-linear", None),
        "tp2-no-bias.yaml": (yaml(", add_bias_linear: false"), None),
        "ep2.args": (base + " --expert-model-parallel-size 2", None),
    }
    for name, (text, refused) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        dialect = ["--from", "megatron"] if name.endswith(".args") else []
        code = cli.main(["check", *dialect, str(path), "--world-size", "2"])
        err = capsys.readouterr().err
        if refused is None:
            assert code == 0 and "bias" not in err, (name, err)
            continue
        assert code == 2 and err.count("\n") == 1 and refused in err, (name, err)
        if refused.startswith("model.add_bias_linear"):
            assert "--disable-bias-linear" in err and "--expert-tensor-parallel-size 1" in err, err
    # and zeromega launch stops there too, before any process starts
    launched = []
    monkeypatch.setattr(cli.launcher, "launch", lambda job, kind: launched.append(job))
    assert cli.main(["launch", "--nproc-per-node", "2", "--config", str(tmp_path / "tp2.yaml"),
                     "examples/pretrain_gpt.py"]) == 2
    assert launched == [] and "model.add_bias_linear=True" in capsys.readouterr().err
