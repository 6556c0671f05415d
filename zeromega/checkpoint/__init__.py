"""Save and resume a training run exactly; move it to another layout; never lose the last good checkpoint.

Directory layout (``--save SAVE``), Megatron's tag names, DeepSpeed's files::

    SAVE/latest                      one line: the tag of the newest complete checkpoint
    SAVE/iter_0000020/               one checkpoint, published by a rename (see files.py)
        manifest.json                sha256 and size of every file; step, data position,
                                     scheduler, layout, and each parameter's tp split
        mp_rank_00_model_states.pt   DeepSpeed: module, engine counters (per tp rank)
        zero_pp_rank_R_mp_rank_T_optim_states.pt   DeepSpeed: ZeRO partitions (per dp rank)
        zeromega/rng_rank_00001.pt   every RNG of global rank 1 (python, numpy, torch, CUDA,
                                     Megatron's tracker)
    SAVE/.staging/                   saves in progress; ignored by loads
    SAVE/.universal/iter_0000020/    DeepSpeed universal form, made on demand for a reshard

What a resume restores: model and optimizer (through the DeepSpeed engine,
ZeRO partitions included), the step, the data position (consumed samples),
Megatron's OptimizerParamScheduler and every rank's RNGs. The same layout
resumes bit for bit. Another layout goes through DeepSpeed's universal
checkpoint (:mod:`.reshard` says which pairs); RNG streams are per rank, so
a resharded run keeps its fresh seeds.

Pipeline (pp > 1) and MoE layouts run on Megatron-Core's engine, whose
checkpoints are Megatron's dist checkpoints inside the same directory,
staging, manifest and ``latest``
(:class:`zeromega.checkpoint.megatron.MegatronCheckpointer`); the
manifest's ``engine`` says which engine wrote a checkpoint, and neither
engine loads the other's (:func:`.reshard.check_engine`).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from . import reshard, rng
from .files import (LATEST, MANIFEST, CheckpointError, publish, read_manifest,
                    records_as_dicts, records_from_dicts, safe_load, staging_dir, torch_save, verify_files,
                    weights_only_loads)

__all__ = ["Checkpointer", "CheckpointError", "Resumed", "tag_for", "find_latest", "resolve_load",
           "open_verified", "saved_engine", "read_manifest", "safe_load"]

RNG_FILE = "zeromega/rng_rank_{:05d}.pt"


def tag_for(step: int) -> str:
    """Megatron-LM's directory name for the checkpoint after ``step`` optimizer steps."""
    return f"iter_{step:07d}"


@dataclass(frozen=True)
class Resumed:
    """Where a loaded checkpoint puts the run."""

    step: int
    consumed_samples: int
    path: Path
    resharded: bool
    rng_restored: bool


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _from_rank0(obj: Any) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _agree(fn: Callable[[], Any], rank0_only: bool = True) -> Any:
    """Run ``fn`` on rank 0 (or everywhere), then make every rank raise rank 0's error or return its value.

    A failure on one rank must not leave the others waiting in a barrier until
    the collective timeout.
    """
    result, error = None, None
    if not rank0_only or _rank() == 0:
        try:
            result = fn()
        except CheckpointError as err:
            error = (err.problem, err.fix)
        except Exception as err:  # reported the same way on every rank
            error = (f"{type(err).__name__}: {err}", "see the traceback of rank 0")
    result, error = _from_rank0((result, error))
    if error is not None:
        raise CheckpointError(*error)
    return result


LAYOUT_KEYS = ("world", "tp", "pp", "cp", "ep", "dp", "micro", "accumulation", "global_batch")


def layout_meta(layout, zero_stage: int, precision: str, **extra) -> dict:
    """What a manifest records of the layout a checkpoint was saved under (both engines)."""
    return {**{k: getattr(layout, k) for k in LAYOUT_KEYS}, **extra, "zero_stage": zero_stage,
            "precision": precision}


def fresh_stage(save_dir: Path, tag: str) -> Path:
    """An empty staging directory for ``tag`` (rank 0 clears one a killed save left), agreed by every rank."""
    stage = staging_dir(save_dir, tag)

    def clear_stage():
        if stage.exists():  # a save of this step that was killed earlier
            shutil.rmtree(stage)
        stage.mkdir(parents=True)

    _agree(clear_stage)
    return stage


