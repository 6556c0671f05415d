"""The ``zeromega`` command line (also ``python -m zeromega``).

::

    zeromega launch [--nproc-per-node N] [--launcher torchrun|deepspeed]
        [--nnodes M --node-rank R --master-addr A --master-port P | --hostfile F [--include S | --exclude S]]
        [--max-restarts K] [--config CFG] SCRIPT [ARGS...]

    zeromega translate IN --to deepspeed|megatron|megatron-core|zeromega [--world-size N] [--format json|yaml]
    zeromega check IN [--world-size N] [--json]

Everything after SCRIPT goes to the script untouched. Flag names are
torchrun's (underscore spellings accepted too) and the deepspeed launcher's.

The processes per node come from ``--nproc-per-node`` or, without it, the
config's ``launch.nproc_per_node``; both given and different is bad input.

Before any process starts, ``launch`` checks the flags, that SCRIPT exists,
the config file (``--config``, any dialect), and that the parallel sizes
(from the config and from Megatron-LM flags among ARGS, e.g.
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
import sys
import warnings
from typing import Callable, Optional

from zeromega.config.errors import ConfigError
from zeromega.config.groups import DESCRIPTIONS, ORDER, rank_groups

from . import launcher, megatron_args, translate
from .cli_common import UsageError, _add_input, _int_at_least, _layout, _read_input
from .export import _add_export
from .partial import flatten
from .plan_cli import _add_plan, launch_preflight
from .plot_cli import _add_plot
from .cli_common import _add_shape
from .data_cli import _add_preprocess, _add_train_tokenizer

PROG = "zeromega"
LAUNCHERS = ("torchrun", "deepspeed")


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


def _add_launch(subparsers) -> None:
    p = subparsers.add_parser(
        "launch", allow_abbrev=False, help="start SCRIPT on every rank through torchrun or the deepspeed launcher",
        description="Start SCRIPT on every rank through torchrun's elastic agent (default) or the "
                    "deepspeed launcher, after checking the config and the parallel layout.",
        epilog="Every rank gets the --config path in ZEROMEGA_CONFIG. Exit code: 0 on success, the "
               "failing rank's exit code otherwise, 2 for bad input.")
    p.add_argument("--nproc-per-node", "--nproc_per_node", type=_int_at_least(1), metavar="N",
                   help="processes per node (default: the config's launch.nproc_per_node; required unless "
                        "--include/--exclude choose the slots)")
    p.add_argument("--launcher", choices=LAUNCHERS, default="torchrun",
                   help="which launcher starts the ranks (default: torchrun)")
    p.add_argument("--nnodes", type=_int_at_least(1), metavar="M", help="number of nodes (torchrun; default 1)")
    p.add_argument("--node-rank", "--node_rank", type=_int_at_least(0), metavar="R",
                   help="this node's rank (torchrun; default 0)")
    p.add_argument("--master-addr", "--master_addr", metavar="A", help="address of node 0")
    p.add_argument("--master-port", "--master_port", type=_port, metavar="P",
                   help="port on node 0 (default: a free port on a single node)")
    p.add_argument("--hostfile", metavar="F", help="deepspeed hostfile ('host slots=N' lines)")
    p.add_argument("--include", default="", metavar="S", help="deepspeed: hosts/slots to use, e.g. worker-0:0,1")
    p.add_argument("--exclude", default="", metavar="S", help="deepspeed: hosts/slots to leave out")
    p.add_argument("--max-restarts", "--max_restarts", type=_int_at_least(0), default=0, metavar="K",
                   help="torchrun: restart the ranks up to K times on failure (default 0)")
    p.add_argument("--config", metavar="CFG",
                   help="the run config (DeepSpeed JSON, unified YAML/JSON, or Megatron-LM launch script), passed "
                        "to ranks as ZEROMEGA_CONFIG")
    p.add_argument("script", nargs="?", metavar="SCRIPT", help="the Python script every rank runs")
    p.add_argument("script_args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="arguments for SCRIPT, passed untouched")
    p.set_defaults(handler=_launch, prog=p.prog)


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse flag combinations the chosen launcher cannot honour."""
    deepspeed = args.launcher == "deepspeed"
    chooses_slots = bool(args.include or args.exclude)
    if (args.hostfile or chooses_slots) and not deepspeed:
        raise UsageError("--hostfile/--include/--exclude are deepspeed launcher flags",
                         "add --launcher deepspeed, or use --nnodes/--node-rank/--master-addr with torchrun")
    if args.include and args.exclude:
        raise UsageError("--include and --exclude are given together", "pass only one of them")
    if chooses_slots and args.nproc_per_node is not None:
        raise UsageError("--nproc-per-node is given together with --include/--exclude",
                         "let --include/--exclude choose the slots, or drop them")
    if args.hostfile and (args.nnodes is not None or args.node_rank is not None):
        raise UsageError("--hostfile is given together with --nnodes/--node-rank",
                         "list the nodes in the hostfile only, or drop --hostfile")
    nnodes, node_rank = args.nnodes or 1, args.node_rank or 0
    if deepspeed:
        if nnodes > 1 or node_rank:
            raise UsageError("the deepspeed launcher takes its nodes from --hostfile, not --nnodes/--node-rank",
                             "list the nodes in --hostfile, or use --launcher torchrun")
        if args.max_restarts:
            raise UsageError("the deepspeed launcher cannot restart ranks (--max-restarts)",
                             "use --launcher torchrun, or drop --max-restarts")
        return
    if node_rank >= nnodes:
        raise UsageError(f"--node-rank {node_rank} is not below --nnodes {nnodes}",
                         f"number the nodes 0..{nnodes - 1}")
    if nnodes > 1 and args.master_addr is None:
        raise UsageError(f"--nnodes {nnodes} needs the address of node 0",
                         "pass --master-addr (and the same --master-port) on every node")


