"""The project's own corpus and the GPT datasets over it.

Runs and tests need real text without a download, so the corpus is the running
Python's standard library sources, tokenized byte by byte into a Megatron indexed
dataset; Megatron-Core's own builder turns it into GPT train/valid/test datasets.
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
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
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


def _fingerprint(prefix: Path) -> str:
    """Megatron's cache hash knows the prefix, not the contents; the .idx (every document's
    length) changes whenever a rebuild changes the corpus, so stale indices are never reused."""
    return hashlib.sha1(Path(f"{prefix}.idx").read_bytes()).hexdigest()[:16]


def build_gpt_datasets(prefix: str | Path, seq_length: int, seed: int,
                       num_samples: tuple[int, int, int], split: str = "98,1,1",
                       cache_dir: str | Path | None = None) -> list[Optional[GPTDataset]]:
    """(train, valid, test) GPTDatasets over the corpus; a split of weight 0 comes back None.

    Call on every rank. Without torch.distributed it just builds. Inside a job, Megatron's
    builder makes rank 0 build and save the shuffle/sample indices, barriers, and the
    other ranks load them, so `cache_dir` (default `<prefix>-index-cache`) must be on a
    filesystem all ranks see. Documents are divided between splits, so each split with
    weight > 0 needs at least one whole document: checked here, because Megatron would
    otherwise loop forever looking for tokens in an empty split.
    """
    prefix = Path(prefix)
    cache = Path(cache_dir) if cache_dir is not None else Path(f"{prefix}-index-cache")
    with open(f"{prefix}.idx", "rb") as f:  # header: magic 9 B, version 8 B, dtype 1 B, count
        f.seek(18)
        n_docs = struct.unpack("<Q", f.read(8))[0]  # sequences, which is what splits divide
    for name, bounds in zip(("train", "valid", "test"),
                            convert_split_vector_to_split_matrix(parse_and_normalize_split(split))):
        if bounds is not None and round(bounds[1] * n_docs) <= round(bounds[0] * n_docs):
            raise ValueError(f"split {split!r} leaves {name} no document of {n_docs}; "
                             "use a larger corpus or another split")
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([str(prefix)], None),
        split=split,
        path_to_cache=str(cache / _fingerprint(prefix)),
        tokenizer=ByteTokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    builder = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config)
    return builder.build()


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
        yield {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
