"""A bash parser for launch scripts: the grammar of the constructs such scripts use, as bash parses them.

:func:`parse` turns a script's text into a tree of commands (the classes
below); :mod:`.shell_eval` runs that tree without running any program.
Covered: simple commands with assignments (``A=1``, ``A+=x``, arrays
``A=( ... )`` and ``A+=( ... )`` with comments and newlines inside), words
with quotes, ``\\`` escapes, ``$VAR``, ``${...}``, ``$( ... )``,
``$(( ... ))`` and backquotes; comments (a ``#`` that starts a word, ended
by the newline whatever the line ends with); ``\\``-newline continuations;
pipelines, ``&&``/``||`` lists, ``;``/``&``/newline separators;
redirections (``> f``, ``2>&1``, ``&> f``, heredocs ``<<EOF``, ``<<-EOF``
and ``<<'EOF'``, herestrings ``<<<``); ``if``/``elif``/``else``,
``for``/``while``/``until``, ``case``, ``{ ...; }``, ``( ... )``, ``[[ ]]``,
``(( ))`` and function definitions. A syntax error is a :class:`ShellSyntax`
naming the line, as bash would refuse the script.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union


class ShellSyntax(Exception):
    """The script is not valid bash: ``line`` and what is wrong."""

    def __init__(self, line: int, problem: str):
        super().__init__(f"line {line}: {problem}")
        self.line, self.problem = line, problem


# ------------------------------------------------------------------ tokens


@dataclass
class Word:
    raw: str
    """The word as written (quotes and escapes kept; the evaluator removes them)."""
    line: int


@dataclass
class ArrayWord:
    """``NAME=( items )`` or ``NAME+=( items )``."""

    name: str
    append: bool
    items: list[str]
    line: int


@dataclass
class Op:
    text: str
    line: int
    fd: Optional[int] = None
    """The file descriptor written before a redirection (``2>``)."""


@dataclass
class Redirect:
    op: str
    target: str
    """The raw target word (the heredoc's delimiter for ``<<``)."""
    fd: Optional[int] = None
    body: Optional[str] = None
    """A heredoc's body."""
    quoted: bool = False
    """A heredoc whose delimiter is quoted: its body is not expanded."""


Token = Union[Word, ArrayWord, Op]

_OPERATORS = ("&&", "||", ";;&", ";;", ";&", "|&", "&>>", "&>", "<<<", "<<-", "<<", ">>", ">&", "<&", ">|", "<>",
              ";", "&", "|", "(", ")", "<", ">")
_REDIRECTS = {"<<<", "<<-", "<<", ">>", ">&", "<&", ">|", "<>", "<", ">", "&>", "&>>"}
_META = set(" \t\n;&|()<>")
_PLAIN = re.compile(r"[^\s;&|()<>'\"\\$`]+")
_ASSIGN_HEAD = re.compile(r"[A-Za-z_]\w*(\+?)=$")
_DQ_PLAIN = re.compile(r'[^"\\$`]+')


class _Lexer:
    def __init__(self, text: str):
        self.text, self.i, self.line = text, 0, 1
        self.tokens: list[Token] = []
        self.pending: list[tuple[str, bool, bool, Redirect]] = []  # heredocs waiting for their newline

    def run(self) -> list[Token]:
        text = self.text
        while self.i < len(text):
            ch = text[self.i]
            if ch in " \t\r":
                self.i += 1
            elif ch == "\\" and text.startswith("\\\n", self.i):
                self.i += 2
                self.line += 1
            elif ch == "#":
                end = text.find("\n", self.i)
                self.i = len(text) if end < 0 else end  # a trailing backslash in a comment continues nothing
            elif ch == "\n":
                self.tokens.append(Op("\n", self.line))
                self.i += 1
                self.line += 1
                self._heredoc_bodies()
            elif text.startswith("((", self.i) and self._arith_command():
                pass
            elif ch in _META:
                self._operator(None)
            else:
                start_line = self.line
                raw = self._word()
                if raw.isdigit() and self.i < len(text) and text[self.i] in "<>":
                    self._operator(int(raw))
                    continue
                head = _ASSIGN_HEAD.match(raw)
                if head and self.i < len(text) and text[self.i] == "(":
                    self.tokens.append(self._array(raw, head, start_line))
                    continue
                self.tokens.append(Word(raw, start_line))
        if self.pending:
            raise ShellSyntax(self.line, f"here-document ends at the end of the file, not at {self.pending[0][0]}")
        self.tokens.append(Op("\n", self.line))
        return self.tokens

    def _arith_command(self) -> bool:
        """``(( expr ))`` as one token, when the parentheses close as a pair."""
        end = _matching(self.text, self.i + 2, "(", ")", self.line)
        if end + 1 < len(self.text) and self.text[end + 1] == ")":
            expr = self.text[self.i + 2:end]
            self.tokens.append(Word("((" + expr + "))", self.line))
            self.line += expr.count("\n")
            self.i = end + 2
            return True
        return False

    def _operator(self, fd: Optional[int]) -> None:
        text = self.text
        for op in _OPERATORS:
            if text.startswith(op, self.i):
                break
        else:  # pragma: no cover - every meta character starts an operator
            raise ShellSyntax(self.line, f"unexpected {text[self.i]!r}")
        self.i += len(op)
        if fd is not None and op not in _REDIRECTS:
            raise ShellSyntax(self.line, f"unexpected {op!r} after {fd}")
        token = Op(op, self.line, fd)
        self.tokens.append(token)
        if op in ("<<", "<<-"):
            while self.i < len(text) and text[self.i] in " \t":
                self.i += 1
            if self.i >= len(text) or text[self.i] in _META:
                raise ShellSyntax(self.line, "a here-document needs a delimiter word after <<")
            raw = self._word()
            delimiter = re.sub(r"""['"\\]""", "", raw)
            quoted = delimiter != raw
            redirect = Redirect(op, delimiter, fd, quoted=quoted)
            self.tokens.append(Word(raw, self.line))
            self.pending.append((delimiter, op == "<<-", quoted, redirect))
            token.heredoc = redirect  # type: ignore[attr-defined]

    def _heredoc_bodies(self) -> None:
        text = self.text
        for delimiter, strip_tabs, _quoted, redirect in self.pending:
            lines = []
            while True:
                if self.i >= len(text):
                    raise ShellSyntax(self.line, f"here-document ends at the end of the file, not at {delimiter}")
                end = text.find("\n", self.i)
                end = len(text) if end < 0 else end
                line = text[self.i:end]
                self.i = min(end + 1, len(text))
                self.line += 1
                if strip_tabs:
                    line = line.lstrip("\t")
                if line.rstrip("\r") == delimiter:
                    break
                lines.append(line)
            redirect.body = "".join(f"{line}\n" for line in lines)
        self.pending = []

    def _word(self) -> str:
        text, parts, start = self.text, [], self.i
        while self.i < len(text):
            match = _PLAIN.match(text, self.i)
            if match:
                parts.append(match.group(0))
                self.i = match.end()
                continue
            ch = text[self.i]
            if ch in _META or ch in " \t\r\n":
                break
            if ch == "\\":
                if text.startswith("\\\n", self.i):
                    self.i += 2
                    self.line += 1
                    continue
                parts.append(text[self.i:self.i + 2])
                self.i += 2
            elif ch == "'":
                end = text.find("'", self.i + 1)
                if end < 0:
                    raise ShellSyntax(self.line, "a single quote (') is never closed")
                parts.append(text[self.i:end + 1])
                self.line += text.count("\n", self.i, end)
                self.i = end + 1
            elif ch == '"':
                end = self._double_quoted(self.i + 1)
                parts.append(text[self.i:end + 1])
                self.line += text.count("\n", self.i, end)
                self.i = end + 1
            elif ch == "`":
                end = self._backquote(self.i + 1)
                parts.append(text[self.i:end + 1])
                self.line += text.count("\n", self.i, end)
                self.i = end + 1
            elif ch == "$":
                end = self._dollar(self.i)
                parts.append(text[self.i:end])
                self.line += text.count("\n", self.i, end)
                self.i = end
            else:  # pragma: no cover
                parts.append(ch)
                self.i += 1
        if self.i == start:
            raise ShellSyntax(self.line, f"unexpected {text[self.i]!r}")
        return "".join(parts)

    def _double_quoted(self, i: int) -> int:
        """Index of the closing ``"`` of a double-quoted string that starts at ``i``."""
        text = self.text
        while i < len(text):
            ch = text[i]
            if ch == '"':
                return i
            if ch == "\\":
                i += 2
            elif ch == "$":
                i = self._dollar(i)
            elif ch == "`":
                i = self._backquote(i + 1) + 1
            else:
                match = _DQ_PLAIN.match(text, i)
                i = match.end() if match else i + 1
        raise ShellSyntax(self.line, 'a double quote (") is never closed')

    def _backquote(self, i: int) -> int:
        text = self.text
        while i < len(text):
            if text[i] == "\\":
                i += 2
            elif text[i] == "`":
                return i
            else:
                i += 1
        raise ShellSyntax(self.line, "a backquote (`) is never closed")

    def _dollar(self, i: int) -> int:
        """End (exclusive) of the expansion that starts with the ``$`` at ``i``."""
        text = self.text
        nxt = text[i + 1:i + 2]
        if nxt == "(":
            return _matching(text, i + 2, "(", ")", self.line) + 1
        if nxt == "{":
            return _matching(text, i + 2, "{", "}", self.line) + 1
        if nxt == "'":
            j = i + 2
            while j < len(text) and text[j] != "'":
                j += 2 if text[j] == "\\" else 1
            if j >= len(text):
                raise ShellSyntax(self.line, "a $'...' string is never closed")
            return j + 1
        if nxt == '"':
            return self._double_quoted(i + 2) + 1
        return i + 1

    def _array(self, raw: str, head: re.Match, line: int) -> ArrayWord:
        """The items of ``NAME=( ... )``: words, with newlines and comments between them."""
        text = self.text
        self.i += 1
        items = []
        while True:
            if self.i >= len(text):
                raise ShellSyntax(line, f"the array {raw}( is never closed with )")
            ch = text[self.i]
            if ch in " \t\r":
                self.i += 1
            elif ch == "\n":
                self.i += 1
                self.line += 1
            elif text.startswith("\\\n", self.i):
                self.i += 2
                self.line += 1
            elif ch == "#":
                end = text.find("\n", self.i)
                self.i = len(text) if end < 0 else end
            elif ch == ")":
                self.i += 1
                break
            elif ch in _META:
                raise ShellSyntax(self.line, f"unexpected {ch!r} inside the array {raw}( ... )")
            else:
                items.append(self._word())
        name = raw[:-2] if head.group(1) else raw[:-1]
        return ArrayWord(name, bool(head.group(1)), items, line)


def _matching(text: str, i: int, open_: str, close: str, line: int) -> int:
    """Index of the ``close`` that balances an ``open_`` just before ``i`` (quotes respected)."""
    depth = 1
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "'" and open_ == "(":
            end = text.find("'", i + 1)
            if end < 0:
                break
            i = end + 1
            continue
        if ch == '"':
            j = i + 1
            while j < len(text) and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            i = j + 1
            continue
        if ch == open_:
            depth += 1
        elif ch == close:
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ShellSyntax(line, f"a {'$(' if open_ == '(' else '${'} is never closed with {close}")


# ------------------------------------------------------------------ commands


@dataclass
class Simple:
    line: int
    assigns: list[Union[Word, ArrayWord]] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)
    redirects: list[Redirect] = field(default_factory=list)
    length: int = 0
    """Characters in the command as written (bounded by the evaluator)."""


