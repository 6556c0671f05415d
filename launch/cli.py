"""The ``zeromega`` command line (also ``python -m zeromega``).

::

    zeromega launch [--launcher torchrun|deepspeed|pdsh|openmpi|slurm|...] [--config CFG]
        [--network-interface IFACE] [torchrun's flags | deepspeed's flags] SCRIPT [ARGS...]
    zeromega --version

    zeromega translate IN --to deepspeed|megatron|megatron-core|zeromega [--world-size N] [--format json|yaml]
    zeromega check IN [--world-size N | --nodes N --nproc-per-node G] [--json]

Everything after SCRIPT goes to the script untouched. The launch flags are
torchrun's and the deepspeed runner's, taken from their own parsers
(:mod:`zeromega.launch.launch_flags`); more than one node:
:mod:`zeromega.launch.network` and docs/multinode.md.

The processes per node come from ``--nproc-per-node`` or, without it, the
config's ``launch.nproc_per_node``; both given and different is bad input.

Before any process starts, ``launch`` checks the flags, that SCRIPT exists,
the config file (``--config``, any dialect), and that the parallel sizes
(from the config and, for a script that reads them through zeromega, from
Megatron-LM flags among ARGS, e.g.
``--tensor-model-parallel-size 4``) divide the world size. Bad input is one
line on stderr, ``zeromega launch: error: <problem>; fix: <fix>``, and exit
code 2, so scripts and CI can tell it from a failed run.

Every rank gets the config's absolute path in ``ZEROMEGA_CONFIG`` (read it
with :func:`zeromega.launch.launcher.config_path_from_env`); see
:mod:`zeromega.launch.launcher` for the rest of the rank environment.

Exit codes: 0 when every rank succeeded; otherwise the failing rank's exit
code (128 + the signal number when a signal killed it, 1 when unknown), after
one line ``zeromega launch: rank R failed (...): <exception>``; 2 for bad input.

Adding a subcommand: write ``_add_<name>(subparsers)`` that builds its parser
and sets ``handler`` (Namespace -> exit code) with ``set_defaults``, then list
it in ``SUBCOMMANDS``. A handler raises :class:`UsageError` for bad input; what subcommands share
(UsageError, reading IN) is in :mod:`zeromega.launch.cli_common`, which they import instead of this
module.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import socket
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional

from zeromega.config.errors import ConfigError
from zeromega.config.groups import DESCRIPTIONS, ORDER, rank_groups

from . import launch_flags, launcher, megatron_args, network, translate
from .cli_common import (UsageError, _add_input, _int_at_least, _layout, _read_input, crossing, node_map,
                         topology_warnings)
from .export import _add_export
from .partial import flatten
from .plan_cli import _add_plan, launch_preflight
from .plot_cli import _add_plot
from .data_cli import _add_preprocess, _add_train_tokenizer
from .cli_common import _add_shape

PROG = "zeromega"


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input as a one-line UsageError instead of a usage block."""

    def error(self, message: str):
        raise UsageError(message, f"see '{self.prog} --help'", prog=self.prog)


def _port(text: str) -> int:
    value = _int_at_least(1)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (1-65535), got {value}")
    return value


# ------------------------------------------------------------------ launch


_LAUNCH_PARSERS: list = []


