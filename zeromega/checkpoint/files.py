"""Checkpoint files on disk: written once, hashed while written, published by rename, loaded without code.

A checkpoint directory is only ever seen complete. Every rank writes into
``SAVE/.staging/TAG``; each file is hashed (sha256) as its bytes go out, so
nothing is read back. Once every rank's files are on disk, rank 0 writes
``manifest.json`` (size and sha256 of every file), renames the staging
directory to ``SAVE/TAG`` and only then replaces ``SAVE/latest`` (a one-line
file holding the tag, DeepSpeed's own pointer format). A save killed at any
point leaves ``latest`` naming the previous complete checkpoint.

Loading checks the manifest first, then reads tensors with
``torch.load(weights_only=True)``: a checkpoint can carry data, never code.
DeepSpeed's files hold three non-tensor objects; exactly those classes are
allowed (:data:`DEEPSPEED_SAFE_GLOBALS`). Megatron-Core's torch_dist
checkpoints add one plain pickle, ``torch.distributed.checkpoint``'s
``.metadata``; :func:`dist_checkpoint_loads` reads it with an allowlist of
its plain record classes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

MANIFEST = "manifest.json"
LATEST = "latest"
STAGING = ".staging"
FORMAT = "zeromega-checkpoint/1"
_CHUNK = 4 << 20
_torch_load = torch.load  # the real one, also while weights_only_loads() has replaced torch.load


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved or loaded; ``str()`` says what and how to fix it."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem}; fix: {fix}")
        self.problem, self.fix = problem, fix


@dataclass(frozen=True)
class FileRecord:
    """One written file: its path relative to the checkpoint directory, size and sha256."""

    path: str
    size: int
    sha256: str


# ----------------------------------------------------------------- writing


class _HashingWriter:
    """A write-only file object that hashes what passes through (torch.save takes any ``write``)."""

    def __init__(self, raw):
        self._raw, self.hash, self.size = raw, hashlib.sha256(), 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.hash.update(view)
        self.size += view.nbytes
        return self._raw.write(view)

    def flush(self) -> None:
        self._raw.flush()


def write_file(path: str | Path, root: str | Path, write: Callable[[Any], None]) -> FileRecord:
    """Create ``path`` with ``write(fileobj)``, fsync it, and return its record relative to ``root``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw:
        out = _HashingWriter(raw)
        write(out)
        raw.flush()
        os.fsync(raw.fileno())
    return FileRecord(path.relative_to(root).as_posix(), out.size, out.hash.hexdigest())


def torch_save(obj: Any, path: str | Path, root: str | Path) -> FileRecord:
    return write_file(path, root, lambda f: torch.save(obj, f))


def hash_file(path: str | Path, root: str | Path) -> FileRecord:
    """Record of a file some library wrote itself (read back once)."""
    path, digest, size = Path(path), hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileRecord(path.relative_to(root).as_posix(), size, digest.hexdigest())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so a reader sees the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def staging_dir(save_dir: Path, tag: str) -> Path:
    return save_dir / STAGING / tag


def publish(save_dir: Path, tag: str, records: Iterable[FileRecord], meta: dict,
            fault: Callable[[str], None] = lambda point: None) -> Path:
    """Rank 0, once every rank's files are written: manifest, rename into place, then ``latest``.

    Files in the staging directory that no rank reported (a library writing
    around the checkpoint engine) are hashed here, so the manifest covers
    every byte that will be loaded.
    """
    stage = staging_dir(save_dir, tag)
    files = {r.path: r for r in records}
    for path in sorted(p for p in stage.rglob("*") if p.is_file()):
        rel = path.relative_to(stage).as_posix()
        if rel not in files and rel != MANIFEST:
            files[rel] = hash_file(path, stage)
    missing = [rel for rel in files if not (stage / rel).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {tag}: files reported written are missing: {missing[:5]}",
                              "check free space and that every rank sees the same --save directory")
    manifest = {"format": FORMAT, "tag": tag, **meta,
                "files": {rel: {"size": r.size, "sha256": r.sha256} for rel, r in sorted(files.items())}}
    write_text_atomic(stage / MANIFEST, json.dumps(manifest, indent=1))
    fault("before_rename")
    final = save_dir / tag
    trash = None
    if final.exists():  # the same step saved again (a run restarted from an older checkpoint)
        trash = save_dir / STAGING / f"{tag}.replaced-{uuid.uuid4().hex[:8]}"
        os.replace(final, trash)
    os.replace(stage, final)
    _fsync_dir(save_dir)
    fault("before_latest")
    write_text_atomic(save_dir / LATEST, tag + "\n")
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    with contextlib.suppress(OSError):  # only when no other save is in flight there
        (save_dir / STAGING).rmdir()
    return final


# ----------------------------------------------------------------- reading


def read_manifest(ckpt: Path) -> dict:
    path = ckpt / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: no {MANIFEST}, so it is not a complete zeromega checkpoint "
                              "(a save that did not finish, or a directory written by something else)",
                              "point --load at the directory holding 'latest', or at a complete checkpoint")
    damaged = "restore the file from a copy, or load an older checkpoint (write its tag into 'latest')"
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path}: damaged (byte {err.start} is not UTF-8 text)", damaged) from None
    except ValueError as err:
        raise CheckpointError(f"{path}: damaged (not valid JSON: {err})", damaged) from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror})", damaged) from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: damaged (a JSON {type(manifest).__name__}, not an object)", damaged)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}",
                              "load it with the zeromega version that wrote it")
    problem = _manifest_problem(manifest)
    if problem:
        raise CheckpointError(f"{path}: damaged ({problem})", damaged)
    return manifest


