"""One consolidated fp32 file from a checkpoint of any supported layout, readable without zeromega.

The weights come whole: ZeRO partitions gathered and tp shards merged.
Under ZeRO 1-3 they are the optimizer's fp32 master weights, taken from
DeepSpeed's universal form of the checkpoint (so a bf16 run exports fp32);
under ZeRO-0 they are the model's own weights, merged across tp ranks along
each parameter's recorded ``partition_dim``. Checkpoints of Megatron-Core's
engine (pp > 1, MoE) hold torch.distributed.checkpoint files with every
tensor under its global shape, read in this one process, no process group;
their values are the optimizer's fp32 masters, stored beside each model
tensor under the same shape (``optimizer.state.param.<key>``, the
distributed optimizer's ``fully_reshardable`` form; ``optimizer.state.fp32_param.<key>``
for a bf16/fp16 ZeRO-0 run), so a bf16 run exports what its optimizer
steps, as on DeepSpeed's engine. The model weights themselves, widened to
fp32, only when the checkpoint has no usable masters: an fp32 ZeRO-0 run
(none kept: the weights are fp32), or masters that do not round to the
weights saved beside them (see :func:`megatron_weights`).

Which values were written is printed (stderr) and recorded in the file's
``__metadata__["weights"]``: ``"fp32 optimizer masters ..."`` or
``"model weights (DTYPE, as fp32): WHY"``.

Output is a `safetensors <https://github.com/huggingface/safetensors>`_ file,
written here in a few lines (the format is an 8-byte header length, a JSON
header, then raw little-endian tensors), so no extra dependency is needed to
write it and any safetensors reader can load it.

Names (``--to torch``): Megatron-Core's GPTModel state-dict names, e.g.
``embedding.word_embeddings.weight`` [padded vocab, h],
``decoder.layers.N.self_attention.linear_qkv.weight`` [3h, h] (per head: q, k, v),
``decoder.layers.N.mlp.linear_fc1.weight`` [ffn, h], and for MoE layers
``decoder.layers.N.mlp.router.weight`` [experts, h] and
``decoder.layers.N.mlp.experts.local_experts.E.linear_fc1.weight`` (E global); ``load_state_dict(...,
strict=False)`` into a 1-process GPTModel of the same shape (only the
``_extra_state`` entries are absent).

Names (``--to hf``): Hugging Face GPT-2's (``transformer.wte.weight``,
``transformer.h.N.attn.c_attn.weight`` [h, 3h] as Conv1D, q|k|v blocks, ...)
plus ``config.json``; for the learned-absolute, multi-head-attention, GELU
GPT that ``examples/pretrain_gpt.py`` builds. The vocabulary keeps its
padding (``vocab_size`` in config.json is the padded size). MoE models have
no GPT-2 form and are refused.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import struct
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

from . import find_latest
from .files import (CheckpointError, dist_checkpoint_loads, read_manifest, safe_load, verify_files,
                    write_text_atomic)
from .reshard import convert

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
           torch.int32: "I32", torch.uint8: "U8"}
_TORCH = {v: k for k, v in _DTYPES.items()}


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: Optional[dict] = None) -> None:
    """Write ``tensors`` as one safetensors file (atomically: temporary name, then rename)."""
    header, offset, blobs = {}, 0, []
    for name, tensor in tensors.items():
        data = tensor.detach().contiguous().cpu()
        raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
        header[name] = {"dtype": _DTYPES[data.dtype], "shape": list(data.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the reference writer does
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in blobs:
            f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (strings; empty when it has none)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)).get("__metadata__", {})


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file (the inverse of :func:`save_safetensors`; no pickle involved)."""
    blob = Path(path).read_bytes()
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + size])
    header.pop("__metadata__", None)
    base = 8 + size
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        data = bytearray(blob[base + begin:base + end])
        out[name] = torch.frombuffer(data, dtype=_TORCH[info["dtype"]]).reshape(info["shape"]) if data else \
            torch.empty(info["shape"], dtype=_TORCH[info["dtype"]])
    return out


# ----------------------------------------------------------------- consolidation


def _tp_rank_of(path: Path) -> int:
    return int(re.search(r"mp_rank_(\d+)", path.name).group(1))


