"""``zeromega plan CFG``: the per-rank memory plan of a config, before anything starts.

::

    zeromega plan CFG [--world-size N] [--micro-batch-size B] [--global-batch-size B]
        [--num-layers L --hidden-size H --num-attention-heads A --seq-length S --vocab-size V
         [--ffn-hidden-size F] [--num-query-groups G] | --params N]
        [--device cpu|cuda] [--gpu-memory GiB] [--gpu a100-40|a100-80|h100|h200|b200|mi300x]
        [--nodes-of G] [--tokens N] [--attention unfused|flash]
        [--intra-node-bw GB/s] [--inter-node-bw GB/s] [--host-bw GB/s] [--check] [--json]
    zeromega plan CFG --gpus N --gpu TYPE [--nodes-of G] [--top K] [--write-config FILE] ...

With pp > 1 (or an MoE model) the plan is Megatron-Core's engine, per
pipeline stage, and the worst stage answers; ``--gpu-memory`` / ``--gpu``
add a verdict for the worst rank's device bytes, ``--gpu`` also the
predicted step time, tokens/s, MFU and (``--tokens``) days, the groups that
cross nodes, and, when it does not fit, what would. ``--gpus N`` searches
the layouts of N GPUs instead (:mod:`zeromega.plugins.plan.search`); the
model and the global batch come from CFG. See docs/planning.md.

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

from zeromega.plugins.plan.devices import DEVICES


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
    p.add_argument("--global-batch-size", type=_int_at_least(1), metavar="B",
                   help="override the config's global batch (sequences per step)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="the accelerator (default: the config's, else cpu)")
    p.add_argument("--gpu-memory", type=_gib, metavar="GiB", help="memory per GPU: prints whether the worst rank "
                   "fits (its device bytes under CUDA); with --gpu it overrides the type's size")
    p.add_argument("--gpu", choices=sorted(GPU_MEMORY_GIB), help="the GPU type: its published memory size, peaks "
                   "and links (docs/planning.md); adds the predicted step time")
    scale = p.add_argument_group("time model and layout search (docs/planning.md)")
    scale.add_argument("--gpus", type=_int_at_least(1), metavar="N", help="search the layouts of N GPUs (needs --gpu)")
    scale.add_argument("--nodes-of", type=_int_at_least(1), metavar="G", help="GPUs per node (default: the config's "
                       "launch.nproc_per_node, else 8)")
    scale.add_argument("--tokens", type=_count, metavar="N", help="token budget: days to train it")
    scale.add_argument("--attention", choices=("unfused", "flash"), help="attention kernels (default: what zeromega "
                       "runs: flash kernels at cp > 1, Megatron-Core's unfused attention otherwise)")
    scale.add_argument("--intra-node-bw", type=_gbs, metavar="GB/s", help="GPU-to-GPU bandwidth in a node, per "
                       "direction (default: the GPU type's NVLink / Infinity Fabric)")
    scale.add_argument("--inter-node-bw", type=_gbs, metavar="GB/s", help="per-GPU network bandwidth across nodes, per "
                       "direction (default: one 200 / 400 Gb/s NIC per GPU)")
    scale.add_argument("--host-bw", type=_gbs, metavar="GB/s", help="GPU-host (PCIe) bandwidth per direction")
    scale.add_argument("--top", type=_int_at_least(1), default=10, metavar="K", help="layouts listed (default 10)")
    scale.add_argument("--write-config", metavar="FILE", help="write the fastest layout as a unified YAML config "
                       "for zeromega launch --config")
    p.add_argument("--check", action="store_true", help="also run the machine checks (nvme path, ops, memory)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(handler=_plan, prog=p.prog)


GPU_MEMORY_GIB = {name: d.memory_gib for name, d in DEVICES.items()}
"""Published HBM sizes (sources in zeromega.plugins.plan.devices). CUDA reports a little less (nvidia-smi:
H100 SXM 81,559 MiB = 79.6 GiB, H200 143,771 MiB = 140.4 GiB), and the CUDA context (~0.5 GiB) comes on top
of what the plan counts."""


def _positive_below_1e6(unit: str, noun: str):
    """An argparse type: a float in (0, 1e6) of ``unit``; ``noun`` names it in the refusal."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not 0 < value < 1e6:
            raise argparse.ArgumentTypeError(f"must be between 0 and 1e6 {unit}, got {text}")
        return value

    return parse


_gbs = _positive_below_1e6("GB/s", "a bandwidth in GB/s")
_gib = _positive_below_1e6("GiB", "a number of GiB")


