"""Bash arithmetic (``$(( ))``, ``(( ))``, array indices): signed 64-bit integers that wrap, C's truncating
division, bash's operator precedence (unary minus binds tighter than ``**``), ``0x``/octal/``base#n``
literals, variables (unset is an unknown here, not bash's 0, so a value is never silently 0) and
assignments (``=``, ``+=``..., ``++``/``--``)."""

from __future__ import annotations

import re
from typing import Optional

_WORD = 2**64
MAX_LENGTH = 4096
"""Characters in one expression; longer ones are not evaluated (they stay unknown)."""
_TOKEN = re.compile(r"\s*(?:(\d+#[0-9A-Za-z@_]+|0[xX][0-9a-fA-F]+|\d+)|([A-Za-z_]\w*)|"
                    r"(\*\*=|<<=|>>=|\+\+|--|\*\*|<<|>>|<=|>=|==|!=|&&|\|\||[-+*/%&|^]=|[-+*/%()<>=!~?:,&|^]))")


class _Bad(Exception):
    pass


class _Unknown(_Bad):
    """A variable the expression reads is unset or unknowable: no value, and no error either."""


class ArithError(Exception):
    """An expression bash itself refuses (division by 0, a syntax error, a negative exponent): bash prints the
    error and stops the command."""


def wrap(value: int) -> int:
    """``value`` as bash's signed 64-bit integer (it wraps, it does not overflow)."""
    value %= _WORD
    return value - _WORD if value >= _WORD // 2 else value


def _c_div(a: int, b: int) -> int:
    if b == 0:
        raise _Bad("division by 0")
    quotient = abs(a) // abs(b)
    return wrap(quotient if (a < 0) == (b < 0) else -quotient)


def _c_mod(a: int, b: int) -> int:
    return wrap(a - _c_div(a, b) * b)


def _pow(a: int, b: int) -> int:
    if b < 0:
        raise _Bad("exponent less than 0")
    return wrap(pow(a, b, _WORD))


_BINARY = {
    "*": lambda a, b: wrap(a * b), "/": _c_div, "%": _c_mod, "+": lambda a, b: wrap(a + b),
    "-": lambda a, b: wrap(a - b), "<<": lambda a, b: wrap(a << (b & 63)), ">>": lambda a, b: a >> (b & 63),
    "<": lambda a, b: int(a < b), "<=": lambda a, b: int(a <= b), ">": lambda a, b: int(a > b),
    ">=": lambda a, b: int(a >= b), "==": lambda a, b: int(a == b), "!=": lambda a, b: int(a != b),
    "&": lambda a, b: a & b, "^": lambda a, b: a ^ b, "|": lambda a, b: a | b, "**": _pow,
}
_LEVELS = [("||",), ("&&",), ("|",), ("^",), ("&",), ("==", "!="), ("<", "<=", ">", ">="), ("<<", ">>"),
           ("+", "-"), ("*", "/", "%")]


