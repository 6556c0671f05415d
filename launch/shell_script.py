"""The training command of a bash launch script (Megatron-LM, Megatron-DeepSpeed, BigScience), read as
bash runs it.

By default the script is *read*, never run: :mod:`.shell_parse` parses it
with bash's grammar and :mod:`.shell_eval` follows its variables and
control flow (``if``/``elif``/``else`` on the branch bash would take,
``+=``, arrays, multi-line strings, heredocs, ``sed`` on a template,
``$(( ))``, ``${X:-d}``, ``source``, ``eval``), recording every program it
would start. With ``run=True`` (``--run-script`` on the command line) the
script runs under bash instead, with the launchers replaced by recorders
(:mod:`.shell_run`): exact bash, but it executes the user's code.

The training command is the recorded command that runs a ``*.py`` script
with the most ``--`` flags after it (``Script.line`` says which line); a
file with no such command is read as bare arguments (every command that
starts with ``-``). ``env`` (``--env NAME=VALUE``) pins a variable over the
script's own assignments. A value the static read cannot know (a command's
output, a variable an undecidable ``if`` sets) is refused once the training
command uses it, with the ``--env`` that supplies it.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from zeromega.config.errors import ConfigError

from . import limits
from .shell_arith import ArithError
from .shell_arith import evaluate as _evaluate
from .shell_eval import OPAQUE, UNSET, Evaluator, _unmark, _unmark_keep
from .shell_parse import ShellSyntax, parse

_LAUNCH_FLAGS = {
    "--nproc_per_node": "launch.nproc_per_node", "--nproc-per-node": "launch.nproc_per_node",
    "--num_gpus": "launch.nproc_per_node", "--num-gpus": "launch.nproc_per_node",
    "--nnodes": "launch.nnodes", "--num_nodes": "launch.nnodes", "--num-nodes": "launch.nnodes",
    "--hostfile": "launch.hostfile", "-H": "launch.hostfile",
}
CONFIG_FLAGS = ("--deepspeed_config", "--deepspeed-config", "--config")
"""Flags of the training command whose value is a config file the script may write itself."""
_MARKS = re.compile("\x00([^\x00]*)\x00|\x01([^\x01]*)\x01")


@dataclass
class Script:
    """What a launch script runs."""

    argv: list[str]
    """The training script's arguments."""
    launcher: dict[str, str] = field(default_factory=dict)
    """Unified launch-section paths -> values, from the launcher's own flags (torchrun, deepspeed)."""
    files: dict[str, str] = field(default_factory=dict)
    """Path -> text of files the script writes (heredoc, ``sed`` from a template, ``echo``/``cp``)."""
    line: int = 0
    """The script line of the training command (0: bare arguments)."""
    command: str = ""
    """The training command as the script writes it (shortened)."""
    notes: list[str] = field(default_factory=list)
    """What the reader wants the user to know (which line it read, files it could not source, --run-script)."""


def _arith(expr: str) -> Optional[int]:
    """Integer arithmetic on literals as bash does it (signed 64-bit wrap-around, C division), or None."""
    try:
        return _evaluate(expr)
    except ArithError:
        return None


_PLAIN = re.compile(r"[^'\"\\#]*")
_BLANKS = re.compile(r"[ \t\r\n]+")


def _split(text: str) -> list[str]:
    """``shlex.split(text, comments=True)``; words without quotes, escapes or comments split in linear time
    (shlex builds each word a character at a time, quadratic in its length)."""
    if _PLAIN.fullmatch(text):
        return [word for word in _BLANKS.split(text) if word]
    return shlex.split(text, comments=True)


def read(text: str, env: Optional[dict[str, str]] = None, name: str = "script", base: Optional[Path] = None,
         run: bool = False) -> Script:
    """The training command's arguments (and launcher flags, written files) of a bash script.

    ``base``: the script's directory (``source``, ``sed`` templates and file tests look there).
    ``run``: run it under bash with recorders for the launchers (:mod:`.shell_run`) instead of reading it."""
    if run:
        from . import shell_run

        return shell_run.read(text, env or {}, name, base, pick)
    _check_line_lengths(text, name)
    try:
        tree = parse(text)
    except ShellSyntax as err:
        if _bare_arguments(text):
            return _read_bare(text, name)
        raise ConfigError(name, f"line {err.line}", f"{err.problem} (bash would refuse the script too)",
                          "fix the script's syntax there") from None
    except RecursionError:
        raise ConfigError(name, "the script", "nests too deep to read", "check the script's brackets") from None
    evaluator = Evaluator(env or {}, name, base)
    try:
        evaluator.run(tree)
    except RecursionError:
        raise ConfigError(name, "the script", "nests too deep to read", "check the script's structure") from None
    except ShellSyntax as err:
        raise ConfigError(name, f"line {err.line}", err.problem, "fix the script's syntax there") from None
    return pick(evaluator, name)