def _merge_module_states(ckpt: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """ZeRO-0: each tp rank's module state dict, concatenated along each parameter's partition_dim."""
    files = sorted(ckpt.glob("mp_rank_*_model_states.pt"), key=_tp_rank_of)
    shards = [safe_load(f)["module"] for f in files]
    out = {}
    for name, split in manifest["params"].items():
        parts = [s[name].float() for s in shards]
        if split.get("gated_halves"):  # --swiglu's fc1: each rank holds [gate_r; up_r]; whole is [gate; up]
            dim = split["partition_dim"]
            halves = [part.chunk(2, dim) for part in parts]
            out[name] = torch.cat([torch.cat([h[i] for h in halves], dim) for i in (0, 1)], dim)
        else:
            out[name] = torch.cat(parts, dim=split["partition_dim"]) if "partition_dim" in split else parts[0]
    return out


def _universal_weights(ckpt: Path, manifest: dict, scratch: Path) -> dict[str, torch.Tensor]:
    """ZeRO 1-3: the fp32 master weights from DeepSpeed's universal conversion."""
    out_dir = scratch / "universal"
    convert(ckpt, out_dir, manifest)
    return universal_folder_weights(out_dir, manifest)


def universal_folder_weights(out_dir: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """The whole fp32 master weights in a universal folder of the checkpoint ``manifest`` describes."""
    tp = manifest["layout"]["tp"]
    weights = {}
    for name, split in manifest["params"].items():
        shape = list(split["shape"])
        if "partition_dim" in split:
            shape[split["partition_dim"]] *= tp
        stored = safe_load(out_dir / "zero" / name / "fp32.pt")
        tensor = stored["param"] if isinstance(stored, dict) else stored  # ZeRO-3 stores the bare tensor
        weights[name] = tensor.float().reshape(shape)
    return weights


# ----------------------------------------------------------------- Megatron-Core's dist checkpoints
#
# Megatron's sharded keys differ from a module's state-dict names in three ways
# (measured, Megatron-Core 0.16.1, local layer spec):
# - ``decoder.layers.X`` stacks every layer along a leading axis [layers, ...]
#   (each stage writes its layers at their global numbers);
# - ``decoder.layers.mlp.experts.experts.Y`` adds an expert axis after it
#   [layers, experts, ...] for SequentialMLP's ``local_experts.E.Y``;
# - the local spec saves its layer norms under TransformerEngine's fused names.
# With ``non_homogeneous_layers`` Megatron writes ``decoder.layers.N.X`` instead,
# without the layer axis; both are read.

_LAYERS = "decoder.layers."
_EXPERTS = ".mlp.experts.experts."
_FUSED_NORMS = {"self_attention.linear_qkv.layer_norm_": "input_layernorm.",
                "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm."}


def _unfused(name: str) -> str:
    for fused, local in _FUSED_NORMS.items():
        name = name.replace("." + fused, "." + local)
    return name


def _stacked_axes(key: str) -> int:
    """How many leading axes of Megatron's tensor ``key`` index layers and experts."""
    if not key.startswith(_LAYERS):
        return 0
    layer_axis = not key[len(_LAYERS):].split(".", 1)[0].isdigit()
    return int(layer_axis) + int(_EXPERTS in "." + key[len(_LAYERS):])


def _module_name(key: str, index: tuple[int, ...]) -> str:
    """Megatron's sharded ``key`` at stacked ``index`` -> the 1-process state-dict name."""
    rest = key[len(_LAYERS):]
    if len(index) and not rest.split(".", 1)[0].isdigit():
        rest, index = f"{index[0]}.{rest}", index[1:]
    if index:
        rest = rest.replace(_EXPERTS, f".mlp.experts.local_experts.{index[0]}.", 1)
    return _unfused(_LAYERS + rest)


def _stored_indices(chunks, axes: int) -> list[tuple[int, ...]]:
    """The (layer, expert) positions some rank wrote (layers of another kind leave gaps)."""
    found = set()
    for chunk in chunks:
        found.update(itertools.product(*(range(o, o + n) for o, n in zip(chunk.offsets[:axes], chunk.sizes[:axes]))))
    return sorted(found)


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# The fp32 master of model tensor K, as Megatron-Core's optimizers save it (same global shape and chunks):
# the distributed optimizer's fully_reshardable ``optimizer.state.param.K`` (ZeRO 1+), the plain
# mixed-precision optimizer's ``optimizer.state.fp32_param.K`` (ZeRO-0 bf16/fp16); ``chained_N.`` in front
# when a chain of optimizers (MoE) saved without ``chained_optim_avoid_prefix``. An fp32 ZeRO-0 run's
# optimizer keeps no master: its model weights are the fp32 weights.
_MASTER = re.compile(r"(?:chained_\d+\.)?optimizer\.state\.(?:param|fp32_param)\.(.+)")
_OPTIMIZER = re.compile(r"(?:chained_\d+\.)?optimizer\.")
MASTERS = "fp32 optimizer masters"


def _chunk_set(meta) -> list[tuple]:
    return sorted((tuple(c.offsets), tuple(c.sizes)) for c in meta.chunks)


def master_keys(model: dict, stored: dict) -> tuple[dict[str, str], list[str]]:
    """(model key -> its master's key, why the other model keys have none) from a checkpoint's
    ``state_dict_metadata``; a master counts only when it covers what the model tensor covers."""
    found: dict[str, list[str]] = {}
    for key in stored:
        match = _MASTER.fullmatch(key)
        if match and match.group(1) in model:
            found.setdefault(match.group(1), []).append(key)
    keys, missing = {}, []
    for key, meta in model.items():
        candidates = found.get(key, [])
        if len(candidates) != 1:
            missing.append(f"{key}: {len(candidates)} masters {candidates[:2]}" if candidates else f"{key}: no master")
        elif stored[candidates[0]].size != meta.size or _chunk_set(stored[candidates[0]]) != _chunk_set(meta):
            missing.append(f"{key}: its master {candidates[0]} is stored with another shape or chunks")
        else:
            keys[key] = candidates[0]
    return keys, missing


def masters_off_weights(weights: dict[str, torch.Tensor], masters: dict[str, torch.Tensor]) -> list[str]:
    """Model keys whose master, rounded to the model's dtype, is not the model weight saved beside it.

    After every optimizer step the model weight is its master so rounded
    (Megatron copies masters into the model), and zeromega refuses to save
    masters that are not; a checkpoint written before the fix for
    Megatron-Core 0.16.1's misplaced bucket offsets
    (:mod:`zeromega.checkpoint.megatron`) fails this check.
    """
    return [f"{key} ({why})" for key, master in masters.items()
            if (why := master_off_weight(master, weights[key])) is not None]


def master_off_weight(master: torch.Tensor, weight: torch.Tensor) -> Optional[str]:
    """None when ``master`` rounded to the weight's dtype is ``weight``; else how far apart they are."""
    if torch.equal(master.to(weight.dtype), weight):
        return None
    return f"max difference {(master.float() - weight.float()).abs().max().item():.3g}"


def _unstacked(tensors: dict[str, torch.Tensor], model: dict) -> dict[str, torch.Tensor]:
    """Megatron's sharded keys -> 1-process names, stacked layers and experts split, as fp32."""
    weights = {}
    for key, tensor in tensors.items():
        axes = _stacked_axes(key)
        if not axes:
            weights[_unfused(key)] = tensor.float()
            continue
        for index in _stored_indices(model[key].chunks, axes):
            weights[_module_name(key, index)] = tensor[index].float().clone()
    return weights


def megatron_weights(ckpt: Path) -> tuple[dict[str, torch.Tensor], str]:
    """(name -> fp32 tensor, where the values came from) for a Megatron-Core torch_dist checkpoint, read
    without a process group; pickles only through :func:`~zeromega.checkpoint.files.dist_checkpoint_loads`.

    The values are the optimizer's fp32 masters when every model tensor has
    one that rounds to the model weight saved beside it (:func:`master_keys`,
    :func:`masters_off_weights`), as the DeepSpeed-engine export does: a bf16
    run exports the weights its optimizer steps, not their bf16 rounding.
    Otherwise the model's own weights, widened to fp32 (an fp32 ZeRO-0 run
    keeps no masters; its weights are fp32 already), and the second value says why.
    """
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(ckpt))
    try:
        with dist_checkpoint_loads():
            stored = {key: meta for key, meta in reader.read_metadata().state_dict_metadata.items()
                      if isinstance(meta, TensorStorageMetadata)}
            model = {key: meta for key, meta in stored.items() if not _OPTIMIZER.match(key)}
            masters, missing = master_keys(model, stored)
            wanted = [*model, *masters.values()]
            tensors = {key: torch.zeros(stored[key].size, dtype=stored[key].properties.dtype) for key in wanted}
            load(tensors, storage_reader=reader, no_dist=True)
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"{ckpt}: torch.distributed.checkpoint could not read the model tensors "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:300]})",
                              "verify the checkpoint (manifest.json) or export another one") from None
    if not model:
        raise CheckpointError(f"{ckpt}: the dist checkpoint holds no model tensors", "export another checkpoint")
    own = {key: tensors[key] for key in model}
    dtypes = "/".join(sorted({str(t.dtype).replace("torch.", "") for t in own.values()}))
    if not masters:
        source = f"model weights ({dtypes}, as fp32): the checkpoint holds no fp32 optimizer masters"
    elif missing:
        source = (f"model weights ({dtypes}, as fp32): {len(missing)} of {len(model)} tensors have no usable "
                  f"fp32 master, e.g. {'; '.join(missing[:2])}")
    elif off := masters_off_weights(own, {key: tensors[master] for key, master in masters.items()}):
        source = (f"model weights ({dtypes}, as fp32): the fp32 masters of {len(off)} tensors do not round to "
                  f"their saved weights (a checkpoint written before the fix for Megatron-Core's misplaced "
                  f"bucket offsets?), e.g. {'; '.join(off[:2])}")
    else:
        source = f"{MASTERS} (model weights are {dtypes})"
        own = {key: tensors[master] for key, master in masters.items()}
    weights = _unstacked(own, model)
    return {name: weights[name] for name in sorted(weights, key=_natural)}, source


