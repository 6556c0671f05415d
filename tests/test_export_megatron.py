"""`zeromega export` of checkpoints written by Megatron-Core's engine (pp > 1, MoE).

Each test trains 2 steps of the real ``examples/pretrain_gpt.py`` (dropout
off, no warmup so step 1 moves the weights), saving after step 1, exports that checkpoint through the CLI and
scores step 2's global batch with a fresh 1-process fp32 GPTModel holding only
the exported weights. Training reported that loss with the same weights, so
for fp32 runs the two agree within a relative 1e-5 (reordered reductions of another layout
give ~1e-7; a missing, misnamed or wrongly unstacked tensor moves the loss by
far more, and a strict name/shape check against the 1-process model's
state dict catches the rest).

bf16 runs export the optimizer's fp32 masters, checked bit for bit against
the tensors stored in the checkpoint; training scored their bf16 rounding in
bf16 arithmetic, so there the exported loss is held to a relative 1e-3
(measured 1.6e-4, pp2; the bf16 weights widened and scored in fp32: 2.4e-5).
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
from zeromega.checkpoint.export import (MASTERS, _module_name, _stacked_axes, load_safetensors, master_keys,
                                        masters_off_weights, safetensors_metadata)
from zeromega.launch import cli
from zeromega.launch.export import _add_export

STEPS, SAVED, GLOBAL = 2, 1, 8
SHAPE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32"]
MOE = ["--num-layers", "2", "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "128"]
RTOL = 1e-5
BF16_RTOL = 1e-3  # fp32 masters scored in fp32 vs training's bf16 weights in bf16 arithmetic (measured 1.6e-4)


def train_and_save(tmp, corpus: str, layout: list[str], world: int = 2, zero_stage: int = 1) -> dict[int, float]:
    """Loss curve of a ``world``-rank, 2-step run that saved after step 1 into ``tmp/ckpt``."""
    args = ["--data-path", corpus, "--split", "1,0,0", *SHAPE, "--micro-batch-size", "2", "--global-batch-size",
            str(GLOBAL), "--lr", "3e-3", "--train-iters", str(STEPS), "--no-progress",
            "--distributed-timeout-minutes", "2", "--zero-stage", str(zero_stage), "--hidden-dropout", "0",
            "--attention-dropout", "0", "--save", str(tmp / "ckpt"), "--save-interval", str(SAVED),
            "--metrics-out", str(tmp / "train.jsonl"), *layout]
    errors = [r["error"] for r in run_world(world, pretrain, args) if r["error"]]
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


def check_against_training(tmp, corpus: str, curve: dict[int, float], rtol: float = RTOL,
                           values: str = MASTERS) -> dict[str, torch.Tensor]:
    """Export the step-1 checkpoint --to torch; its names, shapes and loss must be the 1-process model's,
    and its metadata must say the values are ``values`` (how the recorded source begins)."""
    ckpt = tmp / "ckpt" / tag_for(SAVED)
    assert files.read_manifest(ckpt)["engine"] == "megatron-core"
    out = tmp / "model.safetensors"
    assert export_cli(ckpt, "--to", "torch", out) == 0
    assert safetensors_metadata(out)["weights"].startswith(values), safetensors_metadata(out)
    weights = load_safetensors(out)
    result = score(out, ckpt, corpus)
    assert {n: list(w.shape) for n, w in weights.items()} == result["shapes"]
    assert all(w.dtype == torch.float32 for w in weights.values())
    diff = abs(result["loss"] - curve[SAVED + 1]) / curve[SAVED + 1]
    print(f"exported loss {result['loss']!r} vs training {curve[SAVED + 1]!r}: relative difference {diff:.2e}")
    assert diff <= rtol, (result["loss"], curve[SAVED + 1])
    return weights


def stored_tensors(ckpt, prefix: str = "") -> dict[str, torch.Tensor]:
    """The dense model's tensors as stored in the dist checkpoint (``prefix`` ''), or the optimizer's
    under ``prefix`` (dropped), under 1-process names, layers unstacked; read here with
    torch.distributed.checkpoint, not by the export."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(ckpt))
    with files.dist_checkpoint_loads():
        meta = {k: m for k, m in reader.read_metadata().state_dict_metadata.items()
                if isinstance(m, TensorStorageMetadata) and k.startswith(prefix)
                and (prefix or not k.startswith("optimizer."))}
        tensors = {k: torch.zeros(m.size, dtype=m.properties.dtype) for k, m in meta.items()}
        load(tensors, storage_reader=reader, no_dist=True)
    out = {}
    for key, tensor in tensors.items():
        key = key[len(prefix):]
        if _stacked_axes(key):
            assert _stacked_axes(key) == 1, key  # dense models: a layer axis only
            out.update({_module_name(key, (i,)): tensor[i] for i in range(tensor.shape[0])})
        else:
            out[key] = tensor
    return out


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