def _number(text: str) -> int:
    if "#" in text:
        base_text, digits = text.split("#", 1)
        base = int(base_text)
        if not 2 <= base <= 64:
            raise _Bad("invalid base")
        alphabet = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ@_"
        if base <= 36:
            digits = digits.lower()
        value = 0
        for ch in digits:
            digit = alphabet.index(ch) if ch in alphabet else 99
            if digit >= base:
                raise _Bad("value too great for base")
            value = value * base + digit
        return wrap(value)
    if text[:2].lower() == "0x":
        return wrap(int(text, 16))
    if len(text) > 1 and text[0] == "0":
        if set(text) - set("01234567"):
            raise _Bad("value too great for base")
        return wrap(int(text, 8))
    return wrap(int(text))


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]], ev, depth: int):
        self.tokens, self.i, self.ev, self.depth = tokens, 0, ev, depth

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.i] if self.i < len(self.tokens) else ("end", "")

    def take(self, text: str) -> bool:
        if self.peek() == ("op", text):
            self.i += 1
            return True
        return False

    def variable(self, name: str) -> int:
        if self.ev is None:
            raise _Unknown("no variables")
        value = self.ev.lookup(name)
        if isinstance(value, list):
            value = value[0] if value else ""
        if "\x00" in value or "\x01" in value:
            raise _Unknown("unknown")
        value = value.strip()
        if not value:
            return 0
        if re.fullmatch(r"-?(?:0|[1-9]\d*)", value):  # 012 is octal: evaluated below
            return wrap(int(value))
        if self.depth > 8:
            raise _Bad("expression recursion level exceeded")
        result = evaluate(value, self.ev, self.depth + 1)
        if result is None:
            raise _Unknown("unknown")
        return result

    def assign(self, name: str, value: int) -> int:
        if self.ev is None:
            raise _Unknown("no variables")
        self.ev.set(name, str(value))
        return value

    def comma(self) -> int:
        value = self.assignment()
        while self.take(","):
            value = self.assignment()
        return value

    def assignment(self) -> int:
        kind, text = self.peek()
        nxt = self.tokens[self.i + 1] if self.i + 1 < len(self.tokens) else ("end", "")
        if kind == "name" and nxt[0] == "op" and nxt[1].endswith("=") and nxt[1] not in ("==", "!=", "<=", ">="):
            self.i += 2
            value = self.assignment()
            if nxt[1] != "=":
                value = _BINARY[nxt[1][:-1]](self.variable(text), value)
            return self.assign(text, value)
        return self.ternary()

    def ternary(self) -> int:
        cond = self.binary(0)
        if self.take("?"):
            yes = self.assignment()
            if not self.take(":"):
                raise _Bad("expected ':'")
            no = self.assignment()
            return yes if cond else no
        return cond

    def binary(self, level: int) -> int:
        if level == len(_LEVELS):
            return self.power()
        value = self.binary(level + 1)
        while self.peek()[0] == "op" and self.peek()[1] in _LEVELS[level]:
            op = self.tokens[self.i][1]
            self.i += 1
            right = self.binary(level + 1)
            if op == "&&":
                value = int(bool(value) and bool(right))
            elif op == "||":
                value = int(bool(value) or bool(right))
            else:
                value = _BINARY[op](value, right)
        return value

    def power(self) -> int:
        base = self.unary()
        if self.take("**"):
            return _pow(base, self.power())
        return base

    def unary(self) -> int:
        kind, text = self.peek()
        if kind == "op" and text in ("-", "+", "!", "~"):
            self.i += 1
            value = self.unary()
            if text == "-":
                return wrap(-value)
            return value if text == "+" else int(not value) if text == "!" else ~value
        if kind == "op" and text in ("++", "--"):
            self.i += 1
            name_kind, name = self.peek()
            if name_kind != "name":
                raise _Bad("++ needs a variable")
            self.i += 1
            return self.assign(name, wrap(self.variable(name) + (1 if text == "++" else -1)))
        return self.postfix()

    def postfix(self) -> int:
        kind, text = self.peek()
        self.i += 1
        if kind == "num":
            return _number(text)
        if kind == "name":
            if self.peek() in (("op", "++"), ("op", "--")):
                op = self.tokens[self.i][1]
                self.i += 1
                old = self.variable(text)
                self.assign(text, wrap(old + (1 if op == "++" else -1)))
                return old
            return self.variable(text)
        if (kind, text) == ("op", "("):
            value = self.comma()
            if not self.take(")"):
                raise _Bad("missing ')'")
            return value
        raise _Bad(f"syntax error near {text!r}")


def evaluate(expr: str, ev=None, depth: int = 0) -> Optional[int]:
    """The value of a bash arithmetic expression; None when it reads an unset or unknown variable or is over
    ``MAX_LENGTH`` characters; :class:`ArithError` where bash refuses it (bad syntax, division by 0).

    ``ev`` (a :class:`~.shell_eval.Evaluator`) expands ``$`` parameters and holds the variables; without it
    only literals are allowed."""
    if len(expr) > MAX_LENGTH:
        return None
    if "$" in expr or "`" in expr:
        if ev is None:
            return None
        expr = ev.string(expr)
        if "\x00" in expr or "\x01" in expr or len(expr) > MAX_LENGTH:
            return None
    tokens, pos = [], 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if not match or match.end() == pos:
            if expr[pos:].strip() == "":
                break
            raise ArithError(f"syntax error: operand expected (error token is {expr[pos:].strip()[:20]!r})")
        pos = match.end()
        number, name, op = match.groups()
        tokens.append(("num", number) if number else ("name", name) if name else ("op", op))
    if not tokens:
        return 0 if ev is not None else None
    parser = _Parser(tokens, ev, depth)
    try:
        value = parser.comma()
    except (_Unknown, RecursionError, MemoryError):
        return None
    except (_Bad, ValueError) as err:
        raise ArithError(str(err) or "syntax error") from None
    if parser.i != len(tokens):
        raise ArithError(f"syntax error in expression (error token is {parser.tokens[parser.i][1]!r})")
    return value
