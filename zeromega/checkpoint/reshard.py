"""Which layout changes a checkpoint survives, and the universal form that carries them.

A checkpoint saved under one layout loads natively under the same (tp, pp,
cp, ep, dp, ZeRO stage). Anything else goes through DeepSpeed's universal
checkpoint (``ds_to_universal``: every parameter's fp32 value and Adam
moments, whole, one folder per parameter), which the engine re-slices for
its own dp and tp ranks. The tp merge follows Megatron's own attributes
(``tensor_model_parallel``/``partition_dim``), recorded at save time.

Supported (measured with fp32, dropout off, 3 steps after the load; relative
loss difference to the unchanged run; tests/test_checkpoint.py runs the first two):

* ZeRO-2 dp2 -> ZeRO-1 dp1: 0.0 (bit for bit)
* ZeRO-1 tp2 -> ZeRO-1 tp1 dp2: 2.4e-8; tp2 -> tp1 dp1: 2.3e-8; tp1 -> tp2: 2.3e-8
* ZeRO-3 dp2 -> ZeRO-3 dp1: 0.0 (after :func:`zeromega.checkpoint._unshare_step_counters`;
  DeepSpeed alone drifts by 1.3e-3)

Refused, with the reason: ZeRO-0 on either side (no ZeRO partition files to
convert), ZeRO-1/2 <-> ZeRO-3 (DeepSpeed's stage-3 model files differ),
ZeRO-3 with a tp change, and pp/ep changes (pending their engines).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import CheckpointError, weights_only_loads, write_text_atomic

UNIVERSAL_DIR = ".universal"
SUPPORTED = ("same layout; ZeRO-1/2 -> ZeRO-1/2 with any dp and tp size; "
             "ZeRO-3 -> ZeRO-3 with any dp size and the same tp")


@dataclass(frozen=True)
class Plan:
    universal: bool
    """Load through DeepSpeed's universal checkpoint (the layout changed)."""


def _family(stage: int) -> str:
    return {0: "ZeRO-0", 1: "ZeRO-1/2", 2: "ZeRO-1/2", 3: "ZeRO-3"}[stage]


def plan(saved: dict, now: dict) -> Plan:
    """How to load a checkpoint saved under ``saved`` into ``now`` (both: layout dicts from the manifest)."""
    keys = ("tp", "pp", "ep", "zero_stage")
    if all(saved[k] == now[k] for k in keys) and saved["dp"] * saved["cp"] == now["dp"] * now["cp"]:
        return Plan(universal=False)

    def describe(layout: dict) -> str:
        return (f"tp{layout['tp']} pp{layout['pp']} ep{layout['ep']} dp{layout['dp'] * layout['cp']} "
                f"ZeRO-{layout['zero_stage']}")

    change = f"checkpoint saved as {describe(saved)}, this run is {describe(now)}"

    def refuse(reason: str) -> CheckpointError:
        return CheckpointError(f"{change}: {reason}; supported: {SUPPORTED}",
                               f"resume with the saved layout ({describe(saved)}), or change only what is supported")

    if saved["pp"] != now["pp"] or saved["ep"] != now["ep"] or saved["pp"] > 1 or saved["ep"] > 1:
        raise refuse("resharding pipeline or expert parallel layouts is not supported yet")
    if 0 in (saved["zero_stage"], now["zero_stage"]):
        raise refuse("ZeRO-0 has no ZeRO partition files for DeepSpeed's universal checkpoint")
    if _family(saved["zero_stage"]) != _family(now["zero_stage"]):
        raise refuse("DeepSpeed cannot load between ZeRO-1/2 and ZeRO-3 (their model-state files differ)")
    if saved["zero_stage"] == 3 and saved["tp"] != now["tp"]:
        raise refuse("a tp change under ZeRO-3 is not supported")
    return Plan(universal=True)


def universal_copy(ckpt: Path, manifest: dict) -> Path:
    """Rank 0: DeepSpeed's universal form of ``ckpt`` (made once, cached next to it, checked by size)."""
    root = ckpt.parent / UNIVERSAL_DIR
    final = root / ckpt.name
    sizes = final / "sizes.json"
    if sizes.is_file() and _matches(final, sizes):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{ckpt.name}.tmp-{uuid.uuid4().hex[:8]}"
    convert(ckpt, tmp)
    import json

    files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in tmp.rglob("*") if p.is_file()}
    write_text_atomic(tmp / "sizes.json", json.dumps({"source_sha256": _source_id(manifest), "files": files}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _source_id(manifest: dict) -> str:
    import hashlib

    return hashlib.sha256("".join(f["sha256"] for f in manifest["files"].values()).encode()).hexdigest()


def _matches(folder: Path, sizes: Path) -> bool:
    import json

    try:
        files = json.loads(sizes.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((folder / rel).is_file() and (folder / rel).stat().st_size == size for rel, size in files.items())


def _tensors_only_module(obj):
    """Megatron-Core modules put ``_extra_state`` entries (None) in their state dicts;
    ``ds_to_universal`` calls ``.float()`` on every module entry, so the converter sees tensors only."""
    if isinstance(obj, dict) and isinstance(obj.get("module"), dict):
        obj = dict(obj, module=type(obj["module"])((k, v) for k, v in obj["module"].items()
                                                   if isinstance(v, torch.Tensor)))
    return obj


def convert(ckpt: Path, out: Path) -> None:
    """Run DeepSpeed's ``ds_to_universal`` on ``ckpt`` into ``out`` with weights-only reads, quietly."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(ckpt), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
    chatter = io.StringIO()
    try:
        with weights_only_loads(_tensors_only_module), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal.main(args)
    except CheckpointError:
        raise
    except Exception as err:
        shutil.rmtree(out, ignore_errors=True)
        raise CheckpointError(f"DeepSpeed's universal conversion of {ckpt} failed: {type(err).__name__}: {err}",
                              "resume with the layout the checkpoint was saved with") from None
    # ds_to_universal points a 'latest_universal' file next to its output; zeromega names tags itself.
    with contextlib.suppress(FileNotFoundError):
        (out.parent / "latest_universal").unlink()
