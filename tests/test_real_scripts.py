"""Published Megatron-LM and Megatron-DeepSpeed launch scripts, shrunk only in sizes, paths, rank and iteration
counts (``examples/published/``), read and run as a user would (issue 15).

Each script runs from a directory laid out as its authors expect (``pretrain_gpt.py``, the tokenizer files and
the ``.bin/.idx`` data it names, all built here from local text with a real tokenizer). What zeromega refuses is
found by ``bench/flag_census.py`` (zeromega's own translator and pre-launch checks) and taken out, as a user
would; the rest goes through ``zeromega check`` (fast test: the sizes, batch, lr and architecture the script
states) and ``zeromega launch`` (slow tests: the model has Megatron's parameter count, losses are finite, the
evaluations are printed, TensorBoard events are written where the script asks).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "examples" / "published"
sys.path.insert(0, str(ROOT / "bench"))
import flag_census  # noqa: E402

GPT2 = dict(norm="LayerNorm", bias=True, tied=True, learned_pos=True, swiglu=False)
LLAMA = dict(norm="RMSNorm", bias=False, tied=False, learned_pos=False, swiglu=True)
# name -> what the script states (its own numbers), what zeromega refuses in it, and where TensorBoard goes
SCRIPTS = {
    "megatron_lm_gpt3_175b.sh": dict(
        refused={"--rampup-batch-size"}, tp=1, pp=2, ep=1, cp=1, zero=0, micro=1, glob=8, lr=6e-4, precision="fp16",
        arch=dict(GPT2, layers=4, hidden=64, heads=4, maxpos=64, tokenizer="gpt2"), tensorboard="tensorboard/gpt3"),
    "megatron_lm_llama3_8b_fp8.sh": dict(
        refused={"--apply-layernorm-1p"}, tp=1, pp=1, ep=1, cp=1, zero=1, micro=1, glob=8, lr=1.5e-4,
        precision="bf16", arch=dict(LLAMA, norm="LayerNorm", layers=2, hidden=64, heads=4, groups=2, kv=16,
                                    ffn=224, tokenizer="hf"),
        tensorboard="tensorboard_logs/llama3_8b_fp8"),
    "megatron_lm_mixtral_8x7b.sh": dict(
        refused=set(), tp=1, pp=1, ep=2, cp=1, zero=1, micro=1, glob=8, lr=1e-4, precision="bf16",
        arch=dict(LLAMA, layers=2, hidden=64, heads=4, groups=2, ffn=224, experts=4, topk=2, tokenizer="sp"),
        tensorboard="checkpoints/mixtral/tensorboard", many_documents=True),  # --split 99990,8,2
    "megatron_deepspeed_gpt_345m.sh": dict(
        refused=set(), tp=2, pp=1, ep=1, cp=1, zero=0, micro=4, glob=16, lr=1.5e-4, precision="fp16",
        arch=dict(GPT2, layers=4, hidden=64, heads=4, maxpos=64, tokenizer="gpt2"), tensorboard=None),
    "megatron_deepspeed_llama2.sh": dict(
        refused=set(), tp=1, pp=2, ep=1, cp=1, zero=0, micro=2, glob=8, lr=3e-4, precision="bf16",
        arch=dict(LLAMA, layers=4, hidden=64, heads=4, groups=2, ffn=172, tokenizer="sp"), tensorboard=None),
    "megatron_deepspeed_uc_llama.sh": dict(
        refused=set(), tp=2, pp=1, ep=1, cp=1, zero=1, micro=4, glob=8, lr=3e-4, precision="bf16",
        arch=dict(LLAMA, layers=4, hidden=64, heads=4, ffn=172, tokenizer="sp"),
        tensorboard="z1_uni_ckpt/tensorboard/llama/bf16"),
    "megatron_deepspeed_ulysses_32k.sh": dict(
        refused=set(), tp=1, pp=1, ep=1, cp=2, zero=1, micro=1, glob=2, lr=2e-4, precision="fp16",
        arch=dict(GPT2, layers=2, hidden=64, heads=4, maxpos=128, tokenizer="gpt2"), tensorboard="output/tensorboard"),
    "megatron_deepspeed_moe_125m.sh": dict(
        refused={"(curriculum_learning)"}, tp=1, pp=1, ep=2, cp=1, zero=0, micro=2, glob=8, lr=4.5e-4,
        precision="fp16", arch=dict(GPT2, layers=4, hidden=64, heads=4, maxpos=64, experts=4, topk=1,
                                    moe_layers=[2, 4], tokenizer="gpt2"),
        tensorboard="output/tensorboard"),
}
assert set(SCRIPTS) == set(flag_census.SCRIPTS)


def _env_flags(name: str) -> list[str]:
    return [f"--env={k}={v}" for k, v in flag_census.SCRIPT_ENV.get(name, {}).items()]


def _launch_flags(name: str) -> list[str]:
    """The rank count where the script's launcher line leaves it to the machine (`deepspeed` alone: every GPU)."""
    return ["--nproc-per-node", "2"] if name in flag_census.SCRIPT_ENV else []


