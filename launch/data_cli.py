"""``zeromega train-tokenizer`` and ``zeromega preprocess``: local text to a tokenizer and a ``.bin/.idx``.

::

    zeromega train-tokenizer --input FILE [FILE ...] --output-dir DIR --vocab-size N [--json-keys K ...]
        [--kind bpe|sentencepiece]
    zeromega preprocess --input FILE [FILE ...] --output-prefix P --tokenizer-type T
        [--vocab-file V --merge-file M | --tokenizer-model DIR_OR_FILE | --vocab-size N]
        [--tiktoken-pattern v1|v2 --tiktoken-num-special-tokens N --tokenizer-special-tokens T ...]
        [--legacy-tokenizer] [--json-keys text ...] [--append-eod] [--workers N] [--log-interval N]

``preprocess`` takes Megatron-LM core_v0.16.1's ``tools/preprocess_data.py``
flags and writes what it writes: ``P_<key>_document.bin/.idx`` per JSON key,
through Megatron-Core's ``IndexedDatasetBuilder``; train with
``--data-path P_text_document`` and the same tokenizer flags. Inputs are JSON
lines (``.json``/``.jsonl``, also ``.gz``), or any other file as one document.
``train-tokenizer`` trains a GPT-2-style byte-level BPE with the ``tokenizers``
library on local text and writes every form a run reads: ``vocab.json`` +
``merges.txt`` (``GPT2BPETokenizer``), ``tokenizer.json`` +
``tokenizer_config.json`` (``HuggingFaceTokenizer``) and ``tiktoken.json``
(``TikTokenizer``); ``--kind sentencepiece`` trains a Llama-2-style
SentencePiece BPE instead (``tokenizer.model``: ``SentencePieceTokenizer``,
``GPTSentencePieceTokenizer``, ``Llama2Tokenizer``). Nothing is downloaded.

Registered in :mod:`zeromega.launch.cli` by listing :func:`_add_preprocess`
and :func:`_add_train_tokenizer` in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from .cli_common import UsageError, _int_at_least

# preprocess_data.py flags zeromega does not run, with the reason.
REFUSED = {
    "split_sentences": "sentence splitting needs NLTK's punkt model, a download; zeromega writes documents",
    "partitions": "input partitions are not implemented; pass the files as several --input",
}


def _add_tokenizer_flags(p) -> None:
    g = p.add_argument_group("tokenizer (Megatron-LM names; local files only)")
    g.add_argument("--tokenizer-type", required=True, metavar="TYPE", help=f"one of {', '.join(_tokenizer_types())}")
    g.add_argument("--vocab-file", metavar="FILE", help="GPT2BPETokenizer: vocab.json")
    g.add_argument("--merge-file", metavar="FILE", help="GPT2BPETokenizer: merges.txt")
    g.add_argument("--tokenizer-model", metavar="PATH", help="HuggingFaceTokenizer: a directory with "
                   "tokenizer.json; SentencePiece types and Llama2Tokenizer: the .model file; TikTokenizer: the "
                   "tiktoken .json")
    g.add_argument("--vocab-size", type=_int_at_least(1), metavar="N", help="NullTokenizer: ids 0..N-1; "
                   "TikTokenizer: the vocabulary, special tokens included (default 131072)")
    g.add_argument("--tiktoken-pattern", choices=("v1", "v2"), help="TikTokenizer's split regex (default v2, as "
                   "Megatron-Core's)")
    g.add_argument("--tiktoken-num-special-tokens", type=_int_at_least(1), default=1000, metavar="N",
                   help="TikTokenizer: special ids 0..N-1 before the file's ranks (default 1000)")
    g.add_argument("--tokenizer-special-tokens", nargs="+", metavar="TOKEN", help="TikTokenizer's named special "
                   "tokens (must hold <unk> <s> </s> <mask> <pad> <cls> <sep>)")
    g.add_argument("--tiktoken-special-tokens", nargs="+", metavar="TOKEN", help="Megatron-LM's deprecated "
                   "spelling of --tokenizer-special-tokens (used when that is not given)")
    g.add_argument("--legacy-tokenizer", action="store_true", help="Llama2Tokenizer: Megatron-LM's legacy "
                   "tokenizer, which puts the BOS before each document")


def _tokenizer_types() -> tuple[str, ...]:
    from zeromega.integrations.megatron.tokenizer_types import TOKENIZER_TYPES

    return TOKENIZER_TYPES


FLAG_OF = {"data.vocab_file": "--vocab-file", "data.merge_file": "--merge-file",
           "data.tokenizer_model": "--tokenizer-model", "model.vocab_size": "--vocab-size",
           "data.tokenizer_type": "--tokenizer-type", "data.tiktoken_pattern": "--tiktoken-pattern",
           "data.tiktoken_num_special_tokens": "--tiktoken-num-special-tokens",
           "data.tokenizer_special_tokens": "--tokenizer-special-tokens", "data.legacy_tokenizer": "--legacy-tokenizer"}


def _add_preprocess(subparsers) -> None:
    p = subparsers.add_parser(
        "preprocess", allow_abbrev=False, help="tokenize local text into a Megatron .bin/.idx dataset",
        description="Tokenize JSON-lines (or plain text) files into Megatron .bin/.idx datasets, with Megatron-LM's "
                    "tools/preprocess_data.py flags and output names.",
        epilog="Exit code 2 for bad input (a missing file, a tokenizer without its files, a bad JSON line).")
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True, metavar="FILE", help="JSON lines, one document each "
                   "(.json/.jsonl, .gz too); any other file is one document")
    g.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY", help="keys to extract (default text)")
    g.add_argument("--split-sentences", action="store_true", help="refused (needs NLTK's punkt download)")
    g.add_argument("--keep-newlines", action="store_true", help="accepted (only used with --split-sentences)")
    _add_tokenizer_flags(p)
    g = p.add_argument_group("tokenization process")
    g.add_argument("--append-eod", action="store_true", help="append the tokenizer's EOD to each document")
    g.add_argument("--lang", default="english", help="accepted (only used with --split-sentences)")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, metavar="P", help="writes P_<key>_document.bin/.idx")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=_int_at_least(1), default=1, metavar="N", help="tokenizing processes")
    g.add_argument("--partitions", type=_int_at_least(1), default=1, metavar="N", help="1 only")
    g.add_argument("--log-interval", type=_int_at_least(1), default=1000, metavar="N",
                   help="documents between progress lines")
    g.add_argument("--keep-sequential-samples", action="store_true", help="accepted: order is always kept")
    p.set_defaults(handler=_preprocess, prog=p.prog)


def _make_tokenizer(args: argparse.Namespace):
    from zeromega.integrations.megatron import data

    if args.tokenizer_type not in _tokenizer_types() and args.tokenizer_type not in data.NOT_BUILT:
        raise UsageError(f"--tokenizer-type {args.tokenizer_type} is not a Megatron-LM tokenizer type",
                         f"pass one of {', '.join(_tokenizer_types())}")
    make = functools.partial(data.build_tokenizer, args.tokenizer_type, vocab_file=args.vocab_file,
                             merge_file=args.merge_file, tokenizer_model=args.tokenizer_model,
                             vocab_size=args.vocab_size, tiktoken_pattern=args.tiktoken_pattern,
                             tiktoken_num_special_tokens=args.tiktoken_num_special_tokens,
                             special_tokens=args.tokenizer_special_tokens or args.tiktoken_special_tokens,
                             legacy=args.legacy_tokenizer)
    try:
        make()
    except data.DataError as err:
        flag = FLAG_OF.get(err.field)
        raise UsageError(err.problem if flag is None or flag in err.problem else f"{flag}: {err.problem}",
                         err.fix) from None
    return make


def _inputs(paths: list[str]) -> list[Path]:
    for path in paths:
        if not Path(path).is_file():
            raise UsageError(f"--input {path} is not a file", "pass existing text or JSON-lines files")
    return [Path(path) for path in paths]


def _preprocess(args: argparse.Namespace) -> int:
    from zeromega.integrations.megatron import data

    if args.split_sentences:
        raise UsageError(f"--split-sentences: {REFUSED['split_sentences']}", "drop --split-sentences")
    if args.partitions != 1:
        raise UsageError(f"--partitions {args.partitions}: {REFUSED['partitions']}", "drop --partitions")
    inputs = _inputs(args.input)
    make = _make_tokenizer(args)
    log = functools.partial(print, file=sys.stderr)
    try:
        written = data.preprocess(inputs, args.output_prefix, make, json_keys=args.json_keys,
                                  append_eod=args.append_eod, workers=args.workers, log=log,
                                  log_interval=args.log_interval)
    except ValueError as err:  # a bad JSON line, named by file and line
        raise UsageError(str(err), "fix the input file or --json-keys") from None
    for key, prefix in written.items():
        docs = data.document_count(prefix, documents=True)
        empty = docs - data.document_count(prefix)
        print(f"{prefix}.bin/.idx: {docs} documents of {key!r} ({empty} empty), {args.tokenizer_type}; train "
              f"with --data-path {prefix}")
    return 0


def _add_train_tokenizer(subparsers) -> None:
    p = subparsers.add_parser(
        "train-tokenizer", allow_abbrev=False, help="train a BPE tokenizer (GPT-2's or SentencePiece) on local text",
        description="Train a byte-level BPE (GPT-2's kind) with the tokenizers library on local files; writes "
                    "vocab.json + merges.txt, tokenizer.json + tokenizer_config.json and tiktoken.json to DIR. "
                    "--kind sentencepiece trains a Llama-2-style SentencePiece BPE (DIR/tokenizer.model) instead.",
        epilog="Use DIR/vocab.json and DIR/merges.txt with --tokenizer-type GPT2BPETokenizer, DIR with "
               "--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR, DIR/tiktoken.json with --tokenizer-type "
               "TikTokenizer (and --vocab-size its ranks + --tiktoken-num-special-tokens), DIR/tokenizer.model with "
               "--tokenizer-type SentencePieceTokenizer, GPTSentencePieceTokenizer or Llama2Tokenizer.")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="JSON lines or plain text files")
    p.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY", help="keys read from JSON lines")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="where the tokenizer files go")
    p.add_argument("--kind", choices=("bpe", "sentencepiece"), default="bpe", help="bpe (default): GPT-2's "
                   "byte-level BPE; sentencepiece: a SentencePiece BPE with <unk> <s> </s> and byte fallback")
    p.add_argument("--vocab-size", type=_int_at_least(258), required=True, metavar="N",
                   help="vocabulary size: bpe: the 256 bytes, <|endoftext|> and the merges; sentencepiece: "
                        "<unk> <s> </s>, the 256 byte pieces and the learned ones (at least 300 or so)")
    p.add_argument("--min-frequency", type=_int_at_least(1), default=2, metavar="N",
                   help="a pair is merged when seen at least N times (default 2)")
    p.set_defaults(handler=_train_tokenizer, prog=p.prog)


def _train_tokenizer(args: argparse.Namespace) -> int:
    from zeromega.integrations.megatron import data

    inputs = _inputs(args.input)

    def texts():
        for path in inputs:
            for doc in data.read_documents(path, args.json_keys):
                yield from (text for text in doc.values() if text)

    if args.kind == "sentencepiece":
        try:
            model = data.train_sentencepiece(texts(), args.output_dir, args.vocab_size)
        except ValueError as err:
            raise UsageError(str(err), "fix the input files, --json-keys or --vocab-size") from None
        size = data.build_tokenizer("Llama2Tokenizer", tokenizer_model=str(model)).vocab_size
        print(f"{model} ({size} pieces): --tokenizer-type SentencePieceTokenizer, GPTSentencePieceTokenizer or "
              f"Llama2Tokenizer --tokenizer-model {model}")
        return 0
    try:
        out = data.train_tokenizer(texts(), args.output_dir, args.vocab_size, min_frequency=args.min_frequency)
    except ValueError as err:
        raise UsageError(str(err), "fix the input file or --json-keys") from None
    size = data.build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(out)).vocab_size
    ranks = len(json.loads((out / "tiktoken.json").read_text()))
    print(f"{out}: vocab.json, merges.txt, tokenizer.json, tokenizer_config.json ({size} tokens); tiktoken.json "
          f"({ranks} ranks: TikTokenizer with --vocab-size {ranks} + --tiktoken-num-special-tokens)")
    return 0