@dataclass
class Pipeline:
    line: int
    commands: list
    negate: bool = False


@dataclass
class AndOr:
    line: int
    first: object
    rest: list[tuple[str, object]]


@dataclass
class Sequence:
    line: int
    items: list


@dataclass
class If:
    line: int
    clauses: list[tuple[object, object]]
    orelse: Optional[object]


@dataclass
class Loop:
    line: int
    kind: str
    """'for', 'while' or 'until'."""
    var: str = ""
    items: Optional[list[Word]] = None
    cond: Optional[object] = None
    body: Optional[object] = None


@dataclass
class Case:
    line: int
    word: Word
    arms: list[tuple[list[Word], object]]


@dataclass
class Group:
    line: int
    body: object
    subshell: bool
    redirects: list[Redirect] = field(default_factory=list)


@dataclass
class CondExpr:
    """``[[ ... ]]``: its words and operators, in order."""

    line: int
    parts: list[Token]


@dataclass
class Function:
    line: int
    name: str
    body: object


_RESERVED_END = {"then", "elif", "else", "fi", "do", "done", "esac", "}"}


class _Parser:
    def __init__(self, tokens: list[Token]):
        self.tokens, self.i = tokens, 0

    def peek(self) -> Token:
        return self.tokens[self.i]

    def next(self) -> Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def at_word(self, *words: str) -> bool:
        token = self.tokens[self.i] if self.i < len(self.tokens) else None
        return isinstance(token, Word) and token.raw in words

    def at_op(self, *ops: str) -> bool:
        token = self.tokens[self.i] if self.i < len(self.tokens) else None
        return isinstance(token, Op) and token.text in ops

    def done(self) -> bool:
        return self.i >= len(self.tokens)

    def skip_newlines(self) -> None:
        while not self.done() and self.at_op("\n"):
            self.i += 1

    def expect_word(self, word: str, opened: str, line: int) -> None:
        self.skip_newlines()
        if self.done() or not self.at_word(word):
            got = "the end of the file" if self.done() or self.i == len(self.tokens) - 1 else repr(_text(self.peek()))
            raise ShellSyntax(line, f"{opened} is not closed with {word!r} (found {got})")
        self.i += 1

    def program(self) -> Sequence:
        body = self.compound_list(())
        if not self.done():
            token = self.peek()
            raise ShellSyntax(token.line, f"unexpected {_text(token)!r}")
        return body

    def compound_list(self, stops: tuple[str, ...]) -> Sequence:
        items, line = [], self.peek().line if not self.done() else 0
        while True:
            self.skip_newlines()
            if self.done() or self.at_word(*stops) or self.at_op(")", ";;", ";&", ";;&"):
                break
            if self.at_word(*_RESERVED_END) or self.at_op(";", "&", "|", "&&", "||"):
                token = self.peek()
                raise ShellSyntax(token.line, f"unexpected {_text(token)!r}")
            items.append(self.and_or())
            if self.at_op(";", "&"):
                self.i += 1
        return Sequence(line, items)

    def and_or(self):
        first = self.pipeline()
        rest = []
        while self.at_op("&&", "||"):
            op = self.next().text
            self.skip_newlines()
            rest.append((op, self.pipeline()))
        return AndOr(first.line, first, rest) if rest else first

    def pipeline(self):
        line = self.peek().line
        negate = False
        while self.at_word("!"):
            self.i += 1
            negate = not negate
        commands = [self.command()]
        while self.at_op("|", "|&"):
            self.i += 1
            self.skip_newlines()
            commands.append(self.command())
        return Pipeline(line, commands, negate) if len(commands) > 1 or negate else commands[0]

    def command(self):
        token = self.peek()
        line = token.line
        if isinstance(token, Word):
            word = token.raw
            if word == "if":
                return self.if_()
            if word in ("for", "while", "until"):
                return self.loop(word)
            if word == "case":
                return self.case()
            if word == "{":
                self.i += 1
                body = self.compound_list(("}",))
                self.expect_word("}", "{", line)
                return Group(line, body, False, self.redirects())
            if word == "[[":
                return self.cond()
            if word == "function":
                self.i += 1
                name = self.next()
                if not isinstance(name, Word):
                    raise ShellSyntax(line, "function needs a name")
                if self.at_op("("):
                    self.i += 1
                    self.expect_op(")", line)
                self.skip_newlines()
                return Function(line, name.raw, self.command())
            if (self.i + 2 < len(self.tokens) and isinstance(self.tokens[self.i + 1], Op)
                    and self.tokens[self.i + 1].text == "(" and isinstance(self.tokens[self.i + 2], Op)
                    and self.tokens[self.i + 2].text == ")"):
                self.i += 3
                self.skip_newlines()
                return Function(line, word, self.command())
        if isinstance(token, Op) and token.text == "(":
            self.i += 1
            body = self.compound_list(())
            self.expect_op(")", line)
            return Group(line, body, True, self.redirects())
        return self.simple()

    def expect_op(self, op: str, line: int) -> None:
        self.skip_newlines()
        if not self.at_op(op):
            raise ShellSyntax(line, f"'(' is not closed with {op!r}")
        self.i += 1

    def redirects(self) -> list[Redirect]:
        out = []
        while not self.done() and isinstance(self.peek(), Op) and self.peek().text in _REDIRECTS:
            out.append(self.redirect())
        return out

    def redirect(self) -> Redirect:
        op = self.next()
        heredoc = getattr(op, "heredoc", None)
        target = self.next()
        if not isinstance(target, Word):
            raise ShellSyntax(op.line, f"{op.text} needs a file name after it")
        if heredoc is not None:
            return heredoc
        return Redirect(op.text, target.raw, op.fd)

    def simple(self) -> Simple:
        cmd = Simple(self.peek().line)
        while not self.done():
            token = self.peek()
            if isinstance(token, Op):
                if token.text in _REDIRECTS:
                    cmd.redirects.append(self.redirect())
                    continue
                break
            self.i += 1
            if isinstance(token, ArrayWord):
                cmd.assigns.append(token) if not cmd.words else cmd.words.append(Word(
                    f"{token.name}{'+' if token.append else ''}=({' '.join(token.items)})", token.line))
                cmd.length += sum(len(item) + 1 for item in token.items)
            elif not cmd.words and re.match(r"[A-Za-z_]\w*(\[[^\]]*\])?\+?=", token.raw):
                cmd.assigns.append(token)
            else:
                cmd.words.append(token)
            cmd.length += len(token.raw) + 1 if isinstance(token, Word) else 0
        if not (cmd.words or cmd.assigns or cmd.redirects):
            token = self.peek()
            raise ShellSyntax(token.line, f"unexpected {_text(token)!r}")
        return cmd

    def if_(self) -> If:
        line = self.next().line
        clauses, orelse = [], None
        while True:
            cond = self.compound_list(("then",))
            self.expect_word("then", "if", line)
            body = self.compound_list(("elif", "else", "fi"))
            clauses.append((cond, body))
            if self.at_word("elif"):
                self.i += 1
                continue
            if self.at_word("else"):
                self.i += 1
                orelse = self.compound_list(("fi",))
            self.expect_word("fi", f"the if at line {line}", line)
            return If(line, clauses, orelse)

    def loop(self, kind: str) -> Loop:
        line = self.next().line
        loop = Loop(line, kind)
        if kind == "for":
            if isinstance(self.peek(), Word) and self.peek().raw.startswith("(("):
                loop.var, loop.items = "", None
                loop.cond = self.next()
            else:
                var = self.next()
                if not isinstance(var, Word):
                    raise ShellSyntax(line, "for needs a variable name")
                loop.var = var.raw
                self.skip_newlines()
                if self.at_word("in"):
                    self.i += 1
                    loop.items = []
                    while isinstance(self.peek(), Word):
                        loop.items.append(self.next())
            if self.at_op(";"):
                self.i += 1
        else:
            loop.cond = self.compound_list(("do",))
        self.expect_word("do", kind, line)
        loop.body = self.compound_list(("done",))
        self.expect_word("done", f"the {kind} loop at line {line}", line)
        return loop

    def case(self) -> Case:
        line = self.next().line
        word = self.next()
        if not isinstance(word, Word):
            raise ShellSyntax(line, "case needs a word")
        self.skip_newlines()
        self.expect_word("in", "case", line)
        arms = []
        while True:
            self.skip_newlines()
            if self.at_word("esac"):
                self.i += 1
                return Case(line, word, arms)
            if self.done():
                raise ShellSyntax(line, "case is not closed with 'esac'")
            if self.at_op("("):
                self.i += 1
            patterns = []
            while True:
                token = self.next()
                if not isinstance(token, Word):
                    raise ShellSyntax(token.line, f"unexpected {_text(token)!r} in a case pattern")
                patterns.append(token)
                if self.at_op("|"):
                    self.i += 1
                    continue
                break
            if not self.at_op(")"):
                raise ShellSyntax(line, "a case pattern is not followed by ')'")
            self.i += 1
            body = self.compound_list(("esac",))
            arms.append((patterns, body))
            if self.at_op(";;", ";&", ";;&"):
                self.i += 1

    def cond(self) -> CondExpr:
        line = self.next().line
        parts = []
        while not self.done() and not self.at_word("]]"):
            token = self.next()
            if isinstance(token, Op) and token.text == "\n":
                raise ShellSyntax(line, "[[ is not closed with ]] on its line")
            parts.append(token)
        if self.done():
            raise ShellSyntax(line, "[[ is not closed with ]]")
        self.i += 1
        return CondExpr(line, parts)


def _text(token: Token) -> str:
    if isinstance(token, Word):
        return token.raw
    if isinstance(token, ArrayWord):
        return f"{token.name}=("
    return "newline" if token.text == "\n" else token.text


def parse(text: str) -> Sequence:
    """The script's commands; :class:`ShellSyntax` where bash would refuse it."""
    return _Parser(_Lexer(text).run()).program()