@pytest.fixture(scope="session")
def script_root(tmp_path_factory) -> Path:
    """A directory laid out as the scripts expect: pretrain_gpt.py, tok/ (a 500-token GPT-2 BPE in both forms, a
    SentencePiece model) and data/ (the same 1,200 documents of stdlib text in each tokenizer)."""
    from zeromega.launch import cli

    root = tmp_path_factory.mktemp("published")
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(Path(os.__file__).parent.glob("*.py"))[:60])
    docs = [text[i:i + 300] for i in range(0, 1200 * 300, 300)]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    assert cli.main(["train-tokenizer", "--input", str(corpus), "--output-dir", str(root / "tok"),
                     "--vocab-size", "500"]) == 0
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_prefix=str(root / "tok" / "sp"),
                                   vocab_size=500, model_type="bpe", minloglevel=2)
    tok = root / "tok"
    for prefix, flags in (("gpt2", ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(tok / "vocab.json"),
                                    "--merge-file", str(tok / "merges.txt")]),
                          ("hf", ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tok)]),
                          ("sp", ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model",
                                  str(tok / "sp.model")])):
        assert cli.main(["preprocess", "--input", str(corpus), "--output-prefix", str(root / "data" / prefix),
                         *flags, "--append-eod"]) == 0
    (root / "pretrain_gpt.py").symlink_to(ROOT / "examples" / "pretrain_gpt.py")
    return root


@pytest.fixture(scope="session")
def many_documents(script_root, tmp_path_factory) -> Path:
    """data/sp_text_document again as 60,000 short documents: Mixtral's --split 99990,8,2 gives its test split
    one document from 50,000."""
    from zeromega.launch import cli

    root = tmp_path_factory.mktemp("many")
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(Path(os.__file__).parent.glob("*.py"))[:60])
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text[i:i + 20]}) + "\n" for i in range(0, 60_000 * 20, 20)))
    assert cli.main(["preprocess", "--input", str(corpus), "--output-prefix", str(root / "sp"), "--tokenizer-type",
                     "GPTSentencePieceTokenizer", "--tokenizer-model", str(script_root / "tok" / "sp.model"),
                     "--append-eod", "--workers", "2"]) == 0
    return root


def _vocab(root: Path, kind: str) -> int:
    from zeromega.integrations.megatron import data as D

    tok = root / "tok"
    if kind == "gpt2":
        return D.build_tokenizer("GPT2BPETokenizer", vocab_file=str(tok / "vocab.json"),
                                 merge_file=str(tok / "merges.txt")).vocab_size
    if kind == "hf":
        return D.build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tok)).vocab_size
    return D.build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=str(tok / "sp.model")).vocab_size


