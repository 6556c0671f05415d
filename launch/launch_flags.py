"""``zeromega launch``'s flags: torchrun's and the deepspeed runner's, read by their own parsers.

zeromega adds three flags of its own (``--launcher``, ``--config``,
``--network-interface``). Every other flag before SCRIPT is one of
torchrun's (``torch.distributed.run.get_args_parser()``) or the deepspeed
runner's (the parser ``deepspeed.launcher.runner.parse_args`` builds): their
argparse actions are added to the ``launch`` parser as they are, so the help
shows them and a typo is refused, and the flags of the chosen launcher are
then parsed again by that launcher's own parser, with its defaults.

Which launcher: ``--launcher torchrun|deepspeed``, or the deepspeed runner's
multi-node backends (``--launcher pdsh|openmpi|mvapich|slurm|mpich|impi``,
which mean the deepspeed runner with that backend); without ``--launcher``,
a flag only the deepspeed runner has (``-H/--hostfile``, ``--num_gpus``,
``-i``, ...) picks it, anything else torchrun.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Optional
from unittest import mock

from .cli_common import UsageError

LAUNCHERS = ("torchrun", "deepspeed")
# The deepspeed runner's --launcher values (deepspeed/launcher/constants.py), in lower case as it compares them.
DEEPSPEED_BACKENDS = ("pdsh", "openmpi", "mvapich", "slurm", "mpich", "impi")
OWN, TORCHRUN, DEEPSPEED = "zeromega", "torchrun", "deepspeed"


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def _capture(self, args=None, namespace=None):
    raise _Captured(self)


def deepspeed_parser() -> argparse.ArgumentParser:
    """The parser ``deepspeed.launcher.runner.parse_args`` builds (it has no function that returns it):
    its ``parse_args`` call is stopped and the parser kept."""
    from .launcher import _default_accelerator

    _default_accelerator(os.environ)  # importing deepspeed on a CPU machine otherwise logs a warning
    from deepspeed.launcher import runner

    with mock.patch.object(argparse.ArgumentParser, "parse_args", _capture):
        try:
            runner.parse_args([])
        except _Captured as captured:
            return captured.parser
    raise RuntimeError("deepspeed.launcher.runner.parse_args no longer builds an argparse parser")


def torchrun_parser() -> argparse.ArgumentParser:
    from torch.distributed.run import get_args_parser

    return get_args_parser()


def add_launcher_flags(p: argparse.ArgumentParser, family: str, families: dict[int, set]) -> None:
    """Add ``family``'s (torchrun's or deepspeed's) optional actions to ``p``, those whose option strings
    ``p`` does not have yet; ``families`` maps id(action) -> the launchers that know its flag."""
    parser = torchrun_parser() if family == TORCHRUN else deepspeed_parser()
    group = p.add_argument_group(f"{family}'s flags (parsed by {family}'s own parser)")
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        known = [p._option_string_actions.get(o) for o in action.option_strings]
        if any(known):
            for other in filter(None, known):
                families.setdefault(id(other), set()).add(family)
            continue
        group._add_action(action)
        families[id(action)] = {family}


@dataclass
class Given:
    """One flag as typed before SCRIPT."""

    action: argparse.Action
    option: str
    tokens: list[str]
    values: list[str] = field(default_factory=list)


def given_flags(p: argparse.ArgumentParser, argv: list[str]) -> list[Given]:
    """The flags in ``argv`` (everything before SCRIPT), with the tokens that spell each."""
    found, i = [], 0
    while i < len(argv):
        word = argv[i]
        option, eq, inline = word.partition("=") if word.startswith("--") else (word, "", "")
        action = p._option_string_actions.get(option)
        if action is None and not word.startswith("--") and len(word) > 2:  # -Hhosts
            option, inline, eq = word[:2], word[2:], "="
            action = p._option_string_actions.get(option)
        if action is None:
            i += 1  # argparse has refused it already
            continue
        takes = 0 if action.nargs == 0 else 1
        if eq or not takes:
            found.append(Given(action, option, [word], [inline] if eq else []))
            i += 1
        else:
            found.append(Given(action, option, argv[i:i + 2], argv[i + 1:i + 2]))
            i += 2
    return found


def spelled_for(parser: argparse.ArgumentParser, given: Given) -> list[str]:
    """``given``'s tokens in the spelling ``parser`` knows (``--master-addr`` -> ``--master_addr``)."""
    if given.option in parser._option_string_actions:
        return given.tokens
    wanted = given.option.lstrip("-").replace("-", "_")
    for option in parser._option_string_actions:
        if option.lstrip("-").replace("-", "_") == wanted:
            return [option, *given.values] if len(given.tokens) == 2 or not given.values else [f"{option}={given.values[0]}"]
    return given.tokens