def _flash(args) -> Optional[bool]:
    return None if getattr(args, "attention", None) is None else args.attention == "flash"


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
                    moe_layer_freq=moe.layer_freq, ep=cfg.parallel.ep, etp=cfg.parallel.etp, moe_router_topk=moe.topk)
    return arch


def plan_for_args(args: argparse.Namespace):
    """(plan, corrections, deepspeed dict, device type, context) for parsed ``zeromega plan`` arguments; the
    context holds the config, its layout and the model shape."""
    # plugins/zero is imported here, not at the top: ``zeromega --help`` imports this module and
    # stays ~10% faster without it (measured); nothing here needs torch.
    from zeromega.plugins.zero import defaults, preflight
    from zeromega.plugins.zero import plan as zplan
    from zeromega.plugins.zero.ds_config import to_deepspeed

    cfg = _config(args)
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
                                 recompute=cfg.recompute.granularity, flash=_flash(args),
                                 first_stage_layers=cfg.parallel.first_stage_layers,
                                 last_stage_layers=cfg.parallel.last_stage_layers,
                                 embedding_in_split=cfg.parallel.embedding_in_split,
                                 loss_in_split=cfg.parallel.loss_in_split)
        except ValueError as err:  # a pipeline / MoE layout planned from a bare count, an uneven split
            raise UsageError(str(err), "give the model shape (--num-layers ... or the config's model section)"
                             if args.params is not None else "use a layer count the pipeline stages divide") from None

    try:
        fp16 = (ds.get("fp16") or {}).get("enabled") is True  # the probe computes: only asked for an fp16 run
        preflight.check_combinations(ds, device, fp16_supported=device == "cuda" or not fp16 or _cpu_fp16())
        ds, corrections = preflight.correct(ds, plan_fn(ds))
        if args.check:
            report = preflight.preflight(ds, plan_fn, device_type=device,
                                         local_ranks=min(world, cfg.launch.nproc_per_node or world))
            ds, corrections = report.ds, corrections + report.corrections
    except ConfigError as err:
        raise UsageError.from_config(err) from None
    return plan_fn(ds), corrections, ds, device, {"cfg": cfg, "layout": layout, "shape": shape}


def _config(args: argparse.Namespace):
    """The RunConfig of IN with the command line's batch and shape overrides."""
    cfg, _ = _read_input(args)
    batch = {k: v for k, v in (("micro", args.micro_batch_size), ("global_", args.global_batch_size)) if v is not None}
    if batch:
        dumped = {**cfg.batch.model_dump(by_alias=True), **{("global" if k == "global_" else k): v
                                                             for k, v in batch.items()}}
        try:
            cfg = cfg.model_copy(update={"batch": type(cfg.batch).model_validate(dumped)})
        except ValidationError as err:
            raise UsageError.from_config(config_error(err, "batch.")) from None
    flags = {k: getattr(args, k) for k in _SHAPE_KEYS if getattr(args, k) is not None}
    if flags:  # the shape flags override the config's model section; the layout rules apply to them too
        try:
            model = ModelConfig.model_validate({**cfg.model.model_dump(exclude_unset=True), **flags})
        except ValidationError as err:
            raise UsageError.from_config(config_error(err, "model.")) from None
        cfg = cfg.model_copy(update={"model": model})
    return cfg


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
    shape = run_shape(cfg)
    complete = shape is not None
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
    notes = "".join(f"; {note}" for note in report.notes)
    return f"pre-flight passed ({sized}; {len(report.corrections)} correction(s) the ranks will apply{notes})"


def run_shape(cfg) -> Optional[dict]:
    """The GPT the run will build, as the planner takes it: the config's shape over the vocabulary the run
    uses (``--vocab-size``, else its tokenizer's, as zeromega.run.gpt resolves it); None when the config does
    not give the shape (a script that builds its own model)."""
    from zeromega.run import gpt

    if any(getattr(cfg.model, name) is None for name in gpt.REQUIRED):
        return None
    shape = gpt.shape(cfg, cfg.model.vocab_size or gpt.tokenizer(cfg).vocab_size)
    return dict(shape.__dict__, tied=not shape.untie_embeddings_and_output_weights,
                learned_positions=shape.position_embedding_type == "learned_absolute")


def _cpu_fp16() -> bool:
    """fp16 trains on DeepSpeed's engine on this CPU: natively, or with zeromega's accelerator patch."""
    from zeromega.integrations.megatron import cpu_patches

    return cpu_patches.deepspeed_fp16_on_cpu()