def _add_launch(subparsers) -> None:
    p = subparsers.add_parser(
        "launch", allow_abbrev=False, help="start SCRIPT on every rank through torchrun or the deepspeed launcher",
        description="Start SCRIPT on every rank through torchrun's elastic agent (default) or the "
                    "deepspeed launcher, after checking the config and the parallel layout. Takes torchrun's "
                    "flags and the deepspeed runner's, read by their own parsers.",
        epilog="Every rank gets the --config path in ZEROMEGA_CONFIG. Exit code: 0 on success, the "
               "failing rank's exit code otherwise, 2 for bad input. See docs/launching.md and docs/multinode.md.")
    own = p.add_argument_group("zeromega's flags")
    own.add_argument("--launcher", choices=launch_flags.LAUNCHERS + launch_flags.DEEPSPEED_BACKENDS,
                     help="torchrun (default) or deepspeed starts the ranks; pdsh, openmpi, mvapich, slurm, mpich or "
                          "impi: the deepspeed runner with that multi-node backend (its own --launcher)")
    own.add_argument("--config", metavar="CFG",
                     help="the run config (DeepSpeed JSON, unified YAML/JSON, or Megatron-LM launch script), passed "
                          "to ranks as ZEROMEGA_CONFIG")
    own.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                     help="pin a variable of a launch-script --config over its own assignments, as check --env does "
                          "(e.g. NUM_GPUS=2 for NUM_GPUS=$(nvidia-smi ...)); every rank reads the script with it")
    own.add_argument("--network-interface", "--network_interface", metavar="IFACE",
                     help="the interface ranks talk on across nodes (sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME; "
                          "default: the interface that routes to --master-addr)")
    p.add_argument("script", nargs="?", metavar="SCRIPT", help="the Python script every rank runs")
    p.add_argument("script_args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="arguments for SCRIPT, passed untouched")
    p.set_defaults(handler=_launch, prog=p.prog)
    _LAUNCH_PARSERS.append(p)


def _with_launcher_flags(p: argparse.ArgumentParser, deepspeed: bool = True) -> dict:
    """Give ``p`` torchrun's flags, and deepspeed's when asked (importing deepspeed takes seconds: only
    when a flag is not torchrun's, for --help, or for --launcher deepspeed)."""
    if not hasattr(p, "_zeromega_families"):
        p._zeromega_families = {}
        launch_flags.add_launcher_flags(p, launch_flags.TORCHRUN, p._zeromega_families)
    if deepspeed and not getattr(p, "_zeromega_deepspeed", False):
        launch_flags.add_launcher_flags(p, launch_flags.DEEPSPEED, p._zeromega_families)
        p._zeromega_deepspeed = True
    return p._zeromega_families


def _parse_launch(parser: argparse.ArgumentParser, argv: list[str]):
    """parse_known_args with torchrun's flags; again with deepspeed's too when torchrun's do not do."""
    launch = _LAUNCH_PARSERS[-1]
    _with_launcher_flags(launch, deepspeed=bool({"-h", "--help"} & set(argv)))  # help shows both
    try:
        args, unknown = parser.parse_known_args(argv)
        if not unknown and args.launcher not in ("deepspeed", *launch_flags.DEEPSPEED_BACKENDS):
            return args, unknown
    except UsageError:
        pass
    _with_launcher_flags(launch, deepspeed=True)
    return parser.parse_known_args(argv)


# torchrun / deepspeed flags zeromega reads itself (the rest pass through verbatim)
_TORCHRUN_READ = {"nnodes", "nproc_per_node", "node_rank", "master_addr", "master_port", "max_restarts",
                  "rdzv_backend", "rdzv_endpoint", "rdzv_id", "rdzv_conf", "module", "no_python"}
_DEEPSPEED_READ = {"hostfile", "include", "exclude", "num_gpus", "num_nodes", "master_addr", "master_port",
                   "module", "no_python", "nproc_per_node", "nnodes", "node_rank", "max_restarts"}


def _flags(args: argparse.Namespace) -> argparse.Namespace:
    """Read the flags before SCRIPT with the chosen launcher's own parser; returns the fields the launch uses."""
    p = args.launch_parser
    families = _with_launcher_flags(p, deepspeed=getattr(p, "_zeromega_deepspeed", False))
    given = launch_flags.given_flags(p, args.launcher_argv)
    fam = {id(g.action): families.get(id(g.action), {launch_flags.OWN}) for g in given}
    ds_only = [g.option for g in given if fam[id(g.action)] == {launch_flags.DEEPSPEED}]
    tr_only = [g for g in given if fam[id(g.action)] == {launch_flags.TORCHRUN}]
    kind = args.launcher or ("deepspeed" if ds_only else "torchrun")
    backend = kind if kind in launch_flags.DEEPSPEED_BACKENDS else None
    kind = "deepspeed" if backend else kind
    out = argparse.Namespace(**vars(args))  # zeromega's own flags as parsed
    out.__dict__.update(launcher=kind, backend=backend, script_args=list(args.script_args), nproc_per_node=None,
                        nnodes=None, min_nodes=None, node_rank=None, master_addr=None,
                        master_port=None, max_restarts=0, hostfile=None, include="", exclude="", num_nodes=-1,
                        rdzv_backend=None, rdzv_endpoint=None, rdzv_id=None, rdzv_conf="", module=False,
                        no_python=False, no_local_rank=False, torchrun_args=[], deepspeed_args=[])
    dests = {g.action.dest for g in given}
    if kind == "torchrun":
        if ds_only:
            raise UsageError(f"{', '.join(sorted(set(ds_only)))}: deepspeed launcher flags (torchrun has none of "
                             "them)", "add --launcher deepspeed, or use --nnodes/--node-rank/--master-addr with torchrun")
        tp = launch_flags.torchrun_parser()
        ns = launch_flags.parse_with(tp, [t for g in given if launch_flags.TORCHRUN in fam[id(g.action)]
                                          for t in launch_flags.spelled_for(tp, g)] + ["SCRIPT"], "torchrun")
        _read_torchrun(ns, dests, out)
        out.torchrun_args = [t for g in given if g.action.dest not in _TORCHRUN_READ
                             and launch_flags.TORCHRUN in fam[id(g.action)] for t in launch_flags.spelled_for(tp, g)]
        return out
    # the deepspeed runner: torchrun's names for what it also has
    for g in tr_only:
        if g.action.dest in ("nnodes", "node_rank") and "hostfile" in dests:
            raise UsageError("--hostfile is given together with --nnodes/--node-rank",
                             "list the nodes in the hostfile only, or drop --hostfile")
        if g.action.dest == "nnodes" or (g.action.dest == "node_rank" and "no_ssh" not in dests):
            raise UsageError("the deepspeed launcher takes its nodes from --hostfile, not --nnodes/--node-rank",
                             "list the nodes in --hostfile (or --num_nodes), or use --launcher torchrun")
        if g.action.dest == "max_restarts":
            raise UsageError("the deepspeed launcher cannot restart ranks (--max-restarts)",
                             "use --launcher torchrun, or drop --max-restarts")
        if g.action.dest != "nproc_per_node":
            raise UsageError(f"{g.option} is a torchrun flag; the deepspeed runner has none",
                             f"drop {g.option}, or use --launcher torchrun")
    dp = launch_flags.deepspeed_parser()
    ns = launch_flags.parse_with(dp, [t for g in given if launch_flags.DEEPSPEED in fam[id(g.action)]
                                      for t in launch_flags.spelled_for(dp, g)] + ["SCRIPT"], "deepspeed")
    nproc = next((g.values[0] for g in tr_only if g.action.dest == "nproc_per_node"), None)
    if nproc is not None:
        out.nproc_per_node = _count("--nproc-per-node", nproc)
        if "num_gpus" in dests and ns.num_gpus != out.nproc_per_node:
            raise UsageError(f"--nproc-per-node {nproc} and --num_gpus {ns.num_gpus} disagree",
                             "give only one of them")
    elif "num_gpus" in dests:
        out.nproc_per_node = _count("--num_gpus", str(ns.num_gpus))
    if "num_nodes" in dests:
        out.num_nodes = _count("--num_nodes", str(ns.num_nodes))
    out.hostfile = ns.hostfile if "hostfile" in dests else None
    out.include, out.exclude = ns.include, ns.exclude
    out.master_addr = ns.master_addr if "master_addr" in dests else None
    out.master_port = _port_of(ns.master_port) if "master_port" in dests else None
    out.module, out.no_python, out.no_local_rank = ns.module, ns.no_python, ns.no_local_rank
    out.deepspeed_args = [t for g in given if g.action.dest not in _DEEPSPEED_READ
                          and launch_flags.DEEPSPEED in fam[id(g.action)] for t in launch_flags.spelled_for(dp, g)]
    if backend:
        out.deepspeed_args += ["--launcher", backend]
    return out


def _count(flag: str, text: str) -> int:
    try:
        return _int_at_least(1)(text)
    except argparse.ArgumentTypeError as err:
        raise UsageError(f"{flag} {text}: {err}", f"pass {flag} N with N >= 1") from None


def _port_of(value) -> int:
    try:
        return _port(str(value))
    except argparse.ArgumentTypeError as err:
        raise UsageError(f"--master-port {value}: {err}", "pass a TCP port (1-65535)") from None


def _read_torchrun(ns: argparse.Namespace, dests: set, out: argparse.Namespace) -> None:
    """The fields of torchrun's namespace zeromega needs (nodes, processes, rendezvous)."""
    from torch.distributed.run import determine_local_world_size, parse_min_max_nnodes

    if "nnodes" in dests:
        try:
            low, high = parse_min_max_nnodes(ns.nnodes)
        except (RuntimeError, ValueError):
            raise UsageError(f"--nnodes {ns.nnodes}: not a node count or MIN:MAX", "pass --nnodes N or --nnodes MIN:MAX")
        if low < 1 or high < low:
            raise UsageError(f"--nnodes {ns.nnodes}: needs 1 <= MIN <= MAX", "pass --nnodes N or --nnodes MIN:MAX")
        out.nnodes, out.min_nodes = high, (low if low != high else None)
    if "nproc_per_node" in dests:
        if str(ns.nproc_per_node).lstrip("-").isdigit():
            out.nproc_per_node = _count("--nproc-per-node", str(ns.nproc_per_node))
        else:
            try:
                out.nproc_per_node = determine_local_world_size(ns.nproc_per_node)
            except ValueError as err:
                raise UsageError(f"--nproc-per-node {ns.nproc_per_node}: {err}",
                                 "pass a number, or auto / cpu / gpu") from None
    if "node_rank" in dests:
        out.node_rank = _int_at_least(0)(str(ns.node_rank)) if str(ns.node_rank).isdigit() else _count(
            "--node-rank", str(ns.node_rank))
    if "master_addr" in dests:
        out.master_addr = ns.master_addr
    if "master_port" in dests:
        out.master_port = _port_of(ns.master_port)
    if "max_restarts" in dests:
        try:
            out.max_restarts = _int_at_least(0)(str(ns.max_restarts))
        except argparse.ArgumentTypeError as err:
            raise UsageError(f"--max-restarts {ns.max_restarts}: {err}", "pass --max-restarts K, K >= 0") from None
    for name in ("rdzv_backend", "rdzv_endpoint", "rdzv_id"):
        if name in dests:
            setattr(out, name, getattr(ns, name))
    out.rdzv_conf = ns.rdzv_conf if "rdzv_conf" in dests else ""
    out.module, out.no_python = bool(ns.module), bool(ns.no_python)
    if "standalone" in dests:
        out.torchrun_args.append("--standalone")


def _slurm(args: argparse.Namespace) -> None:
    """Under srun / sbatch: the job's nodes, this node's rank and node 0 from SLURM's variables,
    for what the flags leave open (torchrun only; the deepspeed runner reads SLURM itself)."""
    if args.launcher != "torchrun" or args.rdzv_endpoint:
        return
    found = launch_flags.slurm_from_env(os.environ)
    if found is None or (found.nnodes == 1 and args.nnodes is None):
        return
    args.nnodes = args.nnodes or found.nnodes
    args.node_rank = found.node_rank if args.node_rank is None else args.node_rank
    args.master_addr = args.master_addr or found.master_addr
    args.rdzv_id = args.rdzv_id or found.job_id
    print(f"zeromega launch: SLURM job {found.job_id}: node {args.node_rank} of {args.nnodes}, node 0 is "
          f"{args.master_addr}", file=sys.stderr)


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse flag combinations the chosen launcher cannot honour."""
    deepspeed = args.launcher == "deepspeed"
    chooses_slots = bool(args.include or args.exclude)
    if args.include and args.exclude:
        raise UsageError("--include and --exclude are given together", "pass only one of them")
    if chooses_slots and args.nproc_per_node is not None:
        raise UsageError("--nproc-per-node is given together with --include/--exclude",
                         "let --include/--exclude choose the slots, or drop them")
    if deepspeed:
        return
    nnodes, node_rank = args.nnodes or 1, args.node_rank or 0
    if node_rank >= nnodes:
        raise UsageError(f"--node-rank {node_rank} is not below --nnodes {nnodes}",
                         f"number the nodes 0..{nnodes - 1}")
    if nnodes > 1 and args.master_addr is None and args.rdzv_endpoint is None:
        raise UsageError(f"--nnodes {nnodes} needs the address of node 0",
                         "pass --master-addr (and the same --master-port) on every node, or --rdzv-endpoint")
    if args.network_interface and not network.interface_exists(args.network_interface):
        raise UsageError(f"--network-interface {args.network_interface}: no such interface on this machine",
                         "name one of: " + ", ".join(name for _, name in socket.if_nameindex()))


def _check_script(args: argparse.Namespace) -> None:
    if args.script is None:
        raise UsageError("SCRIPT is missing", "name the Python script every rank runs, after the options")
    if not (args.module or args.no_python) and not os.path.isfile(args.script):
        raise UsageError(f"script {args.script!r} not found", "pass the path of an existing Python script")


@contextlib.contextmanager
def _config_errors(config_path: Optional[str]):
    """Bad config input (file or Megatron flags among ARGS) as a UsageError."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):  # a bad Megatron flag value makes argparse exit
            yield
    except ConfigError as err:
        raise UsageError.from_config(err) from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as err:  # JSON of the wrong shape
        source = f"--config={config_path!r}" if config_path else "script arguments"
        raise UsageError(f"{source}: cannot read it ({type(err).__name__}: {err})",
                         "give each key the type zeromega/config/schema.py documents") from None
    except SystemExit:
        lines = stderr.getvalue().strip().splitlines() or ["invalid Megatron-LM flag"]
        problem = lines[-1].split("error: ", 1)[-1]
        raise UsageError(f"script arguments: {problem}", "fix the Megatron-LM flag among the script's ARGS") from None


def _run_config(args: argparse.Namespace):
    """The run config: the --config file (any dialect) and, for a script that reads them as zeromega's
    do, the Megatron-LM flags among ARGS (any other script's arguments are its own)."""
    megatron = args.script_args if launch_flags.reads_megatron_flags(args.script_text) else []
    own_parser = launch_flags.parses_with_script_args(args.script_text)  # it refuses what it does not know
    with _config_errors(args.config):
        if own_parser:
            from . import script_args

            script_args.check_flags(list(megatron), Path(args.script).name)
        config = translate.build(args.config, megatron_argv=list(megatron), env=args.script_env or None)
        if own_parser:
            script_args.check_config(config)
        return config


def _nproc_per_node(args: argparse.Namespace, config) -> Optional[int]:
    """--nproc-per-node, else the config's launch.nproc_per_node; they must agree when both are given."""
    flag, configured = args.nproc_per_node, config.launch.nproc_per_node
    if configured is not None and (args.include or args.exclude):
        raise UsageError.from_config(ConfigError(
            "launch.nproc_per_node", configured, f"set in --config {args.config} while --include/--exclude "
            "choose the slots", "drop launch.nproc_per_node from the config, or drop --include/--exclude"))
    if flag is not None and configured is not None and flag != configured:
        raise UsageError.from_config(ConfigError(
            "launch.nproc_per_node", configured, f"--config {args.config} says {configured} processes per "
            f"node but --nproc-per-node says {flag}",
            f"pass --nproc-per-node {configured}, set launch.nproc_per_node to {flag}, or give only one of them"))
    nodes = args.nnodes or 1
    stated = "nnodes" in config.launch.model_fields_set  # the schema's default 1 is no statement
    if stated and config.launch.nnodes != nodes and not args.hostfile:
        raise UsageError.from_config(ConfigError(
            "launch.nnodes", config.launch.nnodes, f"--config {args.config} says {config.launch.nnodes} nodes but "
            f"zeromega launch starts {nodes}", f"pass --nnodes {config.launch.nnodes} with --node-rank and "
            "--master-addr on each node, or drop launch.nnodes from the config"))
    nproc = flag if flag is not None else configured
    slots_chosen = args.include or args.exclude or (args.launcher == "deepspeed" and (
        args.hostfile or args.num_nodes > 0 or os.path.isfile(launcher.DEEPSPEED_DEFAULT_HOSTFILE)))
    if nproc is None and not slots_chosen:
        raise UsageError("--nproc-per-node is missing",
                         "pass --nproc-per-node N (processes per node), or set launch.nproc_per_node in --config")
    return nproc


def _job(args: argparse.Namespace, nproc_per_node: Optional[int]) -> launcher.Job:
    """The Job to start, once the flags are consistent and SCRIPT exists."""
    rank_env = {}
    if args.launcher == "torchrun" and (args.nnodes or 1) > 1:
        rank_env, note = network.socket_ifname_settings(
            args.master_addr or (args.rdzv_endpoint or "").rsplit(":", 1)[0] or None, args.network_interface,
            dict(os.environ))
        if note:
            print(f"zeromega launch: {note}", file=sys.stderr)
        master = args.master_addr or (args.rdzv_endpoint or "").rsplit(":", 1)[0]
        local = network.local_address_to(master) if master else None
        if local:  # posted with each step's heartbeat: a lost peer's address then names its ranks
            rank_env["ZEROMEGA_NODE_ADDR"] = local
    elif args.network_interface:
        rank_env = {name: args.network_interface for name in network.SOCKET_IFNAME_VARS}
    if args.network_interface:  # the flag wins over the environment
        os.environ.update(rank_env)
    flag = None
    if args.launcher == "torchrun" or not args.no_local_rank:
        flag = launch_flags.local_rank_flag(args.script_text)
    if args.launcher == "deepspeed" and not args.no_local_rank:
        flag = flag or "--local_rank"  # the runner passes it whatever the script declares
    return launcher.Job(
        script=args.script, script_args=list(args.script_args), nproc_per_node=nproc_per_node,
        nnodes=args.nnodes or 1, node_rank=args.node_rank or 0, master_addr=args.master_addr,
        master_port=args.master_port, max_restarts=args.max_restarts,
        config=os.path.abspath(args.config) if args.config else None,
        hostfile=args.hostfile, include=args.include, exclude=args.exclude,
        min_nodes=args.min_nodes, rdzv_backend=args.rdzv_backend, rdzv_endpoint=args.rdzv_endpoint,
        rdzv_id=args.rdzv_id, rdzv_conf=args.rdzv_conf, torchrun_args=list(args.torchrun_args),
        deepspeed_args=list(args.deepspeed_args), rank_env=rank_env, local_rank_flag=flag,
        module=args.module, no_python=args.no_python, num_nodes=args.num_nodes,
    )


def _world_size(job: launcher.Job, kind: str) -> int:
    if kind == "torchrun":
        return job.nproc_per_node * job.nnodes
    if job.hostfile and not os.path.isfile(job.hostfile):
        raise UsageError(f"hostfile {job.hostfile!r} not found", "pass the path of an existing hostfile")
    try:
        return launcher.deepspeed_world_size(job)
    except ValueError as err:  # the deepspeed runner's own hostfile/filter checks
        raise UsageError(f"deepspeed cannot use these hosts: {err}",
                         "fix the hostfile or the --include/--exclude filter") from None


def _check_layout(job: launcher.Job, kind: str, config, script_text: str = "") -> None:
    """Resolve the run config for the world size and run the ZeRO pre-flight checks (and, for a script
    that trains through zeromega's Run, the run's own)."""
    world = _world_size(job, kind)
    if world < 1:
        raise UsageError(f"no ranks to start (world size {world})", "give the job at least one slot")
    with _config_errors(job.config):
        layout = config.layout(world)
        summary = launch_preflight(config, layout, local_ranks=min(world, job.nproc_per_node or world))
        if launch_flags.runs_zeromega_run(script_text):
            from zeromega.run.prelaunch import before_launch  # the run's own checks (length, wandb, profiler)

            before_launch(config, gpt=launch_flags.parses_with_script_args(script_text))  # else an own model
    if summary:
        print(f"zeromega launch: {summary}", file=sys.stderr)
    nodes = job.nnodes if kind == "torchrun" else None
    if nodes and nodes > 1 and job.nproc_per_node:
        for line in topology_warnings(rank_groups(layout), job.nproc_per_node):
            print(f"zeromega launch: warning: {line}", file=sys.stderr)


def _launch(args: argparse.Namespace) -> int:
    args = _flags(args)
    _slurm(args)
    _check_flags(args)
    _check_script(args)
    args.script_text = "" if args.module or args.no_python else launch_flags.script_text(args.script)
    args.script_env = {}
    for item in args.env:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise UsageError(f"--env {item!r} is not NAME=VALUE", "write e.g. --env NUM_GPUS=2")
        args.script_env[name] = value
    if args.script_env:  # the ranks read the launch script again, with the same pins
        os.environ[translate.CONFIG_ENV] = json.dumps(args.script_env)
    config = _run_config(args)
    job = _job(args, _nproc_per_node(args, config))
    _check_layout(job, args.launcher, config, args.script_text)
    try:
        failure = launcher.launch(job, args.launcher)
    except launcher.LaunchError as err:
        print(f"{args.prog}: {err}", file=sys.stderr)
        return err.exit_status
    if failure is None:
        return 0
    print(f"{args.prog}: {failure.describe()}", file=sys.stderr)
    return failure.exit_status


# ------------------------------------------------------------------ translate and check


def _add_translate(subparsers) -> None:
    p = subparsers.add_parser(
        "translate", allow_abbrev=False, help="print a config in another dialect",
        description="Read IN in any dialect, validate it, and print it as a DeepSpeed JSON (with a 'zeromega' "
                    "block for what DeepSpeed has no key for), Megatron-LM arguments, Megatron-Core "
                    "TransformerConfig fields, or the unified config.",
        epilog="Notes on what the target cannot carry go to stderr. Exit code 2 for bad input.")
    _add_input(p)
    _add_shape(p)
    p.add_argument("--to", required=True, choices=("deepspeed", "megatron", "megatron-deepspeed", "megatron-core",
                                                   "zeromega"), help="the dialect to print")
    p.add_argument("--format", choices=("json", "yaml"), default="json", help="zeromega output format")
    p.add_argument("--deepspeed-out", metavar="FILE", help="--to megatron-deepspeed: where the DeepSpeed JSON "
                   "that --deepspeed_config names is written (default: IN's name + .deepspeed.json, beside IN)")
    p.set_defaults(handler=_translate, prog=p.prog)


def _translate(args: argparse.Namespace) -> int:
    filled: list[str] = []
    cfg, unknown = _read_input(args, filled)
    layout = _layout(cfg, args.world_size)
    notes = [f"{line}" for line in filled]
    if args.to == "deepspeed":
        out = translate.dumps(translate.to_deepspeed_file(cfg, layout))
    elif args.to == "zeromega":
        out = translate.dumps(translate.to_unified(cfg, layout), args.format).rstrip("\n")
    elif args.to == "megatron-core":
        out = translate.dumps(megatron_args.megatron_core_fields(cfg))
    else:
        ds_out = _deepspeed_out(args) if args.to == "megatron-deepspeed" else None
        argv, ds, more = translate.to_megatron(cfg, layout, args.to, ds_out)
        notes += more
        if ds is not None:
            _write_new(ds_out, translate.dumps(ds) + "\n")
            notes.append(f"wrote {ds_out} (the DeepSpeed JSON --deepspeed_config names)")
        lines, current = [], []
        for word in argv + unknown:
            if word.startswith("--") and current:
                lines.append(shlex.join(current))
                current = []
            current.append(word)
        out = " \\\n".join(lines + ([shlex.join(current)] if current else []))
        unknown = []  # kept in the output
    if unknown:
        notes.append(f"Megatron arguments kept but not translated: {' '.join(unknown)}")
    print(out)
    for note in notes:
        print(f"{args.prog}: note: {note}", file=sys.stderr)
    return 0


def _paths(tree: dict, prefix: str = "") -> list[str]:
    return list(flatten(tree, prefix))


def _deepspeed_out(args: argparse.Namespace) -> str:
    if args.deepspeed_out:
        return args.deepspeed_out
    base = os.path.splitext(args.input)[0]
    return f"{base}.deepspeed.json"


def _write_new(path: str, text: str) -> None:
    """Write ``path``; an existing file with other content is refused (never overwritten)."""
    if os.path.exists(path):
        with open(path) as handle:
            if handle.read() == text:
                return
        raise UsageError(f"{path} exists with other content", "pass --deepspeed-out FILE (a new file), or remove it")
    with open(path, "w") as handle:
        handle.write(text)


def _add_check(subparsers) -> None:
    p = subparsers.add_parser(
        "check", allow_abbrev=False, help="validate a config and print its layout and process groups",
        description="Validate IN for a world size and print the parallel sizes, the batch arithmetic and "
                    "which global ranks form each group, as Megatron-Core builds them.",
        epilog="The world size defaults to the config's launch section (nproc_per_node x nnodes). "
               "Exit code 2 for bad input.")
    _add_input(p)
    _add_shape(p)
    p.add_argument("--json", action="store_true", help="print the layout and groups as JSON")
    p.add_argument("--nodes", "--nnodes", type=_int_at_least(1), metavar="N",
                   help="nodes in the job: prints each node's ranks and which groups span nodes (with --nproc-per-node)")
    p.add_argument("--nproc-per-node", "--nproc_per_node", type=_int_at_least(1), metavar="G",
                   help="processes per node (default: the config's launch.nproc_per_node)")
    p.set_defaults(handler=_check, prog=p.prog)


def _check(args: argparse.Namespace) -> int:
    filled: list[str] = []
    cfg, unknown = _read_input(args, filled)
    world = args.world_size
    per_node = args.nproc_per_node or cfg.launch.nproc_per_node
    nodes = args.nodes or (cfg.launch.nnodes if "nnodes" in cfg.launch.model_fields_set else None)
    if (args.nodes or args.nproc_per_node) and per_node and nodes:
        if world is not None and world != per_node * nodes:
            raise UsageError(f"--world-size {world} is not --nodes {nodes} x --nproc-per-node {per_node}",
                             "give --world-size or --nodes with --nproc-per-node, not both")
        world = per_node * nodes
    elif args.nodes and not per_node and world is not None and world % args.nodes == 0:
        per_node = world // args.nodes
    elif args.nodes:
        raise UsageError(f"--nodes {args.nodes} needs the processes per node",
                         "pass --nproc-per-node G (or --world-size a multiple of the nodes)")
    if world is None and cfg.launch.nproc_per_node:
        world = cfg.launch.nproc_per_node * cfg.launch.nnodes
    if world is None:
        raise UsageError("--world-size is missing (and the config has no launch.nproc_per_node)",
                         "pass --world-size N")
    layout = _layout(cfg, world)
    groups = rank_groups(layout)
    nodes = world // per_node if per_node and world % per_node == 0 and (args.nodes or args.nproc_per_node) else None
    if args.json:
        out = {"layout": layout.model_dump(), "groups": groups, "order": ORDER, "autos": filled}
        if nodes:
            out["nodes"] = {"count": nodes, "nproc_per_node": per_node,
                            "spanning": {k: v for k, v in crossing(groups, per_node).items() if v}}
        print(json.dumps(out, indent=2))
        return 0
    s = cfg.sequence
    print(f"world {layout.world} = tp {layout.tp} x pp {layout.pp} x cp {layout.cp} x dp {layout.dp}"
          f"; ep {layout.ep}" + (f"; vpp {layout.vpp}" if layout.vpp else ""))
    print(f"sequence: {s.mode}" + (f" (ulysses {s.ulysses} x ring {s.ring} = cp {layout.cp})" if layout.cp > 1 else "")
          + ("; tp sequence parallel on" if cfg.parallel.sequence_parallel else ""))
    print(f"batch: global {layout.global_batch} = micro {layout.micro} x accumulation {layout.accumulation} "
          f"x dp {layout.dp}")
    print(f"ZeRO-{cfg.zero.stage}, {cfg.precision}; offload optimizer: {cfg.zero.offload_optimizer.device}, "
          f"params: {cfg.zero.offload_param.device}")
    if filled:
        print(f'"auto" filled ({len(filled)}):')
        for line in filled:
            print(f"  {line}")
    print(f"groups (Megatron-Core order {ORDER}):")
    for kind, ranks in groups.items():
        print(f"  {kind:<10} {' '.join(str(r).replace(' ', '') for r in ranks)}   # {DESCRIPTIONS[kind]}")
    if nodes:
        print(f"nodes: {nodes} x {per_node} processes")
        for line in node_map(groups, per_node, nodes):
            print(line)
        for line in topology_warnings(groups, per_node):
            print(f"{args.prog}: warning: {line}", file=sys.stderr)
    if unknown:
        print(f"{args.prog}: note: Megatron arguments not translated: {' '.join(unknown)}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------ main


def _version() -> str:
    """zeromega's version and the engines' (read from their metadata: nothing imported)."""
    from importlib import metadata

    from zeromega.version import __version__

    found = []
    for name in ("torch", "deepspeed", "megatron-core"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return f"{__version__} ({', '.join(found)})"


SUBCOMMANDS: list[Callable] = [_add_launch, _add_translate, _add_check, _add_plan, _add_export, _add_preprocess,
                               _add_train_tokenizer]
SUBCOMMANDS.append(_add_plot)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, allow_abbrev=False,
                     description="DeepSpeed ZeRO + Megatron-Core: one config, one launcher.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    args = None
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = lambda message, *_args, **_kw: f"{PROG}: warning: {message}\n"  # one line each
    try:
        if argv[:1] == ["launch"]:  # torchrun's and deepspeed's flags: imported only when launching
            args, unknown = _parse_launch(parser, argv)
        else:
            args, unknown = parser.parse_known_args(argv)
        if args.handler is _launch:
            args.launch_parser = _LAUNCH_PARSERS[-1]
            args.launcher_argv = argv[1:len(argv) - len(args.script_args) - (args.script is not None)]
        if unknown:  # options before SCRIPT that the subcommand does not know
            raise UsageError(f"unrecognized arguments: {' '.join(unknown)}",
                             f"see '{args.prog} --help'; options for SCRIPT go after SCRIPT", prog=args.prog)
        code = args.handler(args)
        for note in getattr(args, "notes", []):  # what a launch-script reader wants said (which line it read)
            print(f"{args.prog}: note: {note}", file=sys.stderr)
        return code
    except (UsageError, ConfigError) as err:  # a ConfigError here: a writer refusing what it cannot write
        err = UsageError.from_config(err) if isinstance(err, ConfigError) else err
        prog = err.prog or getattr(args, "prog", PROG)
        print(f"{prog}: error: {err.problem}; fix: {err.fix}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `zeromega ... | head`: the reader left; end quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
