"""Real tokenizers from local files: train a BPE, preprocess into .bin/.idx, train on it (issue 15, item 2).

The tokenizer is trained here on stdlib text (``zeromega train-tokenizer``), the
data written by ``zeromega preprocess`` (Megatron-LM's ``preprocess_data.py``
flags), and a tiny GPT trained on it through ``examples/pretrain_gpt.py``'s
command line with ``--tokenizer-type GPT2BPETokenizer`` and
``HuggingFaceTokenizer``. Nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from distributed import run_world
from run_workers import run_logging, run_refused
from zeromega.integrations.megatron import data as D
from zeromega.launch import cli

VOCAB = 400
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--micro-batch-size", "2", "--split", "1,0,0",
        "--no-progress", "--lr", "1e-3", "--train-iters", "3"]


def _texts(count: int = 30) -> list[str]:
    files = sorted(Path(os.__file__).parent.glob("*.py"))[:count]
    return [path.read_text(encoding="utf-8")[:3000] for path in files]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """(tokenizer dir, .bin/.idx prefix, the documents): a 400-token BPE trained and applied by the CLI."""
    root = tmp_path_factory.mktemp("bpe")
    docs = _texts() + [""]  # an empty document stays one, as in Megatron-LM
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs)))
    assert cli.main(["train-tokenizer", "--input", str(corpus), "--output-dir", str(root / "tok"),
                     "--vocab-size", str(VOCAB)]) == 0
    assert cli.main(["preprocess", "--input", str(corpus), "--output-prefix", str(root / "data"),
                     "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(root / "tok" / "vocab.json"),
                     "--merge-file", str(root / "tok" / "merges.txt"), "--append-eod", "--workers", "2"]) == 0
    return root / "tok", root / "data_text_document", docs


def _gpt2(tok: Path) -> list[str]:
    return ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(tok / "vocab.json"),
            "--merge-file", str(tok / "merges.txt")]


def test_a_trained_bpe_reads_back_in_both_forms(bpe):
    tok, _, docs = bpe
    assert sorted(p.name for p in tok.iterdir()) == ["merges.txt", "tiktoken.json", "tokenizer.json",
                                                      "tokenizer_config.json", "vocab.json"]
    gpt2 = D.build_tokenizer("GPT2BPETokenizer", vocab_file=str(tok / "vocab.json"), merge_file=str(tok / "merges.txt"))
    hf = D.build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tok))
    assert gpt2.vocab_size == hf.vocab_size == VOCAB
    assert gpt2.eod == hf.eod == gpt2.vocab["<|endoftext|>"]
    text = docs[3] + "\n# héllo → wörld 🐍"
    ids = gpt2.tokenize(text)
    assert ids == hf.tokenize(text) and max(ids) < VOCAB and gpt2.eod not in ids
    assert len(ids) < 0.7 * len(text.encode())  # merges learned: fewer ids than bytes
    assert gpt2.detokenize(ids) == text == hf.detokenize(ids)


def test_preprocess_writes_megatron_documents_with_eod(bpe, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok, prefix, docs = bpe
    gpt2 = D.build_tokenizer("GPT2BPETokenizer", vocab_file=str(tok / "vocab.json"), merge_file=str(tok / "merges.txt"))
    written = IndexedDataset(str(prefix))
    assert len(written.document_indices) - 1 == len(docs) and len(written) == len(docs) - 1  # empty: no sequence
    assert D.document_count(prefix, documents=True) == len(docs) and D.document_count(prefix) == len(docs) - 1
    for i in (0, 7, len(docs) - 2):
        assert written[i].tolist() == gpt2.tokenize(docs[i]) + [gpt2.eod]
    assert written[0].dtype == np.uint16
    # one worker writes the same bytes as two
    corpus = prefix.parent / "corpus.jsonl"
    assert cli.main(["preprocess", "--input", str(corpus), "--output-prefix", str(tmp_path / "one"), *_gpt2(tok),
                     "--append-eod", "--workers", "1"]) == 0
    for suffix in (".bin", ".idx"):
        assert Path(f"{tmp_path}/one_text_document{suffix}").read_bytes() == Path(f"{prefix}{suffix}").read_bytes()


def test_gpt2_bpe_and_hf_tokenizer_data_train(bpe):
    """The model's vocabulary is the tokenizer's (400, padded to 512): a random model's first loss is ln 512."""
    tok, prefix, _ = bpe
    argv = [*TINY, "--data-path", str(prefix)]
    (gpt2,) = run_world(1, run_logging, argv + _gpt2(tok))
    (hf,) = run_world(1, run_logging, argv + ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tok)])
    assert gpt2["vocab"] == hf["vocab"] == VOCAB
    losses = [r["loss"] for r in gpt2["records"]]
    assert losses == [r["loss"] for r in hf["records"]]  # the same ids, the same run
    assert abs(losses[0] - math.log(512)) < 0.1 and all(math.isfinite(x) for x in losses)