def _check_script(args: argparse.Namespace) -> None:
    if args.script is None:
        raise UsageError("SCRIPT is missing", "name the Python script every rank runs, after the options")
    if not os.path.isfile(args.script):
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
    """The run config: the --config file (any dialect) and the Megatron-LM flags among ARGS."""
    with _config_errors(args.config):
        return translate.build(args.config, megatron_argv=list(args.script_args))


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
    if config.launch.nnodes != nodes and not args.hostfile:
        raise UsageError.from_config(ConfigError(
            "launch.nnodes", config.launch.nnodes, f"--config {args.config} says {config.launch.nnodes} nodes but "
            f"zeromega launch starts {nodes}", f"pass --nnodes {config.launch.nnodes} with --node-rank and "
            "--master-addr on each node, or drop launch.nnodes from the config"))
    nproc = flag if flag is not None else configured
    if nproc is None and not (args.include or args.exclude):
        raise UsageError("--nproc-per-node is missing",
                         "pass --nproc-per-node N (processes per node), or set launch.nproc_per_node in --config")
    return nproc


def _job(args: argparse.Namespace, nproc_per_node: Optional[int]) -> launcher.Job:
    """The Job to start, once the flags are consistent and SCRIPT exists."""
    return launcher.Job(
        script=args.script, script_args=list(args.script_args), nproc_per_node=nproc_per_node,
        nnodes=args.nnodes or 1, node_rank=args.node_rank or 0, master_addr=args.master_addr,
        master_port=args.master_port, max_restarts=args.max_restarts,
        config=os.path.abspath(args.config) if args.config else None,
        hostfile=args.hostfile, include=args.include, exclude=args.exclude,
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


def _check_layout(job: launcher.Job, kind: str, config) -> None:
    """Resolve the run config for the world size and run the ZeRO pre-flight checks."""
    world = _world_size(job, kind)
    if world < 1:
        raise UsageError(f"no ranks to start (world size {world})", "give the job at least one slot")
    with _config_errors(job.config):
        layout = config.layout(world)
        summary = launch_preflight(config, layout, local_ranks=min(world, job.nproc_per_node or world))
        from zeromega.run.run import before_launch  # the run's own checks (length, wandb, profiler), once

        before_launch(config)
    if summary:
        print(f"zeromega launch: {summary}", file=sys.stderr)


def _launch(args: argparse.Namespace) -> int:
    _check_flags(args)
    _check_script(args)
    config = _run_config(args)
    job = _job(args, _nproc_per_node(args, config))
    _check_layout(job, args.launcher, config)
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
    p.set_defaults(handler=_check, prog=p.prog)


def _check(args: argparse.Namespace) -> int:
    filled: list[str] = []
    cfg, unknown = _read_input(args, filled)
    world = args.world_size
    if world is None and cfg.launch.nproc_per_node:
        world = cfg.launch.nproc_per_node * cfg.launch.nnodes
    if world is None:
        raise UsageError("--world-size is missing (and the config has no launch.nproc_per_node)",
                         "pass --world-size N")
    layout = _layout(cfg, world)
    groups = rank_groups(layout)
    if args.json:
        print(json.dumps({"layout": layout.model_dump(), "groups": groups, "order": ORDER, "autos": filled},
                         indent=2))
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
    if unknown:
        print(f"{args.prog}: note: Megatron arguments not translated: {' '.join(unknown)}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------ main

SUBCOMMANDS: list[Callable] = [_add_launch, _add_translate, _add_check, _add_plan, _add_export, _add_preprocess,
                               _add_train_tokenizer]
SUBCOMMANDS.append(_add_plot)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, allow_abbrev=False,
                     description="DeepSpeed ZeRO + Megatron-Core: one config, one launcher.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    args = None
    warnings.formatwarning = lambda message, *_args, **_kw: f"{PROG}: warning: {message}\n"  # one line each
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # options before SCRIPT that the subcommand does not know
            raise UsageError(f"unrecognized arguments: {' '.join(unknown)}",
                             f"see '{args.prog} --help'; options for SCRIPT go after SCRIPT", prog=args.prog)
        code = args.handler(args)
        for note in getattr(args, "notes", []):  # what a launch-script reader wants said (which line it read)
            print(f"{args.prog}: note: {note}", file=sys.stderr)
        return code
    except UsageError as err:
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
