"""The argument lines of a bash launch script, as Megatron-LM and Megatron-DeepSpeed publish them.

Not a shell: enough of bash's expansion for the scripts people actually
write, in order, line by line: ``\\`` continuations, ``NAME=value`` and
``export NAME=value``, arrays ``NAME=( ... )`` used as ``${NAME[@]}``,
``$NAME``, ``${NAME}``, ``${NAME:-default}``, integer ``$(( ... ))``, and
``cat <<EOT > file`` heredocs (Megatron-DeepSpeed writes its DeepSpeed JSON
that way). ``env`` values override the script's own assignments. Anything
else (``$(command)``, unset variables) stays as written, so a flag that
needs it fails with the variable's name.

The training command is the line that runs a ``*.py`` script with the most
``--`` flags after it; a file with no such line is read as bare arguments
(every line that starts with ``--``).
"""

from __future__ import annotations

import ast
import operator
import re
import shlex
from dataclasses import dataclass, field
from typing import Optional

from zeromega.config.errors import ConfigError

_VAR = re.compile(r"\$\{(\w+)(\[@\]|\[\*\])?(?::?-([^}]*))?\}|\$(\w+)")
_ARITH = re.compile(r"\$\(\(([^()]*(?:\([^()]*\)[^()]*)*)\)\)")
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")
_LAUNCH_FLAGS = {
    "--nproc_per_node": "launch.nproc_per_node", "--nproc-per-node": "launch.nproc_per_node",
    "--num_gpus": "launch.nproc_per_node", "--num-gpus": "launch.nproc_per_node",
    "--nnodes": "launch.nnodes", "--num_nodes": "launch.nnodes", "--num-nodes": "launch.nnodes",
    "--hostfile": "launch.hostfile", "-H": "launch.hostfile",
}


@dataclass
class Script:
    """What a launch script runs."""

    argv: list[str]
    """The training script's arguments."""
    launcher: dict[str, str] = field(default_factory=dict)
    """Unified launch-section paths -> values, from the launcher's own flags (torchrun, deepspeed)."""
    files: dict[str, str] = field(default_factory=dict)
    """Path -> text of files the script writes with a heredoc."""


def _arith(expr: str) -> Optional[int]:
    """Integer arithmetic as bash does it (+ - * / % **, parentheses), or None."""
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.floordiv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise ValueError

    try:
        return ev(ast.parse(expr.strip(), mode="eval").body)
    except (ValueError, SyntaxError, ZeroDivisionError, TypeError):
        return None


class _Expander:
    def __init__(self, env: dict[str, str]):
        self.env, self.vars = dict(env), {}

    def value(self, name: str) -> Optional[str]:
        return self.env.get(name, self.vars.get(name))

    def expand(self, text: str) -> str:
        def var(match):
            name = match.group(1) or match.group(4)
            value = self.value(name)
            if value is None and match.group(3) is not None:
                return self.expand(match.group(3))
            return match.group(0) if value is None else value

        return _VAR.sub(var, self.arith(text))

    def arith(self, text: str) -> str:
        """Only the ``$(( ... ))`` parts of ``text`` expanded."""

        def arith(match):
            inner = re.sub(r"\$?\{?([A-Za-z_]\w*)\}?", lambda m: self.value(m.group(1)) or m.group(0),
                           match.group(1))
            result = _arith(inner)
            return match.group(0) if result is None else str(result)

        return _ARITH.sub(arith, text)

    def assign(self, name: str, raw: str) -> None:
        raw = raw.strip()
        if raw.startswith("(") and raw.endswith(")"):  # an array: keep its words, re-quoted
            self.vars[name] = shlex.join(shlex.split(self.expand(raw[1:-1]), comments=True))
            return
        words = shlex.split(self.expand(raw), comments=True) if raw else [""]
        self.vars[name] = " ".join(words)


