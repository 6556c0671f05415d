"""What a user's own ``train.py`` needs to split one sequence over ranks (public as ``zeromega.*``).

Legend: ``b`` batch, ``s`` full sequence, ``s_l`` this rank's tokens,
``C`` ranks sharing a sequence (the sequence-parallel, i.e. context-parallel,
group), ``mode`` one of ``ulysses | ring | usp``.

- :func:`sequence_group`: the process group of the ranks that share a
  sequence (Megatron's context-parallel group, set up by ``zeromega.Run``
  from ``parallel.cp`` / ``sequence.mode``).
- :func:`shard_batch`: this rank's tokens of a full ``[b, s]`` batch in the
  layout the mode's attention reads (contiguous for Ulysses, zigzag for ring
  and USP), with the position ids of those tokens. Hugging Face batches
  (``input_ids`` / ``labels``) get ``shift_labels``: labels shifted before
  the split, since a model that shifts its own labels would pair a rank's
  last token with the next rank's first.
- :func:`cp_loss` (in :mod:`.megatron`): the loss over the sharded sequence,
  weighted so that the mean over the ranks is the one-process mean.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .layout import LAYOUTS, shard

MODES = ("ulysses", "ring", "usp")
LAYOUT_OF_MODE = {"ulysses": "contiguous", "ring": "zigzag", "usp": "zigzag"}
IGNORE_INDEX = -100
# keys split along the sequence (dim 1); everything else passes through unchanged
SEQUENCE_KEYS = ("input_ids", "tokens", "labels", "shift_labels", "loss_mask", "position_ids", "inputs_embeds")


def sequence_group():
    """The process group of the ranks that share one sequence (size 1 without sequence parallelism)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("sequence_group(): zeromega's parallel groups are not set up; fix: call it while "
                           "zeromega.Run trains (inside your model, batches or loss function) or after "
                           "zeromega.initialize(cfg)")
    return parallel_state.get_context_parallel_group()


def layout_of(mode: str) -> str:
    """The token layout ``mode``'s attention reads; a layout name is returned as it is."""
    if mode in LAYOUT_OF_MODE:
        return LAYOUT_OF_MODE[mode]
    if mode in ("contiguous", "zigzag", "stripe"):
        return mode
    raise ValueError(f"mode={mode!r}: unknown; fix: use one of {MODES} (or a layout: contiguous, zigzag, stripe)")


def shard_batch(batch: dict, mode: str, group=None) -> dict:
    """This rank's part of a full-sequence batch, in the layout ``mode`` needs.

    ``input_ids``/``tokens``, ``labels``, ``loss_mask``, ``position_ids``
    (and ``inputs_embeds``) are split along dim 1. Missing ``position_ids``
    are made (``0..s-1``) before the split: a model would otherwise number
    each rank's tokens from 0. A Hugging Face batch (``input_ids``) has its
    ``labels`` replaced by ``shift_labels`` (next token, -100 at the end),
    which HF's causal-LM losses take as they are. An ``attention_mask`` of
    all ones is dropped (the causal mask is implied); padding is refused.
    """
    layout = layout_of(mode)
    group = sequence_group() if group is None else group
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    ids = batch.get("input_ids", batch.get("tokens", batch.get("inputs_embeds")))
    if ids is None:
        raise ValueError(f"shard_batch: the batch has none of input_ids, tokens, inputs_embeds (keys: "
                         f"{sorted(batch)}); fix: name the token ids input_ids (Hugging Face) or tokens")
    b, s = ids.shape[:2]
    out = dict(batch)
    mask = out.pop("attention_mask", None)
    if mask is not None and not bool(torch.all(mask.bool())):
        raise ValueError("shard_batch: attention_mask has padding (zeros); sequence-parallel attention is "
                         "causal over whole sequences; fix: pack sequences without padding, and mask the loss "
                         "instead (labels -100 or loss_mask 0)")
    if "input_ids" in batch and "labels" in batch and "shift_labels" not in batch:
        labels = out.pop("labels")
        out["shift_labels"] = torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), IGNORE_INDEX)], 1)
    if "position_ids" not in out:
        out["position_ids"] = torch.arange(s, device=ids.device).unsqueeze(0).expand(b, s)
    if size == 1:
        return out
    for key in SEQUENCE_KEYS:
        if key in out and out[key] is not None:
            value = out[key]
            if value.dim() < 2 or value.size(1) != s:
                raise ValueError(f"shard_batch: {key} has shape {tuple(value.shape)}, not [b={b}, s={s}, ...]; "
                                 "fix: give every sequence entry the batch's [b, s] shape")
            out[key] = shard(value.expand(b, *value.shape[1:]) if value.size(0) == 1 else value,
                             1, rank, size, layout)
    return out


__all__ = ["sequence_group", "shard_batch", "layout_of", "MODES", "LAYOUTS"]