def find_latest(directory: Path) -> Optional[Path]:
    """The checkpoint ``directory/latest`` names, ``directory`` itself if it is one, or None if empty."""
    latest = directory / LATEST
    if latest.is_file():
        raw = latest.read_bytes()
        try:
            tag = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            tags = sorted(p.name for p in directory.glob("iter_*") if (p / MANIFEST).is_file())
            raise CheckpointError(f"{latest} is damaged ({len(raw)} bytes, not a UTF-8 tag)",
                                  "write the tag of an existing checkpoint into it, e.g. "
                                  f"echo {tags[-1] if tags else 'iter_0000010'} > {latest}") from None
        ckpt = directory / tag
        if not tag or "/" in tag or "\0" in tag or "\n" in tag or not ckpt.is_dir():
            raise CheckpointError(f"{latest} names {tag!r}, which is not a directory in {directory}",
                                  "restore that checkpoint, or write the tag of an existing one into 'latest'")
        return ckpt
    if (directory / MANIFEST).is_file():
        return directory
    return None


def resolve_load(load_dir: str | Path, allow_empty: bool = False) -> Optional[Path]:
    """The checkpoint ``--load load_dir`` means, or None for a fresh start (only when ``allow_empty``
    and the directory is missing or empty). Collective when a process group exists.

    A directory holding anything but checkpoints is refused rather than
    started over, so a mistyped --load never leads to overwriting it.
    """
    load_dir = Path(load_dir).absolute()

    def find():
        if not load_dir.exists():
            if allow_empty:
                return None
            raise CheckpointError(f"--load {load_dir}: no such directory",
                                  "pass the --save directory of an earlier run")
        if not load_dir.is_dir():
            raise CheckpointError(f"--load {load_dir}: not a directory", "pass a checkpoint directory")
        ckpt = find_latest(load_dir)
        if ckpt is None:
            visible = sorted(p.name for p in load_dir.iterdir() if not p.name.startswith("."))
            if allow_empty and not visible:
                return None
            what = f"it holds {visible[:5]}" if visible else "it is empty"
            raise CheckpointError(f"--load {load_dir}: no 'latest' file and no {MANIFEST}, so no zeromega "
                                  f"checkpoint ({what})",
                                  "pass the --save directory of an earlier run, or a checkpoint inside it")
        return ckpt

    ckpt = _agree(find)
    return None if ckpt is None else Path(ckpt)


def open_verified(load_dir: str | Path, allow_empty: bool = False) -> Optional[tuple[Path, dict]]:
    """(checkpoint, manifest) that ``--load load_dir`` means, every file checked against the manifest
    (each rank hashes a share) before anything is read; None for a fresh start (see :func:`resolve_load`)."""
    ckpt = resolve_load(load_dir, allow_empty)
    if ckpt is None:
        return None
    manifest = _agree(lambda: read_manifest(ckpt))
    problems = [p for ps in _gather(verify_files(ckpt, manifest, (_rank(), _world()))) for p in ps]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"checkpoint {ckpt} failed verification: {problems[0]}{more}",
                              "load an older checkpoint (write its tag into 'latest') or re-run from it")
    return ckpt, manifest


def saved_engine(load_dir: str | Path) -> Optional[str]:
    """The engine (:data:`reshard.ENGINES`) that wrote the checkpoint ``--load load_dir`` means; None when
    there is none yet. Collective; reads only the manifest (a load verifies the files later)."""
    ckpt = resolve_load(load_dir, allow_empty=True)
    if ckpt is None:
        return None
    return _agree(lambda: read_manifest(ckpt).get("engine", reshard.DEEPSPEED))