def consolidated_weights(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(name -> whole fp32 tensor, manifest, where the values came from) for a verified checkpoint directory."""
    manifest = read_manifest(ckpt)
    problems = verify_files(ckpt, manifest)
    if problems:
        raise CheckpointError(f"checkpoint {ckpt} failed verification: {problems[0]}", "export another checkpoint")
    weights, source = checkpoint_weights(ckpt, manifest)
    return weights, manifest, source


def checkpoint_weights(ckpt: Path, manifest: dict, universal_folder: Optional[Callable[[], Path]] = None,
                       ) -> tuple[dict[str, torch.Tensor], str]:
    """(name -> whole fp32 tensor, where the values came from) of a checkpoint already verified against
    ``manifest``. ZeRO-1..3 weights come from DeepSpeed's universal form: ``universal_folder()`` when
    given (a cached one), else a conversion into a scratch folder."""
    layout = manifest["layout"]
    engine = manifest.get("engine", "deepspeed")
    if engine == "megatron-core":
        return megatron_weights(ckpt)
    if engine != "deepspeed":
        raise CheckpointError(f"{ckpt}: saved by an unknown engine {engine!r}",
                              "export it with the zeromega version that wrote it")
    if layout["pp"] > 1 or layout["ep"] > 1:
        raise CheckpointError(f"{ckpt}: pipeline/expert parallel checkpoints cannot be exported yet",
                              "export a checkpoint of a pp1 ep1 run")
    if layout["zero_stage"] == 0:
        return (_merge_module_states(ckpt, manifest),
                f"model weights ({layout.get('precision', 'fp32')}, as fp32): ZeRO-0 exports its module states")
    source = f"{MASTERS} (DeepSpeed's universal form)"
    if universal_folder is not None:
        return universal_folder_weights(universal_folder(), manifest), source
    with tempfile.TemporaryDirectory(prefix="zeromega-export-") as scratch:
        return _universal_weights(ckpt, manifest, Path(scratch)), source


def to_hf_gpt2(weights: dict[str, torch.Tensor], heads: int) -> dict[str, torch.Tensor]:
    """Megatron-Core GPT names and layouts -> Hugging Face GPT-2's (Conv1D weights are [in, out])."""
    out = {}
    unknown = []
    for name, w in weights.items():
        if name == "embedding.word_embeddings.weight":
            out["transformer.wte.weight"] = w
        elif name == "embedding.position_embeddings.weight":
            out["transformer.wpe.weight"] = w
        elif name.startswith("decoder.final_layernorm."):
            out["transformer.ln_f." + name.rsplit(".", 1)[1]] = w
        elif name == "output_layer.weight":
            out["lm_head.weight"] = w
        elif m := re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name):
            layer, module, kind = m.groups()
            prefix = f"transformer.h.{layer}."
            if module == "self_attention.linear_qkv":
                # Megatron keeps [q_i, k_i, v_i] per head i; GPT-2 keeps [q_all, k_all, v_all].
                rest = w.shape[1:]
                w = w.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(-1, *rest)
            simple = {"input_layernorm": "ln_1", "pre_mlp_layernorm": "ln_2", "self_attention.linear_qkv": "attn.c_attn",
                      "self_attention.linear_proj": "attn.c_proj", "mlp.linear_fc1": "mlp.c_fc",
                      "mlp.linear_fc2": "mlp.c_proj"}
            if module not in simple:
                unknown.append(name)
                continue
            if kind == "weight" and w.ndim == 2:
                w = w.t()  # nn.Linear [out, in] -> Conv1D [in, out]
            out[prefix + simple[module] + "." + kind] = w.contiguous()
        else:
            unknown.append(name)
    if unknown:
        raise CheckpointError(f"no GPT-2 name for {unknown[:3]}", "export with --to torch (Megatron-Core names)")
    return out


