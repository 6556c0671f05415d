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

from . import limits

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


_WORD = 2**64


def _wrap(value: int) -> int:
    """``value`` as bash's signed 64-bit integer (it wraps, it does not overflow)."""
    value %= _WORD
    return value - _WORD if value >= _WORD // 2 else value


def _c_div(a: int, b: int) -> int:
    """Division truncating toward zero, as C and bash do (Python's // floors)."""
    quotient = abs(a) // abs(b)
    return _wrap(quotient if (a < 0) == (b < 0) else -quotient)


def _c_mod(a: int, b: int) -> int:
    return _wrap(a - _c_div(a, b) * b)


def _c_pow(a: int, b: int) -> int:
    if b < 0:
        raise ValueError  # bash: "exponent less than 0"
    return _wrap(pow(a, b, _WORD))


_ARITH_MAX = 4096
"""Characters in one ``$(( ... ))``; longer expressions stay as written."""


def _arith(expr: str) -> Optional[int]:
    """Integer arithmetic as bash does it (+ - * / % **, parentheses, signed 64-bit wrap-around), or None.

    Bounded: every result wraps to 64 bits (``$((9**9**9))`` is instant, as in bash), and an expression
    over ``_ARITH_MAX`` characters or nested too deep to evaluate stays as written."""
    ops = {ast.Add: lambda a, b: _wrap(a + b), ast.Sub: lambda a, b: _wrap(a - b),
           ast.Mult: lambda a, b: _wrap(a * b), ast.Div: _c_div, ast.FloorDiv: _c_div, ast.Mod: _c_mod,
           ast.Pow: _c_pow}

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return _wrap(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return _wrap(-ev(node.operand)) if isinstance(node.op, ast.USub) else ev(node.operand)
        raise ValueError

    if len(expr) > _ARITH_MAX or not re.fullmatch(r"[\s0-9a-fA-FxX+\-*/%()]*", expr):
        return None
    try:
        return ev(ast.parse(expr.strip(), mode="eval").body)
    except (ValueError, SyntaxError, ZeroDivisionError, TypeError, RecursionError, MemoryError):
        return None


_PLAIN = re.compile(r"[^'\"\\#]*")
_BLANKS = re.compile(r"[ \t\r\n]+")


def _split(text: str) -> list[str]:
    """``shlex.split(text, comments=True)``; words without quotes, escapes or comments split in linear time
    (shlex builds each word a character at a time, quadratic in its length)."""
    if _PLAIN.fullmatch(text):
        return [word for word in _BLANKS.split(text) if word]
    return shlex.split(text, comments=True)


class _Expander:
    def __init__(self, env: dict[str, str], name: str = "script"):
        self.env, self.vars, self.name = dict(env), {}, name

    def value(self, name: str) -> Optional[str]:
        return self.env.get(name, self.vars.get(name))

    def expand(self, text: str, limit: int = limits.MAX_WORD) -> str:
        """``text`` with its variables and arithmetic expanded; refused once it grows past ``limit``
        characters (``A=$A$A`` repeated doubles a value per line)."""
        grown = [len(text)]

        def var(match):
            name = match.group(1) or match.group(4)
            value = self.value(name)
            if value is None and match.group(3) is not None:
                value = self.expand(match.group(3), limit)
            if value is not None:
                grown[0] += len(value)
                if grown[0] > limit:
                    raise ConfigError(self.name, f"${name}", f"expands to more than {limit:,} characters",
                                      "a launch script's values are short: check the assignments of the "
                                      "variables it uses")
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
            self.vars[name] = shlex.join(_split(self.expand(raw[1:-1])))
            return
        words = _split(self.expand(raw)) if raw else [""]
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
        words = _split(shell.arith(line))
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
    """(line number, text, heredoc) with continuations joined, arrays gathered and heredoc bodies cut out.

    Linear in the text: the parts of a logical line are joined once."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        start, parts = i + 1, [lines[i]]
        while parts[-1].rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            parts[-1] = parts[-1].rstrip()[:-1]
            parts.append(lines[i])
        line = " ".join(parts)
        if re.match(r"^\s*(?:export\s+)?\w+=\($", line.strip()) or (
                re.match(r"^\s*(?:export\s+)?\w+=\(", line) and ")" not in line):
            while ")" not in lines[i] or i + 1 == start:
                if i + 1 >= len(lines):
                    break
                i += 1
                parts.append(lines[i].split("#", 1)[0])
            line = " ".join(parts)
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
    shell = _Expander(env or {}, name)
    commands: list[list[str]] = []
    files: dict[str, str] = {}
    for number, line, heredoc in _logical_lines(text):
        if len(line) > limits.MAX_WORD:
            raise ConfigError(name, f"line {number}", f"is {len(line):,} characters long, over the "
                              f"{limits.MAX_WORD:,}-character limit of one command line",
                              "shorten that line; check that the file is a launch script")
        expanded = shell.expand(line)
        try:
            words = _split(expanded)
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
                files[target.group(1).strip("\"'")] = shell.expand(body, limits.MAX_BYTES) if expand else body
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