def parameter_splits(module: torch.nn.Module) -> dict[str, dict]:
    """Each parameter's full-rank shape and how tensor parallelism splits it (Megatron's own attributes)."""
    splits = {}
    for name, param in module.named_parameters():
        shape = list(getattr(param, "ds_shape", param.shape))  # ZeRO-3 keeps the real shape here
        entry = {"shape": shape}
        if getattr(param, "tensor_model_parallel", False):
            entry["partition_dim"] = int(param.partition_dim)
            if getattr(param, "gated_halves", False):  # --swiglu's fused [gate; up] fc1 (model.mark_gated_fc1)
                entry["gated_halves"] = True
        splits[name] = entry
    return splits


def universal_info(splits: dict[str, dict]) -> dict:
    """DeepSpeed's universal-checkpoint hints, derived from the tp split of every parameter:
    column-parallel tensors concatenate on dim 0 (its default), row-parallel on dim 1,
    the rest are replicated on every tp rank; a gated fc1 (``--swiglu``) holds two sub-parameters, each
    split over tp (each rank's slice is ``[gate_r; up_r]``), which DeepSpeed merges and re-slices per half."""
    import re

    from deepspeed.checkpoint import constants as c

    def exact(name: str) -> str:
        return "^" + re.escape(name) + "$"

    return {
        c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        c.TP_REPLICATED_PARAMETER_PATTERNS: [exact(n) for n, s in splits.items() if "partition_dim" not in s],
        c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [exact(n) for n, s in splits.items()
                                                    if s.get("partition_dim") == 1],
        c.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0: [exact(n) for n, s in splits.items() if s.get("gated_halves")],
    }


def _unshare_step_counters(optimizer) -> None:
    """DeepSpeed's ZeRO-3 universal load gives every sub-group the *same* ``step`` tensor; torch's
    Adam increments it in place once per sub-group, so from the second step on bias correction
    drifts (measured: loss off by 1e-3 two steps after the load). One tensor per sub-group again."""
    base = getattr(optimizer, "optimizer", optimizer)
    for state in getattr(base, "state", {}).values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


@contextlib.contextmanager
def _zero3_tp_hints(module: torch.nn.Module, tp: int):
    """Tell DeepSpeed's ZeRO-3 universal load how Megatron splits each parameter across tp.

    ZeRO-3 slices a whole universal tensor for this tp rank only when the
    parameter carries AutoTP's restore hints (DeepSpeed's own tp layers set
    them; Megatron's do not); without them every tp rank would get the whole
    tensor. The hints come from Megatron's ``partition_dim``; the tp group
    DeepSpeed asks its AutoTP registry for is Megatron's. Both live only for
    the load.
    """
    from deepspeed.checkpoint.constants import DS_AUTOTP_UC_META
    from deepspeed.utils import groups
    from megatron.core import parallel_state

    hinted = []
    for param in module.parameters():
        if getattr(param, "tensor_model_parallel", False):
            dim = int(param.partition_dim)
            shape = list(param.ds_shape)
            shape[dim] *= tp
            hint = {"partition_dim": dim, "logical_shape": tuple(shape)}
            if getattr(param, "gated_halves", False):  # [gate; up]: each half sliced over tp
                hint["sub_param_sizes"] = (shape[dim] // 2, shape[dim] // 2)
        else:
            hint = {"replicated": True}
        setattr(param, DS_AUTOTP_UC_META, hint)
        hinted.append(param)
    registered = groups._TENSOR_MODEL_PARALLEL_GROUP
    if registered is None:
        groups._TENSOR_MODEL_PARALLEL_GROUP = parallel_state.get_tensor_model_parallel_group()
    try:
        yield
    finally:
        groups._TENSOR_MODEL_PARALLEL_GROUP = registered
        for param in hinted:
            delattr(param, DS_AUTOTP_UC_META)


def _verified_engine_class():
    """DeepSpeed's torch checkpoint engine with every write hashed and every read ``weights_only``."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class VerifiedCheckpointEngine(TorchCheckpointEngine):
        root: Optional[Path] = None  # the staging directory records are relative to

        def save(self, state_dict, path: str):
            self.written.append(torch_save(state_dict, path, self.root))

        def load(self, path: str, map_location=None):
            return safe_load(path, map_location)

    return VerifiedCheckpointEngine


def install_verified_io(engine):
    """Swap the engine's ``TorchCheckpointEngine`` for the verified one (same settings); the
    decoupled/fast engines write asynchronously, so zeromega cannot tell when they are done."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise CheckpointError(f"DeepSpeed checkpoint engine {type(current).__name__} writes asynchronously, "
                              "so zeromega cannot tell when its files are complete",
                              "drop the 'checkpoint.writer' / 'datastates' block from the DeepSpeed config")
    cls = _verified_engine_class()
    verified = cls.__new__(cls)
    verified.__dict__.update(current.__dict__)
    verified.written = []
    engine.checkpoint_engine = verified
    return verified


