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
    assert sorted(p.name for p in tok.iterdir()) == ["merges.txt", "tokenizer.json", "tokenizer_config.json",
                                                      "vocab.json"]
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
