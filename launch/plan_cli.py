"""``zeromega plan CFG``: the per-rank memory plan of a config, before anything starts.

::

    zeromega plan CFG [--world-size N] [--micro-batch-size B]
        [--num-layers L --hidden-size H --num-attention-heads A --seq-length S --vocab-size V
         [--ffn-hidden-size F] [--num-query-groups G] | --params N]
        [--device cpu|cuda] [--gpu-memory GiB | --gpu a100-40|a100-80|h100|h200] [--check] [--json]

With pp > 1 (or an MoE model) the plan is Megatron-Core's engine, per
pipeline stage, and the worst stage answers; ``--gpu-memory`` / ``--gpu``
add a verdict for the worst rank's device bytes.

The model shape comes from the flags, else from the config's model section
(Megatron-LM flags or the ``zeromega`` block). The plan is the one for the
DeepSpeed config the engine will get: zeromega's tuned defaults filled in
and the corrections :func:`zeromega.plugins.zero.preflight.correct` makes
(printed as notes). ``--check`` also runs the machine checks (nvme path,
free space, async I/O and CPU Adam builds, host and locked memory) and
exits 2 with the fix when one fails.

Registered in :mod:`zeromega.launch.cli` by listing :func:`_add_plan` in
``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from pydantic import ValidationError

from zeromega.config.errors import ConfigError
from zeromega.config.schema import ModelConfig, config_error

from .limits import MAX_INT

from .cli_common import UsageError, _add_input, _int_at_least, _layout, _read_input


def _add_plan(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", allow_abbrev=False, help="print the per-rank memory plan (ZeRO stage, offload, precision)",
        description="Print the bytes each rank holds for parameters, gradients, optimizer states, offload "
                    "buffers and activations under the config's ZeRO stage, offload and precision, and the "
                    "peak a run should measure.",
        epilog="The model comes from the shape flags, --params, or the config's model section. Exit code 2 "
               "for bad input or (with --check) a machine that cannot run the config.")
    _add_input(p)
    shape = p.add_argument_group("model (Megatron-LM names)")
    for flag in ("--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length", "--vocab-size",
                 "--ffn-hidden-size", "--num-query-groups"):
        shape.add_argument(flag, type=_int_at_least(1), metavar="N")
    p.add_argument("--params", type=_count, metavar="N", help="parameter count instead of a shape (e.g. 1.3e9); "
                   "no activation estimate")
    p.add_argument("--micro-batch-size", type=_int_at_least(1), metavar="B", help="override the config's micro batch")
    p.add_argument("--device", choices=("cpu", "cuda"), help="the accelerator (default: the config's, else cpu)")
    cap = p.add_mutually_exclusive_group()
    cap.add_argument("--gpu-memory", type=_gib, metavar="GiB", help="memory per GPU: prints whether the worst rank "
                     "fits (its device bytes under CUDA)")
    cap.add_argument("--gpu", choices=sorted(GPU_MEMORY_GIB), help="the GPU type, for its published memory size")
    p.add_argument("--check", action="store_true", help="also run the machine checks (nvme path, ops, memory)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(handler=_plan, prog=p.prog)


GPU_MEMORY_GIB = {
    # NVIDIA's published HBM sizes (the stacks are binary-sized, so GB there is GiB here):
    # A100 datasheet (nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/
    # nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): 40 GB HBM2 / 80 GB HBM2e;
    # H100 datasheet (resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet): SXM 80 GB;
    # H200 product page (nvidia.com/en-us/data-center/h200/): 141 GB HBM3e.
    # CUDA reports a little less (nvidia-smi: H100 SXM 81,559 MiB = 79.6 GiB, H200 143,771 MiB = 140.4 GiB),
    # and the CUDA context (~0.5 GiB) comes on top of what the plan counts.
    "a100-40": 40.0, "a100-80": 80.0, "h100": 80.0, "h200": 141.0,
}


def _gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GiB") from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1e6 GiB, got {text}")
    return value


def verdict(plan, capacity_gib: float, name: str = "") -> dict:
    """Whether the worst rank's device bytes (the CUDA rows: what the allocator holds) fit ``capacity_gib``."""
    need = plan.peak("cuda")
    stages = getattr(plan, "stages", None)
    worst = f" (pipeline stage {stages.index(plan.worst('cuda'))})" if stages and len(stages) > 1 else ""
    cap = capacity_gib * 2**30
    gpu = f"{name}, " if name else ""
    if need <= cap:
        text = (f"fits: the worst rank{worst} needs {need / 2**30:,.1f} GiB of {gpu}{capacity_gib:g} GiB "
                f"({(cap - need) / 2**30:,.1f} GiB left)")
    else:
        text = (f"does not fit by {(need - cap) / 2**30:,.1f} GiB: the worst rank{worst} needs "
                f"{need / 2**30:,.1f} GiB of {gpu}{capacity_gib:g} GiB")
    return {"fits": need <= cap, "need_bytes": need, "capacity_bytes": int(cap), "text": text}


