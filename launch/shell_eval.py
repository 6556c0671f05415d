"""Runs a parsed launch script (:mod:`.shell_parse`) without running any program: bash's expansions and
control flow over the script's own variables, with every program the script starts recorded, not run.

What a static read cannot know stays marked inside the strings it flows
into, so a value is never silently wrong:

- an *unset* variable expands to a marker that reads as the empty string in
  a test (``[ -z "$X" ]`` is true, as in bash with a clean environment) and
  as ``$NAME`` in a command's words (so a flag given it says which
  variable to pass with ``--env``);
- an *opaque* value (a command's output such as ``$(nvidia-smi -L | wc
  -l)``, a variable an undecidable ``if`` sets differently in its branches)
  is a marker with the reason; a test on it is undecidable (both branches
  are followed and what they set differently becomes opaque), and a flag
  given it is refused by :mod:`.shell_script` with the ``--env`` that fixes it.

Builtins followed: assignments (``=``, ``+=``, arrays), ``export``/
``declare``/``local``/``readonly``, ``unset``, ``source``/``.``, ``eval``,
``shift``, ``set --``, ``exit``, ``return``, functions, ``test``/``[``/``[[``,
``(( ))``, ``true``/``false``/``:``, ``echo``/``printf``/``cat``/``tee``/
``cp`` into files, ``sed`` substitutions (``s///`` with any delimiter, flags
``g``/``I``/N, ``-e``/``-E``/``-r``/``-i``) from a template, ``dirname``/
``basename`` in ``$( )``.
"""

from __future__ import annotations

import copy
import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

from zeromega.config.errors import ConfigError

from . import limits
from .shell_arith import ArithError, evaluate
from .shell_parse import (AndOr, ArrayWord, Case, CondExpr, Function, Group, If, Loop, Op, Pipeline, Redirect,
                          Sequence, ShellSyntax, Simple, Word, parse)

UNSET, OPAQUE = "\x00", "\x01"
"""Marker characters: ``\\x00NAME\\x00`` an unset variable, ``\\x01KEY\\x01`` an opaque value (see ``opaque``)."""
_MARK = re.compile("\x00([^\x00]*)\x00|\x01([^\x01]*)\x01")
_NAME = re.compile(r"[A-Za-z_]\w*")
MAX_STEPS = 100_000
"""Commands one static read runs (loops and functions included) before it gives up."""
MAX_DEPTH = 16
"""Nested ``source``/``eval``/function calls."""
MAX_LOOP = 1024
"""Iterations of one ``for`` loop."""
_QUIET = {":", "true", "cd", "pushd", "popd", "mkdir", "rm", "set", "shopt", "trap", "ulimit", "wait", "sleep",
          "umask", "hash", "alias", "unalias", "touch", "chmod", "ln", "mv", "rmdir", "read", "pip", "nvidia-smi",
          "hostname", "date", "ls", "cut", "sort", "head", "tail", "wc", "grep", "awk", "sync", "module",
          "conda", "source_bashrc", "ifconfig", "ip", "scontrol", "squeue", "git", "which", "type", "printenv"}
"""Programs that never start training; their exit status is unknown except for the builtins."""
_STATUS_ZERO = {":", "true", "cd", "pushd", "popd", "set", "shopt", "trap", "ulimit", "wait", "sleep", "umask",
                "alias", "unalias", "echo", "printf", "export", "declare", "typeset", "local", "readonly",
                "unset", "shift", "mkdir", "cp", "sed", "cat", "tee", "source", "."}
_DECLARE = {"export", "declare", "typeset", "local", "readonly"}


@dataclass
class Opaque:
    """Why a value cannot be known without running the script."""

    what: str
    """What it is, as written (``$(nvidia-smi -L | wc -l)``)."""
    line: int
    var: str = ""
    """The variable first assigned from it (the one ``--env`` sets)."""


@dataclass
class Command:
    """A program the script starts (not run by the static read)."""

    words: list[str]
    line: int
    text: str
    """The command as the script writes it (first words)."""
    condition: str = ""
    """Non-empty when the command runs only if a test the static read cannot decide holds (the test)."""


class _Exit(Exception):
    pass


class _Return(Exception):
    def __init__(self, status: int):
        self.status = status


class _Break(Exception):
    pass


@dataclass
class State:
    vars: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    """Path -> text of what the script writes (None: written by a program, content unknown)."""
    funcs: dict = field(default_factory=dict)
    positional: list = field(default_factory=list)


