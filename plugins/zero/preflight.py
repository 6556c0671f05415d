"""Checks a DeepSpeed ZeRO config against this machine before any rank starts.

DeepSpeed 0.19.8 accepts several configs it then quietly does not honour,
or fails on minutes into a run (after a 6-minute aio build, on the first
swap). Each check here is a pure function of the DeepSpeed config dict, the
memory plan and :class:`Machine` facts, so it runs in the launcher, in
``zeromega plan`` and in tests without a process group. A problem is a
:class:`~zeromega.config.errors.ConfigError` naming the field, the value and
the fix; a setting DeepSpeed needs but the config lacks is corrected and
reported (:func:`correct`), never changed silently.

Measured facts behind the checks: ``docs/zero-offload.md``.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Optional

from zeromega.config.errors import ConfigError

from .defaults import NVME_SUB_GROUP_SIZE
from .plan import GiB, MemoryPlan, ZeroSetup

NVME_HEADROOM = 1.10
"""Space the nvme path must have beyond the plan's swap bytes: 10% (file alignment,
DeepSpeed's gradient swap files, filesystem metadata)."""


@dataclass(frozen=True)
class OpStatus:
    """Whether a DeepSpeed C++ op can be used: ``ready`` (built or cached), ``buildable``
    (JIT build on first use, ``build_s`` seconds on this machine) or neither, with why."""

    name: str
    ready: bool
    buildable: bool
    reason: str = ""
    build_s: int = 0


# Measured JIT build times on 2 cores (docs/zero-offload.md, "JIT-built ops").
_BUILD_SECONDS = {"cpu_adam": 60, "async_io": 370}


@dataclass(frozen=True)
class Machine:
    """Facts about the host the ranks will run on (gathered by :func:`machine_facts`)."""

    available_ram: int
    """MemAvailable: bytes the ranks can still take without swapping or the OOM killer."""
    memlock_limit: Optional[int]
    """RLIMIT_MEMLOCK soft limit in bytes (None: unlimited)."""
    can_lock_any: bool
    """CAP_IPC_LOCK (root): mlock is not bounded by the limit."""
    fp16_supported: bool
    """fp16 trains on the accelerator (DeepSpeed's ``is_fp16_supported``, or on CPU zeromega's patch of it)."""
    device_type: str = "cpu"
    local_ranks: int = 1
    """Ranks on this host: they share its RAM, locked memory and nvme path."""
    ops: dict = field(default_factory=dict)
    """op name -> :class:`OpStatus` (``cpu_adam``, ``async_io``)."""


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _has_cap_ipc_lock() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 14))
    except OSError:
        pass
    return os.geteuid() == 0


def op_status(name: str) -> OpStatus:
    """Can DeepSpeed's ``cpu_adam`` / ``async_io`` op be loaded here, and at what cost?

    Ready when installed prebuilt or already in the torch extensions cache;
    buildable when the builder's ``is_compatible`` holds (for async_io that
    means libaio's headers and library: ``apt-get install -y libaio-dev``)
    and ninja and a C++ compiler exist.
    """
    import contextlib
    import io

    from deepspeed.ops import op_builder

    builder = getattr(op_builder, {"cpu_adam": "CPUAdamBuilder", "async_io": "AsyncIOBuilder"}[name])()
    try:
        from deepspeed.git_version_info import installed_ops

        if installed_ops.get(name):
            return OpStatus(name, True, True, "installed prebuilt")
    except ImportError:
        pass
    from torch.utils import cpp_extension

    cached = os.path.join(cpp_extension._get_build_directory(builder.name, False), f"{builder.name}.so")
    if os.path.exists(cached):
        return OpStatus(name, True, True, f"cached at {cached}")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        compatible = builder.is_compatible(False)
    if not compatible:
        why = "libaio headers/library not found" if name == "async_io" else "DeepSpeed's builder says incompatible"
        return OpStatus(name, False, False, why)
    if not cpp_extension.is_ninja_available():
        return OpStatus(name, False, False, "ninja is not installed")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return OpStatus(name, False, False, "no C++ compiler (c++) on PATH")
    return OpStatus(name, False, True, "JIT build on first use", _BUILD_SECONDS.get(name, 60))


