"""Tokenizers, the project's own corpus, and the GPT datasets over them.

Runs and tests need real text without a download, so the default corpus is the
running Python's standard library sources, tokenized byte by byte into a Megatron
indexed dataset. Other data comes tokenized with one of Megatron-LM's
``--tokenizer-type`` choices, from local files only (:func:`build_tokenizer`), and
:func:`preprocess` writes it as Megatron-Core's ``IndexedDatasetBuilder`` does for
Megatron-LM's ``tools/preprocess_data.py``. Megatron-Core's
``BlendedMegatronDatasetBuilder`` turns single prefixes, weighted blends, per-split
blends or its ``MockGPTDataset`` into GPT train/valid/test datasets
(:func:`build_datasets`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import struct
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from megatron.core.tokenizers import MegatronTokenizerBase

from zeromega.integrations.megatron.tokenizer_types import NOT_BUILT, TOKENIZER_TYPES  # re-exported

EOD = 256
DEFAULT_MAX_BYTES = 8 * 2**20
# Test suites and third-party code are not "the standard library" and would make
# the corpus depend on what happens to be installed.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


class ByteTokenizer(MegatronTokenizerBase):
    """Ids 0..255 are the UTF-8 bytes, 256 ends a document: nothing to train or download.

    GPTDataset reads `eod`, `pad`, `vocab_size` and `unique_identifiers` (the last goes
    into the hash that names its index cache). There is no pad token in the vocabulary:
    `pad` is -1, Megatron's own "never a real id" sentinel; GPTDataset writes 0 where it
    pads and masks the loss there.
    """

    def __init__(self) -> None:
        super().__init__("byte", {})
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("vocab_size", 257), ("eod", EOD)])

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("a byte tokenizer has no chat template")

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def vocab(self) -> dict[str, int]:
        return {**{bytes([i]).decode("latin-1"): i for i in range(256)}, "<eod>": EOD}

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: t for t, i in self.vocab.items()}

    @property
    def eod(self) -> int:
        return EOD

    @property
    def eos(self) -> int:
        return EOD

    @property
    def pad(self) -> int:
        return -1


def default_corpus_prefix() -> Path:
    """Outside the repo and per Python version, since the stdlib sources differ between them."""
    root = Path(os.environ.get("ZEROMEGA_DATA", Path.home() / ".cache" / "zeromega"))
    major, minor = platform.python_version_tuple()[:2]
    return root / f"stdlib-py{major}{minor}-bytes"


def _stdlib_sources() -> list[Path]:
    """The stdlib .py files in a fixed order (sorted relative paths, no symlinked dirs)."""
    root = Path(os.__file__).parent
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")]
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def build_corpus(prefix: str | Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> Path:
    """Write `<prefix>.bin/.idx` (uint16 ids, one document per stdlib file, EOD appended).

    Text is capped at `max_bytes` (the last file is cut to fit). `<prefix>.json` is the
    completion marker, written after both data files: if it exists and matches this
    Python and `max_bytes`, nothing is done. Each caller builds under its own temporary
    name and renames into place, so concurrent callers are safe (they write identical
    bytes); callers asking for *different* `max_bytes` at one prefix at once are not.
    """
    prefix = Path(prefix) if prefix is not None else default_corpus_prefix()
    marker = Path(f"{prefix}.json")
    meta = {"python": platform.python_version(), "stdlib": str(Path(os.__file__).parent),
            "max_bytes": int(max_bytes)}
    try:
        done = all(Path(f"{prefix}{x}").is_file() for x in (".bin", ".idx"))
        if done and {k: v for k, v in json.loads(marker.read_text()).items() if k in meta} == meta:
            return prefix
    except (OSError, ValueError):
        pass
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{prefix}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=np.uint16)
    left = int(max_bytes)
    documents = 0
    for path in _stdlib_sources():
        if left <= 0:
            break
        data = path.read_bytes()[:left]
        if not data:
            continue
        left -= len(data)
        ids = np.append(np.frombuffer(data, dtype=np.uint8).astype(np.uint16), np.uint16(EOD))
        builder.add_document(ids, [ids.size])
        documents += 1
    builder.finalize(f"{tmp}.idx")
    meta.update(documents=documents, text_bytes=int(max_bytes) - left)
    Path(f"{tmp}.json").write_text(json.dumps(meta, indent=1))
    for suffix in (".bin", ".idx", ".json"):
        os.replace(f"{tmp}{suffix}", f"{prefix}{suffix}")
    return prefix


GPT2_EOD = "<|endoftext|>"
TIKTOKEN_PATTERNS = ("v1", "v2")
TIKTOKEN_SPECIAL = ("<unk>", "<s>", "</s>", "<mask>", "<pad>", "<cls>", "<sep>")
"""The special tokens Megatron-Core's tiktoken wrapper requires (ids 0.. in this order by default)."""
TIKTOKEN_DEFAULT_VOCAB = 2**17
"""Megatron's vocabulary for ``TikTokenizer`` without ``--vocab-size`` (special tokens included)."""