class Evaluator:
    """One static run of a script (see the module docstring)."""

    def __init__(self, env: dict[str, str], name: str = "script", base: Optional[Path] = None):
        self.pinned = dict(env)
        self.name, self.base = name, base
        self.state = State()
        self.opaque: dict[str, Opaque] = {}
        self.commands: list[Command] = []
        self.exited = 0
        """The line of an ``exit`` the read took (0: none)."""
        self.missing_sources: list[tuple[str, int]] = []
        self.steps = 0
        self.depth = 0
        self.loop_depth = 0
        self.returnable = 0
        """Functions and sourced files being run (``return`` outside them is an error bash goes past)."""
        self.condition = ""
        self.output: Optional[list[str]] = None
        self.line = 0
        if "PWD" not in self.pinned:  # bash sets PWD at start-up, whatever the environment: the directory it runs in
            self.state.vars["PWD"] = os.getcwd()

    # ------------------------------------------------------------ values

    def get(self, name: str) -> Union[str, list, None]:
        if name in self.pinned:
            return self.pinned[name]
        return self.state.vars.get(name)

    def set(self, name: str, value: Union[str, list], append: bool = False, index: Optional[str] = None) -> None:
        if name in self.pinned:
            return  # --env pins a variable over the script's own assignments
        size = sum(len(v) for v in value) if isinstance(value, list) else len(value)
        if size > limits.MAX_WORD:
            raise ConfigError(self.name, f"${name}", f"expands to more than {limits.MAX_WORD:,} characters",
                              "a launch script's values are short: check the assignments of the variables it uses")
        old = self.state.vars.get(name)
        if index is not None:
            items = list(old) if isinstance(old, list) else ([] if old is None else [old])
            at = self.arith_int(index)
            if at is None or at < 0 or at > 4096:
                return
            items += [""] * (at + 1 - len(items))
            items[at] = (items[at] + value if append else value) if isinstance(value, str) else " ".join(value)
            self.state.vars[name] = items
            return
        if isinstance(value, list):
            if append:
                base = list(old) if isinstance(old, list) else ([] if old is None else [old])
                value = base + value
            self.state.vars[name] = value
            return
        if append and old is not None:
            if isinstance(old, list):
                old = list(old)
                old[0:1] = [(old[0] if old else "") + value]
                self.state.vars[name] = old
                return
            value = old + value
        if value.startswith(OPAQUE) and value.endswith(OPAQUE) and value.count(OPAQUE) == 2:
            opaque = self.opaque.get(value[1:-1])
            if opaque is not None and not opaque.var:
                opaque.var = name
        self.state.vars[name] = value

    def mark_opaque(self, what: str, line: int, var: str = "") -> str:
        key = str(len(self.opaque))
        self.opaque[key] = Opaque(what, line, var)
        return f"{OPAQUE}{key}{OPAQUE}"

    # ------------------------------------------------------------ running

    def run_text(self, text: str) -> None:
        self.run(parse(text))

    def run(self, node) -> Optional[int]:
        try:
            return self.exec(node)
        except _Exit:
            return 0

    def exec(self, node) -> Optional[int]:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise ConfigError(self.name, f"line {getattr(node, 'line', self.line)}", f"runs more than {MAX_STEPS:,} "
                              "commands when read statically (a loop that does not end?)",
                              "read it with --run-script, or pass the training command's arguments directly")
        self.line = getattr(node, "line", self.line)
        if isinstance(node, Sequence):
            status: Optional[int] = 0
            for item in node.items:
                status = self.exec(item)
            return status
        if isinstance(node, Simple):
            return self.simple(node)
        if isinstance(node, AndOr):
            return self.and_or(node)
        if isinstance(node, Pipeline):
            return self.pipeline(node)
        if isinstance(node, If):
            return self.if_(node, 0)
        if isinstance(node, Loop):
            return self.loop(node)
        if isinstance(node, Case):
            return self.case(node)
        if isinstance(node, Group):
            if node.subshell:
                saved = copy.deepcopy(self.state.vars)
                try:
                    return self.exec(node.body)
                finally:
                    self.state.vars = saved
            return self.exec(node.body)
        if isinstance(node, CondExpr):
            return _status(self.cond_expr(node))
        if isinstance(node, Function):
            self.state.funcs[node.name] = node.body
            return 0
        raise ShellSyntax(self.line, f"cannot run {type(node).__name__}")  # pragma: no cover

    def fork(self, branches: list[Callable[[], object]], why: str) -> None:
        """Follow every branch from the same state; what they leave different becomes opaque (``why``)."""
        start = self.state
        ends = []
        saved_condition = self.condition
        self.condition = self.condition or why
        try:
            for branch in branches:
                self.state = copy.deepcopy(start)
                try:
                    branch()
                except (_Exit, _Return, _Break):
                    pass
                ends.append(self.state)
        finally:
            self.condition = saved_condition
        merged = copy.deepcopy(start)
        for kind in ("vars", "files"):
            values = [getattr(end, kind) for end in ends]
            keys = set().union(*values)
            target = getattr(merged, kind)
            for key in keys:
                seen = [v.get(key, "\x02unset") for v in values]
                if all(s == seen[0] for s in seen):
                    if seen[0] == "\x02unset":
                        target.pop(key, None)
                    else:
                        target[key] = seen[0]
                else:
                    target[key] = None if kind == "files" else self.mark_opaque(why, self.line, key)
        for end in ends:
            merged.funcs.update(end.funcs)
        self.state = merged

    def and_or(self, node: AndOr) -> Optional[int]:
        status = self.exec(node.first)
        for op, item in node.rest:
            if status is None:
                self.fork([lambda item=item: self.exec(item), lambda: None],
                          f"the test before {op} at line {node.line}")
                status = None
            elif (status == 0) == (op == "&&"):
                status = self.exec(item)
        return status

    def pipeline(self, node: Pipeline) -> Optional[int]:
        status: Optional[int] = 0
        stdin: Optional[str] = None
        for i, command in enumerate(node.commands):
            last = i == len(node.commands) - 1
            if isinstance(command, Simple):
                status, stdin = self.simple(command, stdin=stdin, piped=not last, in_pipeline=True)
            else:
                status, stdin = self.exec(command), None
        if node.negate:
            return None if status is None else int(status == 0)
        return status

    def if_(self, node: If, start: int) -> Optional[int]:
        for k in range(start, len(node.clauses)):
            cond, body = node.clauses[k]
            status = self.exec(cond)
            if status is None:
                what = _describe(cond)
                self.fork([lambda: self.exec(body), lambda: self.if_(node, k + 1)],
                          f"`{what}` at line {getattr(cond, 'line', node.line)}")
                return None
            if status == 0:
                return self.exec(body)
        return self.exec(node.orelse) if node.orelse is not None else 0

    def loop(self, node: Loop) -> Optional[int]:
        self.loop_depth += 1
        try:
            if node.kind == "for" and node.items is not None or node.kind == "for" and node.cond is None:
                items = ([f for w in node.items for f in self.fields(w.raw)] if node.items is not None
                         else list(self.state.positional))
                for n, item in enumerate(items):
                    if n >= MAX_LOOP:
                        raise ConfigError(self.name, f"line {node.line}", f"a for loop over more than {MAX_LOOP} items",
                                          "read it with --run-script")
                    self.set(node.var, item)
                    try:
                        self.exec(node.body)
                    except _Break:
                        break
                return 0
            # while/until and for ((;;)): the static read cannot count the turns; run the body at most once
            self.fork([lambda: self.exec(node.body), lambda: None], f"the {node.kind} loop at line {node.line}")
            return 0
        finally:
            self.loop_depth -= 1

    def case(self, node: Case) -> Optional[int]:
        word = self.string(node.word.raw)
        if OPAQUE in word:
            arms = [lambda body=body: self.exec(body) for _, body in node.arms] + [lambda: None]
            self.fork(arms, f"`case {node.word.raw}` at line {node.line}")
            return None
        value = _unmark(word)
        for patterns, body in node.arms:
            for pattern in patterns:
                text = self.string(pattern.raw)
                if OPAQUE in text:
                    self.fork([lambda body=body: self.exec(body), lambda: None],
                              f"`case {node.word.raw}` at line {node.line}")
                    return None
                if _glob_match(_unmark(text), value):
                    return self.exec(body)
        return 0

    # ------------------------------------------------------------ simple commands

    def simple(self, node: Simple, stdin: Optional[str] = None, piped: bool = False, in_pipeline: bool = False):
        """Run one simple command; in a pipeline returns (status, its output for the next command)."""
        if node.length > limits.MAX_WORD:
            raise ConfigError(self.name, f"line {node.line}", f"is {node.length:,} characters long, over the "
                              f"{limits.MAX_WORD:,}-character limit of one command line",
                              "shorten that line; check that the file is a launch script")
        self.line = node.line
        if not node.words:
            for assign in node.assigns:
                self.assign(assign)
            status = 0
            for redirect in node.redirects:
                self.redirect_file(redirect, "")
            return (status, None) if in_pipeline else status
        words: list[str] = []
        decl = False
        for i, word in enumerate(node.words):
            if isinstance(word, ArrayWord):
                if decl:
                    self.assign(word)
                continue
            if decl and re.match(r"[A-Za-z_]\w*(\[[^\]]*\])?\+?=", word.raw):
                self.assign(word)
                words.append(word.raw.split("=", 1)[0])
                continue
            fields = self.fields(word.raw)
            if i == 0 and fields and fields[0] in _DECLARE:
                decl = True
            words.extend(fields)
        if not words:
            return (0, None) if in_pipeline else 0
        stdin = self.stdin(node, stdin)
        status, out = self.command(words, node, stdin)
        if out is not None and not piped:
            self.emit(out, node)
        return (status, out if piped else None) if in_pipeline else status

    def stdin(self, node: Simple, stdin: Optional[str]) -> Optional[str]:
        for redirect in node.redirects:
            if redirect.op in ("<<", "<<-"):
                body = redirect.body or ""
                stdin = body if redirect.quoted else self.string(body, heredoc=True)
            elif redirect.op == "<<<":
                stdin = self.string(redirect.target) + "\n"
            elif redirect.op == "<" and redirect.fd in (None, 0):
                stdin = self.read_file(self.string(redirect.target))
        return stdin

    def emit(self, out: str, node: Simple) -> None:
        """Where a builtin's output goes: a file redirection, the ``$( )`` being read, or nowhere."""
        targets = [r for r in node.redirects if r.op in (">", ">>", ">|", "&>", "&>>") and r.fd in (None, 1)]
        if targets:
            for redirect in targets:
                self.redirect_file(redirect, out)
        elif self.output is not None:
            self.output.append(out)

    def redirect_file(self, redirect: Redirect, out: Optional[str]) -> None:
        if redirect.op not in (">", ">>", ">|", "&>", "&>>") or redirect.fd not in (None, 1):
            return
        path = _unmark_keep(self.string(redirect.target))
        if redirect.op in (">>", "&>>") and out is not None:
            old = self.state.files.get(path, "")
            out = None if old is None else old + out
        self.write(path, out)

    def write(self, path: str, text: Optional[str]) -> None:
        if text is not None and len(text) > limits.MAX_BYTES:
            raise ConfigError(self.name, path, f"the script writes more than {limits.MAX_BYTES:,} bytes to it",
                              "a config the script writes is a few kilobytes: check the script")
        self.state.files[path] = text
        norm = os.path.normpath(path)
        if norm != path:
            self.state.files[norm] = text

    def read_file(self, path: str) -> Optional[str]:
        """A file's text: written earlier by the script, else on disk (next to the script); None if unknown."""
        if OPAQUE in path:
            return None
        for key in (path, os.path.normpath(path)):
            if key in self.state.files:
                return self.state.files[key]
        for candidate in ([Path(path)] if Path(path).is_absolute() else
                          ([self.base / path] if self.base is not None else [])):
            try:
                if candidate.is_file() and candidate.stat().st_size <= limits.MAX_BYTES:
                    return candidate.read_text(errors="replace")
            except OSError:
                return None
        return None

    def assign(self, token: Union[Word, ArrayWord]) -> None:
        if isinstance(token, ArrayWord):
            items = [f for item in token.items for f in self.fields(item)]
            self.set(token.name, items, token.append)
            return
        match = re.match(r"([A-Za-z_]\w*)(?:\[([^\]]*)\])?(\+?)=(.*)", token.raw, re.S)
        name, index, append, raw = match.groups()
        value = self.string(raw, assignment=True)
        self.set(name, value, bool(append), index)

    def command(self, words: list[str], node: Simple, stdin: Optional[str]) -> tuple[Optional[int], Optional[str]]:
        """(exit status or None when unknown, output of a builtin that writes one)."""
        name = _unmark(words[0])
        args = words[1:]
        while name in ("command", "builtin", "exec", "nohup", "time", "env") and args:
            if name == "env":
                while args and re.match(r"[A-Za-z_]\w*=", args[0]):
                    args = args[1:]
                if not args:
                    return 0, None
            name, args = _unmark(args[0]), args[1:]
            words = [name, *args]
        if name in _DECLARE or name in (":", "true"):
            return 0, None
        if name == "false":
            return 1, None
        if name in ("test", "["):
            if name == "[":
                if not args or _unmark(args[-1]) != "]":
                    return 2, None
                args = args[:-1]
            return _status(_test(args, self)), None
        if name.startswith("((") and name.endswith("))"):
            return self.arith_command(name[2:-2]), None
        if name == "unset":
            for arg in args:
                if not arg.startswith("-"):
                    self.state.vars.pop(_unmark(arg), None)
                    self.state.funcs.pop(_unmark(arg), None)
            return 0, None
        if name in ("source", "."):
            return self.source(args, node), None
        if name == "eval":
            return self.eval(" ".join(_unmark_keep(a) for a in args), node), None
        if name == "shift":
            count = int(args[0]) if args and args[0].isdigit() else 1
            self.state.positional = self.state.positional[count:]
            return 0, None
        if name == "set":
            if args and args[0] == "--":
                self.state.positional = list(args[1:])
            return 0, None
        if name == "exit":
            if self.condition:
                return 0, None
            self.exited = self.line  # a script that exits before its training command is named, not read as empty
            raise _Exit()
        if name == "return":
            if not self.returnable:  # bash: "can only `return' from a function or sourced script", status 1
                return 1, None
            raise _Return(int(args[0]) if args and args[0].isdigit() else 0)
        if name in ("break", "continue") and self.loop_depth:
            if name == "break":
                raise _Break()
            return 0, None
        if name in self.state.funcs:
            return self.call(name, args), None
        if name == "echo":
            return 0, _echo(args)
        if name == "printf":
            return 0, _printf(args)
        if name in ("cat", "tee"):
            return self.cat(name, args, stdin)
        if name == "cp":
            files = [a for a in args if not a.startswith("-")]
            if len(files) == 2:
                self.write(_unmark_keep(files[1]), self.read_file(_unmark_keep(files[0])))
            return 0, None
        if name == "sed":
            return self.sed(args, stdin, node)
        if name == "pwd":  # the builtin: the directory bash runs in (as $PWD)
            pwd = self.get("PWD")
            return 0, (pwd if isinstance(pwd, str) else os.getcwd()) + "\n"
        if name in ("dirname", "basename") and args:
            path = _unmark_keep(args[0])
            out = os.path.dirname(path.rstrip("/")) or "." if name == "dirname" else os.path.basename(path.rstrip("/"))
            if name == "basename" and len(args) > 1 and out.endswith(_unmark(args[1])):
                out = out[:-len(_unmark(args[1]))]
            return 0, out + "\n"
        for k in range(len(words) - 2):  # `srun ... bash -c "$LAUNCHER $CMD"`: the launch is the string
            if _unmark(words[k]) in ("bash", "sh") and _unmark(words[k + 1]) == "-c":
                return self.eval(_unmark_keep(words[k + 2]), node), None
        if self.output is not None:  # a program's output is what a $( ) reads: not knowable
            self.output.append(self.mark_opaque(_describe(node), node.line))
            return None, None
        if self.loop_depth == 0 and name not in _QUIET:
            self.commands.append(Command(words, node.line, _describe(node), self.condition))
        for redirect in node.redirects:  # what a program writes is unknown
            if redirect.op in (">", ">>", ">|", "&>", "&>>") and redirect.fd in (None, 1):
                self.write(_unmark_keep(self.string(redirect.target)), None)
        return (0 if name in _STATUS_ZERO else None), None

    def cat(self, name: str, args: list[str], stdin: Optional[str]) -> tuple[Optional[int], Optional[str]]:
        files = [_unmark_keep(a) for a in args if not a.startswith("-") or a == "-"]
        if name == "tee":
            text = stdin
            for path in files:
                old = self.state.files.get(path, "") if "-a" in args else ""
                self.write(path, None if text is None or old is None else old + text)
            return 0, text
        if not files:
            return 0, stdin
        parts = [stdin if path == "-" else self.read_file(path) for path in files]
        if any(part is None for part in parts):
            return None, self.mark_opaque(f"cat {' '.join(files)}", self.line)
        return 0, "".join(parts)

    def sed(self, args: list[str], stdin: Optional[str], node: Simple) -> tuple[Optional[int], Optional[str]]:
        scripts, files, in_place, extended = [], [], False, False
        i = 0
        while i < len(args):
            arg = _unmark_keep(args[i])
            if arg in ("-e", "--expression") and i + 1 < len(args):
                scripts.append(_unmark_keep(args[i + 1]))
                i += 2
                continue
            if arg.startswith("--expression="):
                scripts.append(arg.split("=", 1)[1])
            elif arg.startswith("-i") or arg.startswith("--in-place"):
                in_place = True
            elif arg in ("-E", "-r", "--regexp-extended"):
                extended = True
            elif arg.startswith("-") and arg != "-":
                if set(arg[1:]) <= set("Er"):
                    extended = True
                elif set(arg[1:]) - set("Eri"):
                    return None, self.mark_opaque(f"sed {arg}", node.line)
                else:
                    in_place, extended = True, extended or bool(set(arg[1:]) & set("Er"))
            elif not scripts and not files and i == _first_operand(args):
                scripts.append(arg)
            else:
                files.append(_unmark_keep(arg))
            i += 1
        edits = []
        for script in scripts:
            parsed = _sed_script(script, extended)
            if parsed is None:
                return None, self.mark_opaque(f"sed {script!r}", node.line)
            edits += parsed
        if in_place:
            for path in files:
                text = self.read_file(path)
                self.write(path, None if text is None else _sed_apply(edits, text))
            return 0, None
        texts = [self.read_file(path) for path in files] if files else [stdin]
        if any(text is None for text in texts):
            return None, self.mark_opaque(f"sed on {' '.join(files) or 'its input'}", node.line)
        return 0, "".join(_sed_apply(edits, text) for text in texts)

    def source(self, args: list[str], node: Simple) -> Optional[int]:
        if not args:
            return 2
        path = _unmark_keep(args[0])
        text = self.read_file(path)
        if text is None:
            self.missing_sources.append((path, node.line))
            return None
        self.returnable += 1
        try:
            return self.nested(lambda: self.run_text(text), f"source {path}")
        except _Return as ret:  # return in a sourced file ends the file
            return ret.status
        finally:
            self.returnable -= 1

    def eval(self, text: str, node: Simple) -> Optional[int]:
        def run():
            tree = parse(text)
            _renumber(tree, node.line)
            return self.exec(tree)
        return self.nested(run, "eval")

    def nested(self, run: Callable[[], Optional[int]], what: str) -> Optional[int]:
        if self.depth >= MAX_DEPTH:
            raise ConfigError(self.name, f"line {self.line}", f"nests {what} more than {MAX_DEPTH} deep",
                              "read it with --run-script")
        self.depth += 1
        line = self.line
        try:
            return run()
        except ShellSyntax as err:
            raise ConfigError(self.name, f"line {self.line}", f"{what}: {err.problem}",
                              "fix the script's syntax there (bash would refuse it too)") from None
        finally:
            self.depth -= 1
            self.line = line

    def call(self, name: str, args: list[str]) -> Optional[int]:
        saved = self.state.positional
        self.state.positional = list(args)
        self.returnable += 1
        try:
            return self.nested(lambda: self.exec(self.state.funcs[name]), f"the function {name}")
        except _Return as ret:
            return ret.status
        finally:
            self.state.positional = saved
            self.returnable -= 1

    def arith_command(self, expr: str) -> Optional[int]:
        try:
            value = self.arith(expr)
        except ArithError:
            return 1  # bash prints the error; the (( )) fails
        if value is None:
            return None
        return int(value == 0)

    # ------------------------------------------------------------ expansions

    def fields(self, raw: str) -> list[str]:
        """A word's fields after expansion, splitting and quote removal (markers kept)."""
        out = _Fields()
        self.expand(raw, out, quoted=False)
        fields = out.done()
        if sum(len(f) for f in fields) > limits.MAX_WORD:
            raise ConfigError(self.name, raw[:40], f"expands to more than {limits.MAX_WORD:,} characters",
                              "a launch script's values are short: check the assignments of the variables it uses")
        return fields

    def string(self, raw: str, assignment: bool = False, heredoc: bool = False) -> str:
        """A word expanded as one string (assignments, redirection targets, here-documents)."""
        out = _Fields(join=True)
        self.expand(raw, out, quoted=heredoc, heredoc=heredoc)
        text = out.joined()
        limit = limits.MAX_BYTES if heredoc else limits.MAX_WORD
        if len(text) > limit:
            raise ConfigError(self.name, raw[:40], f"expands to more than {limit:,} characters",
                              "a launch script's values are short: check the assignments of the variables it uses")
        return text

    def expand(self, raw: str, out: "_Fields", quoted: bool, heredoc: bool = False) -> None:
        i, n = 0, len(raw)
        while i < n:
            ch = raw[i]
            if ch == "\\":
                nxt = raw[i + 1:i + 2]
                if quoted and nxt not in ("$", "`", '"', "\\", "\n") or heredoc and nxt == '"':
                    out.literal("\\", True)
                    i += 1
                    continue
                if nxt != "\n":
                    out.literal(nxt, True)
                i += 2
            elif ch == "'" and not quoted:
                end = raw.find("'", i + 1)
                if end < 0:
                    raise ConfigError(self.name, f"line {self.line}", "a ' quote is not closed (bash: unexpected EOF "
                                      "while looking for matching `'')", "close the quote")
                out.literal(raw[i + 1:end], True)
                i = end + 1
            elif ch == '"' and not heredoc:
                if quoted:  # the closing quote of the string this call expands
                    i += 1
                    continue
                end = _closing_quote(raw, i + 1)
                out.mark_quoted()
                self.expand(raw[i + 1:end], out, quoted=True)
                i = end + 1
            elif ch == "`":
                end = i + 1
                while end < n and raw[end] != "`":
                    end += 2 if raw[end] == "\\" else 1
                self.substitute(raw[i + 1:end].replace("\\`", "`"), out, quoted)
                i = end + 1
            elif ch == "$":
                i = self.dollar(raw, i, out, quoted)
            else:
                j = i + 1
                while j < n and raw[j] not in "\\'\"`$":
                    j += 1
                out.literal(raw[i:j], quoted)
                i = j

    def dollar(self, raw: str, i: int, out: "_Fields", quoted: bool) -> int:
        nxt = raw[i + 1:i + 2]
        if raw.startswith("$((", i):
            end = _balanced(raw, i + 2, "(", ")")
            if end < len(raw) and raw[end - 1] == ")":
                expr = raw[i + 3:end - 1]
                try:
                    value = self.arith(expr)
                except ArithError as err:
                    raise ConfigError(self.name, f"line {self.line}", f"$(({' '.join(expr.split())[:60]})): {err} "
                                      "(bash stops the command there)", "fix the arithmetic") from None
                if value is None:
                    text = self._marks_in(expr) or self.mark_opaque(f"$(({' '.join(expr.split())}))", self.line)
                else:
                    text = str(value)
                out.value(text, quoted)
                return end + 1
        if nxt == "(":
            end = _balanced(raw, i + 2, "(", ")")
            self.substitute(raw[i + 2:end], out, quoted)
            return end + 1
        if nxt == "{":
            end = _balanced(raw, i + 2, "{", "}")
            self.parameter(raw[i + 2:end], out, quoted)
            return end + 1
        if nxt == "'" and not quoted:
            end = i + 2
            while end < len(raw) and raw[end] != "'":
                end += 2 if raw[end] == "\\" else 1
            out.literal(_ansi_c(raw[i + 2:end]), True)
            return end + 1
        match = _NAME.match(raw, i + 1)
        if match:
            self.variable(match.group(0), out, quoted)
            return match.end()
        if nxt and (nxt.isdigit() or nxt in "@*#?$!-0"):
            self.variable(nxt, out, quoted)
            return i + 2
        out.literal("$", quoted)
        return i + 1

    def variable(self, name: str, out: "_Fields", quoted: bool) -> None:
        value = self.lookup(name)
        if isinstance(value, list):
            out.items(value, quoted, join=name == "*")
        else:
            out.value(value, quoted)

    def lookup(self, name: str, index: Optional[str] = None) -> Union[str, list]:
        """A parameter's value (markers for unset and unknowable ones); lists for ``@``/``*``/``A[@]``."""
        if name in ("@", "*"):
            return list(self.state.positional)
        if name == "#":
            return str(len(self.state.positional))
        if name == "?":
            return "0"
        if name == "0":
            return self.name
        if name.isdigit():
            at = int(name) - 1
            return self.state.positional[at] if at < len(self.state.positional) else f"{UNSET}{name}{UNSET}"
        if name in ("$", "!", "-", "RANDOM", "SECONDS", "BASHPID", "PPID", "EPOCHSECONDS"):
            return self.mark_opaque(f"${name}", self.line)
        value = self.get(name)
        if value is None:
            return f"{UNSET}{name}{UNSET}"
        if index is None:
            return value[0] if isinstance(value, list) and value else ("" if isinstance(value, list) else value)
        if index in ("@", "*"):
            return list(value) if isinstance(value, list) else [value]
        at = self.arith_int(index)
        items = value if isinstance(value, list) else [value]
        if at is None:
            return self.mark_opaque(f"${{{name}[{index}]}}", self.line)
        return items[at] if -len(items) <= at < len(items) else ""

    def parameter(self, body: str, out: "_Fields", quoted: bool) -> None:
        """``${...}``: length, defaults, assignment, alternatives, prefix/suffix removal, replacement, slices."""
        if body.startswith("#") and len(body) > 1:
            match = re.fullmatch(r"#([A-Za-z_]\w*|\d+|[@*])(?:\[([@*]|[^\]]*)\])?", body)
            if match:
                value = self.lookup(match.group(1), match.group(2))
                if isinstance(value, list):
                    out.value(str(len(value)), quoted)
                elif OPAQUE in value or UNSET in value and match.group(2) is None and value.startswith(UNSET):
                    out.value(value if OPAQUE in value else "0", quoted)
                else:
                    out.value(str(len(value)), quoted)
                return
        if body.startswith("!"):
            match = re.fullmatch(r"!([A-Za-z_]\w*)", body)
            target = self.get(match.group(1)) if match else None
            if isinstance(target, str) and _NAME.fullmatch(target):
                self.variable(target, out, quoted)
            else:
                out.value(self.mark_opaque(f"${{{body}}}", self.line), quoted)
            return
        match = re.match(r"([A-Za-z_]\w*|\d+|[@*#?$!-])(?:\[([^\]]*)\])?", body)
        if not match:
            raise ConfigError(self.name, f"line {self.line}", f"${{{body}}}: bad substitution (bash refuses it)",
                              "fix the ${...} expansion")
        name, index = match.group(1), match.group(2)
        rest = body[match.end():]
        value = self.lookup(name, index)
        is_unset = isinstance(value, str) and value.startswith(UNSET) and value.endswith(UNSET) and \
            value.count(UNSET) == 2
        if not rest:
            if isinstance(value, list):
                out.items(value, quoted, join=index == "*")
            else:
                out.value(value, quoted)
            return
        op = re.match(r":?[-=+?]|##?|%%?|//?|/#|/%|\^\^?|,,?|:", rest).group(0)
        word = rest[len(op):]
        text = value if isinstance(value, str) else " ".join(value)
        if op in (":-", "-", ":=", "=", ":+", "+", ":?", "?"):
            empty = is_unset or (op.startswith(":") and (text == "" or isinstance(value, list) and not value))
            if OPAQUE in text and op.startswith(":") and text.strip(OPAQUE).isdigit():
                out.value(self.mark_opaque(f"${{{body}}}", self.line), quoted)
                return
            if op[-1] in "-=?":
                if empty:
                    default = self.string(word)
                    if op[-1] == "=":
                        self.set(name, default)
                    out.value(default, quoted)
                elif isinstance(value, list):
                    out.items(value, quoted)
                else:
                    out.value(text, quoted)
            else:
                out.value("" if empty else self.string(word), quoted)
            return
        if is_unset:
            out.value(text, quoted)
            return
        if OPAQUE in text or UNSET in text:  # trimming or replacing inside a marker would forge another one
            marks = re.findall("\x01[^\x01]*\x01", text) or re.findall("\x00[^\x00]*\x00", text)
            out.value("".join(dict.fromkeys(marks)), quoted)
            return
        if op in ("#", "##", "%", "%%"):
            pattern = _unmark(self.string(word))
            out.value(_trim(text, pattern, op), quoted)
        elif op in ("/", "//", "/#", "/%"):
            pattern, _, replacement = word.partition("/")
            out.value(_replace(text, _unmark(self.string(pattern)), self.string(replacement), op), quoted)
        elif op in ("^^", "^"):
            out.value(text.upper() if op == "^^" else text[:1].upper() + text[1:], quoted)
        elif op in (",,", ","):
            out.value(text.lower() if op == ",," else text[:1].lower() + text[1:], quoted)
        else:  # ${X:offset[:length]}
            offset_text, _, length_text = word.partition(":")
            offset = self.arith_int(offset_text or "0")
            length = self.arith_int(length_text) if length_text else None
            if offset is None or (length_text and length is None) or OPAQUE in text:
                out.value(self.mark_opaque(f"${{{body}}}", self.line), quoted)
                return
            start = offset if offset >= 0 else max(0, len(text) + offset)
            end = len(text) if length is None else (start + length if length >= 0 else len(text) + length)
            out.value(text[start:end], quoted)

    def substitute(self, inner: str, out: "_Fields", quoted: bool) -> None:
        """``$( ... )``: the output of the builtins it runs; a program's output is opaque."""
        saved_output, saved_state, saved_commands = self.output, self.state, len(self.commands)
        line = self.line
        self.output = []
        self.state = copy.deepcopy(self.state)
        try:
            self.nested(lambda: self.run_text(inner), "$( )")
            text = "".join(self.output)
        except (_Return, _Break):
            text = "".join(self.output)
        finally:
            self.output, self.state, self.line = saved_output, saved_state, line
            del self.commands[saved_commands:]
        if OPAQUE in text:
            text = self.mark_opaque(f"$({' '.join(inner.split())})", line)
        out.value(text.rstrip("\n"), quoted)

    # ------------------------------------------------------------ arithmetic

    def arith(self, expr: str) -> Optional[int]:
        """``expr``'s value (None: it reads an unset or unknowable variable); bash's own refusals
        (division by 0, bad syntax) raise :class:`~.shell_arith.ArithError`."""
        return evaluate(expr, self)

    def arith_or_none(self, expr: str) -> Optional[int]:
        try:
            return self.arith(expr)
        except ArithError:
            return None

    def arith_int(self, expr: str) -> Optional[int]:
        if OPAQUE in expr or UNSET in expr:
            return None
        return self.arith_or_none(expr)

    def _marks_in(self, expr: str) -> str:
        """The markers of the unknowable (else unset) variables an expression reads: its value is theirs."""
        values = [self.lookup(m) for m in dict.fromkeys(_NAME.findall(expr))]
        values = [v for v in values if isinstance(v, str)]
        opaque = [m.group(0) for v in values for m in re.finditer("\x01[^\x01]*\x01", v)]
        unset = [m.group(0) for v in values for m in re.finditer("\x00[^\x00]*\x00", v)]
        return "".join(dict.fromkeys(opaque)) or "".join(dict.fromkeys(unset))

    # ------------------------------------------------------------ [[ ]]

    def cond_expr(self, node: CondExpr) -> Optional[bool]:
        tokens: list[tuple[str, str]] = []
        for part in node.parts:
            if isinstance(part, Op):
                tokens.append(("op", part.text))
            else:
                tokens.append(("word", part.raw))
        return _DoubleBracket(tokens, self).parse()