def test_bpe_data_with_the_byte_vocabulary_is_refused_by_file_and_id(bpe, small_corpus):
    """Before: IndexError inside the embedding at step 1. The check covers every prefix of a blend."""
    _, prefix, _ = bpe
    largest = int(np.fromfile(f"{prefix}.bin", dtype=np.uint16).max())
    assert largest >= 257
    (line,) = run_world(1, run_refused, [*TINY, "--data-path", "0.5", small_corpus, "0.5", str(prefix)])
    assert line.startswith("data.tokenizer_type=None") and f"{prefix}.bin holds token id {largest}" in line, line
    assert "\n" not in line and "--tokenizer-type" in line


def test_tokenizer_flags_need_their_files(tmp_path):
    from zeromega.config import ConfigError
    from zeromega.launch import translate
    from zeromega.run import gpt

    cases = {
        ("--tokenizer-type", "GPT2BPETokenizer"): ("data.vocab_file", "needs --vocab-file"),
        ("--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(tmp_path / "no.json"), "--merge-file", "m"):
            ("data.vocab_file", "does not exist"),
        ("--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tmp_path)):
            ("data.tokenizer_model", "has no tokenizer.json"),
        ("--tokenizer-type", "NullTokenizer"): ("model.vocab_size", "needs --vocab-size"),
    }
    for flags, (field, words) in cases.items():  # missing files: from the flags, before any rank starts
        with pytest.raises(ConfigError) as err:
            gpt.tokenizer(translate.build(None, megatron_argv=[*TINY, *flags]))
        assert err.value.field == field and words in str(err.value), str(err.value)
    with pytest.raises(ConfigError, match="no --tokenizer-type says which tokenizer reads it"):
        translate.build(None, megatron_argv=[*TINY, "--vocab-file", "v.json"])
    # Megatron-LM's GPT-3 175B script gives the two files alone (0.16.1 stops there): read as GPT-2 BPE
    with pytest.warns(UserWarning, match="read as GPT2BPETokenizer"):
        cfg = translate.build(None, megatron_argv=[*TINY, "--vocab-file", "v.json", "--merge-file", "m.txt"])
    assert cfg.data.tokenizer_type == "GPT2BPETokenizer"
    assert cli.main(["preprocess", "--input", str(tmp_path / "none.jsonl"), "--output-prefix", str(tmp_path / "x"),
                     "--tokenizer-type", "NullTokenizer", "--vocab-size", "9"]) == 2


def test_null_tokenizer_data_and_vocabulary(tmp_path):
    """NullTokenizer (Megatron-Core's): the text's integers are the ids, the EOD is --vocab-size, the model's
    vocabulary --vocab-size + 1; data with a larger id is refused."""
    from zeromega.config import ConfigError
    from zeromega.launch import script_args
    from zeromega.run import gpt

    corpus = tmp_path / "ints.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(str((i * 7 + j) % 50) for j in range(40))}) + "\n"
                              for i in range(6)))
    assert cli.main(["preprocess", "--input", str(corpus), "--output-prefix", str(tmp_path / "n"),
                     "--tokenizer-type", "NullTokenizer", "--vocab-size", "50", "--append-eod"]) == 0
    prefix = tmp_path / "n_text_document"
    ids = np.fromfile(f"{prefix}.bin", dtype=np.uint16)
    assert ids[:3].tolist() == [0, 1, 2] and ids[40] == 50 and ids.size == 6 * 41
    flags = [*TINY, "--data-path", str(prefix), "--tokenizer-type", "NullTokenizer"]
    cfg = script_args.read(flags + ["--vocab-size", "50"], "pretrain_gpt.py")
    assert gpt.vocab_size(cfg, gpt.corpus(cfg, True)) == 51
    cfg = script_args.read(flags + ["--vocab-size", "40"], "pretrain_gpt.py")
    with pytest.raises(ConfigError, match=f"{prefix}.bin holds token id 50, outside"):
        gpt.vocab_size(cfg, gpt.corpus(cfg, True))