def _no_space(err: BaseException) -> bool:
    """Whether ``err`` (or what it was raised from) is ENOSPC / EDQUOT; torch's zip writer reports a failed
    write as ``unexpected pos N vs M``, with the OSError as its context when it came from a Python file."""
    import errno

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full(err: BaseException, stage: Path) -> Optional[dict]:
    """What a failed write tells about space: None unless the drive is full (ENOSPC in the chain, or torch's
    ``unexpected pos`` with under 1 MiB free there); else the bytes this rank had written and the bytes free."""
    free = shutil.disk_usage(stage).free if stage.exists() else 0
    if not (_no_space(err) or ("unexpected pos" in str(err) and free < (1 << 20))):
        return None
    written = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file()) if stage.exists() else 0
    return {"rank": _rank(), "written": written, "free": free, "error": f"{type(err).__name__}: {err}"}


def save_failed_for_space(save_dir: Path, stage: Path, tag: str, full: dict) -> CheckpointError:
    """The one-line refusal for a checkpoint that did not fit: the path, bytes needed and free, and which
    checkpoint is still the latest (rank 0 clears the half-written staging directory)."""
    need, what = full["written"], "at least"
    previous = None
    with contextlib.suppress(CheckpointError, OSError):
        previous = find_latest(save_dir)
    if previous is not None and (previous / MANIFEST).is_file():
        with contextlib.suppress(CheckpointError):
            need, what = sum(f["size"] for f in read_manifest(previous)["files"].values()), "about"
    if _rank() == 0:
        shutil.rmtree(stage, ignore_errors=True)
    kept = (f"the previous checkpoint {previous} is intact and still 'latest'" if previous is not None
            else "no earlier checkpoint exists there")
    return CheckpointError(f"--save {save_dir}: the disk filled up while rank {full['rank']} wrote checkpoint {tag} "
                           f"(No space left on device): it needs {what} {need} bytes, {full['free']} bytes were free "
                           f"there when the write failed; {kept}; the partial {tag} was removed",
                           f"free space on that drive or point --save at a drive with room, then resume "
                           f"{'from ' + previous.name if previous is not None else 'the run'} with --load {save_dir}")