class DataError(ValueError):
    """Data or a tokenizer that cannot be used as given: ``field`` names the setting to fix."""

    def __init__(self, field: str, value, problem: str, fix: str) -> None:
        super().__init__(f"{problem}; fix: {fix}")
        self.field, self.value, self.problem, self.fix = field, value, problem, fix


class RustTokenizer(MegatronTokenizerBase):
    """A tokenizer of the Rust ``tokenizers`` library, read as Megatron-Core's datasets read a tokenizer.

    Megatron-Core's own wrappers for these files (its ``huggingface`` and ``megatron`` libraries) go through
    ``transformers``, and for ``GPT2BPETokenizer`` they fetch GPT-2's hub config even when the vocabulary
    and merges are local; the Rust library reads the same local files and gives the same ids (Megatron's
    ``text_to_ids`` without special tokens). ``vocab_size`` counts added tokens, as Megatron-Core's
    ``len(tokenizer)`` does.
    """

    def __init__(self, tokenizer, eod_token: str, source: str, kind: str) -> None:
        super().__init__(source, {})
        self._tokenizer = tokenizer
        eod = tokenizer.token_to_id(eod_token)
        if eod is None:
            raise DataError("data.tokenizer_model" if kind == "HuggingFaceTokenizer" else "data.vocab_file",
                                 source, f"{source} has no end-of-document token {eod_token!r}",
                                 "use a vocabulary that holds it (zeromega train-tokenizer adds it)")
        self._eod = eod
        self.unique_identifiers = OrderedDict(
            [("class", kind), ("source", source), ("vocab_size", self.vocab_size), ("eod", eod)])

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("zeromega's tokenizers have no chat template")

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: t for t, i in self.vocab.items()}

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return -1


def _need_file(field: str, flag: str, path: Optional[str], kind: str, what: str) -> str:
    if not path:
        raise DataError(field, None, f"--tokenizer-type {kind} needs {flag}", f"pass {flag} {what}")
    if not Path(path).exists():
        raise DataError(field, path, f"{flag} {path} does not exist", f"pass {flag} {what} (a local path; "
                             "zeromega downloads nothing)")
    return str(path)


def _hf_eos(directory: Path) -> str:
    """The end-of-document token of a Hugging Face tokenizer directory: its ``tokenizer_config.json``'s
    ``eos_token`` (what ``transformers`` reads), else GPT-2's ``<|endoftext|>``."""
    config = directory / "tokenizer_config.json"
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if eos:
            return str(eos)
    return GPT2_EOD