def test_sentencepiece_model_through_megatron_core(tmp_path):
    """SentencePieceTokenizer / GPTSentencePieceTokenizer are Megatron-Core's wrapper over a local .model."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(_texts(10)), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=300, model_type="bpe", minloglevel=2)
    model = str(tmp_path / "sp.model")
    reference = spm.SentencePieceProcessor(model_file=model)
    for kind in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        tok = D.build_tokenizer(kind, tokenizer_model=model)
        text = _texts(12)[11][:500]
        assert tok.tokenize(text) == reference.encode(text)
        assert (tok.vocab_size, tok.eod) == (300, reference.eos_id())


# Llama2Tokenizer and TikTokenizer (Megatron-Core's sentencepiece and tiktoken libraries, as Megatron-LM 0.16.1's
# non-legacy build_tokenizer calls them), from files zeromega train-tokenizer writes.
SPECIALS = 10  # --tiktoken-num-special-tokens: ids 0..9, the tiktoken.json ranks from 10 on


@pytest.fixture(scope="module")
def spm(bpe, tmp_path_factory):
    """A SentencePiece BPE trained by ``train-tokenizer --kind sentencepiece`` and the corpus preprocessed with
    Llama2Tokenizer, without and with --legacy-tokenizer (Megatron-LM's legacy one puts the BOS first)."""
    root = tmp_path_factory.mktemp("spm")
    corpus = bpe[1].parent / "corpus.jsonl"
    assert cli.main(["train-tokenizer", "--kind", "sentencepiece", "--input", str(corpus), "--output-dir",
                     str(root / "tok"), "--vocab-size", str(VOCAB)]) == 0
    model = root / "tok" / "tokenizer.model"
    for name, extra in (("core", []), ("legacy", ["--legacy-tokenizer"])):
        assert cli.main(["preprocess", "--input", str(corpus), "--output-prefix", str(root / name), "--tokenizer-type",
                         "Llama2Tokenizer", "--tokenizer-model", str(model), "--append-eod", *extra]) == 0
    return model, root / "core_text_document", root / "legacy_text_document"


def _tiktoken_flags(tok: Path, pattern: str = "v2") -> list[str]:
    ranks = len(json.loads((tok / "tiktoken.json").read_text()))
    return ["--tokenizer-type", "TikTokenizer", "--tokenizer-model", str(tok / "tiktoken.json"), "--tiktoken-pattern",
            pattern, "--tiktoken-num-special-tokens", str(SPECIALS), "--vocab-size", str(ranks + SPECIALS)]


def test_llama2_tokenizer_is_sentencepiece_with_its_bos_and_eos(bpe, spm):
    import sentencepiece

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    model, core, legacy = spm
    _, _, docs = bpe
    reference = sentencepiece.SentencePieceProcessor(model_file=str(model))
    tok = D.build_tokenizer("Llama2Tokenizer", tokenizer_model=str(model))
    # Megatron's sizes and special ids: the model's pieces, <s> 1, </s> 2 (the EOD), no pad
    assert (tok.vocab_size, tok.bos, tok.eod) == (reference.get_piece_size(), reference.bos_id(), reference.eos_id())
    assert (tok.vocab_size, tok.bos, tok.eod) == (VOCAB, 1, 2)
    text = docs[5][:800] + " héllo → wörld"
    ids = tok.tokenize(text)
    assert ids == reference.encode(text) and tok.detokenize(ids) == reference.decode(ids) == text
    # preprocess: Megatron-LM 0.16.1's default tokenizer adds no BOS, its legacy one does; --append-eod adds </s>
    core_docs, legacy_docs = IndexedDataset(str(core)), IndexedDataset(str(legacy))  # kept: rows view their maps
    for i in (0, 9):
        assert core_docs[i].tolist() == reference.encode(docs[i]) + [2]
        assert legacy_docs[i].tolist() == [1] + reference.encode(docs[i]) + [2]


def test_tiktokenizer_is_megatron_cores_over_a_local_json(bpe, tmp_path):
    """TikTokenizer ids against the tiktoken library itself: the file's ranks shifted past the special ids."""
    import base64

    import tiktoken
    from megatron.core.tokenizers.text.libraries import tiktoken_tokenizer as megatron_tiktoken

    tok_dir, _, docs = bpe
    entries = json.loads((tok_dir / "tiktoken.json").read_text())
    ranks = {base64.b64decode(e["token_bytes"]): e["rank"] + SPECIALS for e in entries}
    text = docs[4][:1500] + "\n# héllo → wörld 🐍 </s>"
    corpus = tmp_path / "one.jsonl"
    corpus.write_text(json.dumps({"text": text}) + "\n")
    for pattern, regex in (("v1", megatron_tiktoken._PATTERN_TIKTOKEN_V1),
                           ("v2", megatron_tiktoken._PATTERN_TIKTOKEN_V2)):
        flags = _tiktoken_flags(tok_dir, pattern)
        tok = D.build_tokenizer("TikTokenizer", tokenizer_model=flags[3], tiktoken_pattern=pattern,
                                vocab_size=int(flags[-1]), tiktoken_num_special_tokens=SPECIALS)
        specials = {t: i for i, t in enumerate(list(D.TIKTOKEN_SPECIAL) + [f"<SPECIAL_{i}>" for i in range(7, 10)])}
        reference = tiktoken.Encoding("ref", pat_str=regex, mergeable_ranks=ranks, special_tokens=specials)
        ids = tok.tokenize(text)
        assert ids == reference.encode(text, allowed_special="all") and ids[-1] == 2  # "</s>" is the special id
        assert (tok.vocab_size, tok.bos, tok.eod, tok.pad) == (len(entries) + SPECIALS, 1, 2, 4)
        ascii_ids = tok.tokenize(docs[4][:1500])
        assert tok.detokenize(ascii_ids) == reference.decode(ascii_ids) == docs[4][:1500]
        # preprocess with the same flags writes those ids, then the EOD
        assert cli.main(["preprocess", "--input", str(corpus), "--output-prefix", str(tmp_path / pattern),
                         *flags, "--append-eod"]) == 0
        written = np.fromfile(tmp_path / f"{pattern}_text_document.bin", dtype=np.uint16)
        assert written.tolist() == ids + [2]
    assert D.build_tokenizer("TikTokenizer", tokenizer_model=flags[3], tiktoken_pattern="v1", vocab_size=300,
                             tiktoken_num_special_tokens=SPECIALS).tokenize(" the") == [ranks[b" the"]]  # cut at 300


def test_llama2_and_tiktoken_data_train(bpe, spm):
    """Both vocabularies (400 and 399 ranks + 10 special ids) pad to 512: a random model's first loss is ln 512."""
    tok, _, _ = bpe
    model, core, _ = spm
    assert cli.main(["preprocess", "--input", str(bpe[1].parent / "corpus.jsonl"), "--output-prefix",
                     str(core.parent / "tik"), *_tiktoken_flags(tok), "--append-eod"]) == 0
    runs = {"llama2": [*TINY, "--data-path", str(core), "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model",
                       str(model)],
            "tiktoken": [*TINY, "--data-path", str(core.parent / "tik_text_document"), *_tiktoken_flags(tok)]}
    for name, argv in runs.items():
        (result,) = run_world(1, run_logging, argv)
        assert result["vocab"] == (VOCAB if name == "llama2" else VOCAB - 1 + SPECIALS), name
        losses = [r["loss"] for r in result["records"]]
        assert abs(losses[0] - math.log(512)) < 0.1 and all(math.isfinite(x) for x in losses), (name, losses)


def test_llama2_and_tiktoken_refusals_are_one_line(bpe, spm, tmp_path):
    from zeromega.config import ConfigError
    from zeromega.launch import translate
    from zeromega.run import gpt

    tok, _, _ = bpe
    model = str(spm[0])
    tik = _tiktoken_flags(tok)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps([{"rank": 0, "token_bytes": "AA==", "token_str": ""}, {"rank": 5}]))
    cases = {  # flags -> (field, words), checked from the flags before any rank starts
        ("--tokenizer-type", "TikTokenizer", "--tokenizer-model", tik[3]): ("data.tiktoken_pattern",
                                                                           "needs --tiktoken-pattern"),
        tuple(tik[:-2]): ("model.vocab_size", f"needs 131062 ranks, and {tik[3]} holds 399; fix: pass --vocab-size 409"),
        (*tik, "--tokenizer-special-tokens", "<unk>", "<s>", "</s>"): ("data.tokenizer_special_tokens",
                                                                      "must be unique and hold"),
        (*tik[:3], str(bad_json), *tik[4:]): ("data.tokenizer_model", "entry 1 needs exactly"),
        (*tik[:3], model, *tik[4:]): ("data.tokenizer_model", "reads a .json vocabulary"),
        ("--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", tik[3]): ("data.tokenizer_model",
                                                                              "is not a SentencePiece model"),
        ("--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", model, "--tokenizer-special-tokens", "<x>"):
            ("data.tokenizer_special_tokens", "read for TikTokenizer only"),
        ("--tokenizer-type", "Llama2Tokenizer"): ("data.tokenizer_model", "needs --tokenizer-model"),
        ("--tokenizer-type", "TikTokenizer", "--tokenizer-model", tik[3], "--tiktoken-pattern", "v3"):
            ("--tiktoken-pattern", "'v1' or 'v2'"),
        ("--tokenizer-type", "BertWordPieceCase", "--vocab-file", "vocab.txt"): ("--tokenizer-type",
                                                                                 "'Llama2Tokenizer' or 'TikTokenizer'"),
    }
    for flags, (field, words) in cases.items():
        with pytest.raises(ConfigError) as err:
            gpt.tokenizer(translate.build(None, megatron_argv=[*TINY, *flags]))
        assert err.value.field == field and words in str(err.value) and "\n" not in str(err.value), str(err.value)
    # Megatron-LM's deprecated --tiktoken-special-tokens is read when --tokenizer-special-tokens is not given
    cfg = translate.build(None, megatron_argv=[*TINY, *tik, "--tiktoken-special-tokens", *D.TIKTOKEN_SPECIAL, "<x>"])
    assert cfg.data.tokenizer_special_tokens[-1] == "<x>" and gpt.tokenizer(cfg).tokenize("<x>") == [7]
    corpus = str(bpe[1].parent / "corpus.jsonl")
    for flags in (["--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", "v.txt"],
                  ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model, "--legacy-tokenizer"],
                  ["--tokenizer-type", "MultimodalTokenizer"]):
        assert cli.main(["preprocess", "--input", corpus, "--output-prefix", str(tmp_path / "x"), *flags]) == 2


def test_tiktoken_flags_translate_back():
    """zeromega translate writes the TikTokenizer flags back in Megatron-LM's spelling (the deprecated
    --tiktoken-special-tokens becomes --tokenizer-special-tokens) and reads them again to the same fields."""
    from zeromega.launch import megatron_args, translate

    flags = ["--tokenizer-type", "TikTokenizer", "--tokenizer-model", "t.json", "--tiktoken-pattern", "v1",
             "--tiktoken-num-special-tokens", "10", "--vocab-size", "409", "--tiktoken-special-tokens",
             *D.TIKTOKEN_SPECIAL, "<x>"]
    cfg = translate.build(None, megatron_argv=[*TINY, *flags])
    argv, lost = megatron_args.write_argv(cfg)
    assert not lost and "--tokenizer-special-tokens" in argv and "--tiktoken-special-tokens" not in argv
    again = translate.build(None, megatron_argv=argv)
    assert again.data == cfg.data and again.model.vocab_size == 409
    assert (cfg.data.tiktoken_pattern, cfg.data.tiktoken_num_special_tokens) == ("v1", 10)