class Checkpointer:
    """Saves and resumes one DeepSpeed engine's run: collective, every rank calls every method.

    ``model_meta`` (e.g. the GPT shape) is stored in the manifest for exporters.
    ``fault`` is called with a point name (``after_write``, ``before_rename``,
    ``before_latest``) during a save: tests use it to kill a save halfway.
    """

    def __init__(self, engine, layout, zero_stage: int, precision: str, scheduler=None,
                 model_meta: Optional[dict] = None, fault: Callable[[str], None] = lambda point: None):
        self.engine, self.layout, self.scheduler, self.fault = engine, layout, scheduler, fault
        self.model_meta = model_meta
        self.zero_stage, self.precision = zero_stage, precision
        self.io = install_verified_io(engine)
        self.splits = parameter_splits(engine.module)

    def _layout_meta(self) -> dict:
        return layout_meta(self.layout, self.zero_stage, self.precision)

    # ------------------------------------------------------------- save

    def save(self, save_dir: str | Path, step: int, consumed_samples: int) -> Path:
        """Write the checkpoint after ``step`` steps and make it ``latest`` once complete."""
        import deepspeed

        save_dir = Path(save_dir).absolute()
        tag = tag_for(step)
        stage = fresh_stage(save_dir, tag)
        start = time.perf_counter()
        self.io.root, self.io.written = stage, []
        client_state = {"iteration": step, "universal_checkpoint_info": universal_info(self.splits)}
        mine, full = [], None
        try:
            self.engine.save_checkpoint(str(stage.parent), tag=tag, client_state=client_state, save_latest=False)
            mine = list(self.io.written)
            mine.append(torch_save(rng.capture(), stage / RNG_FILE.format(_rank()), stage))
        except Exception as err:
            full = disk_full(err, stage)
            if full is None:
                raise
        # A full disk seen by any rank stops every rank with the same message (none waits in the gather).
        fulls = [f for f in _gather(full) if f is not None]
        if fulls:
            raise save_failed_for_space(save_dir, stage, tag, fulls[0])
        self.fault("after_write")
        records = [r for rank_records in _gather(records_as_dicts(mine)) for r in records_from_dicts(rank_records)]
        meta = {
            "engine": reshard.DEEPSPEED, "step": step, "consumed_samples": consumed_samples,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "layout": self._layout_meta(), "params": self.splits, "model": self.model_meta,
            "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__},
        }
        final = _agree(lambda: publish(save_dir, tag, records, meta, self.fault))
        self.last_save = {"seconds": time.perf_counter() - start, "bytes": sum(r.size for r in mine)}
        return final

    # ------------------------------------------------------------- load

    def load(self, load_dir: str | Path, allow_empty: bool = False, load_rng: bool = True) -> Optional[Resumed]:
        """Verify and load the newest checkpoint in ``load_dir``; None when there is none and ``allow_empty``.

        Every file is checked against the manifest (each rank hashes a share)
        before anything is read; the run state is untouched if any check fails.
        """
        found = open_verified(load_dir, allow_empty)
        if found is None:
            return None
        ckpt, manifest = found
        reshard.check_engine(manifest, reshard.DEEPSPEED, ckpt)
        saved = manifest["layout"]
        now = self._layout_meta()
        reshard.check_shape(saved, now, manifest.get("model"), self.model_meta)  # before any file is read
        plan = reshard.plan(saved, now)  # raises CheckpointError for a pair that cannot work
        source = ckpt
        if plan.universal and getattr(self.engine, "zero_nvme_offload_optimizer", lambda: False)():
            raise CheckpointError(f"{ckpt} was saved as {saved['world']} ranks (tp {saved['tp']}, dp {saved['dp']}, "
                                  f"ZeRO-{saved['zero_stage']}); DeepSpeed's nvme optimizer offload loads only the "
                                  "layout it saved (it copies each rank's swap files back)",
                                  f"resume with that layout, or with offload_optimizer.device cpu / none; or "
                                  f"{reshard.WEIGHTS_ONLY_FIX}")
        if plan.universal:
            source = _agree(lambda: reshard.universal_copy(ckpt, manifest))
            self.engine._config.load_universal_checkpoint = True
        hints = _zero3_tp_hints(self.engine.module, self.layout.tp) if plan.universal and self.zero_stage == 3 \
            else contextlib.nullcontext()
        from zeromega.plugins.zero import resume as nvme_resume

        try:
            with weights_only_loads(), hints, nvme_resume.restoring(self.engine, str(source.parent), source.name):
                path, _ = self.engine.load_checkpoint(str(source.parent), tag=source.name,
                                                      load_optimizer_states=True, load_lr_scheduler_states=False)
        except nvme_resume.MissingZeroFiles as err:
            raise CheckpointError(err.problem, err.fix) from None
        finally:
            self.engine._config.load_universal_checkpoint = False
        if plan.universal:
            _unshare_step_counters(self.engine.optimizer)
        if path is None:
            raise CheckpointError(f"DeepSpeed found no model states in {source}", "load another checkpoint")
        if self.scheduler is not None and manifest.get("scheduler") is not None:
            self.scheduler.load_state_dict(manifest["scheduler"])
        restored = False
        rng_file = ckpt / RNG_FILE.format(_rank())
        if load_rng and not plan.resharded and rng_file.is_file():
            rng.restore(safe_load(rng_file))
            restored = True
        _barrier()
        return Resumed(step=int(manifest["step"]), consumed_samples=int(manifest["consumed_samples"]), path=ckpt,
                       resharded=plan.resharded, rng_restored=restored)
