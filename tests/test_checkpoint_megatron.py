"""Checkpoints of Megatron-Core's engine (pp > 1, MoE) through the real ``examples/pretrain_gpt.py``.

Exact resume: a run of 4 steps that saves after step 2, and a second run that
loads that checkpoint and trains steps 3-4, report the same losses bit for
bit (CPU, fp32, dropout on, so the model, the distributed optimizer's Adam
state, the scheduler, the data position and every rank's RNGs must all come
back). Two steps after the load, because a wrong Adam step counter only
shows from the second one.

Resharding compares with the original layout's curve, dropout off (RNG
streams belong to ranks), within a relative 1e-5: far below the loss's
step-to-step change (>1e-2), far above the reordered reductions of another
layout (~1e-7).

Failures, as tests/test_checkpoint.py checks them for DeepSpeed's engine: a
pp2 save that dies halfway leaves the previous checkpoint ``latest`` and the
same command line resumes from it bit for bit; a damaged file is named at
load and nothing is read.
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
from zeromega.checkpoint import CheckpointError, files, reshard, resolve_load, tag_for

STEPS, HALF = 4, 2
SHAPE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32"]
MOE = ["--num-layers", "2", "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "128"]
RTOL = 1e-5


def argv(corpus: str, *extra: str, dropout: bool = True) -> list[str]:
    args = ["--data-path", corpus, "--split", "1,0,0", *SHAPE, "--micro-batch-size", "2",
            "--global-batch-size", "8", "--lr", "3e-3", "--lr-warmup-iters", "1", "--train-iters", str(STEPS),
            "--no-progress", "--distributed-timeout-minutes", "2", "--zero-stage", "1"]
    if not dropout:
        args += ["--hidden-dropout", "0", "--attention-dropout", "0"]
    return args + list(extra)


def run(world: int, args: list[str], in_process_queue: bool = True) -> None:
    errors = [r["error"] for r in run_world(world, pretrain, args, in_process_queue) if r["error"]]
    assert not errors, errors[0]


def run_expecting_error(world: int, args: list[str], fault=None, forbid_loads: bool = False) -> list[str]:
    """Every rank's error; ``fault`` = (point, rank, complete saves before it) to inject one."""
    errors = [r["error"] for r in run_world(world, pretrain, args, True, fault, forbid_loads) if r["error"]]
    assert errors, "the run was expected to fail"
    return errors


def full_then_resumed(tmp, corpus, world, layout, resume_world=None, resume_layout=None, dropout=True,
                      in_process_queue=True):
    """(curve of the 4-step run that saved after step 2, curve of the run resumed from that save)."""
    save = tmp / "ckpt"
    run(world, argv(corpus, *layout, "--save", str(save), "--save-interval", str(HALF),
                    "--metrics-out", str(tmp / "full.jsonl"), dropout=dropout), in_process_queue)
    resume_layout = layout if resume_layout is None else resume_layout
    run(resume_world or world, argv(corpus, *resume_layout, "--load", str(save / tag_for(HALF)),
                                    "--metrics-out", str(tmp / "resumed.jsonl"), dropout=dropout))
    return read_curve(tmp / "full.jsonl"), read_curve(tmp / "resumed.jsonl")


# ---------------------------------------------------------------- exact resume

