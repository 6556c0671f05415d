"""`zeromega export` of checkpoints written by Megatron-Core's engine (pp > 1, MoE).

Each test trains 2 steps of the real ``examples/pretrain_gpt.py`` (dropout
off, fp32, no warmup so step 1 moves the weights), saving after step 1, exports that checkpoint through the CLI and
scores step 2's global batch with a fresh 1-process GPTModel holding only
the exported weights. Training reported that loss with the same weights, so
the two agree within a relative 1e-5 (reordered reductions of another layout
give ~1e-7; a missing, misnamed or wrongly unstacked tensor moves the loss by
far more, and a strict name/shape check against the 1-process model's
state dict catches the rest).
"""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from ckpt_megatron_workers import pretrain
from ckpt_workers import read_curve
from distributed import run_world
from export_workers import loss_of_exported
from zeromega.checkpoint import files, tag_for
from zeromega.checkpoint.export import _module_name, _stacked_axes, load_safetensors
from zeromega.launch import cli
from zeromega.launch.export import _add_export

STEPS, SAVED, GLOBAL = 2, 1, 8
SHAPE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32"]
MOE = ["--num-layers", "2", "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "128"]
RTOL = 1e-5


def train_and_save(tmp, corpus: str, layout: list[str]) -> dict[int, float]:
    """Loss curve of a 2-rank, 2-step run that saved after step 1 into ``tmp/ckpt``."""
    args = ["--data-path", corpus, "--split", "1,0,0", *SHAPE, "--micro-batch-size", "2", "--global-batch-size",
            str(GLOBAL), "--lr", "3e-3", "--train-iters", str(STEPS), "--no-progress",
            "--distributed-timeout-minutes", "2", "--zero-stage", "1", "--hidden-dropout", "0",
            "--attention-dropout", "0", "--save", str(tmp / "ckpt"), "--save-interval", str(SAVED),
            "--metrics-out", str(tmp / "train.jsonl"), *layout]
    errors = [r["error"] for r in run_world(2, pretrain, args) if r["error"]]
    assert not errors, errors[0]
    return read_curve(tmp / "train.jsonl")


def export_cli(*argv: str) -> int:
    parser = cli._Parser(prog="zeromega")
    _add_export(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", *map(str, argv)])
    return args.handler(args)


def score(out, ckpt, corpus: str) -> dict:
    manifest = files.read_manifest(ckpt)
    return run_world(1, loss_of_exported, str(out), manifest["model"], corpus, STEPS * GLOBAL, SAVED + 1, GLOBAL)[0]


def check_against_training(tmp, corpus: str, curve: dict[int, float]) -> dict[str, torch.Tensor]:
    """Export the step-1 checkpoint --to torch; its names, shapes and loss must be the 1-process model's."""
    ckpt = tmp / "ckpt" / tag_for(SAVED)
    assert files.read_manifest(ckpt)["engine"] == "megatron-core"
    out = tmp / "model.safetensors"
    assert export_cli(ckpt, "--to", "torch", out) == 0
    weights = load_safetensors(out)
    result = score(out, ckpt, corpus)
    assert {n: list(w.shape) for n, w in weights.items()} == result["shapes"]
    assert all(w.dtype == torch.float32 for w in weights.values())
    diff = abs(result["loss"] - curve[SAVED + 1]) / curve[SAVED + 1]
    print(f"exported loss {result['loss']!r} vs training {curve[SAVED + 1]!r}: relative difference {diff:.2e}")
    assert diff <= RTOL, (result["loss"], curve[SAVED + 1])
    return weights


def test_pp2_export_scores_as_training_did_and_converts_to_gpt2(tmp_path, small_corpus):
    curve = train_and_save(tmp_path, small_corpus, ["--pipeline-model-parallel-size", "2"])
    weights = check_against_training(tmp_path, small_corpus, curve)
    assert "decoder.layers.3.input_layernorm.weight" in weights  # the second stage's last layer, unstacked

    # --to hf from the --save directory (its latest, step 2): GPT-2 names, Conv1D layouts
    assert export_cli(tmp_path / "ckpt", "--to", "hf", tmp_path / "hf") == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["n_layer"], config["n_head"], config["vocab_size"], config["n_positions"]) == (4, 4, 384, 32)
    hf = load_safetensors(tmp_path / "hf" / "model.safetensors")
    assert export_cli(tmp_path / "ckpt", "--to", "torch", tmp_path / "latest.safetensors") == 0
    latest = load_safetensors(tmp_path / "latest.safetensors")
    assert torch.equal(hf["transformer.h.3.mlp.c_fc.weight"], latest["decoder.layers.3.mlp.linear_fc1.weight"].t())
    assert not torch.equal(latest["decoder.layers.3.mlp.linear_fc1.weight"],
                           weights["decoder.layers.3.mlp.linear_fc1.weight"]), "latest must be step 2, not step 1"

    # verified first: one flipped byte in a shard is refused before anything is read
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "ckpt" / tag_for(SAVED), bad)
    shard = bad / "__1_0.distcp"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(cli.UsageError, match="sha256 differs"):
        export_cli(bad, "--to", "torch", tmp_path / "bad.safetensors")

    # code-free: a .metadata pickle naming a callable is refused even when the manifest vouches for it
    (bad / "__1_0.distcp").write_bytes((tmp_path / "ckpt" / tag_for(SAVED) / "__1_0.distcp").read_bytes())
    (bad / ".metadata").write_bytes(pickle.dumps(print))
    manifest = json.loads((bad / files.MANIFEST).read_text())
    manifest["files"][".metadata"] = {"size": (bad / ".metadata").stat().st_size,
                                      "sha256": files.hash_file(bad / ".metadata", bad).sha256}
    (bad / files.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(cli.UsageError, match="cannot be loaded safely"):
        export_cli(bad, "--to", "torch", tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def test_ep2_moe_export_scores_as_training_did_and_refuses_gpt2(tmp_path, small_corpus):
    curve = train_and_save(tmp_path, small_corpus, ["--expert-model-parallel-size", "2", *MOE])
    weights = check_against_training(tmp_path, small_corpus, curve)
    experts = sorted(n for n in weights if n.startswith("decoder.layers.1.mlp.experts.") and n.endswith("fc1.weight"))
    assert experts == [f"decoder.layers.1.mlp.experts.local_experts.{e}.linear_fc1.weight" for e in range(4)]
    assert len({weights[n].sum().item() for n in experts}) == 4, "each expert must get its own slice"
    with pytest.raises(cli.UsageError, match="no mixture-of-experts") as err:
        export_cli(tmp_path / "ckpt", "--to", "hf", tmp_path / "hf")
    assert "--to torch" in err.value.fix and not (tmp_path / "hf" / "model.safetensors").exists()


def test_ep2_starts_from_the_model_ep1_builds(tmp_path, small_corpus):
    """Weights are drawn by their 1-process names, so ep2's experts are ep1's (Megatron's CPU init alone
    gives both ep ranks the same local experts: expert 2 == expert 0, and another first loss)."""
    ep2 = train_and_save(tmp_path / "ep2", small_corpus, ["--expert-model-parallel-size", "2", *MOE])
    ep1 = train_and_save(tmp_path / "ep1", small_corpus, MOE)
    assert abs(ep2[1] - ep1[1]) <= RTOL * ep1[1], (ep2, ep1)


def test_sharded_keys_map_to_module_names():
    """Both of Megatron's layer forms: stacked (a layer axis) and non-homogeneous (the number in the key)."""
    cases = {
        ("decoder.layers.self_attention.linear_qkv.layer_norm_weight", (3,)): "decoder.layers.3.input_layernorm.weight",
        ("decoder.layers.mlp.linear_fc1.layer_norm_bias", (0,)): "decoder.layers.0.pre_mlp_layernorm.bias",
        ("decoder.layers.mlp.experts.experts.linear_fc2.weight", (1, 5)):
            "decoder.layers.1.mlp.experts.local_experts.5.linear_fc2.weight",
        ("decoder.layers.7.mlp.experts.experts.linear_fc1.weight", (2,)):
            "decoder.layers.7.mlp.experts.local_experts.2.linear_fc1.weight",
        ("decoder.layers.7.mlp.router.weight", ()): "decoder.layers.7.mlp.router.weight",
    }
    for (key, index), name in cases.items():
        assert _stacked_axes(key) == len(index), key
        assert _module_name(key, index) == name
    assert _stacked_axes("embedding.word_embeddings.weight") == 0