def megatron_param_count(a: dict, vocab: int, tp: int) -> int:
    """Megatron's parameter count written out from a script's flags: the vocabulary padded to a multiple of
    128 x tp; attention with GQA (q: heads x kv, k and v: groups x kv); the MLP (SwiGLU: fc1 twice as wide; its
    ffn default int(8h/3 / 64) x 64, else 4h); LayerNorm weight and bias or RMSNorm weight; biases on linear
    layers unless --disable-bias-linear (MoE models too); learned positions unless rope; an untied output layer;
    MoE layers: a router (experts x h, plus experts with biases: Megatron-Core's router has a bias; Megatron-
    DeepSpeed's gate has none, so its own count of a MoE model with biases is experts fewer per MoE layer) and
    every expert's MLP."""
    h, heads = a["hidden"], a["heads"]
    kv, groups = a.get("kv", h // heads), a.get("groups", heads)
    ffn = a.get("ffn") or (int(4 * h * 2 / 3 / 64) * 64 if a["swiglu"] else 4 * h)
    padded = -(-vocab // (128 * tp)) * 128 * tp
    experts = a.get("experts", 0)
    bias = a["bias"]
    norm = h * (2 if a["norm"] == "LayerNorm" else 1)
    qkv = heads * kv + 2 * groups * kv
    attention = h * qkv + heads * kv * h + (qkv + h if bias else 0)
    fc1 = 2 * ffn if a["swiglu"] else ffn
    mlp = h * fc1 + ffn * h + (fc1 + h if bias else 0)
    moe_layers = a.get("moe_layers", range(1, a["layers"] + 1) if experts else [])
    total = 0
    for n in range(1, a["layers"] + 1):
        total += norm + attention + norm + (experts * h + (experts if bias else 0) + experts * mlp if n in moe_layers else mlp)
    total += padded * h + (a["maxpos"] * h if a["learned_pos"] else 0) + norm
    return total + (0 if a["tied"] else padded * h)


def _runnable(name: str, root: Path, workdir: Path) -> tuple[Path, dict]:
    """The script as zeromega launch runs it (the census's refusals taken out), written into ``workdir``."""
    os.chdir(root)
    result = flag_census.census(PUBLISHED / name, world=2)
    path = workdir / name
    path.write_text(flag_census.runnable((PUBLISHED / name).read_text(), result["refused"]))
    return path, result


def test_every_published_script_passes_check_with_its_own_values(script_root, tmp_path, monkeypatch, capsys):
    """Each shrunk script: the census refuses exactly what is expected, and the rest passes ``zeromega check``
    with the layout, batch, lr, precision and architecture the script states."""
    from zeromega.launch import cli, translate

    monkeypatch.chdir(script_root)
    for name, want in SCRIPTS.items():
        path, census = _runnable(name, script_root, tmp_path)
        assert set(census["refused"]) == want["refused"], (name, census["refused"])
        assert cli.main(["check", str(path), "--world-size", "2", "--json", *_env_flags(name)]) == 0, name
        layout = json.loads(capsys.readouterr().out)["layout"]
        got = {k: layout[k] for k in ("tp", "pp", "ep", "cp", "micro")}
        assert got == {k: want[k] for k in ("tp", "pp", "ep", "cp", "micro")}, name
        assert layout["global_batch"] == want["glob"], name
        env = flag_census.SCRIPT_ENV.get(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = translate.build(str(path), env=env)
        a, m = want["arch"], cfg.model
        assert (cfg.zero.stage, cfg.optimizer.lr, cfg.precision) == (want["zero"], want["lr"], want["precision"]), name
        assert (m.num_layers, m.hidden_size, m.num_attention_heads) == (a["layers"], a["hidden"], a["heads"]), name
        assert (m.normalization or "LayerNorm", m.swiglu, m.add_bias_linear) == (a["norm"], a["swiglu"], a["bias"])
        assert m.untie_embeddings_and_output_weights == (not a["tied"]), name
        assert (m.position_embedding_type == "rope") == (not a["learned_pos"]), name
        assert (m.num_query_groups or a["heads"]) == a.get("groups", a["heads"]), name
        assert (cfg.moe.num_experts or 0) == a.get("experts", 0), name
        if a.get("experts"):
            assert cfg.moe.topk == a["topk"], name


_LOSS = re.compile(r"lm loss: ([-+0-9.eEnaNif]+)")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCRIPTS))
def test_published_script_trains_through_zeromega_launch(name, script_root, tmp_path, request):
    """``zeromega launch --config SCRIPT pretrain_gpt.py`` from a directory laid out as the script expects: the
    model has Megatron's parameter count, every logged loss is finite, the evaluations are printed and
    TensorBoard events are written where the script asks."""
    want = SCRIPTS[name]
    work = tmp_path / "run"
    work.mkdir()
    for item in ("tok", "pretrain_gpt.py"):
        (work / item).symlink_to(script_root / item)
    (work / "data").mkdir()
    big = request.getfixturevalue("many_documents") if want.get("many_documents") else None
    for item in (script_root / "data").glob("*_document.*"):
        (work / "data" / item.name).symlink_to(big / item.name if big and item.name.startswith("sp_") else item)
    path, _ = _runnable(name, script_root, tmp_path)
    os.chdir(work)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "zeromega", "launch", *_env_flags(name), *_launch_flags(name), "--config", str(path),
                           "pretrain_gpt.py"], cwd=work, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    wall = time.perf_counter() - started
    count = int(re.search(r"model parameters: ([\d,]+)", out).group(1).replace(",", ""))
    formula = megatron_param_count(want["arch"], _vocab(script_root, want["arch"]["tokenizer"]), want["tp"])
    assert count == formula
    losses = [float(x) for x in _LOSS.findall(out)]
    assert losses and all(math.isfinite(x) for x in losses), out[-3000:]
    evaluations = out.count("validation loss at iteration")
    assert evaluations
    events = list((work / want["tensorboard"]).rglob("events.out.tfevents.*")) if want["tensorboard"] else []
    assert events or not want["tensorboard"], sorted(work.rglob("*"))[:50]
    print(f"\n{name}: {wall:.0f} s, parameters {count:,} (formula {formula:,}), lm loss {losses[0]:.4f} -> "
          f"{losses[-1]:.4f} over {len(losses)} log lines, {evaluations} evaluation lines, "
          f"{len(events)} TensorBoard event file(s)")