def build_tokenizer(tokenizer_type: Optional[str] = None, *, vocab_file: Optional[str] = None,
                    merge_file: Optional[str] = None, tokenizer_model: Optional[str] = None,
                    vocab_size: Optional[int] = None, tiktoken_pattern: Optional[str] = None,
                    tiktoken_num_special_tokens: int = 1000, special_tokens: Optional[Sequence[str]] = None,
                    legacy: bool = False) -> MegatronTokenizerBase:
    """The tokenizer Megatron-LM core_v0.16.1's ``--tokenizer-type`` names, from local files only.

    None is zeromega's byte tokenizer (the project's corpus). ``NullTokenizer`` (ids are the text's integers;
    ``vocab_size`` + 1 with the EOD), the SentencePiece types (``Llama2Tokenizer`` among them) and
    ``TikTokenizer`` are Megatron-Core's own (``MegatronTokenizer.from_pretrained`` with its ``null`` /
    ``sentencepiece`` / ``tiktoken`` libraries, as Megatron-LM's non-legacy ``build_tokenizer`` calls it).
    ``GPT2BPETokenizer`` (``vocab_file`` + ``merge_file``, EOD ``<|endoftext|>``) and ``HuggingFaceTokenizer``
    (a directory with ``tokenizer.json``; EOD its config's ``eos_token``) are :class:`RustTokenizer`.
    ``legacy`` is ``--legacy-tokenizer``, read for ``Llama2Tokenizer`` only: its legacy ``tokenize`` puts the
    BOS first. Bad input raises :class:`DataError`.
    """
    if tokenizer_type is None:
        return ByteTokenizer()
    if tokenizer_type in NOT_BUILT:
        raise DataError("data.tokenizer_type", tokenizer_type, f"--tokenizer-type {tokenizer_type} is not built "
                        f"({NOT_BUILT[tokenizer_type]})",
                        f"pass one of {', '.join(TOKENIZER_TYPES)}")
    if legacy and tokenizer_type != "Llama2Tokenizer":
        raise DataError("data.legacy_tokenizer", True, f"--legacy-tokenizer with --tokenizer-type {tokenizer_type}: "
                        "zeromega reads it for Llama2Tokenizer only (its BOS first)", "drop --legacy-tokenizer")
    if special_tokens and tokenizer_type != "TikTokenizer":
        raise DataError("data.tokenizer_special_tokens", " ".join(special_tokens), "--tokenizer-special-tokens is "
                        f"read for TikTokenizer only, not {tokenizer_type} (Megatron-Core's SentencePiece wrapper "
                        "refuses them without its legacy mode)", "drop --tokenizer-special-tokens")
    from megatron.core.tokenizers import MegatronTokenizer

    if tokenizer_type == "NullTokenizer":
        if not vocab_size:
            raise DataError("model.vocab_size", None, "--tokenizer-type NullTokenizer needs --vocab-size",
                                 "pass --vocab-size N (ids 0..N-1; the EOD is N)")
        return MegatronTokenizer.from_pretrained(metadata_path={"library": "null"}, vocab_size=vocab_size)
    if tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        model = _need_file("data.tokenizer_model", "--tokenizer-model", tokenizer_model, tokenizer_type,
                           "PATH.model (a SentencePiece model file; zeromega train-tokenizer --kind sentencepiece "
                           "writes one)")
        try:
            tokenizer = MegatronTokenizer.from_pretrained(tokenizer_path=model,
                                                          metadata_path={"library": "sentencepiece"},
                                                          legacy=False, special_tokens=None)
        except Exception as err:  # sentencepiece's parse errors
            raise DataError("data.tokenizer_model", model, f"{model} is not a SentencePiece model "
                            f"({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})",
                            "pass a .model file written by sentencepiece") from None
        return BosFirst(tokenizer) if legacy else tokenizer
    if tokenizer_type == "TikTokenizer":
        path = _need_file("data.tokenizer_model", "--tokenizer-model", tokenizer_model, tokenizer_type,
                          "FILE.json (a tiktoken-format vocabulary; zeromega train-tokenizer writes tiktoken.json)")
        return _tiktoken(path, tiktoken_pattern or "v2", vocab_size, tiktoken_num_special_tokens, special_tokens)
    if tokenizer_type == "GPT2BPETokenizer":
        from tokenizers.implementations import ByteLevelBPETokenizer

        vocab = _need_file("data.vocab_file", "--vocab-file", vocab_file, tokenizer_type, "vocab.json")
        merges = _need_file("data.merge_file", "--merge-file", merge_file, tokenizer_type, "merges.txt")
        try:
            tokenizer = ByteLevelBPETokenizer(vocab, merges)
        except Exception as err:  # the Rust library's parse errors
            raise DataError("data.vocab_file", vocab, f"{vocab} / {merges} are not a GPT-2 BPE vocabulary "
                                 f"and merges ({str(err).splitlines()[0]})", "pass GPT-2-style vocab.json and "
                                 "merges.txt") from None
        return RustTokenizer(tokenizer, GPT2_EOD, vocab, tokenizer_type)
    if tokenizer_type == "HuggingFaceTokenizer":
        from tokenizers import Tokenizer

        directory = Path(_need_file("data.tokenizer_model", "--tokenizer-model", tokenizer_model, tokenizer_type,
                                    "DIR (a local Hugging Face tokenizer directory)"))
        if directory.is_file():
            directory = directory.parent
        if not (directory / "tokenizer.json").is_file():
            raise DataError("data.tokenizer_model", str(directory), f"{directory} has no tokenizer.json",
                                 "pass a directory saved by a fast tokenizer (zeromega train-tokenizer writes one)")
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        return RustTokenizer(tokenizer, _hf_eos(directory), str(directory), tokenizer_type)
    raise DataError("data.tokenizer_type", tokenizer_type, "is not a tokenizer zeromega builds",
                         f"pass one of {', '.join(TOKENIZER_TYPES)} (or none: zeromega's byte tokenizer)")