# ------------------------------------------------------------------ helpers


class _Fields:
    """Builds a word's fields: literal text and expansions, split where bash splits them."""

    def __init__(self, join: bool = False):
        self.fields: list[str] = []
        self.current, self.has, self.join = "", False, join

    def mark_quoted(self) -> None:
        self.has = True

    def literal(self, text: str, quoted: bool) -> None:
        self.current += text
        self.has = self.has or quoted or bool(text)

    def value(self, text: str, quoted: bool) -> None:
        if quoted or self.join:
            self.current += text
            self.has = True
            return
        if not text:
            return
        parts = text.split()
        if text[0] in " \t\n" and (self.current or self.has):
            self.finish()
        for k, part in enumerate(parts):
            if k:
                self.finish()
            self.current += part
            self.has = True
        if text[-1] in " \t\n" and parts:
            self.finish()

    def items(self, items: list[str], quoted: bool, join: bool = False) -> None:
        if self.join or join:
            self.value(" ".join(items), quoted)
            return
        for k, item in enumerate(items):
            if k and quoted:
                self.finish()
                self.has = True
            if quoted:
                self.current += item
                self.has = True
            else:
                if k:
                    self.finish()
                self.value(item, False)

    def finish(self) -> None:
        if self.current or self.has:
            self.fields.append(self.current)
        self.current, self.has = "", False

    def done(self) -> list[str]:
        self.finish()
        return self.fields

    def joined(self) -> str:
        return "".join(self.fields) + self.current