# ------------------------------------------------------------------ defects the published scripts found


def test_an_unknown_flag_in_a_launch_script_config_is_refused_not_dropped(tmp_path):
    """zeromega launch --config run.sh (and each rank) read the script with translate.build, which dropped a
    flag no table knows: a typo trained another model silently."""
    from zeromega.config import ConfigError
    from zeromega.launch import translate

    script = tmp_path / "run.sh"
    script.write_text("torchrun --nproc_per_node 2 pretrain_gpt.py --num-layer 4 --lr 0.1 --train-iters 3\n")
    with pytest.raises(ConfigError, match="did you mean --num-layers"):
        translate.build(str(script))


def test_bash_start_up_values_and_file_tests_are_read_as_bash_gives_them(tmp_path, monkeypatch):
    """$PWD and `pwd` are the directory bash runs in (they were unset / unknowable), a relative file test looks
    in that directory first, an unset variable inside a longer word expands to nothing (it was kept as $NAME
    and refused), and a script that exits before its training command is named (it read as empty)."""
    from zeromega.config import ConfigError
    from zeromega.launch import shell_script

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pretrain_gpt.py").write_text("")
    text = ('DIR=`pwd`\nif [ ! -f "pretrain_gpt.py" ]; then exit 1; fi\n'
            'python ${DIR}/pretrain_gpt.py --data-cache-path "${PWD}/cache" --tensorboard-dir tb/hd${HIDDEN}_x\n')
    argv = shell_script.read(text, {}, name="run.sh", base=tmp_path / "elsewhere").argv
    assert argv == ["--data-cache-path", f"{tmp_path}/cache", "--tensorboard-dir", "tb/hd_x"]
    (tmp_path / "pretrain_gpt.py").unlink()
    with pytest.raises(ConfigError, match="line 2.*exits there, before it starts any training command"):
        shell_script.read(text, {}, name="run.sh", base=tmp_path / "elsewhere")