def parse_with(parser: argparse.ArgumentParser, argv: list[str], name: str) -> argparse.Namespace:
    """``parser.parse_args(argv)``, its complaint as a UsageError."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv)
    except SystemExit:
        line = (err.getvalue().strip().splitlines() or ["invalid flags"])[-1].split("error: ", 1)[-1]
        raise UsageError(f"{name}: {line}", f"see '{name} --help'") from None


# ---------------------------------------------------------------- SLURM


def expand_nodelist(text: str) -> list[str]:
    """SLURM's compressed host list (``a[1-3,05],b7``) as host names, in order.

    ``scontrol show hostnames`` is SLURM's own expansion and is used where it exists.
    """
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", text], capture_output=True, text=True,
                                 timeout=20, check=True).stdout.split()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", text):
        names = [""]
        for literal, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", part):
            if not literal and not ranges:
                continue
            expanded = [literal]
            if ranges:
                expanded = []
                for item in ranges.split(","):
                    lo, _, hi = item.partition("-")
                    if not hi:
                        expanded.append(literal + lo)
                        continue
                    width = len(lo) if lo.startswith("0") else 0
                    expanded += [literal + str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
            names = [n + e for n in names for e in expanded]
        hosts += [n for n in names if n]
    return hosts


@dataclass(frozen=True)
class Slurm:
    nnodes: int
    node_rank: int
    master_addr: str
    job_id: str


def slurm_from_env(env: dict) -> Optional[Slurm]:
    """The job's nodes, this node's rank, node 0 and the job id from srun's / sbatch's variables."""
    job_id, nodes, node_id = env.get("SLURM_JOB_ID"), env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES"), \
        env.get("SLURM_NODEID")
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not (job_id and nodes and node_id and nodelist):
        return None
    try:
        hosts = expand_nodelist(nodelist)
        return Slurm(int(nodes), int(node_id), hosts[0], job_id)
    except (ValueError, IndexError):
        raise UsageError(f"SLURM_NNODES={nodes!r} SLURM_NODEID={node_id!r} SLURM_JOB_NODELIST={nodelist!r}: "
                         "cannot read the job's nodes from them",
                         "pass --nnodes, --node-rank and --master-addr yourself") from None


# ---------------------------------------------------------------- the script


LOCAL_RANK_FLAG = re.compile(r"""["'](--local[_-]rank)["']""")


def script_text(path: str) -> str:
    try:
        with open(path, errors="replace") as fp:
            return fp.read(1_000_000)
    except OSError:
        return ""


def local_rank_flag(text: str) -> Optional[str]:
    """``--local_rank`` (or ``--local-rank``) when the script declares that flag, as deepspeed-style scripts do."""
    found = LOCAL_RANK_FLAG.search(text)
    return found.group(1) if found else None


def reads_megatron_flags(text: str) -> bool:
    """Whether the script reads its arguments as Megatron-LM flags through zeromega
    (``zeromega.launch.script_args``, as examples/pretrain_gpt.py): only then does the launcher
    check them before starting; any other script's arguments are its own."""
    return bool(re.search(r"zeromega\.launch(\.script_args\b|\s+import\s+[^\n]*\bscript_args\b)", text))


def parses_with_script_args(text: str) -> bool:
    """Whether the script parses its whole command line with zeromega's parser (``script_args.run/parse/read``,
    as examples/pretrain_gpt.py): then a flag it would refuse is refused by the launcher, before any rank."""
    return reads_megatron_flags(text) and bool(re.search(r"\bscript_args\.(run|parse|read)\(", text))


def runs_zeromega_run(text: str) -> bool:
    """Whether the script trains through zeromega's Run (``script_args.run(...)`` as examples/pretrain_gpt.py,
    or ``Run(...)``): only then do the run's own checks (its length, ...) apply before launch."""
    return reads_megatron_flags(text) and bool(re.search(r"\bscript_args\.run\(|\bRun\(", text))
