"""Which of Megatron-LM's kernel and precision choices run on this device, decided once, from facts.

Megatron-LM scripts ask for fused kernels and GPU-only paths (``--use-flash-attn``, ``--attention-backend``,
``--transformer-impl transformer_engine``, ``--fp8-format``, ``--moe-grouped-gemm``, the bias / softmax /
cross-entropy fusions). The config keeps what the script asked for (``cfg.model`` / ``cfg.moe``, so
``--to megatron`` writes it back); :func:`resolve` turns that request and a :class:`Device` into

- the Megatron-Core ``TransformerConfig`` fields this device can honour (``fields``), and
- one note per stated flag that falls back here, saying what runs instead and why (``notes``).

The translator prints the notes before launch (``launch/megatron_args.py``); the model builder passes the
fields and picks the layer spec from ``fields["transformer_impl"]`` (``integrations/megatron/model.py``).
Nothing is tried and caught inside a rank.

Fusions that are Megatron-Core's own torch code (bias + GELU, bias + SwiGLU, bias + dropout + add, the
'native' fused cross entropy) run on every device. They are the same math as the unfused path, except the
bias + GELU fusion, which is the tanh approximation of GELU (``megatron.core.fusions.fused_bias_gelu``):
Megatron-LM's default for a GPT with biases, so honoured as such. On CPU their ``torch.compile`` wrappers
are taken off (``cpu_patches``): the same functions run eagerly.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class Device:
    """What decides the kernels: CUDA and its compute capability, and the optional kernel libraries."""

    cuda: bool
    capability: Optional[tuple[int, int]] = None
    """(major, minor) of GPU 0 when ``cuda``."""
    te_version: Optional[str] = None
    """TransformerEngine's version when it is installed (None: not installed)."""
    grouped_gemm: bool = False
    """The ``grouped_gemm`` package (Megatron-Core's legacy GroupedMLP) is installed."""
    softmax_kernels: bool = False
    """Megatron's fused softmax extension (``scaled_upper_triang_masked_softmax_cuda``) is installed."""

    @classmethod
    def probe(cls, device: str = "auto") -> "Device":
        """This machine, as ``device`` (the config's ``device``: auto, cuda, cpu) will use it. Looks the
        libraries up without importing them."""
        import torch

        cuda = device != "cpu" and torch.cuda.is_available()
        te = None
        if importlib.util.find_spec("transformer_engine") is not None:
            try:
                te = importlib.metadata.version("transformer_engine")
            except importlib.metadata.PackageNotFoundError:
                te = "unknown"
        return cls(cuda=cuda, capability=tuple(torch.cuda.get_device_capability(0)) if cuda else None,
                   te_version=te, grouped_gemm=importlib.util.find_spec("grouped_gemm") is not None,
                   softmax_kernels=importlib.util.find_spec("scaled_upper_triang_masked_softmax_cuda") is not None)

    def describe(self) -> str:
        """The device in a few words, for the notes."""
        if not self.cuda:
            return "this device is the CPU"
        sm = f"sm_{self.capability[0]}{self.capability[1]}" if self.capability else "a GPU"
        te = f"TransformerEngine {self.te_version}" if self.te_version else "no TransformerEngine"
        return f"this device is CUDA {sm} with {te}"


FP8_CAPABILITY = (8, 9)
"""fp8 GEMMs need Ada (sm_89) or Hopper (sm_90) and newer (TransformerEngine's check)."""
GROUPED_GEMM_CAPABILITY = (8, 0)
"""Megatron-LM's validate_args asserts compute capability >= 8 for --moe-grouped-gemm."""