def hf_config(weights: dict[str, torch.Tensor], heads: int) -> dict:
    vocab, hidden = weights["embedding.word_embeddings.weight"].shape
    layers = 1 + max(int(m.group(1)) for n in weights if (m := re.match(r"decoder\.layers\.(\d+)\.", n)))
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab,
            "n_positions": weights["embedding.position_embeddings.weight"].shape[0], "n_embd": hidden,
            "n_layer": layers, "n_head": heads, "n_inner": weights["decoder.layers.0.mlp.linear_fc1.weight"].shape[0],
            "activation_function": "gelu", "layer_norm_epsilon": 1e-5, "tie_word_embeddings":
            "output_layer.weight" not in weights, "torch_dtype": "float32"}


def export(source: str | Path, out: str | Path, to: str = "torch", heads: Optional[int] = None) -> Path:
    """Write ``source`` (a checkpoint, or a --save directory: its latest) as one safetensors file.

    ``to='torch'``: ``out`` is the file. ``to='hf'``: ``out`` is a directory that gets
    ``model.safetensors`` and ``config.json``; ``heads`` (attention heads) is needed to
    reorder the fused qkv weight. Which values were written (fp32 optimizer masters, or the
    model's weights and why) goes to stderr and into the file's ``__metadata__["weights"]``.
    """
    source = Path(source)
    if not source.is_dir():
        raise CheckpointError(f"{source}: no such checkpoint directory", "pass a --save directory or a checkpoint in it")
    ckpt = find_latest(source)
    if ckpt is None:
        raise CheckpointError(f"{source}: no 'latest' file and no manifest.json", "pass a --save directory of a run")
    weights, manifest, values = consolidated_weights(ckpt)
    meta = {"format": "zeromega-export/1", "source": str(ckpt), "step": manifest["step"],
            "names": "megatron-core" if to == "torch" else "hf-gpt2", "weights": values}
    print(f"zeromega export: {ckpt.name}: {values}", file=sys.stderr)
    out = Path(out)
    if to == "torch":
        out.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(weights, out, meta)
        return out
    if to != "hf":
        raise CheckpointError(f"--to {to!r} is not a known format", "use --to torch or --to hf")
    heads = heads or (manifest.get("model") or {}).get("num_attention_heads")
    if heads is None:
        raise CheckpointError("--to hf needs the number of attention heads", "pass --num-attention-heads N")
    if any(".mlp.router." in name or ".mlp.experts." in name for name in weights):
        raise CheckpointError("GPT-2 has no mixture-of-experts layers; this model routes to experts",
                              "export with --to torch (Megatron-Core names)")
    if "embedding.position_embeddings.weight" not in weights:
        raise CheckpointError("GPT-2 needs learned absolute position embeddings; this model has none (rope?)",
                              "export with --to torch")
    hidden = weights["embedding.word_embeddings.weight"].shape[1]
    if weights["decoder.layers.0.self_attention.linear_qkv.weight"].shape[0] != 3 * hidden:
        raise CheckpointError("GPT-2 has no grouped-query attention", "export with --to torch")
    fc1, fc2 = weights["decoder.layers.0.mlp.linear_fc1.weight"], weights["decoder.layers.0.mlp.linear_fc2.weight"]
    if fc1.shape[0] != fc2.shape[1]:
        raise CheckpointError("GPT-2's MLP is not gated; this model's fc1 is a fused gate/up pair (--swiglu)",
                              "export with --to torch")
    if "decoder.final_layernorm.bias" not in weights:
        raise CheckpointError("GPT-2 uses LayerNorm with a bias; this model's norms have none (RMSNorm?)",
                              "export with --to torch")
    if "decoder.layers.0.self_attention.linear_qkv.bias" not in weights:
        raise CheckpointError("GPT-2's linear layers carry biases; this model has none (--disable-bias-linear)",
                              "export with --to torch")
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(to_hf_gpt2(weights, heads), out / "model.safetensors", meta)
    write_text_atomic(out / "config.json", json.dumps(hf_config(weights, heads), indent=1))
    return out