def _cluster(args: argparse.Namespace, cfg, gpus: int):
    from zeromega.plugins.plan.devices import device
    from zeromega.plugins.plan.timing import Cluster

    node = args.nodes_of or cfg.launch.nproc_per_node or 8
    dev = device(args.gpu, memory_gib=args.gpu_memory, intra_node_gbs=args.intra_node_bw,
                 inter_node_gbs=args.inter_node_bw, host_gbs=args.host_bw)
    return Cluster(dev, gpus, gpus_per_node=node, precision=cfg.precision)


def _plan_layout(cfg, layout, ds: dict, args: argparse.Namespace):
    """The config's layout as the time model reads it (engine as zeromega.run.engines.select picks it)."""
    from zeromega.plugins.plan.timing import PlanLayout
    from zeromega.plugins.zero.plan import ZeroSetup

    zero = ZeroSetup.from_deepspeed(ds)
    flash = _flash(args)
    p = cfg.parallel
    return PlanLayout(tp=layout.tp, pp=layout.pp, dp=layout.dp, global_batch=layout.global_batch, micro=layout.micro,
                      cp=layout.cp, ep=layout.ep, etp=layout.etp, vpp=layout.vpp,
                      sequence_parallel=p.sequence_parallel, recompute=cfg.recompute.granularity,
                      engine="megatron" if layout.pp > 1 or cfg.moe.num_experts else "deepspeed",
                      zero_stage=zero.stage, offload=zero.optimizer_device,
                      flash=layout.cp > 1 if flash is None else flash,
                      first_stage_layers=p.first_stage_layers, last_stage_layers=p.last_stage_layers,
                      embedding_in_split=p.embedding_in_split, loss_in_split=p.loss_in_split)


def _time_line(st, tokens: Optional[int]) -> str:
    parts = " + ".join(f"{k} {v:,.2f}" for k, v in st.parts.items() if v >= 0.005)
    days = f"; {tokens:,} tokens: {st.days(tokens):,.1f} days" if tokens else ""
    return (f"step {st.seconds:,.2f} s ({parts}); {st.tokens_per_s:,.0f} tokens/s, MFU {st.mfu * 100:.1f}%"
            f"{days}")


def _timing(args, ctx, ds: dict, plan, capacity: Optional[float]) -> tuple[list[str], dict]:
    """The time model, topology warnings and (when it does not fit) the fixes for the config's own layout."""
    from zeromega.plugins.plan import search as psearch
    from zeromega.plugins.plan.calibration import FITTED
    from zeromega.plugins.plan.timing import step_time, topology_warnings

    cfg, layout, shape = ctx["cfg"], ctx["layout"], ctx["shape"]
    if shape is None or layout is None:
        return ["time: needs the model shape and --world-size (or the config's launch section)"], {}
    pl = _plan_layout(cfg, layout, ds, args)
    cluster = _cluster(args, cfg, layout.world)
    # the data-parallel reduce hidden behind backward or not: the run's ddp section (Megatron-Core's DDP), or the
    # overlap_comm DeepSpeed's ZeRO gets (None: the time model's default for the engine)
    overlap = cfg.ddp.overlap_grad_reduce if pl.engine == "megatron" else \
        ds.get("zero_optimization", {}).get("overlap_comm")
    try:
        st = step_time(shape, pl, cluster, FITTED, dp_overlap=overlap)
    except ValueError as err:
        raise UsageError(str(err), "see docs/planning.md for what the time model covers") from None
    peak = cluster.device.peak(cluster.precision) / 1e12
    lines = [f"time on {layout.world} x {cluster.device.name} (nodes of {cluster.gpus_per_node}; {cluster.precision} "
             f"peak {peak:,.0f} TFLOP/s, GEMMs at {FITTED.matmul:.1%} of it, fitted: docs/planning.md):",
             "  " + _time_line(st, args.tokens)]
    data = {"time": st.as_dict(), "layout": pl.describe()}
    warnings = topology_warnings(pl, cluster.gpus_per_node)
    lines += [f"warning: {w}" for w in warnings]
    data["topology_warnings"] = warnings
    need = plan.peak("cuda")
    if capacity is not None and need > capacity * 2**30:
        rows = psearch.fixes(shape, pl, cluster, capacity)
        found = psearch.search(shape, cluster, layout.global_batch, capacity_gib=capacity, flash=_flash(args))
        if found.fits:
            best = found.fits[0]
            rows.append((f"the fastest layout of {layout.world} GPUs that fits: {best.layout.describe()}", best.layout,
                         best.need, best.time))
        data["fixes"] = [{"change": c, "need_bytes": n, "fits": n <= capacity * 2**30, "step_s": t.seconds}
                         for c, _, n, t in rows]
        lines.append("what would make it fit (need of the worst rank, predicted step time and its cost):")
        lines.append(f"  {'change':<60} {'GiB':>8} {'fits':>5} {'step s':>9} {'vs now':>8}")
        for c, _, n, t in rows:
            lines.append(f"  {c:<60} {n / 2**30:>8,.1f} {'yes' if n <= capacity * 2**30 else 'no':>5} "
                         f"{t.seconds:>9,.2f} {(t.seconds / st.seconds - 1) * 100:>+7.1f}%")
    return lines, data


