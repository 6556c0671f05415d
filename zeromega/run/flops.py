"""Model FLOPs per sample (Megatron-LM's count) and the device's peak, for TFLOP/s per GPU and MFU.

:func:`flops_per_sample` follows ``num_floating_point_operations`` of
Megatron-LM core_v0.16.1 (megatron/training/training.py, its standard
transformer branch): every GEMM counted 3 times (forward, weight gradient,
data gradient) at 2 FLOPs per multiply-add; per layer the QKV projection
(grouped-query attention shrinks K and V to ``num_query_groups`` heads of
``kv_channels``), the causal core attention (half of the s x s scores, QK^T and
its product with V), the output projection, the MLP (3 GEMMs of width ffn
under SwiGLU, 2 without) or, on MoE layers, ``topk`` experts of width
``moe_ffn_hidden_size``; and the logits over the padded vocabulary.
Norms, softmax and the loss are not counted, as in Megatron-LM.

:func:`peak_flops` is the dense bf16/fp16 tensor peak of a known GPU (the
table below, from the vendors' datasheets), or on a CPU a peak measured once
by a matmul at the rank's thread count and cached under
``$ZEROMEGA_CACHE`` (default ``~/.cache/zeromega``).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Optional

# Dense (no structured sparsity) bf16/fp16 tensor-core peaks, TFLOP/s per GPU, as the vendors publish them.
# Matched against torch.cuda.get_device_name(), most specific first.
GPU_PEAK_TFLOPS: list[tuple[str, float, str]] = [
    ("H100 PCIe", 756.0, "NVIDIA H100 datasheet: H100 PCIe BF16 1,513 TFLOPS with sparsity"),
    ("H100 NVL", 835.0, "NVIDIA H100 datasheet: H100 NVL BF16 1,671 TFLOPS with sparsity"),
    ("H100", 989.0, "NVIDIA H100 datasheet: H100 SXM BF16 1,979 TFLOPS with sparsity"),
    ("H200", 989.0, "NVIDIA H200 datasheet: H200 SXM BF16 1,979 TFLOPS with sparsity"),
    ("GH200", 989.0, "NVIDIA GH200 datasheet: BF16 1,979 TFLOPS with sparsity"),
    ("B200", 2250.0, "NVIDIA HGX B200 datasheet: FP16/BF16 4.5 PFLOPS per GPU with sparsity"),
    ("A100", 312.0, "NVIDIA A100 datasheet: BF16 312 TFLOPS (624 with sparsity)"),
    ("A10", 125.0, "NVIDIA A10 datasheet: BF16 125 TFLOPS (250 with sparsity)"),
    ("L40S", 362.0, "NVIDIA L40S datasheet: BF16 362 TFLOPS (733 with sparsity)"),
    ("L4", 121.0, "NVIDIA L4 datasheet: BF16 121 TFLOPS (242 with sparsity)"),
    ("V100", 125.0, "NVIDIA V100 datasheet: SXM2 FP16 tensor 125 TFLOPS (no bf16)"),
    ("MI300X", 1307.4, "AMD Instinct MI300X datasheet: BF16 1,307.4 TFLOPS dense"),
    ("MI250X", 383.0, "AMD Instinct MI250X datasheet: BF16 383 TFLOPS"),
]


def flops_per_sample(shape, seq_length: int, padded_vocab: int) -> float:
    """Training FLOPs of one sample of ``seq_length`` tokens through ``shape`` (:class:`GPTShape`)."""
    h, layers, heads, s = shape.hidden_size, shape.num_layers, shape.num_attention_heads, seq_length
    kv = shape.kv_channels or h // heads
    groups = shape.num_query_groups or heads  # Megatron-LM: all heads unless --group-query-attention
    ffn = shape.resolved_ffn_hidden_size
    gemm = 3 * 2  # forward + two backward GEMMs, 2 FLOPs per multiply-add
    width = 3 if shape.swiglu else 2  # GEMMs of width ffn in one MLP
    if shape.num_experts:
        freq = shape.moe_layer_freq
        pattern = [1 if i % freq == 0 else 0 for i in range(layers)] if isinstance(freq, int) else list(freq)
        moe_layers, topk = sum(pattern), shape.moe_router_topk
        moe_ffn = shape.moe_ffn_hidden_size or ffn
    else:
        moe_layers, topk, moe_ffn = 0, 0, 0
    dense_layers = layers - moe_layers
    query, key_value = kv * heads, kv * groups
    attention = gemm * (h * (query + 2 * key_value) + query * s / 2 * 2 + query * h)
    mlp = gemm * h * (ffn * width * dense_layers + moe_ffn * topk * width * moe_layers)
    logits = gemm * h * padded_vocab
    return float(s * (mlp + attention * layers + logits))


def _cache_dir() -> Path:
    return Path(os.environ.get("ZEROMEGA_CACHE", Path.home() / ".cache" / "zeromega"))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_cpu_peak(seconds: float = 0.3, size: int = 1024) -> float:
    """FLOP/s of fp32 square matmuls on this process's torch threads (the best of a few timed rounds)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm up the kernel and its threads
    best, deadline = 0.0, time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        elapsed = time.perf_counter() - start
        best = max(best, 4 * 2 * size ** 3 / elapsed)
        if time.perf_counter() > deadline:
            return best


def cpu_peak(measure=measure_cpu_peak) -> tuple[float, str]:
    """(FLOP/s, source): the cached measurement for this CPU and thread count, measured on first use."""
    import torch

    key = f"{_cpu_name()} | {torch.get_num_threads()} threads | fp32"
    path = _cache_dir() / "cpu_peak.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), (int, float)) and known[key] > 0:
        return float(known[key]), f"the matmul peak measured before, cached in {path}"
    value = measure()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        known = known if isinstance(known, dict) else {}
        known[key] = value
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: measured again next time
    return value, "a matmul peak measured just now, cached for next time"


def gpu_peak(name: str) -> Optional[tuple[float, str]]:
    """(FLOP/s, source) of a GPU named ``name`` in the table, or None."""
    for key, tflops, source in GPU_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return tflops * 1e12, source
    return None


def peak_flops(device_type: str) -> tuple[Optional[float], str]:
    """(peak FLOP/s of one rank's device, where the figure comes from); (None, why) when unknown."""
    if device_type == "cuda":
        import torch

        name = torch.cuda.get_device_name()
        found = gpu_peak(name)
        return found if found else (None, f"{name} is not in zeromega's peak table (zeromega/run/flops.py)")
    if device_type == "cpu":
        return cpu_peak()
    return None, f"no peak known for {device_type}"
