"""Which layout changes a checkpoint survives, and the universal form that carries them.

A checkpoint saved under one layout loads natively under the same (tp, pp,
cp, ep, dp, ZeRO stage). Anything else goes through DeepSpeed's universal
checkpoint (``ds_to_universal``: every parameter's fp32 value and Adam
moments, whole, one folder per parameter), which the engine re-slices for
its own dp and tp ranks. The tp merge follows Megatron's own attributes
(``tensor_model_parallel``/``partition_dim``), recorded at save time; the
converter merges the tp slices of every ZeRO stage (ZeRO-3's too, checked
against the manifest by :func:`bridge_zero_families`).

Supported (measured with fp32, dropout off, 3 steps after the load; relative
loss difference to the unchanged run; tests/test_checkpoint.py runs the first two):

* ZeRO-2 dp2 -> ZeRO-1 dp1: 0.0 (bit for bit)
* ZeRO-1 tp2 -> ZeRO-1 tp1 dp2: 2.4e-8; tp2 -> tp1 dp1: 2.3e-8; tp1 -> tp2: 2.3e-8
* ZeRO-3 dp2 -> ZeRO-3 dp1: 0.0 (after :func:`zeromega.checkpoint._unshare_step_counters`;
  DeepSpeed alone drifts by 1.3e-3); ZeRO-3 tp2 dp1 -> tp2 dp2: 2.3e-8
* across families (:func:`bridge_zero_families`; ZeRO-3 targets sliced for tp by
  :func:`zeromega.checkpoint._zero3_tp_hints`): ZeRO-1 dp2 -> ZeRO-3 tp2: 2.3e-8 and
  ZeRO-3 dp2 -> ZeRO-1 tp2: 0.0 (tested); ZeRO-1 dp4 -> ZeRO-3 dp2: 2.3e-8;
  ZeRO-1 dp2 -> ZeRO-3 dp1: 2.3e-8; ZeRO-1 tp2 -> ZeRO-3 dp2: 4.5e-8;
  ZeRO-1 tp2 -> ZeRO-3 tp2: 0.0; ZeRO-3 dp2 -> ZeRO-2 dp1: 0.0
* ZeRO-3 at tp > 1 into another tp or ZeRO stage: ZeRO-3 tp2 -> ZeRO-1 tp1: 4.5e-8
  (tested); -> ZeRO-3 tp1: 4.5e-8; -> ZeRO-3 tp1 dp2: 4.5e-8; -> ZeRO-2 dp2: 4.5e-8;
  -> ZeRO-1 tp2: 0.0; -> ZeRO-1 tp2 dp2: 2.4e-8; -> ZeRO-3 tp4: 6.8e-8; -> ZeRO-2 tp4: 6.8e-8;
  ZeRO-3 tp2 dp2 -> ZeRO-1 tp1: 2.4e-8

* ZeRO-0 at the same tp, another dp: loaded natively (ZeRO-0 keeps the whole
  optimizer state in every tp rank's model-state file): dp2 -> dp1: 2.3e-8
  (tested); tp2 dp1 -> tp2 dp2: 2.4e-8

Refused, with the reason: ZeRO-0 with a tp change or into ZeRO-1/2/3 and the
reverse (no ZeRO partition files to convert), and pp/ep changes on
DeepSpeed's engine (it runs pp1 ep1 only).

Megatron-Core's engine (pp > 1 or MoE; ``zeromega.checkpoint.megatron``)
saves Megatron's dist checkpoint: every tensor under its global name (layers
and experts numbered as in one process) and the distributed optimizer's
state in model-parameter space ("fully_reshardable"), so Megatron-Core
itself re-slices it for another tp / pp / vpp / ep / dp (:func:`plan_megatron`).
Measured (fp32, dropout off, distributed optimizer, the 2 steps after the
load; relative loss difference to the unchanged run; tests/test_checkpoint_megatron.py
runs the first two and tp2 pp2 -> tp1 pp2):

* pp2 -> pp1: 2.3e-8; ep2 -> ep1 (MoE, 4 experts): 0.0
* ep1 -> ep2: 0.0; pp2 dp2 -> pp2 dp1: 0.0; pp2 dp1 -> pp2 dp2: 2.3e-8;
  pp2 -> pp2 with 2 virtual stages: 0.0; pp2 -> pp1 of a MoE model: 2.3e-8
* tp2 pp2 -> tp1 pp2: 0.0 (tested); tp2 pp2 -> tp1 pp4: 0.0; tp1 pp2 -> tp2 pp2: 2.3e-8;
  tp2 (sequence parallel) -> tp1 of a MoE model (4 experts): 4.4e-8
* ZeRO-0 (Megatron's plain optimizer, whose state Megatron also keys by each
  parameter's global name): pp2 -> pp1 6.8e-8 (tested); tp2 pp2 -> tp1 pp2
  6.8e-8; pp2 -> pp2 dp2 4.6e-8; pp2 dp2 -> pp1 4.6e-8; pp2 -> 2 virtual
  stages 0.0; bf16 pp2 -> pp1 2.6e-5
* the optimizer switched, dense models (Adam's moments have the same keys in
  both; the masters are ``optimizer.state.param.K`` in the distributed
  optimizer, ``optimizer.state.fp32_param.K`` or, in fp32, the weights ``K``
  in the plain one: :func:`zeromega.checkpoint.megatron._retarget_masters`):
  ZeRO-0 pp2 -> ZeRO-1 pp1 dp2 0.0 and ZeRO-1 pp2 -> ZeRO-0 pp2 0.0 (tested);
  ZeRO-0 -> ZeRO-1 pp2 0.0; ZeRO-1 pp2 dp2 -> ZeRO-0 pp2 4.6e-8; bf16 both
  ways 0.0

Refused there: the optimizer switched for a MoE model (one optimizer per
parameter kind), an ep change under ZeRO-0 (measured: "Expected 2 entries in
state dict, but got 4"), another precision, another model shape. A checkpoint of one engine never loads into
the other (:func:`check_engine`): their files differ.

The model shape is checked on both engines (:func:`check_shape`) before any file is
read, the vocabulary by its padded size at each side's tp: zeromega's own dialect pads
to lcm(multiple, tp), one size at every tp that divides the multiple; Megatron-LM's
flags pad to --make-vocab-size-divisible-by x tp, which changes with tp (as in
Megatron-LM, whose check_checkpoint_args compares padded_vocab_size). A tp change that
changes the padded vocabulary is refused with the flag value that keeps it (before,
DeepSpeed's universal load stopped in every rank on the embedding's numel).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .files import CheckpointError, safe_load, weights_only_loads, write_text_atomic

UNIVERSAL_DIR = ".universal"
WEIGHTS_ONLY_FIX = "load the weights alone into this layout (--no-load-optim: Adam restarts; --finetune: step 0 too)"
UNIVERSAL_FORMAT = 3  # 2: model-state files named for both ZeRO families; 3: ZeRO-3 tp > 1 sources get step.pt
SUPPORTED = ("same layout; from ZeRO-1, 2 or 3 at any tp to ZeRO-1, 2 or 3 with any dp and tp size, "
             "at pp 1 without experts; ZeRO-0 to ZeRO-0 at the same tp with any dp size")


@dataclass(frozen=True)
class Plan:
    universal: bool
    """Load through DeepSpeed's universal checkpoint (the layout changed)."""
    resharded: bool = False
    """The layout changed (RNG states belong to the saved ranks and are not restored)."""


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
                               f"resume with the saved layout ({describe(saved)}), change only what is supported, "
                               f"or {WEIGHTS_ONLY_FIX}")

    if saved["pp"] != now["pp"] or saved["ep"] != now["ep"] or saved["pp"] > 1 or saved["ep"] > 1:
        raise refuse("resharding pipeline or expert parallel layouts is not supported yet")
    if saved["zero_stage"] == now["zero_stage"] == 0 and saved["tp"] == now["tp"]:
        return Plan(universal=False, resharded=True)  # every tp rank's file holds the whole optimizer state
    if 0 in (saved["zero_stage"], now["zero_stage"]):
        raise refuse("ZeRO-0 has no ZeRO partition files for DeepSpeed's universal checkpoint, so it moves "
                     "only to ZeRO-0 at the same tp")
    return Plan(universal=True, resharded=True)