def _count(text: str) -> int:
    try:
        value = int(float(text))
    except (ValueError, OverflowError):  # OverflowError: 1e400 reads as infinity
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    if value > MAX_INT:
        raise argparse.ArgumentTypeError(f"{text} is beyond the 64-bit limit of {MAX_INT}")
    return value


_SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "vocab_size", "ffn_hidden_size",
               "num_query_groups")


def _shape(args: argparse.Namespace, cfg) -> dict | None:
    model = cfg.model.model_dump()
    shape = {k: getattr(args, k) if getattr(args, k) is not None else model.get(k) for k in _SHAPE_KEYS}
    if args.params is not None:
        given = [k for k in _SHAPE_KEYS if getattr(args, k) is not None]
        if given:
            raise UsageError(f"--params is given together with --{given[0].replace('_', '-')}",
                             "give either the shape or the parameter count")
        return None
    missing = [k for k in _SHAPE_KEYS[:5] if shape[k] is None]
    if missing:
        flags = " ".join(f"--{k.replace('_', '-')}" for k in missing)
        raise UsageError(f"the model shape is incomplete (no {flags})", f"pass {flags}, or --params N")
    shape.update(_architecture(cfg))
    return {k: v for k, v in shape.items() if v is not None}


_ARCH_KEYS = ("swiglu", "normalization", "add_bias_linear", "kv_channels", "position_embedding_type",
              "untie_embeddings_and_output_weights", "make_vocab_size_divisible_by", "max_position_embeddings")


def _architecture(cfg) -> dict:
    """The config's flags that change the parameter count besides the shape (model and moe sections)."""
    model = cfg.model.model_dump()
    arch = {k: model.get(k) for k in _ARCH_KEYS}
    moe = cfg.moe
    if moe.num_experts:
        arch.update(num_experts=moe.num_experts, moe_ffn_hidden_size=moe.ffn_hidden_size,
                    moe_layer_freq=moe.layer_freq, ep=cfg.parallel.ep, etp=cfg.parallel.etp)
    return arch


def plan_for_args(args: argparse.Namespace):
    """(plan, corrections, deepspeed dict, device type) for parsed ``zeromega plan`` arguments."""
    # plugins/zero is imported here, not at the top: ``zeromega --help`` imports this module and
    # stays ~10% faster without it (measured); nothing here needs torch.
    from zeromega.plugins.zero import defaults, preflight
    from zeromega.plugins.zero import plan as zplan
    from zeromega.plugins.zero.ds_config import to_deepspeed

    cfg, _ = _read_input(args)
    if args.micro_batch_size is not None:
        cfg = cfg.model_copy(update={"batch": cfg.batch.model_copy(update={"micro": args.micro_batch_size})})
    flags = {k: getattr(args, k) for k in _SHAPE_KEYS if getattr(args, k) is not None}
    if flags:  # the shape flags override the config's model section; the layout rules apply to them too
        try:
            model = ModelConfig.model_validate({**cfg.model.model_dump(exclude_unset=True), **flags})
        except ValidationError as err:
            raise UsageError.from_config(config_error(err, "model.")) from None
        cfg = cfg.model_copy(update={"model": model})
    world = args.world_size
    if world is None:
        world = (cfg.launch.nproc_per_node or 1) * cfg.launch.nnodes
    layout = _layout(cfg, world)
    device = args.device or (cfg.device if cfg.device in ("cpu", "cuda") else "cpu")
    shape = _shape(args, cfg)
    ds, _ = defaults.tuned(to_deepspeed(cfg, layout, device), device)

    def plan_fn(d):
        try:
            return zplan.for_run(d, layout, shape=shape, params=args.params,
                                 sequence_parallel=cfg.parallel.sequence_parallel,
                                 recompute=cfg.recompute.granularity)
        except ValueError as err:  # a pipeline / MoE layout planned from a bare count, an uneven split
            raise UsageError(str(err), "give the model shape (--num-layers ... or the config's model section)"
                             if args.params is not None else "use a layer count the pipeline stages divide") from None

    try:
        preflight.check_combinations(ds, device, fp16_supported=device == "cuda" or _cpu_fp16())
        ds, corrections = preflight.correct(ds, plan_fn(ds))
        if args.check:
            report = preflight.preflight(ds, plan_fn, device_type=device,
                                         local_ranks=min(world, cfg.launch.nproc_per_node or world))
            ds, corrections = report.ds, corrections + report.corrections
    except ConfigError as err:
        raise UsageError.from_config(err) from None
    return plan_fn(ds), corrections, ds, device