_ARRAY = re.compile(r"^(?:export\s+)?([A-Za-z_]\w*)=\((.*)\)\s*(?:#.*)?$", re.S)
_NAME_EQ = re.compile(r"^[A-Za-z_]\w*=")


def _assignments(shell: _Expander, line: str) -> bool:
    """Record the line's assignments if that is all it does (``A=1 B=2``, ``export A``, arrays)."""
    array = _ARRAY.match(line.strip())
    if array:
        shell.assign(array.group(1), f"({array.group(2)})")
        return True
    try:
        words = shlex.split(shell.arith(line), comments=True)
    except ValueError:
        return False
    if words and words[0] in ("export", "declare", "local", "readonly"):
        words = [w for w in words[1:] if not w.startswith("-") and "=" in w]
        if not words:  # `export NAME` of a name already set
            return True
    if not words or not all(_NAME_EQ.match(w) for w in words):
        return False
    for word in words:
        name, value = word.split("=", 1)
        shell.vars[name] = shell.expand(value)
    return True


def _logical_lines(text: str) -> list[tuple[int, str, Optional[tuple[str, bool, str]]]]:
    """(line number, text, heredoc) with continuations joined, arrays gathered and heredoc bodies cut out."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        start, line = i + 1, lines[i]
        while line.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line.rstrip()[:-1] + " " + lines[i]
        if re.match(r"^\s*(?:export\s+)?\w+=\($", line.strip()) or (
                re.match(r"^\s*(?:export\s+)?\w+=\(", line) and ")" not in line):
            while ")" not in lines[i] or i + 1 == start:
                if i + 1 >= len(lines):
                    break
                i += 1
                line += " " + lines[i].split("#", 1)[0]
        heredoc = None
        match = _HEREDOC.search(line)
        if match:
            body, delimiter = [], match.group(2)
            while i + 1 < len(lines) and lines[i + 1].strip() != delimiter:
                i += 1
                body.append(lines[i])
            i += 1
            heredoc = (delimiter, not match.group(1), "\n".join(body))
        out.append((start, line, heredoc))
        i += 1
    return out


def read(text: str, env: Optional[dict[str, str]] = None, name: str = "script") -> Script:
    """The training command's arguments (and launcher flags, heredoc files) of a bash script."""
    shell = _Expander(env or {})
    commands: list[list[str]] = []
    files: dict[str, str] = {}
    for number, line, heredoc in _logical_lines(text):
        expanded = shell.expand(line)
        try:
            words = shlex.split(expanded, comments=True)
        except ValueError as err:
            raise ConfigError(name, f"line {number}", f"cannot split it into words ({err})",
                              "check the quotes on that line") from None
        if not words:
            continue
        if _assignments(shell, line):
            continue
        if heredoc:
            target = re.search(r">\s*(\S+)", expanded.split("<<", 1)[1] + " " + expanded.split("<<", 1)[0])
            delimiter, expand, body = heredoc
            if target:
                files[target.group(1).strip("\"'")] = shell.expand(body) if expand else body
            continue
        commands.append(words)
    return _pick(commands, files)


def _pick(commands: list[list[str]], files: dict[str, str]) -> Script:
    best = None
    for words in commands:
        for index, word in enumerate(words):
            if word.endswith(".py"):
                flags = sum(w.startswith("--") for w in words[index + 1:])
                if best is None or flags > best[0]:
                    best = (flags, words[:index], words[index + 1:])
                break
    if best is None:  # bare arguments: every line that starts with a flag
        argv = [w for words in commands if words[0].startswith("-") for w in words]
        return Script(argv, {}, files)
    _, launcher_words, argv = best
    launcher = {}
    for i, word in enumerate(launcher_words):
        flag, eq, value = word.partition("=")
        if flag in _LAUNCH_FLAGS:
            value = value if eq else (launcher_words[i + 1] if i + 1 < len(launcher_words) else "")
            launcher[_LAUNCH_FLAGS[flag]] = value
    return Script(argv, launcher, files)
