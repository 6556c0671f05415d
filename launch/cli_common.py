"""What the ``zeromega`` subcommands share: :class:`UsageError`, argument types, IN and reading it.

Below :mod:`zeromega.launch.cli` and its subcommand modules
(:mod:`~zeromega.launch.plan_cli`, :mod:`~zeromega.launch.export`), so those
import it and the CLI imports them: no import cycle.
"""

from __future__ import annotations

import argparse
from typing import Callable, Optional

from zeromega.config.errors import ConfigError

from .limits import MAX_INT, MAX_WORLD
from .translate import DIALECTS, detect, resolve, sources


def _one_line(text: str) -> str:
    """``text`` with line breaks and other unprintable characters escaped (a key or value from the input
    may hold them), so the error stays one line."""
    return text if text.isprintable() else "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class UsageError(Exception):
    """Input the user can fix; printed as one line, exit code 2."""

    def __init__(self, problem: str, fix: str, prog: Optional[str] = None):
        problem, fix = _one_line(problem), _one_line(fix)
        super().__init__(f"{problem}; fix: {fix}")
        self.problem, self.fix, self.prog = problem, fix, prog

    @classmethod
    def from_config(cls, err: ConfigError, prog: Optional[str] = None) -> "UsageError":
        """A ConfigError as one line: ``field=value: problem; fix: fix``."""
        return cls(f"{err.field}={err.value!r}: {err.problem}", err.fix, prog=prog)


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if value > MAX_INT:
            raise argparse.ArgumentTypeError(f"{text} is beyond the 64-bit limit of {MAX_INT}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _add_input(p) -> None:
    """IN and the options every config-reading subcommand shares."""
    p.add_argument("input", metavar="IN", help="a DeepSpeed JSON, a unified YAML/JSON config, or a Megatron-LM "
                   "launch script / argument file (detected; see --from)")
    p.add_argument("--from", dest="dialect", choices=DIALECTS, help="the dialect of IN, when detection guesses wrong")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="a shell variable the launch script uses but does not set (repeatable)")
    p.add_argument("--run-script", action="store_true",
                   help="a launch script: run it under bash (this EXECUTES the script's own commands) in a scratch "
                        "directory, with torchrun/deepspeed/srun/python *.py recorded instead of started, for "
                        "bash's exact semantics; default: read it statically, running nothing")
    p.add_argument("--world-size", "--world_size", type=_int_at_least(1), metavar="N",
                   help="ranks in the job: resolves dp and the batch arithmetic")


# The model-shape flags (Megatron-LM's names) that fill a DeepSpeed JSON's bucket-size "auto"s.
SHAPE_FLAGS = {"--num-layers": "model.num_layers", "--hidden-size": "model.hidden_size",
               "--num-attention-heads": "model.num_attention_heads", "--seq-length": "model.seq_length",
               "--vocab-size": "model.vocab_size", "--ffn-hidden-size": "model.ffn_hidden_size",
               "--num-query-groups": "model.num_query_groups"}


def _add_shape(p) -> None:
    """The model-shape flags, for subcommands that have none of their own (translate, check)."""
    shape = p.add_argument_group("model (Megatron-LM names; fill the bucket-size \"auto\"s of a DeepSpeed JSON)")
    for flag in SHAPE_FLAGS:
        shape.add_argument(flag, type=_int_at_least(1), metavar="N")
    p.set_defaults(shape_is_a_source=True)


def _shape_source(args: argparse.Namespace, found: list) -> list:
    """The shape flags as one more source. Where a subcommand's own flags override the config (plan), only
    the fields no source states, so they fill "auto"s without clashing."""
    from .partial import flatten, set_path

    stated = {path for _, partial in found for path in flatten(partial)}
    tree: dict = {}
    for flag, path in SHAPE_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None and (getattr(args, "shape_is_a_source", False) or path not in stated):
            set_path(tree, path, value)
    return [("the command line", tree)] if tree else []


def _read_input(args: argparse.Namespace, filled: Optional[list] = None):
    """(RunConfig, unmapped Megatron arguments) for IN, or a UsageError; ``filled`` gets the "auto"s filled."""
    env = {}
    for item in args.env:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise UsageError(f"--env {item!r} is not NAME=VALUE", "write e.g. --env TP=2")
        env[name] = value
    try:
        args.notes = []  # printed by cli.main once the command succeeds
        found, unknown = sources(args.input, env, args.dialect, run_script=args.run_script, notes=args.notes)
        found = found + _shape_source(args, found)
        return resolve(found, megatron=(args.dialect or detect(args.input)) == "megatron", filled=filled), unknown
    except ConfigError as err:
        raise UsageError.from_config(err) from None


def _layout(cfg, world_size: Optional[int]):
    if world_size is not None and world_size > MAX_WORLD:
        raise UsageError(f"world size {world_size} is over the limit of {MAX_WORLD:,} ranks (the layout lists every "
                         "rank's groups)", "check --world-size, or launch.nproc_per_node x launch.nnodes")
    try:
        return None if world_size is None else cfg.layout(world_size)
    except ConfigError as err:
        raise UsageError.from_config(err) from None


# ------------------------------------------------------------------ nodes

# Group kinds whose traffic is on every layer's critical path: across nodes they run at the network's speed.
_LATENCY_BOUND = {"tp": "tensor parallel", "expert-tp": "expert tensor parallel"}
# Kinds whose all-to-all / ring traffic grows with their size: warned about when large and across nodes.
_LARGE_AT = {"cp": 4, "ep": 4, "ulysses": 4, "ring": 4}


def node_of(rank: int, per_node: int) -> int:
    """The node a global rank runs on: torchrun and deepspeed number ranks node by node."""
    return rank // per_node


def crossing(groups: dict[str, list[list[int]]], per_node: int) -> dict[str, list[list[int]]]:
    """Group kind -> the groups of that kind whose ranks sit on more than one node."""
    return {kind: [g for g in found if len({node_of(r, per_node) for r in g}) > 1] for kind, found in groups.items()}


def topology_warnings(groups: dict[str, list[list[int]]], per_node: int) -> list[str]:
    """One line for each group kind that should stay inside a node but does not."""
    lines = []
    for kind, across in crossing(groups, per_node).items():
        if not across:
            continue
        size = len(across[0])
        if kind in _LATENCY_BOUND or size >= _LARGE_AT.get(kind, 10**9):
            lines.append(f"{len(across)} of {len(groups[kind])} {kind} groups (size {size}) span nodes "
                         f"({per_node} ranks per node), e.g. ranks {across[0]}: their collectives run every layer "
                         f"over the network; make {kind} divide the processes per node ({per_node})")
    return lines


def node_map(groups: dict[str, list[list[int]]], per_node: int, nodes: int) -> list[str]:
    """Lines of ``zeromega check --nodes``: each node's ranks, then each group kind's groups per node."""
    lines = [f"node {n}: ranks {n * per_node}-{(n + 1) * per_node - 1}" for n in range(nodes)]
    spans = crossing(groups, per_node)
    for kind, found in groups.items():
        if all(len(g) == 1 for g in found):
            continue
        inside = len(found) - len(spans[kind])
        where = []
        for g in found:
            by_node: dict[int, list[int]] = {}
            for r in g:
                by_node.setdefault(node_of(r, per_node), []).append(r)
            where.append("+".join(f"n{n}:{','.join(map(str, rs))}" for n, rs in by_node.items()))
        verdict = "inside nodes" if not spans[kind] else f"{len(spans[kind])} of {len(found)} span nodes"
        lines.append(f"  {kind:<10} {verdict:<22} {' '.join(where)}")
    return lines