def launch_preflight(cfg, layout, local_ranks: int) -> Optional[str]:
    """The ZeRO pre-flight checks, run by ``zeromega launch`` before any rank starts.

    Only for configs that offload or ask for fp16 (the checks that need the
    machine: nvme path, free space, aio/CPU Adam ops, locked memory, RAM).
    The model shape comes from the run config (Megatron flags among the
    script's arguments); without it the space and RAM checks use a model of
    0 parameters and only the path, op and combination checks bite. Raises
    ConfigError; returns a one-line summary for the launcher to print.
    """
    z = cfg.zero
    devices = {z.offload_optimizer.device, z.offload_param.device}
    if devices == {"none"} and cfg.precision != "fp16":
        return None
    import torch

    from zeromega.plugins.zero import defaults, preflight
    from zeromega.plugins.zero import plan as zplan
    from zeromega.plugins.zero.ds_config import to_deepspeed

    device = cfg.device if cfg.device in ("cpu", "cuda") else ("cuda" if torch.cuda.is_available() else "cpu")
    model = cfg.model.model_dump()
    shape = {k: model.get(k) for k in _SHAPE_KEYS if model.get(k) is not None}
    complete = all(k in shape for k in _SHAPE_KEYS[:5])
    ds, _ = defaults.tuned(to_deepspeed(cfg, layout, device), device)
    os.environ.setdefault("DS_ACCELERATOR", device)  # else DeepSpeed warns that it guessed

    def plan_fn(d):
        if complete:
            return zplan.for_run(d, layout, shape=shape, sequence_parallel=cfg.parallel.sequence_parallel,
                                 recompute=cfg.recompute.granularity)
        return zplan.for_run(d, layout, params=0)

    report = preflight.preflight(ds, plan_fn, device_type=device, local_ranks=local_ranks)
    gib = 2**30
    sized = (f"plan {report.plan.peak(device) / gib:.2f} GiB/rank, {report.plan.nvme_bytes / gib:.2f} GiB on nvme"
             if complete else "model shape unknown: space and RAM not sized")
    return f"pre-flight passed ({sized}; {len(report.corrections)} correction(s) the ranks will apply)"


def _cpu_fp16() -> bool:
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())


def _plan(args: argparse.Namespace) -> int:
    plan, corrections, _, device = plan_for_args(args)
    capacity = args.gpu_memory if args.gpu_memory is not None else GPU_MEMORY_GIB.get(args.gpu)
    result = verdict(plan, capacity, args.gpu or "") if capacity is not None else None
    if args.json:
        extra = {"verdict": result} if result else {}
        print(json.dumps({**plan.as_dict(device), "corrections": [str(c) for c in corrections], **extra}, indent=2))
    else:
        print(plan.table(device))
        if result:
            print(f"verdict: {result['text']}")
    for c in corrections:
        print(f"{args.prog}: note: corrected {c}", file=sys.stderr)
    return 0