def _status(result: Optional[bool]) -> Optional[int]:
    return None if result is None else (0 if result else 1)


def _unmark(text: str) -> str:
    """The value bash would see with nothing unset set: unset markers are empty (opaque ones stay)."""
    return re.sub("\x00[^\x00]*\x00", "", text) if UNSET in text else text


def _unmark_keep(text: str) -> str:
    """Unset markers as ``$NAME`` (what the script wrote)."""
    return re.sub("\x00([^\x00]*)\x00", r"$\1", text) if UNSET in text else text


def _closing_quote(raw: str, i: int) -> int:
    while i < len(raw):
        if raw[i] == "\\":
            i += 2
        elif raw[i] == '"':
            return i
        elif raw[i] == "$" and raw[i + 1:i + 2] in ("(", "{"):
            i = _balanced(raw, i + 2, raw[i + 1], ")" if raw[i + 1] == "(" else "}") + 1
        elif raw[i] == "`":
            i = raw.index("`", i + 1) + 1
        else:
            i += 1
    return len(raw)


def _balanced(raw: str, i: int, open_: str, close: str) -> int:
    depth = 1
    while i < len(raw):
        ch = raw[i]
        if ch == "\\":
            i += 2
            continue
        if ch == '"' or ch == "'" and open_ == "(":
            end = raw.find(ch, i + 1)
            i = (end if end >= 0 else len(raw)) + 1
            continue
        if ch == open_:
            depth += 1
        elif ch == close:
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return len(raw) - 1