@pytest.mark.parametrize("zero_stage,prefix", [(1, "optimizer.state.param."), (0, "optimizer.state.fp32_param.")],
                         ids=["distributed-optimizer", "zero0"])
def test_bf16_pp2_exports_the_fp32_masters(zero_stage, prefix, tmp_path, small_corpus):
    """The distributed optimizer's fully_reshardable masters (ZeRO-1), Megatron's mixed-precision optimizer's
    fp32 copies (ZeRO-0): bit for bit, not the bf16 weights widened, and scored within BF16_RTOL."""
    curve = train_and_save(tmp_path, small_corpus, ["--pipeline-model-parallel-size", "2", "--bf16"],
                           zero_stage=zero_stage)
    weights = check_against_training(tmp_path, small_corpus, curve, rtol=BF16_RTOL)
    ckpt = tmp_path / "ckpt" / tag_for(SAVED)
    masters, model = stored_tensors(ckpt, prefix), stored_tensors(ckpt)
    assert sorted(weights) == sorted(masters) == sorted(model)
    assert all(model[n].dtype == torch.bfloat16 and masters[n].dtype == torch.float32 for n in weights)
    assert all(torch.equal(weights[n], masters[n]) for n in weights), "the export must be the stored fp32 masters"
    assert all(torch.equal(weights[n].to(torch.bfloat16), model[n]) for n in weights), "masters of these weights"
    widened = [n for n in weights if torch.equal(weights[n], model[n].float())]
    assert not widened, f"exported as the bf16 weights widened: {widened[:3]}"


def test_fp32_zero0_pp2_exports_the_model_weights(tmp_path, small_corpus):
    """Megatron's fp32 optimizer at ZeRO-0 keeps no masters (the weights are fp32): the model weights are
    exported, and the file says so."""
    curve = train_and_save(tmp_path, small_corpus, ["--pipeline-model-parallel-size", "2"], zero_stage=0)
    weights = check_against_training(tmp_path, small_corpus, curve,
                                     values="model weights (float32, as fp32): the checkpoint holds no fp32")
    model = stored_tensors(tmp_path / "ckpt" / tag_for(SAVED))
    assert sorted(weights) == sorted(model) and all(torch.equal(weights[n], model[n]) for n in weights)


def test_tp2_pp2_export_scores_as_training_did(tmp_path, small_corpus):
    """4 ranks, each holding half of half the model: the export has the 1-process model's names and shapes
    (checked in check_against_training) and its loss."""
    curve = train_and_save(tmp_path, small_corpus, ["--tensor-model-parallel-size", "2",
                                                    "--pipeline-model-parallel-size", "2"], world=4)
    manifest = files.read_manifest(tmp_path / "ckpt" / tag_for(SAVED))
    assert (manifest["layout"]["tp"], manifest["layout"]["pp"], manifest["layout"]["world"]) == (2, 2, 4)
    weights = check_against_training(tmp_path, small_corpus, curve)
    assert weights["decoder.layers.3.self_attention.linear_qkv.weight"].shape == (192, 64)  # tp halves merged