def _search(args: argparse.Namespace) -> int:
    """``--gpus N``: every layout of N GPUs that fits, fastest first; the rejected families and why."""
    import yaml

    from zeromega.plugins.plan import search as psearch

    if args.gpu is None:
        raise UsageError("--gpus searches layouts for a GPU type", f"add --gpu ({'|'.join(sorted(GPU_MEMORY_GIB))})")
    if args.params is not None:
        raise UsageError("--gpus needs the model shape, not a parameter count", "drop --params and give the shape")
    cfg = _config(args)
    shape = _shape(args, cfg)
    gb = cfg.batch.global_
    if gb is None:
        raise UsageError("--gpus needs the global batch", "pass --global-batch-size B (sequences per step)")
    cluster = _cluster(args, cfg, args.gpus)
    result = psearch.search(shape, cluster, gb, capacity_gib=args.gpu_memory, flash=_flash(args))
    top = result.fits[:args.top]
    if args.json:
        print(json.dumps({"considered": result.considered, "fit": len(result.fits), "capacity": result.capacity,
                          "layouts": [{"layout": c.layout.describe(), "need_bytes": c.need, **c.time.as_dict(),
                                       "config": psearch.to_unified(shape, c.layout, cluster)} for c in top],
                          "rejected": result.rejected}, indent=2))
    else:
        print(f"layouts of {args.gpus} x {cluster.device.name} (nodes of {cluster.gpus_per_node}), global batch {gb} "
              f"x seq {shape['seq_length']}: {result.considered} considered, {len(result.fits)} fit in "
              f"{result.capacity / 2**30:,.0f} GiB")
        days = f" {'days':>8}" if args.tokens else ""
        print(f"{'#':>3}  {'layout':<58} {'GiB':>6} {'step s':>8} {'tokens/s':>10} {'MFU':>6}{days}")
        for i, c in enumerate(top, 1):
            d = f" {c.time.days(args.tokens):>8,.1f}" if args.tokens else ""
            print(f"{i:>3}  {c.layout.describe():<58} {c.need / 2**30:>6.1f} {c.time.seconds:>8.2f} "
                  f"{c.time.tokens_per_s:>10,.0f} {c.time.mfu * 100:>5.1f}%{d}")
        if not top:
            print("no layout fits")
        print("rejected:")
        for family, why in result.rejected.items():
            print(f"  {family}: {why}")
    if args.write_config:
        if not top:
            raise UsageError("no layout fits, so none was written", "add GPUs, or a GPU with more memory")
        best = top[0]
        text = yaml.safe_dump(psearch.to_unified(shape, best.layout, cluster), sort_keys=False)
        try:
            with open(args.write_config, "w") as fh:
                fh.write(f"# zeromega plan --gpus {args.gpus} --gpu {args.gpu}: {best.layout.describe()}, predicted "
                         f"{best.time.seconds:.2f} s/step, {best.need / 2**30:.1f} GiB on the worst rank\n" + text)
        except OSError as err:
            raise UsageError(f"--write-config {args.write_config}: {err.strerror}", "pass a writable path") from None
        print(f"{args.prog}: wrote {args.write_config} ({best.layout.describe()}); run it with zeromega launch "
              f"--config {args.write_config} SCRIPT", file=sys.stderr)
    return 0


def _plan(args: argparse.Namespace) -> int:
    if args.gpus is not None:
        return _search(args)
    if args.write_config:
        raise UsageError("--write-config writes the best layout of a search", "add --gpus N --gpu TYPE")
    plan, corrections, ds, device, ctx = plan_for_args(args)
    capacity = args.gpu_memory if args.gpu_memory is not None else GPU_MEMORY_GIB.get(args.gpu)
    result = verdict(plan, capacity, args.gpu or "") if capacity is not None else None
    timing_lines, timing = _timing(args, ctx, ds, plan, capacity) if args.gpu else ([], {})
    if args.json:
        extra = {"verdict": result} if result else {}
        print(json.dumps({**plan.as_dict(device), "corrections": [str(c) for c in corrections], **extra, **timing},
                         indent=2))
    else:
        print(plan.table(device))
        if result:
            print(f"verdict: {result['text']}")
        for line in timing_lines:
            print(line)
    for c in corrections:
        print(f"{args.prog}: note: corrected {c}", file=sys.stderr)
    return 0