def _ansi_c(text: str) -> str:
    table = {"n": "\n", "t": "\t", "\\": "\\", "'": "'", '"': '"', "r": "\r", "a": "\a", "e": "\x1b"}
    return re.sub(r"\\(.)", lambda m: table.get(m.group(1), "\\" + m.group(1)), text)


def _glob_regex(pattern: str) -> str:
    return fnmatch.translate(pattern)[4:-3] if pattern else ""


def _glob_match(pattern: str, value: str) -> bool:
    return re.fullmatch(_glob_regex(pattern), value, re.S) is not None


def _trim(text: str, pattern: str, op: str) -> str:
    rx = re.compile(_glob_regex(pattern), re.S)
    spans = range(len(text) + 1)
    if op in ("#", "##"):
        order = spans if op == "#" else reversed(spans)
        for k in order:
            if rx.fullmatch(text[:k]):
                return text[k:]
    else:
        order = reversed(spans) if op == "%" else spans
        for k in order:
            if rx.fullmatch(text[k:]):
                return text[:k]
    return text


def _replace(text: str, pattern: str, replacement: str, op: str) -> str:
    rx = _glob_regex(pattern)
    if not rx:
        return text
    if op == "/#":
        return re.sub("^" + rx, lambda m: replacement, text, count=1, flags=re.S)
    if op == "/%":
        return re.sub(rx + "$", lambda m: replacement, text, count=1, flags=re.S)
    return re.sub(rx, lambda m: replacement, text, count=0 if op == "//" else 1, flags=re.S)