def _manifest_problem(manifest: dict) -> Optional[str]:
    """What is wrong with the fields every load reads (a hand edit, a bit flip in a key), or None."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        return "no 'files' table"
    for rel, want in files.items():
        if not (isinstance(want, dict) and isinstance(want.get("size"), int) and isinstance(want.get("sha256"), str)):
            return f"the entry for {rel!r} lacks an integer size and a sha256"
    for key in ("step", "consumed_samples"):
        if not isinstance(manifest.get(key), int) or isinstance(manifest.get(key), bool) or manifest[key] < 0:
            return f"{key!r} is {manifest.get(key)!r}, not a count"
    layout = manifest.get("layout")
    if not isinstance(layout, dict):
        return "no 'layout' table"
    for key in ("world", "tp", "pp", "cp", "ep", "dp", "micro", "accumulation", "global_batch", "zero_stage"):
        if key in ("micro", "accumulation", "global_batch") and layout.get(key) is None:
            continue  # not recorded by every writer (the batch may ramp up); nothing loads it as a count
        if not isinstance(layout.get(key), int) or isinstance(layout.get(key), bool):
            return f"layout {key!r} is {layout.get(key)!r}, not an integer"
    if not isinstance(manifest.get("params", {}), dict):
        return "'params' is not a table"
    return None


def verify_files(ckpt: Path, manifest: dict, share: Optional[tuple[int, int]] = None) -> list[str]:
    """Problems with the files of ``manifest`` (every ``share=(rank, world)``-th one); empty when all match."""
    problems = []
    for i, (rel, want) in enumerate(sorted(manifest["files"].items())):
        if share is not None and i % share[1] != share[0]:
            continue
        path = ckpt / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            problems.append(f"{path}: {size} bytes, the manifest says {want['size']} (truncated or overwritten)")
            continue
        if hash_file(path, ckpt).sha256 != want["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (corrupted)")
    return problems


def _deepspeed_safe_globals() -> list:
    """The non-tensor classes inside DeepSpeed's checkpoint files (measured, DeepSpeed 0.19.8):
    the ZeRO optimizer's loss scaler and stage enum, and the fp32 fragment addresses ZeRO
    records per parameter. Unpickling one only fills its fields; none runs code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load`` that refuses pickled code: tensors, containers and the allowed classes only."""
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        try:
            return _torch_load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # a corrupted zip, a truncated pickle, a forbidden global
            raise CheckpointError(f"{path}: cannot be loaded safely ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:300]})",
                                  "verify the checkpoint (manifest.json) or load an older one") from None


@contextlib.contextmanager
def weights_only_loads(post: Callable[[Any], Any] = lambda obj: obj) -> Iterator[None]:
    """Route every ``torch.load`` made meanwhile (DeepSpeed's universal-checkpoint readers pass
    ``weights_only=False`` themselves) through :func:`safe_load`, then ``post``."""
    original = torch.load

    def load(f, map_location=None, *args, **kwargs):
        return post(safe_load(f, map_location))

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


# torch.distributed.checkpoint's ``.metadata`` (a plain pickle, written by ``pickle.dump``), as
# Megatron-Core 0.16.1's torch_dist strategy writes it with torch 2.13: records of plain fields,
# the planner's own records (Megatron keeps the save plans there), enums, torch.Size and dtypes.
_DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                               "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                               "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
                                              "BytesIOWriteData"},
    "torch.serialization": {"_get_layout"},  # a name -> torch.layout lookup
    "torch": {"Size"},
    "collections": {"OrderedDict"},
}


class _AllowlistUnpickler(pickle.Unpickler):
    """An unpickler that builds only the classes of :data:`_DCP_METADATA_CLASSES` (and torch dtypes,
    layouts and memory formats, which pickle by name); anything else, a callable above all, is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                            torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a checkpoint's metadata")


class _SafePickle:
    """``pickle`` as torch.distributed.checkpoint's reader sees it inside :func:`dist_checkpoint_loads`."""

    def __getattr__(self, name: str) -> Any:
        return getattr(pickle, name)

    @staticmethod
    def load(file, **kwargs) -> Any:
        try:
            return _AllowlistUnpickler(file).load()
        except Exception as err:
            where = getattr(file, "name", "a torch.distributed.checkpoint .metadata file")
            raise CheckpointError(f"{where}: cannot be loaded safely ({type(err).__name__}: {err})",
                                  "verify the checkpoint (manifest.json) or load an older one") from None


@contextlib.contextmanager
def dist_checkpoint_loads() -> Iterator[None]:
    """Meanwhile, Megatron-Core's torch_dist reads carry no code: ``torch.load`` (its ``common.pt``,
    object shards that torch's planner loads with ``weights_only=False``) goes through
    :func:`safe_load`, and torch.distributed.checkpoint's ``.metadata`` pickle through an allowlist."""
    from torch.distributed.checkpoint import filesystem

    original = filesystem.pickle
    filesystem.pickle = _SafePickle()
    try:
        with weights_only_loads():
            yield
    finally:
        filesystem.pickle = original


def records_as_dicts(records: Iterable[FileRecord]) -> list[dict]:
    return [asdict(r) for r in records]


def records_from_dicts(items: Iterable[dict]) -> list[FileRecord]:
    return [FileRecord(**d) for d in items]