def _check_line_lengths(text: str, name: str) -> None:
    """Refuse a line (``\\`` continuations joined) over ``MAX_WORD`` before parsing: linear and quick."""
    start, length = 1, 0
    for number, line in enumerate(text.split("\n"), 1):
        length += len(line)
        if length > limits.MAX_WORD:
            raise ConfigError(name, f"line {start}", f"is {length:,}+ characters long, over the "
                              f"{limits.MAX_WORD:,}-character limit of one command line",
                              "shorten that line; check that the file is a launch script")
        if not line.endswith("\\"):
            start, length = number + 1, 0


def _bare_arguments(text: str) -> bool:
    """Every logical line is a flag line (an argument file, which need not be valid bash)."""
    lines = [line.strip() for line in re.sub(r"\\\r?\n", " ", text).splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    return bool(lines) and all(line.startswith("-") for line in lines)


def _read_bare(text: str, name: str) -> Script:
    argv = []
    for number, line in enumerate(re.sub(r"\\\r?\n", " ", text).splitlines(), 1):
        if len(line) > limits.MAX_WORD:
            raise ConfigError(name, f"line {number}", f"is {len(line):,} characters long, over the "
                              f"{limits.MAX_WORD:,}-character limit of one command line",
                              "shorten that line; check that the file is a launch script")
        try:
            argv += _split(line)
        except ValueError as err:
            raise ConfigError(name, f"line {number}", f"cannot split it into words ({err})",
                              "check the quotes on that line") from None
    return Script(argv)


def _known_flags() -> set[str]:
    from . import megatron_args

    return {*megatron_args.TABLE, *megatron_args.SPECIAL, *megatron_args.NEGATIONS, *CONFIG_FLAGS}


def pick(evaluator: Evaluator, name: str) -> Script:
    """The training command among the commands the script starts, checked for values nobody can know."""
    commands = evaluator.commands
    best = None
    for command in commands:
        for index, word in enumerate(command.words):
            if word.endswith(".py"):
                flags = sum(w.startswith("--") for w in command.words[index + 1:])
                if best is None or flags > best[0]:
                    best = (flags, command, index)
                break
    notes = [f"`source {path}` (line {line}): no such file, so what it sets is unset here"
             for path, line in evaluator.missing_sources]
    files = _files(evaluator)
    if best is None and evaluator.exited:
        raise ConfigError(name, f"line {evaluator.exited}", "the script exits there, before it starts any training "
                          "command (as bash would, run from this directory)", "make what it tests hold (run from "
                          "the directory it expects: file tests look here, then next to the script), or pass the "
                          "variables it tests with --env NAME=VALUE")
    if best is None:  # bare arguments: every command that starts with a flag
        argv = [w for command in commands if command.words[0].startswith("-") for w in command.words]
        argv = [_clean(evaluator, name, argv, i, None) for i in range(len(argv))]
        return Script(argv, {}, files, 0, "", notes)
    _, command, index = best
    if command.condition:
        raise ConfigError(name, f"line {command.line}", f"the training command runs only if {command.condition} "
                          "holds, which a static read cannot decide", "pass the variables it tests with --env "
                          "NAME=VALUE, or read the script with --run-script (runs it under bash)")
    argv = [_clean(evaluator, name, command.words, i, command.line) for i in range(index + 1, len(command.words))]
    launcher_words = command.words[:index]
    launcher = {}
    for i, word in enumerate(launcher_words):
        flag, eq, value = word.partition("=")
        if flag in _LAUNCH_FLAGS:
            if not eq:
                value = launcher_words[i + 1] if i + 1 < len(launcher_words) else ""
            launcher[_LAUNCH_FLAGS[flag]] = _value(evaluator, name, flag, value, command.line)
    _check_config_files(evaluator, name, argv, command.line)
    others = [c.line for c in commands if c is not command]
    if others:
        shown = ", ".join(str(n) for n in others[:6]) + (", ..." if len(others) > 6 else "")
        notes.insert(0, f"{name}: the training command is line {command.line} ({_shown(evaluator, command.text)}); "
                        f"other commands not read as it: line{'s' if len(others) > 1 else ''} {shown}")
    return Script(argv, launcher, files, command.line, _shown(evaluator, command.text), notes)


def _files(evaluator: Evaluator) -> dict[str, str]:
    return {path: _unmark_keep(text) for path, text in evaluator.state.files.items()
            if text is not None and OPAQUE not in text}


def _why(evaluator: Evaluator, text: str) -> tuple[str, str]:
    """(what cannot be known, the fix) for the first opaque marker in ``text``."""
    match = re.search("\x01([^\x01]*)\x01", text)
    opaque = evaluator.opaque.get(match.group(1)) if match else None
    if opaque is None:
        return "a value the static read cannot know", "read the script with --run-script (runs it under bash)"
    if opaque.var:
        return (f"{opaque.var} comes from {opaque.what} (line {opaque.line}), which a static read does not run",
                f"pass --env {opaque.var}=VALUE, or read the script with --run-script (runs it under bash)")
    return (f"it comes from {opaque.what} (line {opaque.line}), which a static read does not run",
            "put the value in the script or a variable given with --env NAME=VALUE, or read the script with "
            "--run-script (runs it under bash)")


def _value(evaluator: Evaluator, name: str, flag: str, value: str, line: int) -> str:
    if OPAQUE in value:
        problem, fix = _why(evaluator, value)
        raise ConfigError(flag, _shown(evaluator, value), f"{name} line {line}: {problem}", fix)
    if UNSET in value:
        var = re.search("\x00([^\x00]*)\x00", value).group(1)
        raise ConfigError(flag, _unmark_keep(value), f"{name} line {line}: uses the shell variable {var}, which is "
                          f"not set{_missing(evaluator)}", f"pass --env {var}=VALUE")
    return value


def _missing(evaluator: Evaluator) -> str:
    if not evaluator.missing_sources:
        return ""
    path, line = evaluator.missing_sources[0]
    return f" (it may come from `source {path}` at line {line}, which is not there)"


def _shown(evaluator: Evaluator, text: str) -> str:
    def show(match):
        if match.group(1) is not None:
            return f"${match.group(1)}"
        opaque = evaluator.opaque.get(match.group(2))
        return f"${opaque.var}" if opaque and opaque.var else (opaque.what if opaque else "?")
    return _MARKS.sub(show, text)


def _clean(evaluator: Evaluator, name: str, argv: list[str], i: int, line: Optional[int]) -> str:
    """``argv[i]`` without markers; refused when it carries an unknowable value a known flag would read."""
    word = argv[i]
    if OPAQUE in word:
        flag = word.split("=", 1)[0] if word.startswith("--") and "=" in word else (argv[i - 1] if i else "")
        whole = _MARKS.fullmatch(word) is not None
        if whole or flag in _known_flags():
            problem, fix = _why(evaluator, word)
            where = f"{name} line {line}" if line else name
            raise ConfigError(flag if flag.startswith("-") else "arguments", _shown(evaluator, word),
                              f"{where}: {problem}", fix)
        return _shown(evaluator, word)
    if UNSET in word and evaluator.missing_sources:
        flag = argv[i - 1] if i else "arguments"
        var = re.search("\x00([^\x00]*)\x00", word).group(1)
        raise ConfigError(flag, _unmark_keep(word), f"uses the shell variable {var}, which is not set"
                          f"{_missing(evaluator)}", f"pass --env {var}=VALUE, or put the sourced file next to "
                          "the script")
    if UNSET in word and _unmark(word):  # bash: an unset variable inside a longer word expands to nothing
        return _unmark(word)
    return _unmark_keep(word)


def config_flag(argv: list[str]) -> tuple[list[str], Optional[str]]:
    """``argv`` without its ``--config FILE`` (or ``--config=FILE``), and that FILE (None when absent)."""
    for i, word in enumerate(argv):
        if word == "--config" and i + 1 < len(argv):
            return argv[:i] + argv[i + 2:], argv[i + 1]
        if word.startswith("--config="):
            return argv[:i] + argv[i + 1:], word.split("=", 1)[1]
    return list(argv), None


def _check_config_files(evaluator: Evaluator, name: str, argv: list[str], line: int) -> None:
    """A config file the training command reads that the script writes with something unknowable."""
    files = evaluator.state.files
    for i, word in enumerate(argv):
        flag, eq, value = word.partition("=")
        if flag not in CONFIG_FLAGS:
            continue
        path = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
        key = path if path in files else os.path.normpath(path)
        if key not in files:
            continue
        text = files[key]
        if text is None:
            raise ConfigError(flag, path, f"{name} line {line}: the script writes it with a program a static read "
                              "does not run", "read the script with --run-script (runs it under bash), or pass "
                              "the config file itself")
        if OPAQUE in text:
            problem, fix = _why(evaluator, text)
            raise ConfigError(flag, path, f"{name}: the config the script writes holds a value a static read "
                              f"cannot know: {problem}", fix)