def _echo(args: list[str]) -> str:
    newline, escapes = True, False
    while args and re.fullmatch(r"-[neE]+", args[0]):
        newline = newline and "n" not in args[0]
        escapes = "e" in args[0]
        args = args[1:]
    text = " ".join(_unmark_keep(a) for a in args)
    if escapes:
        text = _ansi_c(text)
    return text + ("\n" if newline else "")


def _printf(args: list[str]) -> Optional[str]:
    if not args:
        return ""
    fmt, values = _ansi_c(_unmark_keep(args[0])), [_unmark_keep(a) for a in args[1:]]
    out, k = [], 0
    while True:
        def field(match):
            nonlocal k
            if match.group(0) == "%%":
                return "%"
            value = values[k] if k < len(values) else ""
            k += 1
            spec = match.group(0)
            kind = spec[-1]
            if kind in "di":  # bash reads 0x10, 010 and 'c as numbers
                from .shell_arith import _number
                try:
                    number = _number(value.strip()) if value.strip() else 0
                except Exception:  # noqa: BLE001 - bash: "invalid number", prints 0
                    number = 0
                return (spec[:-1] + "d") % number
            if kind in "fg":
                try:
                    return spec % float(value or 0)
                except ValueError:
                    return spec % 0.0
            if kind in "qb":
                return value
            return spec % value
        out.append(re.sub(r"%%|%[-+ 0#]*\d*(?:\.\d+)?[sdifgqb]", field, fmt))
        if k == 0 or k >= len(values):
            break
    return "".join(out)