def machine_facts(device_type: str = "cpu", local_ranks: int = 1, ops: tuple = ()) -> Machine:
    """The facts :func:`check` needs, read from this host (``ops``: op names to probe)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if device_type == "cuda":
        fp16 = True
    else:
        from zeromega.integrations.megatron import cpu_patches

        fp16 = cpu_patches.deepspeed_fp16_on_cpu()  # natively, or with zeromega's accelerator patch
    return Machine(available_ram=_meminfo("MemAvailable"),
                   memlock_limit=None if soft == resource.RLIM_INFINITY else soft,
                   can_lock_any=_has_cap_ipc_lock(), fp16_supported=fp16, device_type=device_type,
                   local_ranks=local_ranks, ops={name: op_status(name) for name in ops})


def ops_needed(ds: dict) -> tuple:
    """DeepSpeed ops this config makes the engine load."""
    s = ZeroSetup.from_deepspeed(ds)
    needed = []
    if s.optimizer_device != "none":
        needed.append("cpu_adam")
    if "nvme" in (s.optimizer_device, s.param_device):
        needed.append("async_io")
    return tuple(needed)


# ------------------------------------------------------------------ config-only checks


def check_combinations(ds: dict, device_type: str = "cpu", fp16_supported: bool = True) -> None:
    """Refuse what DeepSpeed accepts but does not do."""
    s = ZeroSetup.from_deepspeed(ds)
    if s.precision == "fp16" and not fp16_supported:
        raise ConfigError("fp16.enabled", True, f"the {device_type} device does not compute in fp16 (DeepSpeed "
                          "fails in _do_sanity_check: 'Type fp16 is not supported on your device')",
                          'use bf16: "bf16": {"enabled": true} (--bf16) and fp16 disabled')
    if s.optimizer_device == "nvme" and s.stage < 3:
        raise ConfigError("zero_optimization.offload_optimizer.device", "nvme", f"ZeRO-{s.stage} silently treats "
                          "nvme as cpu offload (stage_1_and_2.py writes nothing under nvme_path)",
                          "set zero_optimization.stage to 3, or offload_optimizer.device to cpu")
    if s.param_device != "none" and s.stage < 3:
        raise ConfigError("zero_optimization.offload_param.device", s.param_device,
                          f"parameter offload needs ZeRO-3; ZeRO-{s.stage} ignores it",
                          "set zero_optimization.stage to 3, or remove offload_param")
    if s.optimizer_device != "none" and s.stage == 0:
        raise ConfigError("zero_optimization.offload_optimizer.device", s.optimizer_device,
                          "optimizer offload needs ZeRO stage 1-3; ZeRO-0 ignores it",
                          "set zero_optimization.stage to 1, 2 or 3")
    for name, device, path in (("offload_optimizer", s.optimizer_device, s.optimizer_nvme_path),
                               ("offload_param", s.param_device, s.param_nvme_path)):
        if device == "nvme" and not path:
            raise ConfigError(f"zero_optimization.{name}.nvme_path", path, "nvme offload needs a directory",
                              f"set zero_optimization.{name}.nvme_path to a directory on a local fast disk")


# ------------------------------------------------------------------ corrections


@dataclass(frozen=True)
class Correction:
    """A setting changed so the config works as asked: field, old and new value, and why."""

    field: str
    old: object
    new: object
    why: str

    def __str__(self) -> str:
        return f"{self.field}: {self.old!r} -> {self.new!r} ({self.why})"


MIN_SWAP_BYTES = 1024**2
"""DeepSpeed swaps a parameter partition only from 1 MiB up (``MIN_AIO_BYTES``); smaller ones stay in RAM."""


def param_swap_needs(plan: MemoryPlan) -> tuple[int, int]:
    """(buffer_size, buffer_count) nvme parameter offload needs for this model.

    buffer_size holds the largest parameter partition. buffer_count: every
    swappable tensor (partition >= 1 MiB) of two consecutive layers (one
    computing while the next is read; a GPT layer has four: QKV, projection,
    fc1, fc2) plus 2 for the embedding and the output layer. Measured
    (DeepSpeed 0.19.8): a 4-layer h=1024 GPT trains with 10; the notes' 12
    Linear layers failed with 8 (``Not enough buffers 0 for swapping 1``).
    """
    lp, n = plan.setup.lp, plan.dp
    largest = -(-plan.model.largest_tensor // n)
    shape = plan.model.shape
    if shape:
        h, f, t = shape["hidden_size"], shape.get("ffn_hidden_size") or 4 * shape["hidden_size"], shape.get("tp", 1)
        per_layer = sum(1 for numel in (3 * h * h, h * h, h * f, f * h) if lp * numel / t / n >= MIN_SWAP_BYTES)
    else:
        per_layer = 6
    return int(largest), int(2 * per_layer + 2)


def correct(ds: dict, plan: MemoryPlan) -> tuple[dict, list[Correction]]:
    """A copy of ``ds`` with the settings DeepSpeed needs but does not set, and the list of changes.

    nvme parameter offload (DeepSpeed 0.19.8, measured): with ``max_in_cpu``
    at its default (1e9 elements, more than a partition) the parameters never
    leave RAM while 5 x 1e8-element locked buffers are added (+2.3 GB/rank),
    so ``max_in_cpu`` becomes 0; prefetching hands out swap buffers it does
    not give back (``param ... already assigned swap buffer``), so
    ``stage3_prefetch_bucket_size`` becomes 0, and so does ``stage3_max_reuse_distance``
    (parameters kept for reuse keep their buffers); buffers smaller than the
    largest partition or too few fail with ``Not enough buffers``. nvme
    optimizer offload swaps whole sub-groups through ``buffer_count`` locked
    buffers of ``sub_group_size`` fp32 elements, so DeepSpeed's default 1e9
    (16 GB locked) becomes the tuned size from :mod:`.defaults`.
    """
    ds = copy.deepcopy(ds)
    zero = ds.setdefault("zero_optimization", {})
    s = ZeroSetup.from_deepspeed(ds)
    changes: list[Correction] = []

    def put(block: dict, key: str, new, why: str, where: str, when: Callable[[object], bool]) -> None:
        old = block.get(key)
        if when(old):
            block[key] = new
            changes.append(Correction(f"{where}.{key}", old, new, why))

    if s.stage == 3 and s.optimizer_device == "nvme":
        put(zero, "sub_group_size", NVME_SUB_GROUP_SIZE, "whole sub-groups are swapped through locked buffers",
            "zero_optimization", lambda v: v is None or float(v) > NVME_SUB_GROUP_SIZE * 10)
    if s.stage == 3 and s.param_device == "nvme":
        block = zero["offload_param"]
        size, count = param_swap_needs(plan)
        put(block, "max_in_cpu", 0, "otherwise the parameters stay in RAM", "zero_optimization.offload_param",
            lambda v: v is None or float(v) >= plan.model.params / plan.dp)
        if size:  # unknown model (no plan): DeepSpeed's 1e8-element buffers stay
            put(block, "buffer_size", size, "must hold the largest parameter partition",
                "zero_optimization.offload_param", lambda v: v is None or float(v) < size)
        put(block, "buffer_count", count, "one per swappable tensor in flight",
            "zero_optimization.offload_param", lambda v: v is None or float(v) < count)
        key = "stage3_prefetch_bucket_size" if "prefetch_bucket_size" not in zero else "prefetch_bucket_size"
        put(zero, key, 0, "prefetch leaks swap buffers", "zero_optimization", lambda v: v is None or float(v) != 0)
        key = "stage3_max_reuse_distance" if "max_reuse_distance" not in zero else "max_reuse_distance"
        put(zero, key, 0, "parameters kept for reuse hold swap buffers (10 buffers failed at the default 1e9)",
            "zero_optimization", lambda v: v is None or float(v) != 0)
    return ds, changes


# ------------------------------------------------------------------ machine checks


def check_nvme_path(path: str, field_name: str, needed_bytes: int, notes: Optional[list] = None) -> None:
    """The nvme path exists, is a writable directory that takes O_DIRECT writes, and has room (swap files a
    dead run left there are removed first, ones DeepSpeed will overwrite counted as free; ``notes`` gets
    a line for each)."""
    notes = [] if notes is None else notes
    if not os.path.exists(path):
        raise ConfigError(field_name, path, "does not exist", f"create it (mkdir -p {path}) or point {field_name} "
                          "at an existing directory on a local disk")
    if not os.path.isdir(path):
        raise ConfigError(field_name, path, "is not a directory", "point it at a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(field_name, path, "is not writable by this user", f"chmod u+w {path}, or choose "
                          "a directory this user can write")
    try:
        fd, probe = tempfile.mkstemp(prefix=".zeromega-probe-", dir=path)
        os.close(fd)
    except OSError as err:
        raise ConfigError(field_name, path, f"cannot create a file there ({err.strerror})",
                          "choose a writable directory (a read-only mount cannot hold swap files)") from None
    try:
        _probe_direct_io(probe)
    except OSError as err:
        raise ConfigError(field_name, path, f"does not take O_DIRECT writes ({err.strerror}), which DeepSpeed's "
                          "async I/O needs (tmpfs and some network filesystems refuse them)",
                          "choose a directory on a local disk (ext4/xfs)") from None
    finally:
        os.unlink(probe)
    from .space_guard import stale_swap

    reclaimed, note = stale_swap(path)  # a crashed run's swap files are neither counted nor kept
    if note:
        notes.append(note)
    free = shutil.disk_usage(path).free + (reclaimed if os.path.isdir(os.path.join(path, "zero_stage_3")) else 0)
    if free < needed_bytes:
        raise ConfigError(field_name, path, f"has {free / GiB:.1f} GiB free, the run writes "
                          f"{needed_bytes / GiB:.1f} GiB there",
                          f"free {(needed_bytes - free) / GiB:.1f} GiB, choose a larger disk, or use more ranks/"
                          "nodes (ZeRO-3 splits the bytes over them)")


def _probe_direct_io(path: str) -> None:
    """One 4 KiB aligned O_DIRECT write, as libaio issues them."""
    import mmap

    fd = os.open(path, os.O_WRONLY | getattr(os, "O_DIRECT", 0))
    try:
        buf = mmap.mmap(-1, 4096)  # page-aligned
        try:
            os.write(fd, buf)
        finally:
            buf.close()
    finally:
        os.close(fd)


def check_ops(needed: tuple, machine: Machine) -> None:
    for name in needed:
        status = machine.ops.get(name)
        if status is None or status.ready or status.buildable:
            continue
        fix = ("apt-get install -y libaio-dev (then the op JIT-builds on first use, ~6 min on 2 cores)"
               if name == "async_io" else "install ninja and a C++ compiler (pip install ninja; apt-get install g++)")
        field_name = ("zero_optimization.offload_*.device" if name == "async_io"
                      else "zero_optimization.offload_optimizer.device")
        raise ConfigError(field_name, "nvme" if name == "async_io" else "cpu/nvme",
                          f"DeepSpeed's {name} op cannot be built here: {status.reason}", fix)


def check_host_memory(plan: MemoryPlan, machine: Machine) -> None:
    """Locked buffers fit ``ulimit -l`` (unless CAP_IPC_LOCK) and every rank's host bytes fit in RAM."""
    ranks = machine.local_ranks
    pinned = plan.pinned_bytes * ranks
    if pinned and not machine.can_lock_any and machine.memlock_limit is not None \
            and plan.pinned_bytes > machine.memlock_limit:
        raise ConfigError("zero_optimization.offload_*.buffer_count", plan.pinned_bytes,
                          f"each rank locks {plan.pinned_bytes / GiB:.2f} GiB of swap buffers but ulimit -l is "
                          f"{machine.memlock_limit / 2**20:.0f} MiB (mlock fails and DeepSpeed gets a null buffer)",
                          "raise it (ulimit -l unlimited, or memlock in /etc/security/limits.conf), or lower "
                          "buffer_count / buffer_size / sub_group_size")
    host = (plan.peak(machine.device_type) if machine.device_type == "cpu" else plan.host_bytes) * ranks
    if host > machine.available_ram:
        what = "resident memory" if machine.device_type == "cpu" else "host memory (offload + buffers)"
        raise ConfigError("zero_optimization", f"stage {plan.setup.stage}", f"the plan needs "
                          f"{host / GiB:.1f} GiB of {what} for {ranks} rank(s), {machine.available_ram / GiB:.1f} "
                          "GiB is available",
                          "offload optimizer and parameters to nvme (ZeRO-3), use more nodes, or a smaller "
                          "micro-batch / model")