def universal_copy(ckpt: Path, manifest: dict) -> Path:
    """Rank 0: DeepSpeed's universal form of ``ckpt`` (made once, cached next to it, checked by size)."""
    root = ckpt.parent / UNIVERSAL_DIR
    final = root / ckpt.name
    sizes = final / "sizes.json"
    if sizes.is_file() and _matches(final, sizes):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{ckpt.name}.tmp-{uuid.uuid4().hex[:8]}"
    convert(ckpt, tmp, manifest)
    try:
        bridge_zero_families(tmp, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    import json

    files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in tmp.rglob("*") if p.is_file()}
    write_text_atomic(tmp / "sizes.json", json.dumps({"format": UNIVERSAL_FORMAT, "source_sha256": _source_id(manifest),
                                                      "files": files}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def bridge_zero_families(folder: Path, manifest: dict) -> None:
    """Make a universal folder loadable by both ZeRO families, whichever one saved it.

    The weights and Adam moments sit in ``zero/<parameter>/``, whole, the same
    for every stage; a universal load reads only metadata besides. What kept
    ZeRO-1/2 and ZeRO-3 apart is where DeepSpeed 0.19 looks for that metadata:

    * the model-state file, globbed by the *loading* stage's name
      (``mp_rank_XX_model_states.pt`` for ZeRO-1/2, ``zero_pp_rank_0_mp_rank_XX_...``
      for ZeRO-3): hard links give it both names;
    * ``zero/optimizer_state.pt``: ZeRO-3 takes Adam's step and hyper-parameters
      from its ``optimizer_state_dict``, ZeRO-1/2 insists on a ``ds_version``;
      each is added from what the other family wrote (the step from the
      per-parameter ``step.pt``, equal for every parameter);
    * the per-parameter files: ZeRO-1/2 reads ``{"param": tensor in its shape,
      "cat_dim": tp split}`` and a ``step.pt``; ZeRO-3 sources have no step
      (their one step is written per parameter) and, at tp 1, a flat tensor
      (shaped and split from the manifest); at tp > 1 DeepSpeed has merged
      their tp slices already, which is checked against the manifest
      (:func:`_zero3_per_parameter_states`).
    """
    import deepspeed

    zero3_prefix = "zero_pp_rank_0_"
    twins = [(path, folder / (zero3_prefix + path.name)) for path in folder.glob("mp_rank_*_model_states.pt")]
    twins += [(path, folder / path.name[len(zero3_prefix):])
              for path in folder.glob(zero3_prefix + "mp_rank_*_model_states.pt")]
    for path, twin in twins:
        if not twin.exists():
            os.link(path, twin)

    state_file = folder / "zero" / "optimizer_state.pt"
    state = safe_load(state_file)
    changed = False
    if "optimizer_state_dict" not in state:  # saved by ZeRO-1/2
        step = safe_load(next((folder / "zero").glob("*/step.pt")))
        state["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": state["param_groups"]}
        changed = True
    if "ds_version" not in state:  # saved by ZeRO-3
        state["ds_version"] = deepspeed.__version__
        changed = True
        step = _zero3_step(state)
        for name, split in manifest["params"].items():
            _zero3_per_parameter_states(folder / "zero" / name, name, split, manifest["layout"]["tp"], step)
    if changed:
        torch.save(state, state_file)


UNIVERSAL_STATES = ("fp32", "exp_avg", "exp_avg_sq")  # per parameter: master weight, both Adam moments


def _zero3_step(state: dict) -> torch.Tensor:
    """Adam's step from a ZeRO-3 universal ``optimizer_state.pt`` (one entry per sub-group, all equal)."""
    steps = {float(sub["step"]) for sub in state["optimizer_state_dict"]["state"].values()}
    if len(steps) != 1:
        raise CheckpointError(f"the ZeRO-3 checkpoint's optimizer sub-groups disagree on Adam's step ({sorted(steps)})",
                              "resume with the layout the checkpoint was saved with")
    return state["optimizer_state_dict"]["state"][0]["step"]


def _zero3_per_parameter_states(param_dir: Path, name: str, split: dict, tp: int, step: torch.Tensor) -> None:
    """Bring one parameter's ZeRO-3 universal states into the per-parameter form ZeRO-1/2 reads
    (``{"param": whole tensor, "cat_dim": tp split}`` and a ``step.pt``), checked against the manifest.

    ``ds_to_universal`` gathers the dp partitions of each tp rank, and at tp > 1
    also concatenates the tp ranks' slices (its ``merge_tp_slices``, steered by
    the patterns :func:`zeromega.checkpoint.universal_info` derives from
    Megatron's ``partition_dim``), writing ``{"param", "cat_dim"}``; at tp 1 it
    writes a flat tensor. Here each state must hold the whole parameter: each
    rank's shape (the manifest's) with the partition dim times tp, concatenated
    along ``partition_dim``; anything else (a lone tp slice) is refused rather
    than loaded into the wrong places.
    """
    dim = split.get("partition_dim")
    whole = list(split["shape"])
    if dim is not None:
        whole[dim] *= tp
    for state_name in UNIVERSAL_STATES:
        path = param_dir / f"{state_name}.pt"
        if not path.is_file():
            raise CheckpointError(f"DeepSpeed's universal conversion wrote no {state_name} for {name}",
                                  "resume with the layout the checkpoint was saved with")
        value = safe_load(path)
        merged = isinstance(value, dict)  # tp > 1: {"param", "cat_dim"}; tp 1: one flat tensor
        tensor = value.get("param") if merged else value
        joined = value.get("cat_dim") if merged else dim
        if not isinstance(tensor, torch.Tensor):
            fits = False
        elif merged:
            fits = tuple(tensor.shape) == tuple(whole) and (dim is None or joined == dim)
        else:
            fits = tp == 1 and tensor.numel() == torch.Size(whole).numel()
        if not fits:
            got = (f"{list(tensor.shape)} joined along dim {joined}" if isinstance(tensor, torch.Tensor)
                   else f"a {type(value).__name__} without a tensor")
            raise CheckpointError(f"DeepSpeed's universal conversion gave {name} ({state_name}) as {got}, not the "
                                  f"whole parameter {whole} (tp {tp} slices of {split['shape']} joined along "
                                  f"dim {dim})", "resume with the layout the checkpoint was saved with")
        if not merged:
            entry = {"param": tensor.detach().reshape(whole).clone()}
            if dim is not None:
                entry["cat_dim"] = dim
            if split.get("gated_halves"):  # what the converter writes for its 2-sub-params pattern
                from deepspeed.checkpoint.constants import PARAM_N_SUB_PARAMS

                entry[PARAM_N_SUB_PARAMS] = 2
            torch.save(entry, path)
    if not (param_dir / "step.pt").exists():
        torch.save(step.clone(), param_dir / "step.pt")


def _source_id(manifest: dict) -> str:
    import hashlib

    return hashlib.sha256("".join(f["sha256"] for f in manifest["files"].values()).encode()).hexdigest()


def _matches(folder: Path, sizes: Path) -> bool:
    import json

    try:
        recorded = json.loads(sizes.read_text())
        files = recorded["files"]
    except (OSError, ValueError, KeyError):
        return False
    if recorded.get("format") != UNIVERSAL_FORMAT:
        return False
    return all((folder / rel).is_file() and (folder / rel).stat().st_size == size for rel, size in files.items())


def _tensors_only_module(obj):
    """Megatron-Core modules put ``_extra_state`` entries (None) in their state dicts;
    ``ds_to_universal`` calls ``.float()`` on every module entry, so the converter sees tensors only."""
    if isinstance(obj, dict) and isinstance(obj.get("module"), dict):
        obj = dict(obj, module=type(obj["module"])((k, v) for k, v in obj["module"].items()
                                                   if isinstance(v, torch.Tensor)))
    return obj


OFFLOADED = "offloaded_tensors"
"""DeepSpeed's copy of each rank's nvme optimizer swap folder inside a checkpoint (``rankNN/``)."""


def _swap_file(folder: Path, name: str, numel: int) -> torch.Tensor:
    """The first ``numel`` fp32 values of a DeepSpeed swap file (raw, padded to the aio alignment)."""
    path = folder / name
    if not path.is_file() or path.stat().st_size < 4 * numel:
        have = path.stat().st_size if path.is_file() else "no"
        raise CheckpointError(f"{path}: {have} bytes, the optimizer partition needs {4 * numel}",
                              "load an older checkpoint; this one's offloaded optimizer state is incomplete")
    return torch.from_file(str(path), shared=False, size=numel, dtype=torch.float32).clone()


def fill_offloaded(state: dict, param_shapes: list, rank_folder: Path, dp: int) -> int:
    """Put the nvme-offloaded sub-groups of one ZeRO-3 optimizer file (``state``, as DeepSpeed saved it) back
    in place from the swap files DeepSpeed copied into the checkpoint; returns how many were filled.

    Under ``offload_optimizer: nvme`` DeepSpeed saves each swapped sub-group's fp32 master weights and Adam
    moments as empty tensors; their values are the files ``A_B.tensor.swp``, ``exp_avg-A_B.tensor.swp`` and
    ``exp_avg_sq-A_B.tensor.swp`` in ``offloaded_tensors/rankNN`` (A, B: the sub-group's first and last
    parameter ids, so sorting by A gives the sub-groups' order). A sub-group holds ceil(numel / dp) values of
    each of its parameters (DeepSpeed's ZeRO-3 partition)."""
    from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT

    optim = state[OPTIMIZER_STATE_DICT]
    flats, states = optim[FP32_FLAT_GROUPS], optim["optimizer_state_dict"]["state"]
    empty = [i for i, flat in enumerate(flats) if flat.numel() == 0]
    if not empty:
        return 0
    ids = sorted((p.name[:-len(".tensor.swp")] for p in rank_folder.glob("*.tensor.swp")
                  if "-" not in p.name and "_gradient_" not in p.name and "_param." not in p.name),
                 key=lambda name: int(name.split("_")[0]))
    if len(ids) != len(empty):
        raise CheckpointError(f"{rank_folder}: {len(ids)} offloaded optimizer partitions for {len(empty)} "
                              "swapped sub-groups", "load an older checkpoint; this one is incomplete")
    for index, swap_id in zip(empty, ids):
        numel = sum(-(-_numel(shape) // dp) for shape in param_shapes[index].values())
        flats[index] = _swap_file(rank_folder, f"{swap_id}.tensor.swp", numel)
        for key, value in states.get(index, {}).items():
            if torch.is_tensor(value) and value.numel() == 0:
                states[index][key] = _swap_file(rank_folder, f"{key}-{swap_id}.tensor.swp", numel)
    return len(empty)


def _numel(shape) -> int:
    out = 1
    for size in shape:
        out *= int(size)
    return out


@contextlib.contextmanager
def _offload_filled(ckpt: Path, manifest: Optional[dict]):
    """``ckpt`` itself, or, when it holds ``offloaded_tensors/`` (ZeRO-3 with nvme optimizer offload), a
    scratch copy whose ZeRO files carry those values (:func:`fill_offloaded`); other files are hard links."""
    if not (ckpt / OFFLOADED).is_dir():
        yield ckpt
        return
    layout = (manifest or {}).get("layout") or {}
    tp, dp = int(layout.get("tp", 1)), int(layout.get("dp", 1))
    scratch = ckpt.parent / UNIVERSAL_DIR / f".{ckpt.name}.filled-{uuid.uuid4().hex[:8]}"
    scratch.mkdir(parents=True)
    try:
        model_files = sorted(ckpt.glob("*mp_rank_*_model_states.pt"))
        for path in ckpt.iterdir():
            if path.is_file() and not path.name.endswith("_optim_states.pt"):
                os.link(path, scratch / path.name)
        for path in sorted(ckpt.glob("*_optim_states.pt")):
            # zero_pp_rank_{dp}_mp_rank_{tp}_optim_states.pt (bf16_ prefixed under bf16)
            parts = path.name.split("_")
            dp_rank, tp_rank = int(parts[parts.index("pp") + 2]), int(parts[parts.index("mp") + 2])
            model = next(p for p in model_files if f"mp_rank_{tp_rank:02d}" in p.name)
            shapes = safe_load(model)["param_shapes"]
            state = safe_load(path)
            rank_folder = ckpt / OFFLOADED / f"rank{dp_rank * tp + tp_rank:02d}"
            fill_offloaded(state, shapes, rank_folder, dp)
            torch.save(state, scratch / path.name)
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def convert(ckpt: Path, out: Path, manifest: Optional[dict] = None) -> None:
    """Run DeepSpeed's ``ds_to_universal`` on ``ckpt`` into ``out`` with weights-only reads, quietly
    (nvme-offloaded optimizer state first put back into the ZeRO files: :func:`fill_offloaded`)."""
    from deepspeed.checkpoint import ds_to_universal

    chatter = io.StringIO()
    try:
        with _offload_filled(ckpt, manifest) as source, weights_only_loads(_tensors_only_module), \
                contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            args = argparse.Namespace(input_folder=str(source), output_folder=str(out), num_extract_workers=1,
                                      num_merge_workers=1, keep_temp_folder=False, strict=True,
                                      inject_missing_state=False)
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


# ----------------------------------------------------------------- Megatron-Core's engine

DEEPSPEED, MEGATRON = "deepspeed", "megatron-core"
ENGINES = {DEEPSPEED: "DeepSpeed's engine (pp 1, no experts)",
           MEGATRON: "Megatron-Core's engine (pp > 1 or --num-experts)"}
MEGATRON_SUPPORTED = ("same layout; with the distributed optimizer (ZeRO-1+), any change of tp, pp, "
                      "virtual stages, ep and dp with the same precision and model shape; with ZeRO-0 the same, "
                      "except ep; ZeRO-0 <-> ZeRO-1+ for dense models")
# The model-shape fields a checkpoint's tensors depend on (GPTShape names); dropout and the MoE
# routing knobs (capacity, aux loss, dispatcher) may change between runs.
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                "vocab_size", "position_embedding_type",
                "untie_embeddings_and_output_weights", "num_experts", "moe_ffn_hidden_size", "moe_router_topk",
                "swiglu", "normalization", "add_bias_linear", "kv_channels", "moe_layer_freq")
# Shape fields added later: a checkpoint written before them has the value they then had.
SHAPE_DEFAULTS = {"swiglu": False, "normalization": "LayerNorm", "add_bias_linear": True, "kv_channels": None,
                  "moe_layer_freq": 1}


def padded_vocabulary(shape: dict, tp: int) -> int:
    """The embedding's rows: the shape's vocabulary padded to lcm(its multiple, tp) (the model's rule)."""
    multiple = shape.get("make_vocab_size_divisible_by", 128)
    step = multiple * tp // math.gcd(multiple, tp)
    return -(-int(shape["vocab_size"]) // step) * step


def check_shape(saved: dict, now: dict, saved_shape: Optional[dict], now_shape: Optional[dict]) -> None:
    """Refuse a checkpoint of another model shape (``saved`` / ``now``: layout dicts; the shapes: GPTShape
    fields from the manifest, None or without a vocabulary for an own model): every field of
    ``SHAPE_FIELDS``, and the padded vocabulary at each side's tp."""
    if not saved_shape or not now_shape:
        return
    for key in SHAPE_FIELDS:
        was, now_value = (saved_shape.get(key, SHAPE_DEFAULTS.get(key)),
                          now_shape.get(key, SHAPE_DEFAULTS.get(key)))
        if was != now_value:
            raise CheckpointError(f"checkpoint's model has {key} = {was!r}, this run's has "
                                  f"{now_value!r}: the tensors do not fit",
                                  f"resume with the saved model shape ({key} = {was!r})")
    if saved_shape.get("vocab_size") is None:
        return  # an own model: no vocabulary of zeromega's
    was, padded = padded_vocabulary(saved_shape, saved["tp"]), padded_vocabulary(now_shape, now["tp"])
    if was == padded:
        return
    tp = now["tp"]
    keep = (f"keep {was} rows: at tp {tp} pass --make-vocab-size-divisible-by {was // tp} (Megatron-LM's flag, "
            f"x tp {tp} = {was}) or set model.make_vocab_size_divisible_by {was}" if was % tp == 0 else
            f"resume at the saved tp {saved['tp']} (tp {tp} does not divide the saved {was} rows)")
    raise CheckpointError(f"checkpoint's model has its vocabulary of {saved_shape['vocab_size']} padded to {was} "
                          f"(multiple {saved_shape.get('make_vocab_size_divisible_by', 128)} at tp {saved['tp']}), "
                          f"this run's to {padded} (multiple {now_shape.get('make_vocab_size_divisible_by', 128)} at "
                          f"tp {tp}): the embedding and output tensors do not fit", keep)


def check_engine(manifest: dict, engine: str, ckpt: Path) -> None:
    """Refuse a checkpoint another engine wrote (DeepSpeed's files vs Megatron's dist checkpoint)."""
    saved = manifest.get("engine", DEEPSPEED)  # checkpoints from before this field are DeepSpeed's
    if saved == engine:
        return
    layout = manifest.get("layout", {})
    where = f"at pp{layout.get('pp', '?')} ep{layout.get('ep', '?')}"
    if engine == DEEPSPEED:
        fix = ("resume it with examples/pretrain_gpt.py, which picks Megatron-Core's engine for it at any pp, "
               "or with --pipeline-model-parallel-size / --num-experts as saved")
    else:
        fix = "resume it with pp 1 and no --num-experts (DeepSpeed's engine)"
    raise CheckpointError(f"checkpoint {ckpt} was saved by {ENGINES.get(saved, saved)} {where}; this run uses "
                          f"{ENGINES[engine]}, which cannot read its files", f"{fix}, or {WEIGHTS_ONLY_FIX}")


def plan_megatron(saved: dict, now: dict, saved_shape: Optional[dict] = None,
                  now_shape: Optional[dict] = None) -> bool:
    """Whether loading a Megatron-Core-engine checkpoint saved under ``saved`` reshards it for
    ``now`` (layout dicts from the manifest); raises CheckpointError for a pair that cannot work."""

    def describe(layout: dict) -> str:
        vpp = f" vpp{layout['vpp']}" if (layout.get("vpp") or 1) > 1 else ""
        zero = "distributed optimizer" if layout["zero_stage"] >= 1 else "ZeRO-0"
        return (f"tp{layout['tp']} pp{layout['pp']}{vpp} ep{layout['ep']} dp{layout['dp'] * layout['cp']} "
                f"{zero} {layout['precision']}")

    def refuse(field: str, reason: str, fix: str) -> CheckpointError:
        return CheckpointError(f"checkpoint saved as {describe(saved)}, this run is {describe(now)}: {field} "
                               f"{saved.get(field)!r} -> {now.get(field)!r}: {reason}; supported: {MEGATRON_SUPPORTED}",
                               f"{fix}, or {WEIGHTS_ONLY_FIX}")

    moe = bool((saved_shape or {}).get("num_experts") or (now_shape or {}).get("num_experts"))
    if (saved["zero_stage"] >= 1) != (now["zero_stage"] >= 1) and moe:
        raise refuse("zero_stage", "between ZeRO-0 (Megatron's plain optimizer) and the distributed optimizer "
                     "(ZeRO-1+) only dense models' state is mapped (MoE runs chain one optimizer per "
                     "parameter kind)", f"resume with --zero-stage {saved['zero_stage']}")
    if saved["precision"] != now["precision"]:
        raise refuse("precision", "the optimizer state is kept per precision",
                     f"resume with the saved precision ({saved['precision']})")
    check_shape(saved, now, saved_shape, now_shape)
    same = (all(saved[k] == now[k] for k in ("tp", "pp", "ep", "cp", "dp"))
            and (saved.get("vpp") or 1) == (now.get("vpp") or 1))
    if saved["zero_stage"] == 0 and saved["ep"] != now["ep"]:
        raise refuse("ep", "Megatron's plain (ZeRO-0) optimizer state does not carry across an ep change (its "
                     "load expects another number of optimizer entries)", f"resume with --expert-model-parallel-size {saved['ep']}, or save "
                     "with --zero-stage 1")
    return not same