def _fake_dist_checkpoint(path, tensors: dict[str, torch.Tensor]):
    """A torch_dist checkpoint of just ``tensors`` (global, unsharded), written in this process."""
    from torch.distributed.checkpoint import FileSystemWriter, save

    class Writer(FileSystemWriter):
        def storage_meta(self):
            return None  # torch's own records the path as a PosixPath, which the .metadata allowlist refuses

    save(dict(tensors), storage_writer=Writer(str(path)), no_dist=True)
    return path


def _off_by_bucket_padding(master: torch.Tensor) -> torch.Tensor:
    """What Megatron-Core 0.16.1 saved after a padded bucket: the values shifted, the tail zero-filled."""
    flat = master.flatten()
    return torch.cat([flat[2:], torch.zeros(2)]).reshape(master.shape)


MODEL_WEIGHTS = "model weights (bfloat16, as fp32): "
VALUE_CASES = {  # case -> (prefix of the masters' keys, how the recorded source begins)
    "masters": ("optimizer.state.param.", MASTERS),
    "chained-prefix": ("chained_1.optimizer.state.param.", MASTERS),
    "fp32_param": ("optimizer.state.fp32_param.", MASTERS),
    "no-masters": (None, MODEL_WEIGHTS + "the checkpoint holds no fp32 optimizer masters"),
    "exp_avg-only": ("optimizer.state.exp_avg.", MODEL_WEIGHTS + "the checkpoint holds no fp32 optimizer masters"),
    "one-missing": ("optimizer.state.param.", MODEL_WEIGHTS + "1 of 2 tensors have no usable fp32 master, "
                                                              "e.g. embedding.word_embeddings.weight: no master"),
    "misplaced": ("optimizer.state.param.", MODEL_WEIGHTS + "the fp32 masters of 1 tensors do not round"),
}


@pytest.mark.parametrize("case", VALUE_CASES)
def test_which_values_a_dist_checkpoint_exports(case, tmp_path):
    """The export takes fp32 masters only when every model tensor has one that rounds to its saved weight."""
    from zeromega.checkpoint.export import megatron_weights

    torch.manual_seed(0)
    emb, norm = "embedding.word_embeddings.weight", "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
    masters = {emb: torch.randn(8, 4), norm: 1 + torch.randn(2, 4) / 100}  # norm: stacked, 2 layers
    model = {key: m.to(torch.bfloat16) for key, m in masters.items()}
    prefix, why = VALUE_CASES[case]
    stored = dict(masters) if prefix else {}
    if case == "one-missing":
        del stored[emb]
    if case == "misplaced":
        stored[emb] = _off_by_bucket_padding(masters[emb])
    ckpt = _fake_dist_checkpoint(tmp_path / "ckpt", {**model, **{prefix + k: t for k, t in stored.items()}})
    weights, source = megatron_weights(ckpt)
    assert source.startswith(why), source
    took = masters if why == MASTERS else {key: w.float() for key, w in model.items()}
    assert set(weights) == {emb} | {f"decoder.layers.{i}.input_layernorm.weight" for i in (0, 1)}
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert torch.equal(weights[emb], took[emb])
    assert all(torch.equal(weights[f"decoder.layers.{i}.input_layernorm.weight"], took[norm][i]) for i in (0, 1))


def test_master_checks_name_the_tensors():
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorProperties, TensorStorageMetadata

    def meta(*chunks):
        return TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size([2, 4]),
                                     [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in chunks])

    halves = meta(((0, 0), (1, 4)), ((1, 0), (1, 4)))
    model = {"a": halves, "b": halves}
    stored = {**model, "optimizer.state.param.a": halves, "optimizer.state.param.b": meta(((0, 0), (1, 4))),
              "chained_0.optimizer.state.param.a": halves}
    keys, missing = master_keys(model, stored)
    assert keys == {} and len(missing) == 2
    assert missing[0].startswith("a: 2 masters") and "another shape or chunks" in missing[1]
    weight = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    assert masters_off_weights({"w": weight}, {"w": torch.tensor([1.001, 2.0])}) == []
    assert masters_off_weights({"w": weight}, {"w": torch.tensor([2.0, 1.0])}) == ["w (max difference 1)"]