LAYOUTS = {
    "pp2-1f1b": (2, ["--pipeline-model-parallel-size", "2"]),
    "ep2-moe": (2, ["--expert-model-parallel-size", "2", *MOE]),
    "pp2xdp2-distopt": (4, ["--pipeline-model-parallel-size", "2"]),
    # One layer (49,984 elements) per stage leaves the layer bucket 64 short of a multiple of 128: the
    # tied embedding's own bucket starts after padding (see misplaced_masters).
    "pp2-one-layer-per-stage": (2, ["--pipeline-model-parallel-size", "2", "--num-layers", "2"]),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_resume_reproduces_the_loss_curve_bit_for_bit(name, tmp_path, small_corpus):
    world, layout = LAYOUTS[name]
    # The first keeps Megatron's spawned result queue (ckpt_megatron_workers), as real runs do.
    full, resumed = full_then_resumed(tmp_path, small_corpus, world, layout, in_process_queue=name != "pp2-1f1b")
    assert sorted(full) == list(range(1, STEPS + 1))
    assert sorted(resumed) == list(range(HALF + 1, STEPS + 1)), "the resumed run must start after the saved step"
    for step in resumed:
        assert resumed[step] == full[step], f"{name} step {step}: resumed {resumed[step]!r} vs {full[step]!r}"
    ckpt = tmp_path / "ckpt" / tag_for(HALF)
    manifest = files.read_manifest(ckpt)
    assert manifest["engine"] == reshard.MEGATRON and manifest["consumed_samples"] == HALF * 8
    assert files.verify_files(ckpt, manifest) == []
    assert {"metadata.json", "common.pt", ".metadata"} <= set(manifest["files"])
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == tag_for(STEPS)  # saved again at the end


def test_a_save_whose_masters_are_misplaced_is_refused_before_writing(tmp_path, small_corpus, monkeypatch):
    """Without zeromega's re-layout, Megatron-Core 0.16.1 saves the embedding's masters shifted by the
    layer bucket's padding; the save must say so and write nothing, not publish a checkpoint that
    resumes to another curve."""
    import contextlib

    from zeromega.checkpoint import megatron as megatron_checkpoint

    monkeypatch.setattr(megatron_checkpoint, "_world_tensors_in_buffer_coordinates",
                        lambda optimizer: contextlib.nullcontext())  # forked ranks inherit it
    save = tmp_path / "ckpt"
    errors = run_expecting_error(2, argv(small_corpus, *LAYOUTS["pp2-one-layer-per-stage"][1], "--save", str(save),
                                         "--save-interval", str(HALF), dropout=False))
    assert len(errors) == 2, errors
    for error in errors:
        assert "masters disagree with the model weights" in error, error
        assert "embedding.word_embeddings.weight" in error and "nothing was written" in error, error
    assert not save.exists() or not any(save.iterdir()), sorted(save.iterdir())


def test_a_checkpoint_with_misplaced_masters_is_refused_at_load(tmp_path, small_corpus, monkeypatch):
    """A checkpoint written the way Megatron-Core 0.16.1 writes it (no re-layout, no save check) loads
    nothing: its model weights are right, its masters are shifted, and a resume would leave the curve."""
    import contextlib

    from zeromega.checkpoint import megatron as megatron_checkpoint

    layout, save = LAYOUTS["pp2-one-layer-per-stage"][1], tmp_path / "ckpt"
    with monkeypatch.context() as patched:
        patched.setattr(megatron_checkpoint, "_world_tensors_in_buffer_coordinates",
                        lambda optimizer: contextlib.nullcontext())
        patched.setattr(megatron_checkpoint, "_refuse_misplaced_masters", lambda state: None)
        run(2, argv(small_corpus, *layout, "--save", str(save), "--save-interval", str(HALF), dropout=False))
    errors = run_expecting_error(2, argv(small_corpus, *layout, "--load", str(save / tag_for(HALF)),
                                         dropout=False))
    assert len(errors) == 2, errors
    for error in errors:
        assert str(save / tag_for(HALF)) in error and "masters disagree with its model weights" in error, error
        assert "embedding.word_embeddings.weight" in error and "fix: resume from another checkpoint" in error


def test_checkpoint_directory_and_interval_may_come_from_the_config_file(tmp_path, small_corpus, capfd):
    """A DeepSpeed JSON's zeromega block (or a Megatron launch script used as --config) that states
    --save/--save-interval is obeyed, not silently dropped; a flag that disagrees with it is refused."""
    save = tmp_path / "ckpt"
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zeromega": {"checkpoint": {"save": str(save), "interval": HALF}}}))
    run(2, argv(small_corpus, *PP2, "--config", str(config)))
    assert (save / "latest").read_text().strip() == tag_for(STEPS)
    assert files.verify_files(save / tag_for(HALF), files.read_manifest(save / tag_for(HALF))) == []
    capfd.readouterr()
    errors = run_expecting_error(1, argv(small_corpus, "--config", str(config), "--save", str(tmp_path / "other")))
    assert errors == ["SystemExit: 2"], errors  # bad input: exit code 2, one line on stderr
    line = capfd.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("pretrain_gpt.py: error: checkpoint.save") and str(tmp_path / "other") in line, line
    assert not (tmp_path / "other").exists()


# ---------------------------------------------------------------- reshard

RESHARDS = {
    "pp2 -> pp1": (2, ["--pipeline-model-parallel-size", "2"], 1, []),
    "ep2 -> ep1": (2, ["--expert-model-parallel-size", "2", *MOE], 1, MOE),
    # --make-vocab-size-divisible-by 64 x tp 2 keeps tp 1's 384 vocabulary rows (Megatron-LM pads to flag x tp)
    "tp2 x pp2 -> tp1 x pp2": (4, ["--tensor-model-parallel-size", "2", "--make-vocab-size-divisible-by", "64",
                                   "--pipeline-model-parallel-size", "2"], 2, ["--pipeline-model-parallel-size", "2"]),
    # Megatron's plain optimizer (ZeRO-0) keys its state by global names too
    "ZeRO-0 pp2 -> pp1": (2, ["--pipeline-model-parallel-size", "2", "--zero-stage", "0"], 1, ["--zero-stage", "0"]),
    # ... and its masters and moments map onto the distributed optimizer's, both ways
    "ZeRO-0 pp2 -> ZeRO-1 pp1 dp2": (2, ["--pipeline-model-parallel-size", "2", "--zero-stage", "0"], 2, []),
    "ZeRO-1 pp2 -> ZeRO-0 pp2": (2, ["--pipeline-model-parallel-size", "2"],
                                 2, ["--pipeline-model-parallel-size", "2", "--zero-stage", "0"]),
}


@pytest.mark.parametrize("name", RESHARDS)
def test_reshard_continues_the_original_curve(name, tmp_path, small_corpus):
    world, layout, new_world, new_layout = RESHARDS[name]
    full, resumed = full_then_resumed(tmp_path, small_corpus, world, layout, new_world, new_layout, dropout=False)
    assert sorted(resumed) == list(range(HALF + 1, STEPS + 1))
    diffs = {step: abs(resumed[step] - full[step]) / abs(full[step]) for step in resumed}
    print(f"{name}: relative loss difference per step {diffs}")
    assert all(d <= RTOL for d in diffs.values()), (name, diffs)


# ---------------------------------------------------------------- saves that die halfway

PP2 = ["--pipeline-model-parallel-size", "2"]


def pp2_argv(corpus: str, save, metrics, *extra: str) -> list[str]:
    """4 steps at pp2, a checkpoint every 2 steps (dropout on: the RNGs must come back too)."""
    return argv(corpus, *PP2, "--save", str(save), "--save-interval", str(HALF), "--metrics-out", str(metrics),
                *extra)


@pytest.fixture(scope="module")
def killed_after_write(tmp_path_factory, small_corpus):
    """(--save directory, curve, errors) of a pp2 run whose save after step 4 died on rank 1 once its
    files were written, before the manifest: ``iter_0000002`` is the last complete checkpoint."""
    tmp = tmp_path_factory.mktemp("killed")
    errors = run_expecting_error(2, pp2_argv(small_corpus, tmp / "ckpt", tmp / "full.jsonl"),
                                 fault=("after_write", 1, 1))
    return tmp / "ckpt", read_curve(tmp / "full.jsonl"), errors


def _assert_latest_is_step_2(save) -> None:
    assert (save / "latest").read_text().strip() == tag_for(HALF)
    ckpt = resolve_load(save)
    assert ckpt == save / tag_for(HALF)
    assert files.verify_files(ckpt, files.read_manifest(ckpt)) == []


def test_save_that_dies_halfway_leaves_the_previous_checkpoint_latest(killed_after_write, tmp_path, small_corpus):
    # The metrics of the dying run hold the whole uninterrupted curve: step 4 is logged before its save.
    shutil.copytree(killed_after_write[0], tmp_path / "ckpt", symlinks=True)
    save, full, errors = tmp_path / "ckpt", killed_after_write[1], killed_after_write[2]
    assert sorted(full) == list(range(1, STEPS + 1))
    assert any("injected fault at after_write" in e for e in errors), errors
    _assert_latest_is_step_2(save)
    assert not (save / tag_for(STEPS)).exists(), "a save that died before its manifest must not be published"

    # The same command line with --load resumes from step 2; its save after step 4 dies on rank 0
    # after the rename, before 'latest' moves.
    errors = run_expecting_error(2, pp2_argv(small_corpus, save, tmp_path / "second.jsonl", "--load", str(save)),
                                 fault=("before_latest", 0, 0))
    assert all("injected fault at before_latest" in e for e in errors), errors
    _assert_latest_is_step_2(save)
    assert (save / tag_for(STEPS) / files.MANIFEST).is_file()  # renamed into place, never named by 'latest'

    # Again: resumes from step 2 and saves step 4 over the unnamed one.
    run(2, pp2_argv(small_corpus, save, tmp_path / "third.jsonl", "--load", str(save)))
    assert (save / "latest").read_text().strip() == tag_for(STEPS)
    assert files.verify_files(save / tag_for(STEPS), files.read_manifest(save / tag_for(STEPS))) == []
    for name in ("second.jsonl", "third.jsonl"):
        resumed = read_curve(tmp_path / name)
        assert sorted(resumed) == list(range(HALF + 1, STEPS + 1)), name
        for step in resumed:
            assert resumed[step] == full[step], f"{name} step {step}: {resumed[step]!r} vs {full[step]!r}"


# ---------------------------------------------------------------- damaged files


@pytest.mark.parametrize("victim,damage", [("__1_0.distcp", "truncate"), ("common.pt", "flip a byte")])
def test_damaged_dist_checkpoint_file_is_named(victim, damage, killed_after_write, tmp_path):
    save = tmp_path / "ckpt"
    shutil.copytree(killed_after_write[0], save, symlinks=True)
    ckpt = save / tag_for(HALF)
    path = ckpt / victim
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = files.verify_files(ckpt, files.read_manifest(ckpt))
    assert len(problems) == 1 and str(path) in problems[0], problems
    assert ("truncated" if damage == "truncate" else "corrupted") in problems[0]


def test_damaged_shard_stops_the_run_before_anything_is_loaded(killed_after_write, tmp_path, small_corpus):
    save = tmp_path / "ckpt"
    shutil.copytree(killed_after_write[0], save, symlinks=True)
    victim = save / tag_for(HALF) / "__0_0.distcp"
    victim.write_bytes(victim.read_bytes()[:-100])
    errors = run_expecting_error(2, argv(small_corpus, *PP2, "--load", str(save)), forbid_loads=True)
    assert len(errors) == 2, errors
    for error in errors:  # every rank stops with the same message, not one rank and a hang
        assert "CheckpointError" in error and str(victim) in error and "truncated" in error, error
        assert "dist_checkpointing.load was called" not in error


# ---------------------------------------------------------------- refusals


def _fake_checkpoint(tmp_path, engine, layout):
    """A verified-looking checkpoint directory whose manifest names ``engine`` (no files to load)."""
    save = tmp_path / "ckpt"
    ckpt = save / tag_for(2)
    ckpt.mkdir(parents=True)
    manifest = {"format": files.FORMAT, "tag": tag_for(2), "step": 2, "consumed_samples": 16, "layout": layout,
                "files": {}, **({"engine": engine} if engine else {})}
    (ckpt / files.MANIFEST).write_text(json.dumps(manifest))
    (save / files.LATEST).write_text(tag_for(2) + "\n")
    return save


BASE = {"world": 2, "tp": 1, "pp": 2, "cp": 1, "ep": 1, "dp": 1, "vpp": 1, "zero_stage": 1, "precision": "fp32"}


def test_a_deepspeed_checkpoint_is_refused_by_the_megatron_engine(tmp_path, small_corpus):
    # No "engine" field: what every DeepSpeed-engine checkpoint before this one says.
    save = _fake_checkpoint(tmp_path, None, dict(BASE, pp=1, world=1))
    errors = [r["error"] for r in run_world(1, pretrain, argv(small_corpus, *MOE, "--load", str(save)))]
    assert errors[0] and "CheckpointError" in errors[0], errors
    assert "saved by DeepSpeed's engine" in errors[0] and "Megatron-Core's engine" in errors[0]
    assert "fix: " in errors[0]


def test_engine_and_layout_rules_name_field_value_and_fix(tmp_path):
    with pytest.raises(CheckpointError, match=r"saved by Megatron-Core's engine.*this run uses DeepSpeed's.*fix: "):
        reshard.check_engine({"engine": reshard.MEGATRON, "layout": BASE}, reshard.DEEPSPEED, tmp_path)
    reshard.check_engine({"layout": BASE}, reshard.DEEPSPEED, tmp_path)  # older manifests are DeepSpeed's
    assert not reshard.plan_megatron(BASE, dict(BASE))
    assert reshard.plan_megatron(BASE, dict(BASE, pp=1, world=1))
    assert reshard.plan_megatron(dict(BASE, pp=1, ep=2, dp=2), dict(BASE, pp=1, world=1))
    assert reshard.plan_megatron(BASE, dict(BASE, vpp=2))
    assert reshard.plan_megatron(dict(BASE, tp=2, world=4), dict(BASE))
    zero0 = dict(BASE, zero_stage=0)
    assert reshard.plan_megatron(zero0, dict(zero0, tp=2, world=4))  # Megatron keys its plain state by global names
    assert not reshard.plan_megatron(BASE, dict(zero0))  # the optimizer changes, the layout does not
    moe = {"num_layers": 2, "hidden_size": 64, "num_experts": 4}
    for saved, now, field, shapes in [(BASE, dict(BASE, tp=2, world=4, zero_stage=0), "zero_stage", (moe, moe)),
                                      (BASE, dict(BASE, precision="bf16"), "precision", (None, None)),
                                      (dict(zero0, pp=1, ep=2, dp=2), dict(zero0, pp=1, world=1), "ep", (None, None))]:
        with pytest.raises(CheckpointError, match=rf"{field} .* -> .*supported: .*fix: "):
            reshard.plan_megatron(saved, now, *shapes)
    shape = {"num_layers": 4, "hidden_size": 64, "num_experts": 4}
    with pytest.raises(CheckpointError, match=r"num_experts = 4, this run's has 8.*fix: "):
        reshard.plan_megatron(BASE, dict(BASE), shape, dict(shape, num_experts=8, hidden_dropout=0.0))
    reshard.plan_megatron(BASE, dict(BASE), shape, dict(shape, hidden_dropout=0.1))  # dropout may change


def test_dist_checkpoint_reads_carry_no_code(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Payload(), protocol=2))
    with files.dist_checkpoint_loads():
        with pytest.raises(CheckpointError, match=r"exec' is not allowed in a checkpoint's metadata"):
            FileSystemReader(str(tmp_path)).read_metadata()
        (tmp_path / "common.pt").write_bytes(pickle.dumps({"optimizer": Payload()}, protocol=2))
        with pytest.raises(CheckpointError, match="cannot be loaded safely"):
            torch.load(tmp_path / "common.pt", weights_only=False)  # what torch's load planner asks for
    assert not marker.exists()