class BosFirst:
    """``Llama2Tokenizer`` under ``--legacy-tokenizer``: Megatron-LM's legacy ``_Llama2Tokenizer.tokenize`` puts
    the BOS before every text (its default ``bos=True, eos=False``); everything else is the wrapped tokenizer's."""

    def __init__(self, tokenizer) -> None:
        self._wrapped = tokenizer

    def tokenize(self, text: str) -> list[int]:
        return [self._wrapped.bos, *self._wrapped.tokenize(text)]

    def __getattr__(self, name):
        return getattr(self._wrapped, name)


def _tiktoken(path: str, pattern: str, vocab_size: Optional[int], num_special: int,
              special_tokens: Optional[Sequence[str]]):
    """Megatron-Core's ``TikTokenizer`` over a local vocabulary, its assertions turned into one-line refusals.

    The file is Megatron's tiktoken JSON: a list of ``{"rank", "token_bytes" (base64), "token_str"}``, rank i
    at position i, the 256 single bytes first. Ids 0..``num_special``-1 are the special tokens (``<unk>``,
    ``<s>``, ``</s>``, ... then ``<SPECIAL_i>`` fillers), the file's ranks follow; the vocabulary is
    ``vocab_size`` (Megatron: ``--vocab-size``, else 131072), and the file must hold at least ``vocab_size -
    num_special`` ranks (the rest are cut)."""
    import base64
    import binascii

    if pattern not in TIKTOKEN_PATTERNS:
        raise DataError("data.tiktoken_pattern", pattern, "is not a tiktoken pattern Megatron-LM knows",
                        "pass --tiktoken-pattern v1 or v2")
    if not path.endswith(".json"):
        raise DataError("data.tokenizer_model", path, "TikTokenizer reads a .json vocabulary (Megatron-Core asserts "
                        "the suffix)", "pass Megatron's tiktoken JSON (zeromega train-tokenizer writes tiktoken.json)")
    try:
        ranks = json.loads(Path(path).read_text(encoding="utf-8"))
        assert isinstance(ranks, list)
        for i, entry in enumerate(ranks):
            assert isinstance(entry, dict) and set(entry) == {"rank", "token_bytes", "token_str"}, \
                f"entry {i} needs exactly rank, token_bytes, token_str"
            assert entry["rank"] == i, f"entry {i} has rank {entry['rank']}"
            token = base64.b64decode(entry["token_bytes"], validate=True)
            assert i >= 256 or token == bytes([i]), f"entry {i} is not the byte {i}"
    except (OSError, ValueError, AssertionError, binascii.Error, TypeError) as err:
        raise DataError("data.tokenizer_model", path, f"{path} is not a tiktoken vocabulary of Megatron's form "
                        f"({err or 'not a JSON list'})", "pass a list of {rank, token_bytes, token_str} (zeromega "
                        "train-tokenizer writes one)") from None
    specials = list(special_tokens) if special_tokens else list(TIKTOKEN_SPECIAL)
    missing = [t for t in TIKTOKEN_SPECIAL if t not in specials]
    if missing or len(set(specials)) != len(specials):
        raise DataError("data.tokenizer_special_tokens", " ".join(specials), "must be unique and hold "
                        f"{' '.join(TIKTOKEN_SPECIAL)} (Megatron-Core's tiktoken wrapper asserts it)",
                        f"add {' '.join(missing) or 'each token once'}")
    vocab = vocab_size or TIKTOKEN_DEFAULT_VOCAB
    if not len(specials) <= num_special < vocab:
        raise DataError("data.tiktoken_num_special_tokens", num_special, f"must be at least the {len(specials)} "
                        f"special tokens and below the vocabulary of {vocab}", f"pass --tiktoken-num-special-tokens "
                        f"between {len(specials)} and {vocab - 1}")
    if len(ranks) < vocab - num_special:
        raise DataError("model.vocab_size", vocab_size, f"a TikTokenizer vocabulary of {vocab} with {num_special} "
                        f"special tokens needs {vocab - num_special} ranks, and {path} holds {len(ranks)}",
                        f"pass --vocab-size {len(ranks) + num_special} (the file's ranks plus "
                        "--tiktoken-num-special-tokens)")
    try:
        import tiktoken  # noqa: F401  (Megatron-Core imports it quietly and fails later without it)
    except ImportError:
        raise DataError("data.tokenizer_type", "TikTokenizer", "needs the tiktoken package",
                        "pip install tiktoken (zeromega's install_requires has it)") from None
    from megatron.core.tokenizers import MegatronTokenizer

    return MegatronTokenizer.from_pretrained(tokenizer_path=path, metadata_path={"library": "tiktoken"},
                                             pattern=pattern, vocab_size=vocab, num_special_tokens=num_special,
                                             special_tokens=specials if special_tokens else None)


