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


TOKENIZER_TYPES = ("NullTokenizer", "GPT2BPETokenizer", "HuggingFaceTokenizer", "SentencePieceTokenizer",
                   "GPTSentencePieceTokenizer")
"""Megatron-LM's ``--tokenizer-type`` choices zeromega builds (core_v0.16.1 names), each from local files."""
GPT2_EOD = "<|endoftext|>"


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
                    vocab_size: Optional[int] = None) -> MegatronTokenizerBase:
    """The tokenizer Megatron-LM core_v0.16.1's ``--tokenizer-type`` names, from local files only.

    None is zeromega's byte tokenizer (the project's corpus). ``NullTokenizer`` (ids are the text's integers;
    ``vocab_size`` + 1 with the EOD) and the SentencePiece types are Megatron-Core's own
    (``MegatronTokenizer.from_pretrained`` with its ``null`` / ``sentencepiece`` libraries, as Megatron-LM's
    ``build_tokenizer`` calls it). ``GPT2BPETokenizer`` (``vocab_file`` + ``merge_file``, EOD
    ``<|endoftext|>``) and ``HuggingFaceTokenizer`` (a directory with ``tokenizer.json``; EOD its config's
    ``eos_token``) are :class:`RustTokenizer`. Bad input raises :class:`DataError`.
    """
    if tokenizer_type is None:
        return ByteTokenizer()
    from megatron.core.tokenizers import MegatronTokenizer

    if tokenizer_type == "NullTokenizer":
        if not vocab_size:
            raise DataError("model.vocab_size", None, "--tokenizer-type NullTokenizer needs --vocab-size",
                                 "pass --vocab-size N (ids 0..N-1; the EOD is N)")
        return MegatronTokenizer.from_pretrained(metadata_path={"library": "null"}, vocab_size=vocab_size)
    if tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        model = _need_file("data.tokenizer_model", "--tokenizer-model", tokenizer_model, tokenizer_type,
                           "PATH.model (a SentencePiece model file)")
        return MegatronTokenizer.from_pretrained(tokenizer_path=model, metadata_path={"library": "sentencepiece"},
                                                 legacy=False, special_tokens=None)
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


def train_tokenizer(texts, output_dir: str | Path, vocab_size: int, min_frequency: int = 2) -> Path:
    """Train a GPT-2-style byte-level BPE on ``texts`` (an iterable of documents) with the ``tokenizers``
    library; writes ``vocab.json`` + ``merges.txt`` (``--tokenizer-type GPT2BPETokenizer``) and
    ``tokenizer.json`` + ``tokenizer_config.json`` (``--tokenizer-type HuggingFaceTokenizer``) to
    ``output_dir``. ``<|endoftext|>`` is the EOD (id 0)."""
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
    return out


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


SPLITS = ("train", "valid", "test")


def build_datasets(seq_length: int, seed: int, num_samples: tuple[int, int, int], *,
                   blend: Optional[tuple[list[str], Optional[list[float]]]] = None,
                   blend_per_split: Optional[list] = None, split: str = "969, 30, 1",
                   tokenizer: Optional[MegatronTokenizerBase] = None, cache_dir: str | Path | None = None,
                   mock: bool = False, eod_mask_loss: bool = False,
                   reset_position_ids: bool = False) -> list[Optional[GPTDataset]]:
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
        mmap_bin_files=True,
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
