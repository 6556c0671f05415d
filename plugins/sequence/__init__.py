"""Long sequences split across ranks: Ulysses, ring (zigzag) and USP attention.

Legend (every module here): ``b`` batch, ``s`` full sequence, ``s_l``
tokens on this rank, ``h`` query heads, ``h_kv`` key/value heads, ``d``
head dim, ``P`` ranks sharing a sequence (``U`` Ulysses, ``R`` ring,
``C = U x R`` context parallel).

One input layout: ``[b, s_l, h, d]`` for q and ``[b, s_l, h_kv, d]`` for k
and v, any other shape raises ``ValueError``. Megatron-Core's ``[s, b, h, d]``
goes through :mod:`.megatron`, whose core attention routes to these.

- :func:`ulysses_attention` (:mod:`.ulysses`): all-to-all seq <-> heads.
- :func:`ring_attention` (:mod:`.ring`): key/value blocks around a ring,
  zigzag for causal balance, fused kernels with log-sum-exp (:mod:`.kernels`).
- :func:`usp_attention` (:mod:`.usp`): Ulysses inside ring.
- :mod:`.layout`: which tokens a rank holds (contiguous, zigzag, stripe and
  yunchang's ring_zigzag / ring_stripe); causal attention over several
  ranks takes it as ``layout=`` and refuses what it cannot compute exactly.
- :mod:`.batch`: ``shard_batch(batch, mode)``, ``sequence_group()`` for a
  user's own loss; :mod:`.hf`: the modes in transformers' attention registry.
"""

from .layout import shard, unshard
from .ring import ring_attention
from .ulysses import local_attention, ulysses_attention
from .usp import USPGroups, build_usp_groups, usp_attention

__all__ = ["shard", "unshard", "ring_attention", "ulysses_attention", "local_attention", "usp_attention",
           "USPGroups", "build_usp_groups"]