def train_tokenizer(texts, output_dir: str | Path, vocab_size: int, min_frequency: int = 2) -> Path:
    """Train a GPT-2-style byte-level BPE on ``texts`` (an iterable of documents) with the ``tokenizers``
    library; writes ``vocab.json`` + ``merges.txt`` (``--tokenizer-type GPT2BPETokenizer``),
    ``tokenizer.json`` + ``tokenizer_config.json`` (``--tokenizer-type HuggingFaceTokenizer``) and the same
    merges as Megatron's tiktoken JSON, ``tiktoken.json`` (``--tokenizer-type TikTokenizer``; see
    :func:`write_tiktoken`) to ``output_dir``. ``<|endoftext|>`` is the EOD (id 0)."""
    from tokenizers.implementations import ByteLevelBPETokenizer

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[GPT2_EOD], show_progress=False)
    tokenizer.save_model(str(out))
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": GPT2_EOD, "eos_token": GPT2_EOD,
         "unk_token": GPT2_EOD, "model_max_length": 1 << 30}, indent=1))
    write_tiktoken(json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"],
                   out / "tiktoken.json")
    return out


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet back to bytes: printable Latin-1 bytes stand for themselves, the other 68
    bytes, in byte order, for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    decoder = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in decoder.values()]
    decoder.update({chr(256 + n): b for n, b in enumerate(others)})
    return decoder


def write_tiktoken(merges, path: str | Path) -> Path:
    """Megatron's tiktoken JSON for a byte-level BPE's ``merges`` (pairs, or ``"a b"`` strings, in GPT-2's
    byte alphabet): the 256 bytes are ranks 0..255, each merge's token the next rank in merge order (tiktoken
    merges by lowest rank), a token made twice keeping its first rank."""
    import base64

    decode = _gpt2_byte_decoder()
    tokens = [bytes([b]) for b in range(256)]
    seen = set(tokens)
    for merge in merges:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        token = bytes(decode[c] for c in left + right)
        if token not in seen:
            seen.add(token)
            tokens.append(token)
    entries = [{"rank": i, "token_bytes": base64.b64encode(t).decode("ascii"),
                "token_str": t.decode("utf-8", errors="replace")} for i, t in enumerate(tokens)]
    Path(path).write_text(json.dumps(entries))
    return Path(path)


def train_sentencepiece(texts, output_dir: str | Path, vocab_size: int) -> Path:
    """Train a Llama-2-style SentencePiece BPE (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, no pad, unknown characters
    as bytes, text kept as written: no normalization, spaces not collapsed, digits split) on ``texts`` with
    the ``sentencepiece`` library, so decoding gives the text back; writes ``tokenizer.model`` (for
    ``SentencePieceTokenizer``, ``GPTSentencePieceTokenizer`` and ``Llama2Tokenizer``). Documents are fed line
    by line (SentencePiece skips sentences over 4,192 bytes). A ``ValueError`` names what the trainer refused."""
    import sentencepiece as spm

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = (line for text in texts for line in text.splitlines() if line.strip())
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=lines, model_prefix=str(out / "tokenizer"),
                                       vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
                                       character_coverage=1.0, normalization_rule_name="identity",
                                       remove_extra_whitespaces=False, split_digits=True,
                                       allow_whitespace_only_pieces=True, minloglevel=2)
    except RuntimeError as err:
        raise ValueError(f"sentencepiece: {str(err).strip().splitlines()[-1]}") from None
    (out / "tokenizer.vocab").unlink(missing_ok=True)
    return out / "tokenizer.model"