def _first_operand(args: list[str]) -> int:
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "-":
        i += 2 if args[i] in ("-e", "--expression", "-f") else 1
    return i


_BRE_SPECIAL = {"(": "\\(", ")": "\\)", "{": "\\{", "}": "\\}", "+": "\\+", "?": "\\?", "|": "\\|"}


def _sed_regex(pattern: str, extended: bool) -> str:
    """A sed regular expression (POSIX basic, GNU's ``\\+ \\? \\|`` included; or extended) as Python's."""
    if extended:
        return pattern
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            out.append(nxt if nxt in "(){}+?|" else "\\" + nxt)
            i += 2
            continue
        out.append(_BRE_SPECIAL.get(ch, ch))
        i += 1
    return "".join(out)


def _sed_script(script: str, extended: bool) -> Optional[list[tuple[re.Pattern, str, int]]]:
    """The ``s`` commands of a sed script (``;`` or newline between them); None for anything else."""
    edits = []
    i = 0
    script = script.strip()
    while i < len(script):
        while i < len(script) and script[i] in " \t\n;":
            i += 1
        if i >= len(script):
            break
        if script[i] != "s" or i + 1 >= len(script):
            return None
        delim = script[i + 1]
        if delim in "\\\n ":
            return None
        parts, j, buf = [], i + 2, []
        while j < len(script) and len(parts) < 2:
            ch = script[j]
            if ch == "\\" and j + 1 < len(script):
                buf.append(script[j + 1] if script[j + 1] == delim else script[j:j + 2])
                j += 2
                continue
            if ch == delim:
                parts.append("".join(buf))
                buf = []
            else:
                buf.append(ch)
            j += 1
        if len(parts) < 2:
            return None
        flags_match = re.match(r"[gIip0-9]*", script[j:])
        flags = flags_match.group(0)
        j += len(flags)
        count = 0 if "g" in flags else int(re.sub(r"\D", "", flags) or 1)
        try:
            rx = re.compile(_sed_regex(parts[0], extended), re.I if ("I" in flags or "i" in flags) else 0)
        except re.error:
            return None
        edits.append((rx, parts[1], count))
        i = j
    return edits


def _sed_replacement(template: str, match: re.Match) -> str:
    out, i = [], 0
    while i < len(template):
        ch = template[i]
        if ch == "\\" and i + 1 < len(template):
            nxt = template[i + 1]
            if nxt.isdigit():
                out.append(match.group(int(nxt)) or "" if int(nxt) <= (match.re.groups or 0) else "")
            else:
                out.append({"n": "\n", "t": "\t"}.get(nxt, nxt))
            i += 2
            continue
        out.append(match.group(0) if ch == "&" else ch)
        i += 1
    return "".join(out)


def _sed_apply(edits, text: str) -> str:
    lines = text.split("\n")
    for k, line in enumerate(lines):
        for rx, template, count in edits:
            if count <= 1 or count == 0:
                line = rx.sub(lambda m: _sed_replacement(template, m), line, count=1 if count == 1 else 0)
            else:
                seen = [0]

                def nth(m, count=count, template=template):
                    seen[0] += 1
                    return _sed_replacement(template, m) if seen[0] == count else m.group(0)
                line = rx.sub(nth, line)
        lines[k] = line
    return "\n".join(lines)


def _describe(node, limit: int = 80) -> str:
    """A command as the script writes it, shortened."""
    if isinstance(node, Simple):
        words = [w.raw if isinstance(w, Word) else f"{w.name}=(...)" for w in node.words] or \
            [a.raw if isinstance(a, Word) else f"{a.name}=(...)" for a in node.assigns]
        text = " ".join(words)
    elif isinstance(node, Sequence):
        text = "; ".join(_describe(item, limit) for item in node.items)
    elif isinstance(node, Pipeline):
        text = " | ".join(_describe(c, limit) for c in node.commands)
    elif isinstance(node, AndOr):
        text = _describe(node.first, limit) + "".join(f" {op} {_describe(c, limit)}" for op, c in node.rest)
    elif isinstance(node, CondExpr):
        text = "[[ " + " ".join(p.raw if isinstance(p, Word) else p.text for p in node.parts) + " ]]"
    else:
        text = type(node).__name__.lower()
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _renumber(node, line: int) -> None:
    """Commands run by ``eval`` carry the line of the ``eval``."""
    stack = [node]
    while stack:
        item = stack.pop()
        if hasattr(item, "line"):
            item.line = line
        for value in getattr(item, "__dict__", {}).values():
            if isinstance(value, list):
                stack.extend(v for v in value if hasattr(v, "__dict__") or isinstance(v, tuple))
            elif hasattr(value, "__dict__"):
                stack.append(value)
        if isinstance(item, tuple):
            stack.extend(v for v in item if hasattr(v, "__dict__"))


# ------------------------------------------------------------------ test and [[ ]]

_UNARY = {"-n", "-z", "-e", "-f", "-d", "-s", "-r", "-w", "-x", "-L", "-h", "-a", "-v", "-o"}
_BINARY = {"=", "==", "!=", "-eq", "-ne", "-lt", "-le", "-gt", "-ge", "<", ">", "-nt", "-ot", "=~"}