def test_launch_env_pins_reach_the_ranks(tmp_path, monkeypatch):
    """zeromega launch --env NAME=VALUE pins a launch script's variable for the launcher's read and for every
    rank's (ZEROMEGA_CONFIG_ENV); without it an unknowable value stops the launch."""
    from zeromega.launch import cli, script_args, translate

    script = tmp_path / "run.sh"
    script.write_text("NUM_GPUS=$(nvidia-smi -L | wc -l)\n"
                      "deepspeed pretrain_gpt.py --num-layers $NUM_GPUS --hidden-size 64 --num-attention-heads 4 "
                      "--seq-length 32 --micro-batch-size 1 --lr 0.1 --train-iters 3\n")
    monkeypatch.delenv(translate.CONFIG_ENV, raising=False)
    launched = []
    monkeypatch.setattr(cli.launcher, "launch", lambda job, kind: launched.append(dict(os.environ)) or None)
    assert cli.main(["launch", "--nproc-per-node", "1", "--config", str(script), str(ROOT / "examples" /
                                                                                      "pretrain_gpt.py")]) == 2
    assert cli.main(["launch", "--env", "NUM_GPUS=3", "--nproc-per-node", "1", "--config", str(script),
                     str(ROOT / "examples" / "pretrain_gpt.py")]) == 0
    monkeypatch.setenv(translate.CONFIG_ENV, launched[0][translate.CONFIG_ENV])
    monkeypatch.setenv("ZEROMEGA_CONFIG", str(script))
    assert script_args.read([], "pretrain_gpt.py").model.num_layers == 3


def test_megatron_deepspeed_top2_second_expert_sampling():
    """--disable-moe-top2-2nd-expert-sampling (was an unknown flag): top-2 as Megatron-Core computes it, silently;
    --topk 2 without it is accepted with one note that the 2nd expert is not sampled; top-1 ignores it as
    DeepSpeed's top1gating does."""
    from zeromega.launch import megatron_args

    base = ["--deepspeed", "--num-layers", "4", "--num-experts", "4", "--topk"]
    for argv, noted in ((base + ["2", "--disable-moe-top2-2nd-expert-sampling"], False), (base + ["2"], True),
                        (base + ["1", "--disable-moe-top2-2nd-expert-sampling"], False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            args = megatron_args.parse(argv)
        assert args.unknown == [], argv
        assert args.partial["moe"]["topk"] == int(argv[argv.index("--topk") + 1])
        assert any("Gumbel" in str(w.message) for w in caught) == noted, argv


def test_ring_attention_dropout_is_refused_before_launch():
    """Ring / USP attention refuse dropout when the ranks build the model; the launcher now says it first."""
    from zeromega.config import ConfigError
    from zeromega.launch import translate
    from zeromega.run.prelaunch import before_launch

    base = ["--context-parallel-size", "2", "--num-attention-heads", "4", "--lr", "0.1", "--train-iters", "3"]
    with pytest.raises(ConfigError, match="model.attention_dropout.*ring attention has no dropout"):
        before_launch(translate.build(megatron_argv=base + ["--cp-comm-type", "p2p"]))
    before_launch(translate.build(megatron_argv=base + ["--cp-comm-type", "a2a"]))
    before_launch(translate.build(megatron_argv=base + ["--cp-comm-type", "p2p", "--attention-dropout", "0"]))


def test_a_moe_model_with_biases_asked_gets_them():
    """zeromega built MoE models without linear biases (and said so); a script that asks for biases (no
    --disable-bias-linear, as Megatron-DeepSpeed's GPT MoE scripts) now gets them, as Megatron-LM builds it;
    where Megatron-Core cannot keep them (expert tp > 1) the run is refused before launch (tests/test_moe_bias.py)."""
    from zeromega.config.schema import validate
    from zeromega.launch import megatron_args

    ds = ["--deepspeed", "--num-layers", "4", "--num-experts", "4"]
    for argv, bias in ((["--num-experts", "4"], True), (["--num-experts", "4", "--disable-bias-linear"], False),
                       (ds, True), (ds + ["--disable-bias-linear"], False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            partial = megatron_args.parse(argv).partial
        said = [str(w.message) for w in caught]
        assert not any("without linear biases" in s for s in said), argv  # the old note
        assert validate(partial).model.add_bias_linear is bias, argv
        # Megatron-DeepSpeed's gate has no bias, Megatron-Core's router has one per expert: said (its count)
        assert any("router has a bias per expert" in s for s in said) == (bias and argv[0] == "--deepspeed"), argv