def read_documents(path: str | Path, json_keys: Sequence[str] = ("text",)) -> Iterator[dict[str, str]]:
    """The documents of one input: a ``.json``/``.jsonl`` (optionally ``.gz``) file holds one JSON object per
    line, as Megatron-LM's ``preprocess_data.py`` reads it; any other file is one document."""
    import gzip

    path = Path(path)
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    opener = gzip.open if path.name.endswith(".gz") else open
    if not name.endswith((".json", ".jsonl")):
        with opener(path, "rt", encoding="utf-8") as f:
            yield {key: f.read() for key in json_keys}
        return
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                yield {key: record[key] for key in json_keys}
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{number}: not a JSON object with the key(s) {', '.join(json_keys)} "
                                 f"({type(err).__name__}: {err})") from None


_WORKER_TOKENIZER = None


def _init_worker(make_tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = make_tokenizer()


def _encode(item: tuple[dict[str, str], bool]) -> dict[str, list[int]]:
    doc, append_eod = item
    out = {}
    for key, text in doc.items():
        ids = list(_WORKER_TOKENIZER.tokenize(text)) if text else []
        if ids and append_eod:
            ids.append(_WORKER_TOKENIZER.eod)
        out[key] = ids
    return out


def preprocess(inputs: Sequence[str | Path], output_prefix: str | Path, make_tokenizer,
               json_keys: Sequence[str] = ("text",), append_eod: bool = False, workers: int = 1,
               log=None, log_interval: int = 1000) -> dict[str, Path]:
    """Tokenize documents into ``{output_prefix}_{key}_document.bin/.idx`` per JSON key (Megatron-LM's names).

    ``make_tokenizer`` (picklable, no arguments) builds the tokenizer in each of ``workers`` processes.
    Documents keep their order; an empty one stays an empty document, and ``append_eod`` adds the EOD to
    the others, as ``tools/preprocess_data.py`` does. Ids are stored in Megatron-Core's
    ``DType.optimal_dtype`` for the vocabulary, through its ``IndexedDatasetBuilder``.
    """
    import multiprocessing
    import time

    from megatron.core.datasets.indexed_dataset import DType

    tokenizer = make_tokenizer()
    prefixes = {key: Path(f"{output_prefix}_{key}_document") for key in json_keys}
    for prefix in prefixes.values():
        prefix.parent.mkdir(parents=True, exist_ok=True)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    builders = {key: IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype) for key, prefix in prefixes.items()}
    docs = ((doc, append_eod) for path in inputs for doc in read_documents(path, json_keys))
    pool = None
    if workers > 1:
        pool = multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker,
                                                        initargs=(make_tokenizer,))
        encoded = pool.imap(_encode, docs, 32)
    else:
        _init_worker(lambda: tokenizer)
        encoded = map(_encode, docs)
    started, count = time.time(), 0
    try:
        for count, doc in enumerate(encoded, 1):
            for key, ids in doc.items():
                builders[key].add_document(np.asarray(ids, dtype=dtype), [len(ids)] if ids else [])
            if log is not None and count % log_interval == 0:
                log(f"processed {count} documents ({count / (time.time() - started):.0f} docs/s)")
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    for key, prefix in prefixes.items():
        builders[key].finalize(f"{prefix}.idx")
    return prefixes


def _fingerprint(prefixes: Sequence[str | Path]) -> str:
    """Megatron's cache hash knows the prefix, not the contents; the .idx (every document's
    length) changes whenever a rebuild changes the corpus, so stale indices are never reused."""
    digest = hashlib.sha1()
    for prefix in prefixes:
        digest.update(Path(f"{prefix}.idx").read_bytes())
    return digest.hexdigest()[:16]