@dataclass
class Resolved:
    """What runs: Megatron-Core config fields, and a note for each stated flag that falls back."""

    fields: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def resolve(cfg, device: Device, stated: Optional[set[str]] = None) -> Resolved:
    """The fields this ``device`` honours for ``cfg``'s request, and the fallback notes for ``stated`` flags
    (None: every flag whose value differs from what runs)."""
    m, moe = cfg.model, cfg.moe
    out = Resolved()
    f = out.fields

    def note(flag: str, text: str) -> None:
        if stated is None or flag in stated:
            out.notes[flag] = text

    te_ok = device.cuda and device.te_version is not None
    # --transformer-impl: TransformerEngine's layers, on CUDA with TE installed; zeromega's Ulysses / ring / USP
    # attention is a local spec of its own, so context parallel keeps the local layers.
    te = False
    if m.transformer_impl == "transformer_engine":
        if not te_ok:
            note("--transformer-impl", f"TransformerEngine's layers need CUDA and the transformer_engine package "
                 f"({device.describe()}): Megatron-Core's local layers run (same math, torch kernels)")
        elif cfg.parallel.cp > 1:
            note("--transformer-impl", "zeromega's context-parallel attention (Ulysses / ring / USP) is a local "
                 "layer spec: Megatron-Core's local layers run (same math, torch kernels)")
        else:
            te = True
    f["transformer_impl"] = "transformer_engine" if te else "local"

    # --attention-backend: a TransformerEngine attention choice (Megatron-LM asserts 'local' goes with the local
    # spec, which is what runs without TE).
    backend = m.attention_backend
    if backend in ("flash", "fused", "unfused") and not te:
        note("--attention-backend", f"{backend} is TransformerEngine's attention, which does not run here "
             f"({device.describe() if not te_ok else 'local layers'}): Megatron-Core's local attention runs "
             "(softmax(QK^T)V in torch, same values)")
        backend = "auto"
    elif backend == "local" and te:
        note("--attention-backend", "local attention needs the local layer spec (Megatron-LM asserts so): "
             "TransformerEngine picks its attention (auto)")
        backend = "auto"
    f["attention_backend"] = backend

    # fp8: TransformerEngine's GEMMs on sm_89+.
    if m.fp8 is not None:
        capable = te and device.capability is not None and device.capability >= FP8_CAPABILITY
        if capable:
            f.update(fp8=m.fp8, fp8_amax_history_len=m.fp8_amax_history_len,
                     fp8_amax_compute_algo=m.fp8_amax_compute_algo, fp8_param=m.fp8_param)
        else:
            why = device.describe() if not te_ok else "the local layers run" if not te else \
                f"compute capability {device.capability[0]}.{device.capability[1]} < 8.9"
            note("--fp8-format", f"fp8 needs TransformerEngine's layers on a GPU of compute capability 8.9 or "
                 f"newer ({why}): the run keeps {cfg.precision}")
            for flag in ("--fp8-amax-history-len", "--fp8-amax-compute-algo", "--fp8-param-gather"):
                note(flag, "fp8 is off here (see --fp8-format)")
    elif m.fp8_param:
        note("--fp8-param-gather", "without --fp8-format there is no fp8 parameter to gather (Megatron-Core "
             "refuses fp8_param without fp8): off")

    # --moe-grouped-gemm: TransformerEngine's TEGroupedMLP, or the grouped_gemm package's GroupedMLP.
    grouped = False
    if moe.grouped_gemm and moe.num_experts:
        capable = device.cuda and device.capability is not None and device.capability >= GROUPED_GEMM_CAPABILITY
        if capable and (te or device.grouped_gemm):
            grouped = True
        else:
            why = device.describe() if not capable else "neither TransformerEngine's layers nor the grouped_gemm " \
                "package is here"
            note("--moe-grouped-gemm", f"grouped GEMM needs CUDA (compute capability 8.0+) and TransformerEngine "
                 f"or grouped_gemm ({why}): experts run one by one (SequentialMLP, same values)")
    f["moe_grouped_gemm"] = grouped

    # Megatron-Core's torch-code fusions: every device.
    f["bias_activation_fusion"] = m.bias_activation_fusion
    f["bias_dropout_fusion"] = m.bias_dropout_fusion
    # The fused masked softmax is a CUDA extension that Megatron-Core imports when the shapes and a 16-bit
    # input allow it; without the extension that import would fail in a rank, so the torch softmax runs.
    softmax = m.masked_softmax_fusion and device.cuda and device.softmax_kernels
    if m.masked_softmax_fusion and not softmax:
        note("--masked-softmax-fusion", f"the fused softmax needs CUDA and Megatron's "
             f"scaled_upper_triang_masked_softmax_cuda extension ({device.describe()}"
             f"{'' if not device.cuda else ', without it'}): the torch softmax runs (same values)")
    f["masked_softmax_fusion"] = softmax
    f["cross_entropy_loss_fusion"] = m.cross_entropy_loss_fusion
    impl = m.cross_entropy_fusion_impl
    if m.cross_entropy_loss_fusion and impl == "te" and not te_ok:
        note("--cross-entropy-fusion-impl", f"te needs TransformerEngine on CUDA ({device.describe()}): "
             "Megatron-Core's native fused cross entropy runs (same values)")
        impl = "native"
    f["cross_entropy_fusion_impl"] = impl
    # Megatron-LM's --gradient-accumulation-fusion (on by default) needs apex's fused_weight_gradient_mlp_cuda
    # and Megatron's main_grad buffers; zeromega accumulates in torch (what --no-gradient-accumulation-fusion
    # asks for), on every device.
    f["gradient_accumulation_fusion"] = False
    f["persist_layer_norm"] = False
    return out


# Flags whose fallback note depends on the device: launch/megatron_args.py asks resolve() for their text.
DEVICE_FLAGS = ("--transformer-impl", "--attention-backend", "--fp8-format", "--fp8-amax-history-len",
                "--fp8-amax-compute-algo", "--fp8-param-gather", "--moe-grouped-gemm", "--masked-softmax-fusion",
                "--cross-entropy-fusion-impl")