def _compare(op: str, left: str, right: str, ev: Evaluator, pattern: bool = False,
             arithmetic: bool = False) -> Optional[bool]:
    if OPAQUE in left or OPAQUE in right:
        return None
    left, right = _unmark(left), _unmark(right)
    if op in ("=", "=="):
        return _glob_match(right, left) if pattern else left == right
    if op == "!=":
        return not _glob_match(right, left) if pattern else left != right
    if op == "<":
        return left < right
    if op == ">":
        return left > right
    if op == "=~":
        try:
            return re.search(right, left) is not None
        except re.error:
            return False
    if op in ("-nt", "-ot"):
        return None
    if arithmetic:
        try:
            a, b = ev.arith(left or "0"), ev.arith(right or "0")
        except ArithError:
            return False
        if a is None or b is None:
            return None
    else:
        try:
            a, b = int(left.strip()), int(right.strip())
        except ValueError:
            return False  # bash: "integer expression expected", status 2
    return {"-eq": a == b, "-ne": a != b, "-lt": a < b, "-le": a <= b, "-gt": a > b, "-ge": a >= b}[op]


def _unary(op: str, arg: str, ev: Evaluator) -> Optional[bool]:
    if OPAQUE in arg:
        return None
    if op == "-n":
        return _unmark(arg) != ""
    if op == "-z":
        return _unmark(arg) == ""
    if op == "-v":
        return ev.get(_unmark(arg)) is not None
    if op == "-o":
        return None
    path = _unmark(arg)
    if UNSET in arg and not path:
        return False
    path = _unmark_keep(arg)
    if op in ("-e", "-a", "-f", "-s", "-r") and path in ev.state.files:
        return ev.state.files[path] is not None or None
    text = ev.read_file(path)
    if text is not None:
        return op != "-d" and (op != "-s" or bool(text))
    if not Path(path).is_absolute() and OPAQUE not in path:  # bash looks in the current directory first
        try:
            if Path(path).is_dir() if op == "-d" else Path(path).exists():
                return True
        except OSError:
            pass
    if ev.base is not None:
        target = Path(path) if Path(path).is_absolute() else ev.base / path
        try:
            if op == "-d":
                return target.is_dir()
            return target.exists()
        except OSError:
            return None
    return None


def _test(args: list[str], ev: Evaluator) -> Optional[bool]:
    """``test``/``[``: POSIX's rules by argument count, then ``!``, ``-a``, ``-o`` and parentheses."""
    words = [_unmark(a) if OPAQUE not in a else a for a in args]

    def simple(ws: list[str], raw: list[str]) -> Optional[bool]:
        if not ws:
            return False
        if len(ws) == 1:
            return None if OPAQUE in raw[0] else ws[0] != ""
        if ws[0] == "!" and len(ws) <= 4:
            inner = simple(ws[1:], raw[1:])
            return None if inner is None else not inner
        if len(ws) == 2 and ws[0] in _UNARY:
            return _unary(ws[0], raw[1], ev)
        if len(ws) == 3 and ws[1] in _BINARY:
            return _compare(ws[1], raw[0], raw[2], ev)
        if len(ws) == 3 and ws[0] == "(" and ws[2] == ")":
            return simple(ws[1:2], raw[1:2])
        return "complex"  # type: ignore[return-value]

    result = simple(words, args)
    if result != "complex":
        return result

    pos = [0]

    def primary() -> Optional[bool]:
        i = pos[0]
        if i < len(words) and words[i] == "!":
            pos[0] += 1
            inner = primary()
            return None if inner is None else not inner
        if i < len(words) and words[i] == "(":
            pos[0] += 1
            inner = disjunction()
            pos[0] += 1
            return inner
        if i + 2 < len(words) + 0 and words[i + 1] in _BINARY:
            pos[0] += 3
            return _compare(words[i + 1], args[i], args[i + 2], ev)
        if i + 1 < len(words) and words[i] in _UNARY:
            pos[0] += 2
            return _unary(words[i], args[i + 1], ev)
        pos[0] += 1
        return None if i < len(args) and OPAQUE in args[i] else (i < len(words) and words[i] != "")

    def conjunction() -> Optional[bool]:
        value = primary()
        while pos[0] < len(words) and words[pos[0]] == "-a":
            pos[0] += 1
            value = _and(value, primary())
        return value

    def disjunction() -> Optional[bool]:
        value = conjunction()
        while pos[0] < len(words) and words[pos[0]] == "-o":
            pos[0] += 1
            value = _or(value, conjunction())
        return value

    return disjunction()


def _and(a: Optional[bool], b: Optional[bool]) -> Optional[bool]:
    if a is False or b is False:
        return False
    return None if a is None or b is None else True


def _or(a: Optional[bool], b: Optional[bool]) -> Optional[bool]:
    if a is True or b is True:
        return True
    return None if a is None or b is None else False


class _DoubleBracket:
    """``[[ ... ]]``: no word splitting, ``==``/``!=`` match a glob, ``=~`` a regex, ``&&``/``||``/``!``/``()``."""

    def __init__(self, tokens: list[tuple[str, str]], ev: Evaluator):
        self.tokens, self.ev, self.i = tokens, ev, 0

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.i] if self.i < len(self.tokens) else ("end", "")

    def parse(self) -> Optional[bool]:
        value = self.disjunction()
        return value

    def disjunction(self) -> Optional[bool]:
        value = self.conjunction()
        while self.peek() == ("op", "||"):
            self.i += 1
            value = _or(value, self.conjunction())
        return value

    def conjunction(self) -> Optional[bool]:
        value = self.negation()
        while self.peek() == ("op", "&&"):
            self.i += 1
            value = _and(value, self.negation())
        return value

    def negation(self) -> Optional[bool]:
        if self.peek() == ("word", "!"):
            self.i += 1
            inner = self.negation()
            return None if inner is None else not inner
        if self.peek() == ("op", "("):
            self.i += 1
            inner = self.disjunction()
            if self.peek() == ("op", ")"):
                self.i += 1
            return inner
        return self.primary()

    def word(self) -> str:
        kind, text = self.peek()
        self.i += 1
        return self.ev.string(text) if kind == "word" else text

    def primary(self) -> Optional[bool]:
        kind, text = self.peek()
        if kind == "word" and text in _UNARY and self.i + 1 < len(self.tokens) and \
                self.tokens[self.i + 1][0] == "word" and (self.i + 2 >= len(self.tokens) or
                                                          self.tokens[self.i + 2][1] not in _BINARY):
            self.i += 1
            return _unary(text, self.word(), self.ev)
        left = self.word()
        kind, op = self.peek()
        if op in _BINARY:
            self.i += 1
            _, raw = self.peek()
            if op in ("==", "=", "!=") and kind != "end":
                self.i += 1
                quoted = raw.startswith(("'", '"'))
                right = self.ev.string(raw)
                return _compare(op, left, right if not quoted else _glob_escape(right), self.ev, pattern=True)
            if op == "=~":
                pieces = []
                while self.peek()[0] != "end" and self.peek() not in (("op", "&&"), ("op", "||"), ("op", ")")):
                    pieces.append(self.word())
                return _compare(op, left, "".join(pieces), self.ev)
            right = self.word()
            return _compare(op, left, right, self.ev, arithmetic=True)
        return None if OPAQUE in left else _unmark(left) != ""


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)
