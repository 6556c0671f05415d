"""What hybrid layouts should move and how to time them: shared by the bench/ scripts.

Theory is per rank, per optimizer step, in the units the comm counter
(``zeromega.integrations.comm``) counts: an all-gather counts its gathered
output, a reduce-scatter its full input, an all-to-all its input, p2p what
is sent. Legend: ``L`` layers on this stage, ``b`` micro-batch, ``s``
sequence, ``h`` hidden, ``m`` micro-batches per step, ``k`` router top-k,
``T = s b h x 4`` bytes (one fp32 activation of the full sequence).

- tp with sequence parallel (Korthikanti et al. 2022, section 4.2.2): per
  layer and micro-batch, forward all-gathers the inputs of the two
  column-parallel linears and reduce-scatters the outputs of the two
  row-parallel ones; backward re-gathers the two inputs (for the weight
  grads), reduce-scatters the two input grads and all-gathers the two
  output grads: ``6 T`` all-gather + ``4 T`` reduce-scatter. The
  vocab-parallel embedding all-reduces its output (``T``, then split along
  the sequence; the split's backward is one all-gather); the output layer
  adds two all-gathers and one reduce-scatter.
- tp without sp: the same traffic as all-reduces, ``4 T`` per layer (2 fwd,
  2 bwd) plus 1 for the embedding and 1 for the output layer's input grad.
- pp: a stage sends ``m`` activations forward (all but the last stage) and
  ``m`` gradients back (all but the first), each ``T / tp_sp`` (``v m`` of
  each with ``v`` virtual stages, minus the chunks that stay on the rank).
- dp with the distributed optimizer (ZeRO-1): reduce-scatter of the grad
  buffer plus all-gather of the params, ``P`` bytes each (``P`` = this rank's
  parameter bytes; expert params over the expert-dp group).
- ep all-to-all: dispatch and combine, forward and backward, of the ``b s k``
  routed token copies: ``4 b s k h x 4`` bytes per MoE layer and micro-batch
  (the rank's own share ``1/ep`` of it never leaves, but is handed to the call).
"""

from __future__ import annotations

from typing import Optional

import torch


def random_batches(vocab: int, seq: int, micro: int, count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` micro-batches of random tokens: timing and bytes do not depend on the text."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, vocab, (micro, seq), generator=generator)
        out.append({"tokens": tokens, "labels": tokens.roll(-1, 1), "loss_mask": torch.ones(micro, seq),
                    "position_ids": torch.arange(seq).expand(micro, seq)})
    return out


def comm_theory(*, layers: int, seq: int, micro: int, hidden: int, m: int, tp: int, sp: bool, pp: int,
                pp_rank: int, dp: int, param_bytes: int, expert_param_bytes: int = 0, edp: int = 1,
                ep: int = 1, topk: int = 0, moe_layers: int = 0, virtual: int = 1,
                first_stage: bool = True, last_stage: bool = True) -> dict[str, float]:
    """Bytes per collective kind this rank should hand to torch.distributed in one step."""
    t = seq * micro * hidden * 4
    out: dict[str, float] = {}

    def add(kind: str, value: float) -> None:
        if value:
            out[kind] = out.get(kind, 0.0) + value

    if tp > 1:
        if sp:
            add("all_gather", m * t * (6 * layers + (1 if first_stage else 0) + (2 if last_stage else 0)))
            add("reduce_scatter", m * t * (4 * layers + (1 if last_stage else 0)))
            add("all_reduce", m * t * (1 if first_stage else 0))  # vocab-parallel embedding, then split
        else:
            add("all_reduce", m * t * (4 * layers + (1 if first_stage else 0) + (1 if last_stage else 0)))
    if pp > 1:
        p2p_t = t / (tp if sp else 1)
        # Chunk c of the p v chunks sends its activation to c + 1 and its input grad to c - 1;
        # this rank holds v chunks, the last stage the very last and the first stage the very first.
        sends = 2 * virtual - (1 if last_stage else 0) - (1 if first_stage else 0)
        add("p2p", m * p2p_t * sends)
    if dp > 1:
        dense = param_bytes - expert_param_bytes
        add("reduce_scatter", dense)
        add("all_gather", dense)
    if edp > 1 and expert_param_bytes:
        add("reduce_scatter", expert_param_bytes)
        add("all_gather", expert_param_bytes)
    if ep > 1 and moe_layers:
        add("all_to_all", 4 * moe_layers * m * micro * seq * topk * hidden * 4)
    return out


def ratio_line(measured: dict[str, int], theory: dict[str, float]) -> str:
    """``kind measured/theory`` for every kind either side names (small metadata kinds shown as bytes)."""
    parts = []
    for kind in sorted(set(measured) | set(theory)):
        got, want = measured.get(kind, 0), theory.get(kind, 0.0)
        parts.append(f"{kind} {got / want:.3f}" if want else f"{kind} {got:,} B (theory 0)")
    return ", ".join(parts)


def median(values: list[float]) -> Optional[float]:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else None
