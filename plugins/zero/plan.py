"""The memory plan: bytes per rank for a ZeRO stage, offload and precision, before anything runs.

Legend: ``P`` parameters one tensor-parallel rank holds (the whole model / tp,
plus the replicated norms and biases), ``N`` the data-parallel size ZeRO
partitions over, ``lp`` bytes of a model-precision element (2 for bf16/fp16,
4 for fp32), ``s`` sequence, ``b`` micro-batch, ``h`` hidden, ``a`` heads,
``L`` layers, ``V`` padded vocabulary, ``t`` tp.

The ZeRO paper's arithmetic (Adam, K = 12 bytes of optimizer state per
parameter in mixed precision: fp32 master, momentum, variance)::

                 params    grads     optimizer     mixed precision   fp32 (K = 8: m, v)
    ZeRO-0       lp P      lp P      K P           16 P              16 P
    ZeRO-1       lp P      lp P      K P / N       (4 + 12/N) P      (8 + 8/N) P
    ZeRO-2       lp P      lp P / N  K P / N       (2 + 14/N) P      (4 + 12/N) P
    ZeRO-3       lp P / N  lp P / N  K P / N       16 P / N          16 P / N

DeepSpeed 0.19.8 holds a little more than the paper, and the plan follows
the engine, because the plan is checked against what a run measures:

- ZeRO-1/2 always clone the partition into an fp32 master copy, also for an
  fp32 model (``stage_1_and_2.py``: ``weights_partition = ...clone()``), so
  fp32 ZeRO-1/2 carry K = 12, not 8. So does ZeRO-3: ``_create_fp32_partitions``
  means to reuse an fp32 partition as the master, but it compares
  ``tensor.device`` with a device *name* string, which is never equal, so it
  clones (live-tensor census of a 57M-parameter fp32 ZeRO-3 run: one master
  per sub-group beside the partition).
- ZeRO-2 (and ZeRO-1 / ZeRO-3 with CPU optimizer offload) keep an fp32
  gradient partition for the optimizer (4 P / N) beside the model-precision
  gradients. ZeRO-1 without offload holds none between steps: the full
  gradients live while micro-batches accumulate, the reduced partition from
  the boundary to the end of the update, and its flattened fp32 copy during
  the step (measured phase by phase; see :func:`plan_memory`). ZeRO-3
  otherwise flattens one sub-group's fp32 gradients at a time during the
  step, and keeps its reduce bucket (``reduce_bucket_size``
  elements, allocated once at that size) for the whole run. ZeRO-3
  accumulates gradients in the model dtype (``grad_accum_dtype`` unset), in
  host memory when the optimizer is offloaded, also to nvme: that buffer
  (lp P / N) is what bounds how large a model one host can train.

The plan then adds what is only alive for part of a step, by phase, and a
fixed process baseline, so that ``peak`` is comparable with a measured peak:

- forward/backward: activations, logits, gradient buckets (ZeRO-0 too: the
  engine flattens gradients into ``reduce_bucket_size`` buffers to
  all-reduce them) and ZeRO-3's gathered parameters. DeepSpeed keeps a
  gathered parameter until ``stage3_max_live_parameters`` is exceeded when
  it will be reused within ``stage3_max_reuse_distance`` (default 1e9, so a
  model smaller than that stays gathered from forward through backward).
- optimizer step: torch's multi-tensor AdamW computes ``sqrt(v)`` and its
  bias-corrected quotient for the whole partition at once (8 bytes per
  element it steps: ``aten::sqrt`` and ``aten::div`` each allocated 4 P/N
  under torch.profiler's memory view, ZeRO-2); ZeRO-1/2 then all-gather the
  updated parameters through ``allgather_bucket_size`` buffers;
  ``DeepSpeedCPUAdam`` (offload) works in place; NVMe offload swaps one
  sub-group in at a time.

- ZeRO-1/2's all-gather of the updated parameters, after the update: on
  gloo a new tensor of the whole gathered output (lp P), on NCCL the
  ``allgather_bucket_size`` buffers.

The peak is the resident part plus the largest phase (measured per phase
with ``/proc/self/status`` VmHWM on this machine: they do not overlap).
Not modelled: on a CPU rank, glibc keeps the pages of freed tensors under
the mmap threshold (1 MiB, :mod:`zeromega.integrations.accelerator`) until
``malloc_trim``, which zeromega runs after every DeepSpeed backward and
step; within a step they add up (ZeRO-2, 57M parameters, fp32: live tensors
656 MiB, resident set 777 MiB at the end of backward). Under Megatron-Core's
1F1B with activations below 1 MiB the heap fragments and grows from step to
step (pp 2, 8 x 512: 805 MiB measured at step 3, 716 with a 64 KiB mmap
threshold, 699 planned; docs/planning.md). bench/zero_memory.py shows the
effect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

GiB = 1024**3
MiB = 1024**2

PROCESS_BASELINE_BYTES = 400 * MiB
"""Resident bytes of a rank before the model: torch, DeepSpeed and Megatron-Core
imported, gloo initialised, the data set opened. Measured on this CPU machine
(``/proc/self/status`` just before the model is built, examples/pretrain_gpt.py
under ``zeromega launch``, 2 and 4 ranks, either engine): VmRSS 388-390 MiB,
VmHWM 404-405 MiB (the data set's set-up peaks a little above what stays).
It was 600 MiB here before: bench/zero_memory.py's empty rank, whose
pytest-spawned worker imports more than a training script does, and that
over-charged every CPU plan by ~200 MiB (plan/measured 1.17-1.21 at pp 1).
CUDA ranks add the CUDA context on the host."""

AIO_ALIGN_BYTES = 1024
"""DeepSpeed's swap files are written in multiples of 1 KiB (``AIO_ALIGNED_BYTES``)."""

_LP_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def _num(value, default) -> int:
    """A size from a DeepSpeed dict (int, float or a string like "2e7"); "auto"/None -> default."""
    if value is None or value == "auto":
        return int(default)
    return int(float(value))


@dataclass(frozen=True)
class ModelSize:
    """What the plan needs to know about the model, per tensor-parallel rank."""

    params: int
    """Parameters one tp rank holds (its shards plus the replicated ones)."""
    total_params: int
    """Parameters of the whole model (every tp shard once)."""
    largest_tensor: int
    """Elements of the largest parameter on one tp rank (it sizes swap buffers)."""
    largest_layer: int
    """Parameters of the largest module ZeRO-3 gathers at once (a transformer layer or the embedding)."""
    num_tensors: int = 0
    """Parameter tensors per tp rank."""
    shape: Optional[dict] = None
    """The GPT shape it came from (activations need s, h, a, L, V), None for a bare count."""

    @classmethod
    def from_count(cls, params: int, tp: int = 1) -> "ModelSize":
        """A model known only by its parameter count: tensors assumed to be ~1/12 of a layer."""
        per_rank = math.ceil(params / tp)
        return cls(params=per_rank, total_params=params, largest_tensor=max(1, per_rank // 24),
                   largest_layer=max(1, per_rank // 12))


def padded_vocab(vocab: int, multiple: int = 128, tp: int = 1) -> int:
    """Megatron-Core vocabulary padding as zeromega builds it (lcm of multiple and tp)."""
    step = math.lcm(multiple, tp)
    return (vocab + step - 1) // step * step


def _moe_pattern(num_layers: int, num_experts: Optional[int], moe_layer_freq) -> list[bool]:
    """Which layers are MoE layers: Megatron-Core's ``moe_layer_freq`` (every N-th from layer 0, or a 0/1 list)."""
    if not num_experts:
        return [False] * num_layers
    if isinstance(moe_layer_freq, (list, tuple)):
        if len(moe_layer_freq) != num_layers:
            raise ValueError(f"moe_layer_freq has {len(moe_layer_freq)} entries for {num_layers} layers")
        return [bool(x) for x in moe_layer_freq]
    return [i % int(moe_layer_freq) == 0 for i in range(num_layers)]


@dataclass(frozen=True)
class GPTCount:
    """Parameters of zeromega's Megatron-Core GPT on one tp (and ep) rank, piece by piece."""

    layers: tuple
    """Parameters of each transformer layer, in order (dense or MoE)."""
    expert_layers: tuple
    """Of which expert parameters (sharded over ep, reduced over expert-dp), per layer."""
    embedding: int
    """Word embedding (V h / t) plus learned positions (s h, replicated)."""
    word_embedding: int
    """The word embedding alone (V h / t): a tied output layer's copy on the last stage."""
    output: int
    """Untied output layer (V h / t), 0 when tied."""
    final_norm: int
    tensors_per_layer: tuple
    largest_tensor: int

    def stage(self, first: int, count: int, is_first: bool, is_last: bool, tied_copy: bool = True) -> int:
        """Parameters of a pipeline stage holding layers ``first .. first+count-1``."""
        n = sum(self.layers[first:first + count])
        if is_first:
            n += self.embedding
        if is_last:
            n += self.final_norm + self.output
            if tied_copy and not self.output and not is_first:
                n += self.word_embedding  # Megatron-Core keeps a copy of the tied weight on the last stage
        return n

    @property
    def total(self) -> int:
        return self.stage(0, len(self.layers), True, True)


_COUNTS: dict = {}


def gpt_count(*args, **kwargs) -> "GPTCount":
    """:func:`_gpt_count`, remembered per argument set (the layout search asks for the same counts often)."""
    key = (args, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items())))
    try:
        hit = _COUNTS.get(key)
    except TypeError:  # an unhashable argument: count without remembering
        return _gpt_count(*args, **kwargs)
    if hit is None:
        if len(_COUNTS) > 4096:
            _COUNTS.clear()
        hit = _COUNTS[key] = _gpt_count(*args, **kwargs)
    return hit


def _gpt_count(num_layers: int, hidden_size: int, num_attention_heads: int, seq_length: int, vocab_size: int,
              tp: int = 1, ffn_hidden_size: Optional[int] = None, num_query_groups: Optional[int] = None,
              tied: bool = True, learned_positions: bool = True, make_vocab_size_divisible_by: int = 128,
              swiglu: bool = False, normalization: str = "LayerNorm", add_bias_linear: bool = True,
              kv_channels: Optional[int] = None, untie_embeddings_and_output_weights: Optional[bool] = None,
              position_embedding_type: Optional[str] = None, max_position_embeddings: Optional[int] = None,
              num_experts: Optional[int] = None, moe_ffn_hidden_size: Optional[int] = None,
              moe_layer_freq=1, ep: int = 1, etp: Optional[int] = None, **_ignored) -> GPTCount:
    """Megatron-Core's GPT (local spec) counted piece by piece, as zeromega builds it (model.py).

    Per layer (t = tp, d = kv_channels or h/a, q = a d, k = g d, f the MLP width,
    Megatron-LM's ``int(8h/3 / 64) x 64`` under ``--swiglu`` when unstated):
    two norms (h each, plus h bias for LayerNorm; RMSNorm has none), QKV
    ((q + 2k) h / t, bias (q + 2k)/t), the projection (q h / t, bias h),
    fc1 (g f h / t with g = 2 for SwiGLU's fused [gate; up], bias g f / t) and
    fc2 (f h / t, bias h); without ``add_bias_linear`` no linear biases. An MoE
    layer replaces the MLP with a router ([E, h], replicated; bias E) and E/ep
    experts of width ``moe_ffn_hidden_size`` split over etp (fc1 and fc2 as
    above; biases only at etp 1, Megatron-Core's rule). Plus the
    vocab-parallel embedding (V padded to lcm(make_vocab_size_divisible_by, tp)),
    learned positions (s h, replicated; none under rope), the final norm and,
    untied, the output layer (V h / t, no bias).
    """
    h, a = hidden_size, num_attention_heads
    if untie_embeddings_and_output_weights is not None:
        tied = not untie_embeddings_and_output_weights
    if position_embedding_type is not None:
        learned_positions = position_embedding_type == "learned_absolute"
    s = max_position_embeddings or seq_length
    if ffn_hidden_size is None:
        ffn_hidden_size = int((4 * h * 2 / 3) / 64) * 64 if swiglu else 4 * h
    f = ffn_hidden_size
    g = num_query_groups or a
    d = kv_channels or h // a
    moe_pattern = _moe_pattern(num_layers, num_experts, moe_layer_freq)
    bias = add_bias_linear
    etp = etp or tp
    v = padded_vocab(vocab_size, make_vocab_size_divisible_by, tp)
    norm = h * (2 if normalization == "LayerNorm" else 1)
    glu = 2 if swiglu else 1
    qkv = (a + 2 * g) * d
    attn = qkv * h // tp + q_proj(a * d, h, tp) + (qkv // tp + h if bias else 0)
    attn_tensors = 2 + (2 if bias else 0)
    dense = glu * f * h // tp + f * h // tp + (glu * f // tp + h if bias else 0)
    dense_tensors = 2 + (2 if bias else 0)
    norm_tensors = 2 * (2 if normalization == "LayerNorm" else 1)
    layers, experts, tensors = [], [], []
    mf = moe_ffn_hidden_size or f
    local = (num_experts or 0) // max(ep, 1)
    for is_moe in moe_pattern:
        if is_moe:
            exp = local * (glu * mf * h // etp + mf * h // etp + (glu * mf // etp + h if bias else 0))
            router = num_experts * h + (num_experts if bias else 0)
            mlp, mlp_tensors = router + exp, (2 if bias else 1) + (4 if bias else 2) * local
        else:
            exp, mlp, mlp_tensors = 0, dense, dense_tensors
        layers.append(2 * norm + attn + mlp)
        experts.append(exp)
        tensors.append(norm_tensors + attn_tensors + mlp_tensors)
    word = v * h // tp
    largest = max([word, qkv * h // tp, glu * f * h // tp] + ([glu * mf * h // etp] if num_experts else []))
    return GPTCount(layers=tuple(layers), expert_layers=tuple(experts), embedding=word + (s * h if learned_positions else 0),
                    word_embedding=word, output=0 if tied else word, final_norm=norm, tensors_per_layer=tuple(tensors),
                    largest_tensor=largest)


def q_proj(q: int, h: int, tp: int) -> int:
    """The attention output projection's weight on one tp rank ([h, q / t])."""
    return q * h // tp


def gpt_size(num_layers: int, hidden_size: int, num_attention_heads: int, seq_length: int, vocab_size: int,
             tp: int = 1, **arch) -> ModelSize:
    """Exact parameter count of zeromega's Megatron-Core GPT on one tp rank (every architecture flag the run
    accepts; see :func:`gpt_count`). Checked against the built model in tests/test_plan_arch.py."""
    c = gpt_count(num_layers, hidden_size, num_attention_heads, seq_length, vocab_size, tp=tp, **arch)
    whole = gpt_count(num_layers, hidden_size, num_attention_heads, seq_length, vocab_size, tp=1,
                      **{**arch, "ep": 1, "etp": 1}) if (tp > 1 or arch.get("ep", 1) > 1) else c
    ffn = arch.get("ffn_hidden_size") or (int((4 * hidden_size * 2 / 3) / 64) * 64 if arch.get("swiglu")
                                         else 4 * hidden_size)
    shape = dict(num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                 seq_length=seq_length, vocab_size=padded_vocab(vocab_size, arch.get("make_vocab_size_divisible_by",
                                                                                      128), tp),
                 ffn_hidden_size=ffn, tp=tp)
    outside = 1 + (c.embedding > c.word_embedding) + (1 if c.output else 0) + (2 if c.final_norm > hidden_size else 1)
    return ModelSize(params=c.total, total_params=whole.total, largest_tensor=c.largest_tensor,
                     largest_layer=max(max(c.layers, default=0), c.word_embedding),
                     num_tensors=sum(c.tensors_per_layer) + outside, shape=shape)


@dataclass(frozen=True)
class ZeroSetup:
    """The parts of a DeepSpeed config dict that decide memory, read once (the engine's own truth)."""

    stage: int
    precision: str
    optimizer_device: str = "none"
    param_device: str = "none"
    optimizer_nvme_path: Optional[str] = None
    param_nvme_path: Optional[str] = None
    optimizer_pin: bool = True
    param_pin: bool = True
    sub_group_size: int = int(1e9)
    reduce_bucket_size: int = int(5e8)
    allgather_bucket_size: int = int(5e8)
    prefetch_bucket_size: int = int(5e7)
    max_live_parameters: int = int(1e9)
    max_reuse_distance: int = int(1e9)
    optimizer_buffer_count: int = 4
    param_buffer_count: int = 5
    param_buffer_size: int = int(1e8)
    max_in_cpu: int = int(1e9)
    aio_intra_op_parallelism: int = 1
    contiguous_gradients: bool = True

    @classmethod
    def from_deepspeed(cls, ds: dict) -> "ZeroSetup":
        zero = ds.get("zero_optimization") or {}
        if isinstance(zero, bool):
            zero = {"stage": int(zero)}
        opt = zero.get("offload_optimizer") or {}
        par = zero.get("offload_param") or {}
        precision = "fp32"
        if (ds.get("bf16") or ds.get("bfloat16") or {}).get("enabled") in (True, "true"):
            precision = "bf16"
        elif (ds.get("fp16") or {}).get("enabled") in (True, "true"):
            precision = "fp16"
        aio = ds.get("aio") or {}

        def pick(*keys, default):
            for key in keys:
                if key in zero:
                    return _num(zero[key], default)
            return int(default)

        return cls(
            stage=int(zero.get("stage", 0)), precision=precision,
            optimizer_device=str(opt.get("device") or "none"), param_device=str(par.get("device") or "none"),
            optimizer_nvme_path=opt.get("nvme_path"), param_nvme_path=par.get("nvme_path"),
            optimizer_pin=bool(opt.get("pin_memory", True)), param_pin=bool(par.get("pin_memory", True)),
            sub_group_size=pick("sub_group_size", default=1e9),
            reduce_bucket_size=pick("reduce_bucket_size", default=5e8),
            allgather_bucket_size=pick("allgather_bucket_size", default=5e8),
            prefetch_bucket_size=pick("stage3_prefetch_bucket_size", "prefetch_bucket_size", default=5e7),
            max_live_parameters=pick("stage3_max_live_parameters", "max_live_parameters", default=1e9),
            max_reuse_distance=pick("stage3_max_reuse_distance", "max_reuse_distance", default=1e9),
            optimizer_buffer_count=_num(opt.get("buffer_count"), 4),
            param_buffer_count=_num(par.get("buffer_count"), 5),
            param_buffer_size=_num(par.get("buffer_size"), 1e8),
            max_in_cpu=_num(par.get("max_in_cpu"), 1e9),
            aio_intra_op_parallelism=_num(aio.get("intra_op_parallelism"), 1),  # 0.19 reads no "thread_count"
            contiguous_gradients=zero.get("contiguous_gradients", True) not in (False, "false"),
        )

    @property
    def lp(self) -> int:
        return _LP_BYTES[self.precision]

    @property
    def mixed(self) -> bool:
        return self.precision != "fp32"


PHASES = ("backward", "step", "gather")


@dataclass(frozen=True)
class Row:
    """One line of the plan: what, where it lives, bytes per rank, and the formula."""

    name: str
    where: str
    """``device`` (the accelerator; host RAM on a CPU run), ``host``, ``pinned`` (host, page-locked), ``nvme``."""
    bytes: int
    formula: str
    transient: bool = False
    """Alive only during part of a step (buckets, gathered params, activations)."""
    phase: str = "backward"
    """For a transient row, when it is alive: ``"backward"`` (forward + backward), ``"step"`` (the
    optimizer's update) or ``"gather"`` (ZeRO-1/2's all-gather of the updated parameters after it)."""
    only_on: Optional[str] = None
    """``"cpu"`` / ``"cuda"`` for a row that exists on that device type only (a collective's copies)."""


@dataclass(frozen=True)
class Activations:
    """Activation shape: per-layer bytes sbh(34 + 5as/h) (Korthikanti et al., 16-bit), scaled for fp32."""

    seq_length: int
    micro_batch: int
    sequence_parallel: bool = False
    recompute: Optional[str] = None
    """None, ``"selective"`` (drops the 5as/h attention term) or ``"full"`` (keeps 2sbh per layer)."""
    cp: int = 1
    """Context-parallel size (Ulysses x ring): each rank holds s / cp of the sequence."""
    flash: bool = False
    """Fused / flash attention (no s x s scores kept: the 5as/h term is gone, as under selective
    recompute). zeromega's cp > 1 attention runs torch's flash kernels; Megatron-Core's local attention
    (cp 1) is unfused and keeps the scores."""


@dataclass
class MemoryPlan:
    """Per-rank bytes by location, and the peak a run should measure."""

    setup: ZeroSetup
    model: ModelSize
    dp: int
    tp: int
    rows: list[Row] = field(default_factory=list)
    baseline: int = PROCESS_BASELINE_BYTES
    engine: str = "deepspeed"
    """``deepspeed`` (ZeRO 0-3) or ``megatron`` (Megatron-Core DDP, distributed optimizer or not)."""
    label: str = ""
    """What part of the model this rank holds (a pipeline stage's layers), empty for the whole model."""

    def rows_on(self, device_type: str) -> list[Row]:
        """The rows that exist on ``device_type`` (``"cpu"`` or ``"cuda"``)."""
        return [r for r in self.rows if r.only_on in (None, device_type)]

    def total(self, where: str, transient: bool = True, device_type: str = "cpu") -> int:
        """Bytes at ``where``; with ``transient`` the worst phase's transients are included."""
        rows = self.rows_on(device_type)
        resident = sum(r.bytes for r in rows if r.where == where and not r.transient)
        if not transient:
            return resident
        return resident + max((sum(r.bytes for r in rows if r.where == where and r.transient and r.phase == ph)
                               for ph in PHASES), default=0)

    def transient_phase(self, where: str = "device", device_type: str = "cpu") -> str:
        """The phase whose transients at ``where`` are largest (where the peak happens)."""
        size = {ph: sum(r.bytes for r in self.rows_on(device_type) if r.where == where and r.transient
                        and r.phase == ph) for ph in PHASES}
        return max(size, key=size.get)

    @property
    def nvme_bytes(self) -> int:
        """Bytes this rank writes under its nvme path(s)."""
        return self.total("nvme")

    @property
    def pinned_bytes(self) -> int:
        """Page-locked host bytes this rank asks for (mlock; counts against ``ulimit -l``)."""
        return self.total("pinned")

    @property
    def host_bytes(self) -> int:
        """Host RAM of this rank outside the device (pinned included)."""
        return self.total("host") + self.total("pinned")

    @property
    def device_bytes(self) -> int:
        """Accelerator bytes (the CUDA allocator's peak)."""
        return self.total("device", device_type="cuda")

    def peak(self, device_type: str = "cpu") -> int:
        """The peak a run measures: on CPU the resident set (device and host are the same RAM,
        plus the process baseline); on CUDA the allocator's peak on the device."""
        if device_type == "cuda":
            return self.device_bytes
        rows = self.rows_on("cpu")
        resident = sum(r.bytes for r in rows if r.where != "nvme" and not r.transient)
        phases = [sum(r.bytes for r in rows if r.where != "nvme" and r.transient and r.phase == ph) for ph in PHASES]
        return self.baseline + resident + max(phases)

    def paper_bytes(self) -> int:
        """The ZeRO paper's model-state bytes per rank (params + grads + optimizer, no extras)."""
        s, p, n = self.setup, self.model.params, self.dp
        k = 12 if s.mixed else 8
        params = s.lp * p / (n if s.stage >= 3 else 1)
        grads = s.lp * p / (n if s.stage >= 2 else 1)
        opt = k * p / (n if s.stage >= 1 else 1)
        return int(params + grads + opt)

    def table(self, device_type: str = "cpu") -> str:
        s = self.setup
        if self.engine == "megatron":
            opt = "distributed optimizer (ZeRO-1 over dp)" if s.stage >= 1 else "plain optimizer (no sharding)"
            head = (f"Megatron-Core DDP + {opt}, {s.precision}; {self.label}{self.model.params / 1e6:,.1f}M params "
                    f"on this rank, tp {self.tp} x dp {self.dp}")
        else:
            head = (f"ZeRO-{s.stage} {s.precision}, offload optimizer: {s.optimizer_device}, params: "
                    f"{s.param_device}; {self.model.total_params / 1e6:,.1f}M params, {self.model.params / 1e6:,.1f}M "
                    f"per tp rank, tp {self.tp} x dp {self.dp}")
        lines = [head, f"{'per rank':<34} {'where':<7} {'MiB':>11}  formula"]
        for r in self.rows_on(device_type):
            mark = {"backward": " *", "step": " **", "gather": " ***"}[r.phase] if r.transient else ""
            lines.append(f"{r.name + mark:<34} {r.where:<7} {r.bytes / MiB:>11,.1f}  {r.formula}")
        if self.engine == "deepspeed":
            lines.append(f"{'ZeRO paper model states':<34} {'':<7} {self.paper_bytes() / MiB:>11,.1f}")
        for where in ("device", "host", "pinned", "nvme"):
            if any(r.where == where for r in self.rows):
                lines.append(f"{'total ' + where:<34} {'':<7} {self.total(where, device_type=device_type) / MiB:>11,.1f}")
        label = "peak device (allocator)" if device_type == "cuda" else "peak resident (with baseline)"
        lines.append(f"{label:<34} {'':<7} {self.peak(device_type) / MiB:>11,.1f}")
        lines.append("* alive during forward/backward only; ** during the optimizer step only; *** during "
                     "ZeRO-1/2's parameter all-gather after it; the peak counts the largest phase")
        return "\n".join(lines)

    def as_dict(self, device_type: str = "cpu") -> dict:
        return {"rows": [r.__dict__ for r in self.rows], "peak": self.peak(device_type),
                "nvme": self.nvme_bytes, "pinned": self.pinned_bytes, "paper": self.paper_bytes()}


def _io_aligned(numel: int, elem: int, intra_op: int = 1) -> int:
    align = AIO_ALIGN_BYTES * intra_op // elem
    return (numel + align - 1) // align * align


def plan_memory(ds: dict, model: ModelSize, dp: int, tp: int = 1, activations: Optional[Activations] = None,
                baseline: int = PROCESS_BASELINE_BYTES, client_adam: str = "torch") -> MemoryPlan:
    """The per-rank memory plan for DeepSpeed config ``ds`` (as ``to_deepspeed`` writes it).

    ``client_adam``: ``"torch"`` when the optimizer is torch's multi-tensor
    AdamW (zeromega's choice without offload), ``"fused"`` for an optimizer
    that updates in place (DeepSpeed's CPU Adam, used under offload).
    """
    s = ZeroSetup.from_deepspeed(ds)
    plan = MemoryPlan(setup=s, model=model, dp=dp, tp=tp, baseline=baseline)
    rows = plan.rows
    p, n, lp = model.params, max(dp, 1), s.lp
    part = math.ceil(p / n)  # elements of one rank's partition (ZeRO pads to a multiple of N)
    opt_where = {"none": "device", "cpu": "host", "nvme": "nvme"}[s.optimizer_device]
    if s.stage == 0:
        rows.append(Row("parameters", "device", lp * p, f"{lp} P"))
        rows.append(Row("gradients", "device", lp * p, f"{lp} P"))
        if s.mixed:
            rows.append(Row("fp32 master + grads", "device", 8 * p, "(4 + 4) P"))
        rows.append(Row("Adam m, v", "device", 8 * p, "8 P"))
        rows.append(Row("all-reduce bucket", "device", 4 * min(s.reduce_bucket_size, p),
                        "4 x min(reduce_bucket_size, P)", transient=True))
        _optimizer_temporaries(rows, s, p, client_adam)
        _activations(rows, s, model, tp, activations)
        return plan

    # --- parameters
    if s.stage < 3:
        rows.append(Row("parameters", "device", lp * p, f"{lp} P"))
    elif s.param_device == "none":
        rows.append(Row("parameter partition", "device", lp * part, f"{lp} P/N"))
    elif s.param_device == "cpu":
        rows.append(Row("parameter partition", "pinned" if s.param_pin else "host", lp * part, f"{lp} P/N"))
    else:
        in_cpu = min(part, s.max_in_cpu)
        if in_cpu:
            rows.append(Row("parameters kept in RAM (max_in_cpu)", "host", lp * in_cpu, f"{lp} min(P/N, max_in_cpu)"))
        rows.append(Row("parameter partition", "nvme", lp * _io_aligned(part, lp, s.aio_intra_op_parallelism),
                        f"{lp} P/N"))
        buf = _io_aligned(s.param_buffer_size, lp, s.aio_intra_op_parallelism)
        rows.append(Row("param swap buffers", "pinned", lp * buf * s.param_buffer_count,
                        f"{lp} x buffer_count {s.param_buffer_count} x buffer_size {s.param_buffer_size:.3g}"))
        # The buffer the updated parameters are swapped out through after the step: DeepSpeed sizes it
        # by the *whole* (ds_numel) tensors of the largest sub-group, so N x its partition (stage3.py,
        # reserve_partitioned_swap_space; found by a live-tensor census: 154 MiB at N = 2, 2e7 sub-groups).
        rows.append(Row("param swap-out buffer", "pinned", lp * n * min(s.sub_group_size, part),
                        f"{lp} x N x min(sub_group_size, P/N)"))
    # --- gradients
    if s.stage == 1 and s.optimizer_device == "none":
        # ZeRO-1 measured (fp32, 8 x 1024 GPT, 2 ranks, /proc/self/status around every micro-batch): the
        # full gradients appear with the first backward, stay while micro-batches accumulate, and are freed
        # at the accumulation boundary once reduced into this rank's partition; after the step the resident
        # set is back to parameters + master, m, v (4 P + 12 P/N), with no gradient left.
        rows.append(Row("gradients (accumulated)", "device", lp * p, f"{lp} P", transient=True))
    elif s.stage == 1:
        rows.append(Row("gradients", "device", lp * p, f"{lp} P"))
    elif s.stage == 2:
        rows.append(Row("gradient partition", "device", lp * part, f"{lp} P/N"))
    else:  # ZeRO-3 accumulates in the model dtype, on the host when the optimizer is offloaded
        where = "device" if s.optimizer_device == "none" else "host"
        rows.append(Row("gradient partition", where, lp * part, f"{lp} P/N"))
    if s.stage == 1 and s.optimizer_device == "none":
        # The reduced partition exists from the boundary's reduce to the end of the update; step() then
        # flattens it into a new fp32 tensor (``flatten(averaged_gradients)``, ``.to(fp32)``) that the
        # optimizer reads, while the reduced one is still allocated: 16 P/N above the resident states
        # during the step (lp + 4 + AdamW's 8), measured 772 MiB at P/N = 50.6M, fp32.
        rows.append(Row("reduced gradient partition", "device", lp * part, f"{lp} P/N", transient=True))
        rows.append(Row("reduced gradient partition", "device", lp * part, f"{lp} P/N", transient=True,
                        phase="step"))
        rows.append(Row("flattened fp32 gradient partition", "device", 4 * part, "4 P/N", transient=True,
                        phase="step"))
    elif s.stage < 3 or s.optimizer_device == "cpu":
        rows.append(Row("fp32 gradient partition (optimizer)", opt_where, 4 * part, "4 P/N"))
    elif s.optimizer_device == "none":
        rows.append(Row("fp32 gradients of the sub-group stepped", "device", 4 * min(s.sub_group_size, part),
                        "4 x min(sub_group_size, P/N)", transient=True, phase="step"))
    if s.stage == 3 and s.contiguous_gradients:
        rows.append(Row("reduce bucket (kept)", "device", lp * s.reduce_bucket_size, f"{lp} x reduce_bucket_size"))
    # --- optimizer: fp32 master + Adam m, v (every stage clones the master; see the module doc)
    master = True
    k = 8 + (4 if master else 0)
    rows.append(Row("optimizer states (master, m, v)" if master else "optimizer states (m, v)", opt_where,
                    k * part, f"{k} P/N"))
    if s.optimizer_device == "nvme":
        # DeepSpeed swaps each sub-group's fp32 gradients out beside its states (large-model demo,
        # 567M fp32 on 2 ranks: swap files 10.6 GiB = 16 P + 4 P).
        rows.append(Row("fp32 gradient swap", "nvme", 4 * _io_aligned(part, 4, s.aio_intra_op_parallelism),
                        "4 P/N"))
        sub = _io_aligned(min(s.sub_group_size, part), 4, s.aio_intra_op_parallelism)
        rows.append(Row("optimizer swap buffers", "pinned", 4 * sub * s.optimizer_buffer_count,
                        f"4 x buffer_count {s.optimizer_buffer_count} x min(sub_group_size, P/N)"))
        # The sub-group being stepped is swapped in: its master, m, v and grad live in RAM.
        rows.append(Row("sub-group in flight", "host", 16 * min(s.sub_group_size, part),
                        "16 x min(sub_group_size, P/N)", transient=True, phase="step"))
    # --- transient buffers of the step
    grad_bytes = 4 if s.stage < 3 or not s.mixed else lp
    if s.stage < 3:
        rows.append(Row("reduce bucket", "device", grad_bytes * min(s.reduce_bucket_size, p),
                        f"{grad_bytes} x min(reduce_bucket_size, P)", transient=True))
        rows.append(Row("all-gather bucket", "device", lp * min(s.allgather_bucket_size, p),
                        f"{lp} x min(allgather_bucket_size, P)", transient=True, phase="gather", only_on="cuda"))
        # gloo's all_gather_into_tensor gathers into a new tensor of the whole output, then copies
        # (torch.profiler: aten::empty of lp x P under c10d::_allgather_base_, ZeRO-1/2 and offload)
        rows.append(Row("all-gather output copy (gloo)", "device", lp * p, f"{lp} P", transient=True,
                        phase="gather", only_on="cpu"))
    else:
        if s.max_reuse_distance >= p:  # every parameter is reused by backward within the distance: kept
            gathered = min(p, max(s.max_live_parameters, model.largest_layer + s.prefetch_bucket_size))
            formula = f"{lp} x min(P, max_live_parameters)"
        else:
            gathered = min(p, model.largest_layer + s.prefetch_bucket_size)
            formula = f"{lp} x (largest layer + prefetch_bucket_size)"
        rows.append(Row("gathered parameters", "device", lp * gathered, formula, transient=True))
        # autograd's full-size gradients wait for the (kept) bucket to be reduce-scattered
        rows.append(Row("gradients waiting for the bucket", "device", lp * min(s.reduce_bucket_size, p),
                        f"{lp} x min(reduce_bucket_size, P)", transient=True))
    if s.optimizer_device == "none":
        _optimizer_temporaries(rows, s, part, client_adam)
    _activations(rows, s, model, tp, activations)
    return plan


def _optimizer_temporaries(rows: list, s: ZeroSetup, stepped: int, client_adam: str) -> None:
    """torch's multi-tensor AdamW holds sqrt(v) and sqrt(v)/bias-correction for every element it steps."""
    if client_adam == "torch":
        rows.append(Row("AdamW sqrt(v) temporaries", "device", 8 * stepped,
                        "8 x elements stepped (P or P/N)", transient=True, phase="step"))


def activation_bytes(shape: dict, act: Activations, precision: str = "bf16", tp: int = 1) -> tuple[int, str]:
    """Activations of the whole layer stack held for backward, and the formula used.

    Per layer sbh(34 + 5as/h) bytes in 16-bit (Korthikanti et al. 2022); with
    tp the 24 sbh of the tp-split tensors divide by t: sbh(10 + 24/t + 5as/(ht));
    with sequence parallelism everything divides: sbh(34 + 5as/h)/t; selective
    recompute, and fused / flash attention, drop the 5as/h term; full
    recompute keeps only each layer's input (2 sbh) plus one layer's worth.
    Context parallelism (Ulysses or ring) gives each rank s / cp of the
    sequence: every term divides by cp (Ulysses' scores are a/cp heads of the
    whole sequence, the same bytes). fp32 doubles every term.
    """
    cp = max(getattr(act, "cp", 1) or 1, 1)
    s, b = act.seq_length / cp, act.micro_batch
    h, a, L = shape["hidden_size"], shape["num_attention_heads"], shape["num_layers"]
    no_scores = act.recompute == "selective" or getattr(act, "flash", False)
    attn = 0 if no_scores else 5 * a * act.seq_length / h  # scores: a s^2 b per layer, over cp ranks
    if act.sequence_parallel:
        per_layer, text = s * b * h * (34 + attn) / tp, "sbh(34 + 5as/h)/t"
    else:
        per_layer, text = s * b * h * (10 + 24 / tp + attn / tp), "sbh(10 + 24/t + 5as/(ht))"
    if no_scores:
        text = text.replace(" + 5as/h", "").replace(" + 5as/(ht)", "")
    if cp > 1:
        text = text.replace("sbh", "(s/cp)bh")
    scale = 2 if precision == "fp32" else 1
    if act.recompute == "full":
        total = L * 2 * s * b * h / (tp if act.sequence_parallel else 1) + per_layer
        return int(scale * total), "L x 2sbh + one layer"
    return int(scale * L * per_layer), f"L x {text}" + (" x 2 (fp32)" if scale == 2 else "")


def _activations(rows: list, s: ZeroSetup, model: ModelSize, tp: int, act: Optional[Activations]) -> None:
    if act is None or model.shape is None:
        return
    nbytes, formula = activation_bytes(model.shape, act, s.precision, tp)
    rows.append(Row("activations", "device", nbytes, formula, transient=True))
    # Logits and the fp32 cross-entropy: lp logits, their fp32 copy (softmax) and its gradient.
    v = model.shape["vocab_size"]
    tokens = act.seq_length // max(act.cp, 1) * act.micro_batch
    rows.append(Row("logits + loss", "device", tokens * v // tp * (s.lp + 8), f"sb V/t ({s.lp} + 4 + 4)",
                    transient=True))


def stage_layers(num_layers: int, pp: int, vpp: Optional[int] = None, first: Optional[int] = None,
                 last: Optional[int] = None, embedding_in_split: bool = False,
                 loss_in_split: bool = False) -> list[list[tuple[int, int]]]:
    """Per pipeline stage, its model chunks as (first layer, layer count).

    Even: ``L / pp`` layers per stage (``L / (pp v)`` per chunk, stage r
    holding chunks r, r + pp, ... when interleaved). Uneven, as Megatron-LM's
    ``--decoder-first-pipeline-num-layers`` / ``--decoder-last-pipeline-num-layers``
    (Megatron-Core's ``num_layers_in_first/last_pipeline_stage``): the first
    and / or last stage hold the layers given, the stages between split the
    rest evenly (not with vpp here: Megatron's interleaved uneven rules are
    not planned). ``--account-for-embedding-in-pipeline-split`` /
    ``--account-for-loss-in-pipeline-split`` count the embedding / the loss as
    one more layer: ``(L + e + l) / pp`` per stage, one transformer layer fewer
    on the first / last stage."""
    v = vpp if vpp and vpp > 1 else 1
    if embedding_in_split or loss_in_split:
        total = num_layers + embedding_in_split + loss_in_split
        if v > 1 or first is not None or last is not None or total % pp:
            raise ValueError(f"{num_layers} layers + embedding / loss = {total} do not split evenly over pp {pp}"
                             if not total % pp == 0 else "the embedding / loss accounting switches are planned "
                             "without vpp and without first / last stage layer counts")
        per = total // pp
        counts = [per] * pp
        counts[0] -= int(embedding_in_split)
        counts[-1] -= int(loss_in_split)
        if min(counts) < 1:
            raise ValueError(f"{num_layers} layers over pp {pp}: a stage would hold no transformer layer")
        first, last = counts[0], counts[-1]
    if first is None and last is None:
        if num_layers % (pp * v):
            raise ValueError(f"{num_layers} layers do not split evenly over pp {pp}" + (f" x vpp {v}" if v > 1 else "")
                             + ": give --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers")
        per_chunk = num_layers // (pp * v)
        return [[((c * pp + r) * per_chunk, per_chunk) for c in range(v)] for r in range(pp)]
    if v > 1:
        raise ValueError("uneven pipeline stages (--decoder-first/last-pipeline-num-layers) with vpp are not planned: "
                         "drop the virtual stages or split evenly")
    if pp < 2 or (first is not None and last is not None and pp < 3 and num_layers != first + last):
        raise ValueError(f"--decoder-first/last-pipeline-num-layers need pp >= 2 (pp {pp})"
                         if pp < 2 else f"first {first} + last {last} layers != {num_layers} at pp 2")
    middle_stages = pp - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    if rest < 0 or (middle_stages and (rest % middle_stages or rest == 0)) or (not middle_stages and rest):
        raise ValueError(f"{num_layers} layers minus first {first or 0} and last {last or 0} leave {rest} for the "
                         f"{middle_stages} other stage(s): they must split evenly, at least one layer each")
    per = rest // middle_stages if middle_stages else 0
    counts = [per] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    out, at = [], 0
    for n in counts:
        out.append([(at, n)])
        at += n
    return out


def in_flight_chunks(stage: int, pp: int, micro_batches: int, vpp: Optional[int] = None) -> int:
    """Model-chunk forward passes whose activations a stage holds at once under Megatron's 1F1B.

    Plain 1F1B: stage r runs ``pp - r - 1`` warm-up forwards, then one more
    before its first backward: ``min(pp - r, m)`` micro-batches. Interleaved
    (v chunks): ``(pp - r - 1) x 2 + (v - 1) pp`` warm-up chunk-forwards plus
    one, at most ``m v``; on the first stage that is ``p (1 + (p-1)/(p v))``
    micro-batches' worth of L/p layers (Narayanan et al. 2021, section 2.2)."""
    v = vpp if vpp and vpp > 1 else 1
    if v == 1:
        return min(pp - stage, micro_batches)
    return min((pp - stage - 1) * 2 + (v - 1) * pp + 1, micro_batches * v)


def plan_megatron(precision: str, model: ModelSize, dp: int, tp: int = 1, distributed_optimizer: bool = True,
                  expert_params: int = 0, expert_dp: int = 1, activation_rows: tuple = (),
                  baseline: int = PROCESS_BASELINE_BYTES, label: str = "",
                  grad_reduce_in_fp32: Optional[bool] = None) -> MemoryPlan:
    """One rank under Megatron-Core's DDP and optimizer, as zeromega's MegatronTrainer builds them.

    ``model.params`` is what this rank holds (its stage, its tp shard, its
    experts), ``expert_params`` the part of it that is experts (sharded by the
    distributed optimizer over ``expert_dp``, the rest over ``dp`` = dp x cp).
    Per parameter: the model-precision weights (lp), the gradient buffer (4
    bytes when ``grad_reduce_in_fp32``, ``ddp.grads_in_fp32``'s rule when None:
    fp32 for bf16, lp for fp16), and the optimizer: with the distributed
    optimizer fp32 master (mixed precision only: an fp32 model steps its own
    weights, the shards are views) and Adam m, v (4 + 8, over dp); without it
    the same, whole. torch's AdamW is the optimizer on a machine without
    TransformerEngine or apex (this CPU one): its sqrt(v) temporaries (8 per
    element stepped under CUDA's foreach, 8 per element of the largest tensor
    on CPU; with TE / apex FusedAdam none: not modelled) are alive during the step. After the step the
    distributed optimizer all-gathers the parameters into their buffer; gloo
    gathers into a new tensor of the whole output first (lp P)."""
    lp = _LP_BYTES[precision]
    mixed = precision != "fp32"
    setup = ZeroSetup(stage=1 if distributed_optimizer else 0, precision=precision)
    plan = MemoryPlan(setup=setup, model=model, dp=dp, tp=tp, baseline=baseline, engine="megatron", label=label)
    rows, p = plan.rows, model.params
    dense = p - expert_params
    if distributed_optimizer:
        stepped = math.ceil(dense / max(dp, 1)) + math.ceil(expert_params / max(expert_dp, 1))
        text = "P/N" if not expert_params else "(P_dense/N + P_expert/N_expert)"
    else:
        stepped, text = p, "P"
    rows.append(Row("parameters", "device", lp * p, f"{lp} P"))
    from zeromega.config.schema import DDPConfig

    if DDPConfig(grad_reduce_in_fp32=grad_reduce_in_fp32).grads_in_fp32(precision):
        rows.append(Row("gradient buffer (fp32)", "device", 4 * p, "4 P (grad_reduce_in_fp32)"))
    else:
        rows.append(Row(f"gradient buffer ({precision})", "device", lp * p, f"{lp} P (the parameters' dtype)"))
    if mixed:
        rows.append(Row("fp32 master", "device", 4 * stepped, f"4 {text}"))
    rows.append(Row("Adam m, v", "device", 8 * stepped, f"8 {text}"))
    # torch's AdamW runs multi-tensor (foreach) on CUDA: sqrt(v) and its quotient for every element at once;
    # on CPU it runs per tensor (foreach is CUDA-only by default), and Megatron's shards are per-parameter
    # views (not DeepSpeed's one flat partition), so only the largest tensor's temporaries are alive.
    largest = min(stepped, model.largest_tensor)
    rows.append(Row("AdamW sqrt(v) temporaries", "device", 8 * stepped, f"8 {text} (torch foreach)",
                    transient=True, phase="step", only_on="cuda"))
    rows.append(Row("AdamW sqrt(v) temporaries", "device", 8 * largest, "8 x largest tensor (per-tensor AdamW)",
                    transient=True, phase="step", only_on="cpu"))
    if distributed_optimizer and dp > 1:
        rows.append(Row("all-gather output copy (gloo)", "device", lp * p, f"{lp} P", transient=True,
                        phase="gather", only_on="cpu"))
    rows.extend(activation_rows)
    return plan


@dataclass
class PipelinePlan:
    """Per pipeline stage plans (one rank of each stage); the worst stage answers for the run."""

    stages: list[MemoryPlan]

    def worst(self, device_type: str = "cpu") -> MemoryPlan:
        return max(self.stages, key=lambda p: p.peak(device_type))

    def __getattr__(self, name):  # everything else (setup, rows, model, dp, ...) is the worst stage's
        if name == "stages":
            raise AttributeError(name)
        return getattr(self.worst(), name)

    def peak(self, device_type: str = "cpu") -> int:
        return self.worst(device_type).peak(device_type)

    def table(self, device_type: str = "cpu") -> str:
        if len(self.stages) == 1:
            return self.stages[0].table(device_type)
        worst = self.worst(device_type)
        lines = [f"{'pipeline stage':<44} {'params':>10} {'MiB states':>11} {'MiB peak':>11}"]
        for i, st in enumerate(self.stages):
            states = sum(r.bytes for r in st.rows_on(device_type) if not r.transient)
            mark = "  <- worst" if st is worst else ""
            lines.append(f"{'stage ' + str(i) + ' (' + st.label.rstrip('; ') + ')':<44} {st.model.params / 1e6:>9,.1f}M "
                         f"{states / MiB:>11,.1f} {st.peak(device_type) / MiB:>11,.1f}{mark}")
        lines.append("")
        lines.append(f"worst stage ({self.stages.index(worst)}):")
        lines.append(worst.table(device_type))
        return "\n".join(lines)

    def as_dict(self, device_type: str = "cpu") -> dict:
        worst = self.worst(device_type)
        return {**worst.as_dict(device_type), "worst_stage": self.stages.index(worst),
                "stages": [{"label": st.label, "params": st.model.params, "peak": st.peak(device_type)}
                           for st in self.stages]}


def _stage_activations(shape: dict, act: Activations, precision: str, tp: int, layers: int, chunks: int,
                       layers_per_chunk: int, last: bool, lp: int, largest_tensor: int = 0) -> tuple:
    rows = []
    if act is None or shape is None:
        return ()
    in_flight = chunks * layers_per_chunk
    if act.recompute == "full":  # each layer-micro-batch keeps its input; one layer's worth is rebuilt at a time
        whole, _ = activation_bytes({**shape, "num_layers": 1}, replace(act, recompute=None), precision, tp)
        scale = 2 if precision == "fp32" else 1
        kept = int(scale * 2 * act.seq_length / max(act.cp, 1) * act.micro_batch * shape["hidden_size"]
                   / (tp if act.sequence_parallel else 1))
        rows.append(Row("activations", "device", kept * in_flight + whole,
                        f"{in_flight} layer-micro-batches in flight x 2sbh + one layer", transient=True))
        one_layer = whole
    else:
        per_layer, formula = activation_bytes({**shape, "num_layers": 1}, act, precision, tp)
        rows.append(Row("activations", "device", per_layer * in_flight,
                        f"{in_flight} layer-micro-batches in flight x {formula.replace('L x ', '')}", transient=True))
        one_layer = per_layer
    # Backward through a layer allocates the gradients of its activations while that layer's saved
    # activations are still held, and autograd's gradient of a weight (lp bytes) exists until DDP's hook
    # adds it into the fp32 buffer and drops it: one layer's activation bytes plus the largest weight.
    # Measured as live bytes (64 KiB mmap threshold, fp32, first stage): pp2 8 x 512 105 MiB over the
    # resident states for 88 of activations (+11 + 4 here); tp2 x pp2 8 x 1024 123.5 for 98 (+12.3 + 8).
    rows.append(Row("backward working set", "device", one_layer + lp * largest_tensor,
                    f"one layer-micro-batch's activations + {lp} x largest tensor", transient=True))
    if last:
        v = shape["vocab_size"]
        tokens = act.seq_length // max(act.cp, 1) * act.micro_batch
        rows.append(Row("logits + loss", "device", tokens * v // tp * (lp + 8), f"sb V/t ({lp} + 4 + 4)",
                        transient=True))
    return tuple(rows)


def plan_pipeline(precision: str, layout, shape: dict, distributed_optimizer: bool = True,
                  sequence_parallel: bool = False, recompute: Optional[str] = None,
                  baseline: int = PROCESS_BASELINE_BYTES, flash: Optional[bool] = None,
                  first_stage_layers: Optional[int] = None, last_stage_layers: Optional[int] = None,
                  embedding_in_split: bool = False, loss_in_split: bool = False,
                  grad_reduce_in_fp32: Optional[bool] = None) -> PipelinePlan:
    """The Megatron-Core engine's plan per pipeline stage (pp >= 1; MoE models run there at pp 1 too)."""
    pp, tp = layout.pp, layout.tp
    vpp = getattr(layout, "vpp", None)
    cp = getattr(layout, "cp", 1)
    ep, etp = getattr(layout, "ep", 1) or 1, getattr(layout, "etp", None) or tp
    count = gpt_count(tp=tp, **{**shape, "ep": ep, "etp": etp})
    whole = gpt_size(tp=tp, **shape)
    edp = max(1, tp * cp * layout.dp // (etp * ep))
    act = Activations(shape["seq_length"], layout.micro, sequence_parallel, recompute, cp=cp,
                      flash=flash if flash is not None else cp > 1)
    m = getattr(layout, "accumulation", 1) or 1
    lp = _LP_BYTES[precision]
    plans = []
    split = stage_layers(len(count.layers), pp, vpp, first_stage_layers or getattr(layout, "first_stage_layers", None),
                         last_stage_layers or getattr(layout, "last_stage_layers", None),
                         embedding_in_split or bool(getattr(layout, "embedding_in_split", False)),
                         loss_in_split or bool(getattr(layout, "loss_in_split", False)))
    for r, chunks in enumerate(split):
        first, last = r == 0, r == pp - 1
        params = sum(count.stage(f, n, first and i == 0, last and i == len(chunks) - 1)
                     for i, (f, n) in enumerate(chunks))
        experts = sum(sum(count.expert_layers[f:f + n]) for f, n in chunks)
        layers = [f"{f}-{f + n - 1}" for f, n in chunks]
        label = (f"layers {', '.join(layers)}" + (" + embedding" if first else "")
                 + (" + output" if last and (count.output or pp == 1) else "")
                 + (" + tied output copy" if last and not count.output and pp > 1 else "") + "; ")
        size = replace(whole, params=params)
        rows = _stage_activations(whole.shape, act, precision, tp, sum(n for _, n in chunks),
                                  in_flight_chunks(r, pp, m, vpp), chunks[0][1], last, lp, whole.largest_tensor)
        plans.append(plan_megatron(precision, size, dp=layout.dp * cp, tp=tp,
                                   distributed_optimizer=distributed_optimizer, expert_params=experts,
                                   expert_dp=edp, activation_rows=rows, baseline=baseline, label=label,
                                   grad_reduce_in_fp32=grad_reduce_in_fp32))
    return PipelinePlan(plans)


def for_run(ds: dict, layout, shape: Optional[dict] = None, params: Optional[int] = None,
            sequence_parallel: bool = False, recompute: Optional[str] = None,
            flash: Optional[bool] = None, first_stage_layers: Optional[int] = None,
            last_stage_layers: Optional[int] = None, embedding_in_split: bool = False,
            loss_in_split: bool = False) -> "MemoryPlan | PipelinePlan":
    """The plan for a zeromega run: ``layout`` (tp, dp, micro) and a GPT ``shape`` or a ``params`` count.

    ``flash``: fused / flash attention (no s^2 scores); None: what zeromega runs (flash kernels at cp > 1,
    Megatron-Core's unfused local attention at cp 1)."""
    cp = getattr(layout, "cp", 1) or 1
    flash = cp > 1 if flash is None else flash
    megatron = getattr(layout, "pp", 1) > 1 or bool(shape and shape.get("num_experts"))
    if megatron:  # the engine zeromega.run.engines.select picks: Megatron-Core DDP (+ distributed optimizer)
        if shape is None:
            raise ValueError("a pipeline / MoE plan needs the model shape (a parameter count cannot be staged)")
        zero = ZeroSetup.from_deepspeed(ds)
        # ddp.grad_reduce_in_fp32 as the DeepSpeed dict carries it (plugins/zero/ds_config.py): fp32 or lp
        comm = ds.get("communication_data_type")
        return plan_pipeline(zero.precision, layout, shape, distributed_optimizer=zero.stage >= 1,
                             grad_reduce_in_fp32=None if comm is None else str(comm).lower() == "fp32",
                             sequence_parallel=sequence_parallel, recompute=recompute, flash=flash,
                             first_stage_layers=first_stage_layers, last_stage_layers=last_stage_layers,
                             embedding_in_split=embedding_in_split, loss_in_split=loss_in_split)
    if shape is not None:
        model = gpt_size(tp=layout.tp, **shape)
        act = Activations(shape["seq_length"], layout.micro, sequence_parallel, recompute, cp=cp, flash=flash)
    elif params is not None:
        model, act = ModelSize.from_count(params, layout.tp), None
    else:
        raise ValueError("for_run needs a model shape or a parameter count")
    return plan_memory(ds, model, dp=layout.dp * getattr(layout, "cp", 1), tp=layout.tp, activations=act)


__all__ = ["Activations", "MemoryPlan", "ModelSize", "PipelinePlan", "in_flight_chunks", "plan_megatron",
           "plan_pipeline", "stage_layers", "Row", "ZeroSetup", "activation_bytes", "for_run",
           "gpt_count", "gpt_size", "padded_vocab", "plan_memory", "replace"]
