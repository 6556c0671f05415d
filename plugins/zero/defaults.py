"""ZeRO sizes where DeepSpeed's defaults are wrong for the device, chosen by measurement.

DeepSpeed's defaults are tuned for GPUs with tens of GB each. On a CPU rank
(and for NVMe offload anywhere) they cost memory and time; the numbers
below come from ``docs/zero-offload.md`` (201M-parameter
model, 2 ranks, 3 steps, peak RSS per rank) and from
``bench/zero_memory.py`` / ``examples/large_model`` runs in this repository.

- Buckets and sub-groups (``reduce_bucket_size``, ``allgather_bucket_size``,
  ``stage3_prefetch_bucket_size``, ``sub_group_size``): DeepSpeed's 5e8 /
  5e8 / 5e7 / 1e9 elements. At 2e7 ZeRO-3's peak fell from 4.68 to 3.43
  GB/rank and 3 steps from 62 s to 16 s.
- NVMe optimizer offload: the optimizer swaps one sub-group at a time through
  ``buffer_count`` locked fp32 buffers of ``sub_group_size`` elements; with
  1e9 the partition is one sub-group swapped in at once (no saving, 16 GB of
  locked buffers asked for). At 2e7 the peak fell by 0.8 GB/rank (-23%).
- NVMe parameter offload: see :func:`.preflight.correct` (``max_in_cpu`` 0,
  prefetch 0, buffers sized from the model).
- aio: 1 MiB blocks, queue depth 8, one thread: the raw aio handle moved
  ~2.1 GB/s both ways on this disk with these settings.
"""

from __future__ import annotations

import copy

CPU_BUCKET_SIZE = int(2e7)
"""Elements per ZeRO bucket / sub-group on a CPU rank (measured above)."""

NVME_SUB_GROUP_SIZE = int(2e7)
"""Elements per optimizer sub-group under NVMe optimizer offload: 4 locked fp32 buffers = 320 MB/rank."""

AIO = {"block_size": 1048576, "queue_depth": 8, "intra_op_parallelism": 1, "single_submit": False,
       "overlap_events": True}
"""DeepSpeed's ``aio`` block as measured working (~2.1 GB/s raw)."""

_BUCKETS = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size", "sub_group_size")


def tuned(ds: dict, device_type: str) -> tuple[dict, list[str]]:
    """A copy of ``ds`` with the measured defaults filled in where the config is silent.

    Keys the config sets are never changed (:func:`.preflight.correct` is
    the place for settings that must change); returns the keys filled.
    """
    ds = copy.deepcopy(ds)
    zero = ds.setdefault("zero_optimization", {})
    filled = []
    if device_type == "cpu":
        for key in _BUCKETS:
            if key not in zero and not (key == "stage3_prefetch_bucket_size" and "prefetch_bucket_size" in zero):
                zero[key] = CPU_BUCKET_SIZE
                filled.append(f"zero_optimization.{key}")
    devices = {(zero.get(k) or {}).get("device") for k in ("offload_optimizer", "offload_param")}
    if "nvme" in devices:
        if "nvme" == (zero.get("offload_optimizer") or {}).get("device") and "sub_group_size" not in zero:
            zero["sub_group_size"] = NVME_SUB_GROUP_SIZE
            filled.append("zero_optimization.sub_group_size")
        aio = ds.setdefault("aio", {})
        for key, value in AIO.items():
            if key not in aio and not (key == "intra_op_parallelism" and "thread_count" in aio):
                aio[key] = value
                filled.append(f"aio.{key}")
    return ds, filled
