"""Accelerators and links the planner knows: published peaks, memory sizes and bandwidths.

Every figure is the vendor's published number for the SXM / OAM part (dense,
no sparsity), with its source beside it. Bandwidths are per GPU and per
direction (NVIDIA quotes NVLink as the bidirectional total: 600 GB/s on A100
is 300 GB/s each way). What a collective reaches of a link is
:data:`LINK_EFFICIENCY`, an assumption, not a published figure.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

LINK_EFFICIENCY = 0.8
"""Fraction of a link's per-direction bandwidth a ring collective reaches (NCCL's bus bandwidth on
DGX-class nodes is typically 75-90% of the link's; an assumption of this planner, not fitted)."""


@dataclass(frozen=True)
class Device:
    """One accelerator type: what the time and memory models read."""

    name: str
    memory_gib: float
    """HBM per GPU (the stacks are binary-sized: the vendor's GB is GiB here)."""
    hbm_gbs: float
    """HBM bandwidth, GB/s."""
    tflops: dict
    """Dense tensor-core peak per precision (``bf16``, ``fp16``, ``fp8``, ``fp32`` = TF32), TFLOP/s."""
    intra_node_gbs: float
    """GPU-to-GPU inside a node, per direction, GB/s (NVLink / Infinity Fabric)."""
    inter_node_gbs: float
    """GPU-to-GPU across nodes, per GPU and direction, GB/s (one NIC per GPU in the reference system)."""
    host_gbs: float
    """GPU to host memory (PCIe), per direction, GB/s."""
    source: str
    """Where the figures come from."""

    def peak(self, precision: str) -> float:
        """Dense peak FLOP/s for a training precision (fp32 runs on TF32 tensor cores)."""
        key = {"fp32": "fp32"}.get(precision, precision)
        if key not in self.tflops:
            raise ValueError(f"{self.name} has no published {precision} peak")
        return self.tflops[key] * 1e12


DEVICES = {
    # A100 SXM4: NVIDIA A100 Tensor Core GPU datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf):
    # BF16/FP16 tensor 312 TFLOPS (624 with sparsity), TF32 156; 40 GB HBM2 1,555 GB/s, 80 GB HBM2e 2,039 GB/s;
    # NVLink 600 GB/s, PCIe Gen4 64 GB/s (both bidirectional). Across nodes: DGX A100 has one 200 Gb/s HDR
    # InfiniBand port per GPU (DGX A100 datasheet) = 25 GB/s.
    "a100-40": Device("A100 SXM4 40GB", 40.0, 1555.0, {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}, 300.0, 25.0,
                      32.0, "NVIDIA A100 datasheet; DGX A100 datasheet (8x HDR 200 Gb/s)"),
    "a100-80": Device("A100 SXM4 80GB", 80.0, 2039.0, {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}, 300.0, 25.0,
                      32.0, "NVIDIA A100 datasheet; DGX A100 datasheet (8x HDR 200 Gb/s)"),
    # H100 SXM5: NVIDIA H100 Tensor Core GPU datasheet: BF16/FP16 1,979 TFLOPS and FP8 3,958 with sparsity
    # ("1/2 lower without sparsity": 989.4 / 1,978.9 dense, as NVIDIA's Hopper whitepaper tables them), TF32
    # 494.7 dense; 80 GB HBM3 3.35 TB/s; NVLink 900 GB/s, PCIe Gen5 128 GB/s (bidirectional). DGX H100:
    # 8x ConnectX-7 400 Gb/s (one per GPU) = 50 GB/s.
    "h100": Device("H100 SXM5 80GB", 80.0, 3350.0, {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "fp32": 494.7},
                   450.0, 50.0, 64.0, "NVIDIA H100 datasheet; DGX H100 datasheet (8x NDR 400 Gb/s)"),
    # H200 SXM: NVIDIA H200 datasheet / product page: compute as H100 SXM; 141 GB HBM3e 4.8 TB/s; NVLink 900 GB/s.
    "h200": Device("H200 SXM 141GB", 141.0, 4800.0, {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "fp32": 494.7},
                   450.0, 50.0, 64.0, "NVIDIA H200 datasheet; HGX H200 with 400 Gb/s NDR per GPU"),
    # B200 (HGX / DGX, 1,000 W): NVIDIA DGX B200 datasheet: 8 GPUs, 72 PFLOPS FP8 training (with sparsity:
    # 4.5 PF dense FP8 per GPU, 2.25 PF dense BF16/FP16, the HGX B200 figures), 1,440 GB HBM3e total (180 GB
    # usable per GPU; the chip carries 192 GB), 64 TB/s total (8 TB/s per GPU), NVLink 5 1.8 TB/s per GPU
    # (bidirectional), 8x ConnectX-7 400 Gb/s.
    "b200": Device("B200 180GB", 180.0, 8000.0, {"bf16": 2250.0, "fp16": 2250.0, "fp8": 4500.0, "fp32": 1100.0},
                   900.0, 50.0, 64.0, "NVIDIA DGX B200 datasheet (per GPU: total / 8, dense = sparse / 2)"),
    # MI300X: AMD Instinct MI300X data sheet: BF16/FP16 1,307.4 TFLOPS, FP8 2,614.9 dense, TF32 653.7;
    # 192 GB HBM3 5.3 TB/s; 7 Infinity Fabric links of 64 GB/s per direction (448 GB/s to the other 7 GPUs
    # of an 8-GPU platform), PCIe Gen5 x16 64 GB/s per direction; 400 Gb/s NIC per GPU assumed across nodes.
    "mi300x": Device("MI300X 192GB", 192.0, 5300.0, {"bf16": 1307.4, "fp16": 1307.4, "fp8": 2614.9, "fp32": 653.7},
                     448.0, 50.0, 64.0, "AMD Instinct MI300X data sheet; 400 Gb/s NIC per GPU assumed"),
}


def device(name: str, memory_gib: Optional[float] = None, intra_node_gbs: Optional[float] = None,
           inter_node_gbs: Optional[float] = None, host_gbs: Optional[float] = None) -> Device:
    """The table's device, with any figure the user overrides (``--gpu-memory``, ``--intra-node-bw`` ...)."""
    if name not in DEVICES:
        raise ValueError(f"unknown GPU {name!r}: known are {', '.join(sorted(DEVICES))}")
    d = DEVICES[name]
    changes = {k: v for k, v in dict(memory_gib=memory_gib, intra_node_gbs=intra_node_gbs,
                                      inter_node_gbs=inter_node_gbs, host_gbs=host_gbs).items() if v is not None}
    return replace(d, **changes)


__all__ = ["DEVICES", "Device", "LINK_EFFICIENCY", "device"]