@dataclass
class Report:
    """What :func:`preflight` found: the config to use and what it changed."""

    ds: dict
    corrections: list[Correction]
    plan: MemoryPlan
    notes: list = field(default_factory=list)
    """What the checks did on the machine (stale swap files removed or counted as free)."""


def preflight(ds: dict, plan_fn: Callable[[dict], MemoryPlan], machine: Optional[Machine] = None,
              device_type: str = "cpu", local_ranks: int = 1) -> Report:
    """Every check, in the order a user would fix things; raises ConfigError on the first problem.

    Mistakes in the config itself (combinations, an nvme path that is missing
    or too small) come before what the machine lacks (a buildable op, host
    memory), so a typo is named even on a machine without libaio. ``plan_fn``
    builds the memory plan for a config (the corrections change the plan, so
    it is built again after them).
    """
    if machine is None:
        machine = machine_facts(device_type, local_ranks, ops_needed(ds))
    check_combinations(ds, machine.device_type, machine.fp16_supported)
    ds, corrections = correct(ds, plan_fn(ds))
    plan = plan_fn(ds)
    s = plan.setup
    notes: list[str] = []
    paths: dict[str, int] = {}
    per_device = {"optimizer": 0, "param": 0}
    for row in plan.rows:
        if row.where == "nvme":
            per_device["param" if row.name.startswith("parameter") else "optimizer"] += row.bytes
    for kind, path in (("optimizer", s.optimizer_nvme_path), ("param", s.param_nvme_path)):
        device = s.optimizer_device if kind == "optimizer" else s.param_device
        if device == "nvme" and path:
            paths[str(path)] = paths.get(str(path), 0) + per_device[kind]
    for path, nbytes in paths.items():
        name = ("zero_optimization.offload_optimizer.nvme_path" if str(s.optimizer_nvme_path) == path
                else "zero_optimization.offload_param.nvme_path")
        check_nvme_path(path, name, int(nbytes * machine.local_ranks * NVME_HEADROOM), notes)
    check_ops(ops_needed(ds), machine)
    check_host_memory(plan, machine)
    return Report(ds, corrections, plan, notes)


__all__ = ["Correction", "Machine", "OpStatus", "Report", "check_combinations", "check_host_memory",
           "check_nvme_path", "check_ops", "correct", "machine_facts", "op_status", "ops_needed",
           "param_swap_needs", "preflight"]