def document_count(prefix: str | Path, documents: bool = False) -> int:
    """Sequences in a ``.idx`` (what Megatron's split divides: one per non-empty document as zeromega and
    preprocess_data.py write them), or with ``documents`` the documents, empty ones included."""
    with open(f"{prefix}.idx", "rb") as f:  # header: magic 9 B, version 8 B, dtype 1 B, sequences, documents
        f.seek(18)
        sequences, docs = struct.unpack("<QQ", f.read(16))
    return docs - 1 if documents else sequences  # the document index starts with a 0


def token_id_cache_dir() -> Path:
    """Where :func:`largest_token_id` keeps what it found (beside the project's corpus, ``ZEROMEGA_DATA``)."""
    return default_corpus_prefix().parent / "largest-token-id"


def largest_token_id(prefix: str | Path, cache: bool = True, chunk_bytes: int = 64 * 2**20) -> int:
    """The largest token id in ``<prefix>.bin`` (read with its ``.idx``'s dtype), -1 for no token.

    The scan reads the file once, ``chunk_bytes`` at a time through a memory map (a multi-GB file never
    becomes one array). With ``cache`` the answer is kept in :func:`token_id_cache_dir`, keyed by the
    ``.bin``'s real path, size, modification time and inode and the ``.idx``'s size and time: a rewritten
    file is scanned again, an unchanged one costs one ``stat`` and a small read. A cache that cannot be
    written is skipped."""
    from megatron.core.datasets.indexed_dataset import DType

    bin_path, idx_path = Path(f"{prefix}.bin").resolve(), Path(f"{prefix}.idx").resolve()
    b, i = bin_path.stat(), idx_path.stat()
    key = [str(bin_path), b.st_size, b.st_mtime_ns, b.st_ino, i.st_size, i.st_mtime_ns]
    entry = token_id_cache_dir() / f"{hashlib.sha1(str(bin_path).encode()).hexdigest()[:20]}.json"
    if cache:
        try:
            found = json.loads(entry.read_text())
            if found.get("key") == key:
                return int(found["largest"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    with open(idx_path, "rb") as f:
        f.seek(17)  # after the magic (9 B) and the version (8 B)
        dtype = np.dtype(DType.dtype_from_code(f.read(1)[0]))
    largest = -1
    if b.st_size >= dtype.itemsize:
        tokens = np.memmap(bin_path, dtype=dtype, mode="r")
        step = max(1, chunk_bytes // dtype.itemsize)
        for start in range(0, tokens.size, step):
            largest = max(largest, int(tokens[start:start + step].max()))
        del tokens
    if cache:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            tmp.write_text(json.dumps({"key": key, "largest": largest}))
            os.replace(tmp, entry)
        except OSError:
            pass
    return largest


SPLITS = ("train", "valid", "test")


def build_datasets(seq_length: int, seed: int, num_samples: tuple[int, int, int], *,
                   blend: Optional[tuple[list[str], Optional[list[float]]]] = None,
                   blend_per_split: Optional[list] = None, split: str = "969, 30, 1",
                   tokenizer: Optional[MegatronTokenizerBase] = None, cache_dir: str | Path | None = None,
                   mock: bool = False, eod_mask_loss: bool = False,
                   reset_position_ids: bool = False, mmap_bin_files: bool = True) -> list[Optional[GPTDataset]]:
    """(train, valid, test) GPTDatasets from Megatron-Core's ``BlendedMegatronDatasetBuilder``; None where
    no data is asked for or none exists.

    ``blend`` is Megatron-Core's ``(prefixes, weights or None)`` (what ``get_blend_from_list`` makes of
    ``--data-path``), divided by ``split``; ``blend_per_split`` gives each split its own blend (or None);
    ``mock`` builds Megatron-Core's ``MockGPTDataset`` (no files). ``eod_mask_loss`` and ``reset_position_ids``
    are Megatron-Core's (``--eod-mask-loss``: loss mask 0 on EOD tokens; ``--reset-position-ids``: positions
    restart after each EOD). Call on every rank: inside a job the
    builder makes rank 0 write the shuffle/sample indices to ``cache_dir`` (default
    ``<first prefix>-index-cache``, on a filesystem all ranks see), barriers, and the others load them.

    Documents are divided between splits, and a split that gets no document of a prefix would make
    Megatron loop forever looking for tokens. A split nothing reads (0 samples) is therefore not built; a
    split that is read but gets no document is refused with the document counts (``ValueError``).
    """
    tokenizer = tokenizer or ByteTokenizer()
    prefixes = [p for b in ([blend] if blend else []) + list(blend_per_split or []) if b for p in b[0]]
    if mock:
        prefixes = []
    cache = None
    if prefixes:
        cache = Path(cache_dir) if cache_dir is not None else Path(f"{prefixes[0]}-index-cache")
        cache = cache / _fingerprint(prefixes)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=None if mock else blend,
        blend_per_split=None if mock or not blend_per_split else list(blend_per_split),
        split=None if blend_per_split and not mock else split,
        path_to_cache=None if cache is None else str(cache),
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=False,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,
        mmap_bin_files=mmap_bin_files,
    )
    if mock:
        from megatron.core.datasets.gpt_dataset import MockGPTDataset

        config.split_matrix = [b if n else None for b, n in zip(config.split_matrix, num_samples)]
        return BlendedMegatronDatasetBuilder(MockGPTDataset, list(num_samples), lambda: True, config).build()
    if blend_per_split:
        for name, part, n in zip(SPLITS, blend_per_split, num_samples):
            for prefix in (part[0] if part and n else []):
                if document_count(prefix) == 0:
                    raise DataError(f"data.{name}_path", str(prefix), f"{prefix}.idx holds no document, and the "
                                    f"{name} split reads it", "pass a dataset with documents")
        sizes = [n if part else 0 for part, n in zip(blend_per_split, num_samples)]
        config.blend_per_split = [part if n else None for part, n in zip(config.blend_per_split, sizes)]
        return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    matrix = config.split_matrix
    for prefix in blend[0]:
        docs = document_count(prefix)
        for name, bounds, n in zip(SPLITS, matrix, num_samples):
            if bounds is not None and n and round(bounds[1] * docs) <= round(bounds[0] * docs):
                raise _empty_split(prefix, docs, name, split, num_samples)
    config.split_matrix = [b if n else None for b, n in zip(matrix, num_samples)]
    return BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config).build()


def _empty_split(prefix, docs: int, name: str, split: str, num_samples) -> DataError:
    """The refusal for a read split without a document, with the smallest weights that give each read split
    one (Megatron rounds ``weight / total * documents`` at each boundary)."""
    read = [n > 0 for n in num_samples]
    fix = "use a corpus with more documents"
    if docs >= sum(read):
        weights = [0] * 3
        left = docs
        for i in (2, 1):
            if read[i]:
                weights[i], left = 1, left - 1
        weights[0] = left
        fix = f"e.g. --split {','.join(map(str, weights))} (whole documents per split), or more documents"
    return DataError("data.split", split, f"--split {split!r} leaves the {name} split no document of the {docs} in "
                     f"{prefix}, and the run reads {dict(zip(SPLITS, num_samples))[name]} {name} samples", fix)


def build_gpt_datasets(prefix: str | Path, seq_length: int, seed: int,
                       num_samples: tuple[int, int, int], split: str = "98,1,1",
                       cache_dir: str | Path | None = None) -> list[Optional[GPTDataset]]:
    """(train, valid, test) GPTDatasets over one byte-tokenized prefix (see :func:`build_datasets`)."""
    return build_datasets(seq_length, seed, num_samples, blend=([str(prefix)], None), split=split,
                          cache_dir=cache_dir)


def sample_batches(dataset, micro_batch_size: int, start_sample: int = 0, dp_rank: int = 0,
                   dp_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches, in order, until the dataset runs out (partial ones dropped).

    Layout (Megatron's own): global micro-batch k covers samples
    [start + k*M*D, start + (k+1)*M*D) with M = micro_batch_size, D = dp_size, and rank r
    takes the r-th block of M of them. Concatenating the ranks' k-th micro-batches in rank
    order therefore gives the k-th micro-batch of a D=1 run with micro-batch M*D, so a
    step of A accumulated micro-batches sees the same global batch whatever D is.
    `start_sample` counts global samples already consumed (steps * global batch size).
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
    stride = micro_batch_size * dp_size
    for base in range(start_sample, len(dataset) - stride + 1, stride):
        first = base + dp_rank * micro_batch_size
        rows = [dataset[i] for i in range(first, first + micro_batch_size)]
        # A blend's samples also carry their dataset's index (a numpy scalar), which training does not read.
        yield {key: torch.stack([row[key] for row in rows]) for key in rows[0] if torch.is_tensor(rows[0][key])}
