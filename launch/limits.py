"""Bounds on what the config readers accept, so every input ends in a result or one clean error, quickly.

A run config is a few kilobytes, nests four or five levels and holds
numbers that fit in 64 bits. Input far beyond that is refused before it is
parsed or walked, each limit with its own message (a :class:`ConfigError`):

- ``MAX_BYTES``: the size of a config file or argument file;
- ``MAX_DEPTH``: how deep mappings and lists nest (the parsers recurse);
- ``MAX_VALUES``: how many values a file holds once YAML aliases are
  expanded (an alias chain doubles per level: "billion laughs");
- ``MAX_INT``: the magnitude of an integer (64-bit, what DeepSpeed, torch
  and bash use; Python's own int parsing refuses 4,300 digits with a
  ValueError and a float beyond 1.8e308 reads as infinity);
- ``MAX_WORD``: one line of a launch script or argument file, after its
  variables are expanded (real command lines are a few KiB; Python's shlex
  is quadratic in the length of a quoted word);
- ``MAX_WORLD``: ranks in a job, so a layout's process groups stay listable.

Non-finite numbers (``NaN``, ``Infinity``, YAML ``.inf``) are refused with
the path of the key that holds them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Optional

from zeromega.config.errors import ConfigError

MAX_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_VALUES = 10_000
MAX_INT = 2**63 - 1
MAX_WORD = 64 * 1024
MAX_WORLD = 1 << 17


class _Refused(Exception):
    """Raised inside a parser's hooks; the reader turns it into a ConfigError naming the file."""

    def __init__(self, problem: str, fix: str):
        super().__init__(problem)
        self.problem, self.fix = problem, fix


def _short(text: str) -> str:
    return text if len(text) <= 24 else f"{text[:10]}...{text[-6:]} ({len(text)} characters)"


def _parse_int(text: str) -> int:
    digits = text.lstrip("+-")
    if len(digits) > 19 or abs(int(text)) > MAX_INT:
        raise _Refused(f"the integer {_short(text)} is beyond the 64-bit limit of +-{MAX_INT}",
                       "give a number that fits in 64 bits")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {_short(text)} is beyond the range of a float (it reads as infinity)",
                       "give a finite number")
    return value


def check_size(path: Path, field: str, text: Optional[str] = None) -> None:
    """Refuse a file over MAX_BYTES (before reading it when ``text`` is None) or one with nothing in it."""
    size = path.stat().st_size if text is None else len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise ConfigError(field, str(path), f"is {size:,} bytes, over the {MAX_BYTES:,}-byte limit of a config file",
                          "pass the run's config (a few kilobytes), not another file")
    if text is not None and not text.strip():
        raise ConfigError(field, str(path), "is empty", "write the config into it (an empty file states nothing, "
                          "so it would run on defaults alone)")


def _bracket_depth(text: str) -> int:
    """How deep ``[``/``{`` nest outside double-quoted strings (exact for JSON, close for Hjson/YAML flow)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    return deepest
        elif ch in "]}" and depth:
            depth -= 1
    return deepest


def _too_deep(field: str, path: str, where: str = "") -> ConfigError:
    at = f" (at {where})" if where else ""
    return ConfigError(field, path, f"nests deeper than {MAX_DEPTH} levels{at}",
                       "a run config nests a few levels: check the file's brackets and indentation")


def load_json(text: str, path: str, field: str = "--config", hjson: bool = False,
              object_pairs_hook: Optional[Callable] = None) -> Any:
    """JSON (or DeepSpeed's Hjson) with the limits applied; syntax errors are the caller's to report."""
    if _bracket_depth(text) > MAX_DEPTH:
        raise _too_deep(field, path)
    try:
        if hjson:
            import hjson as hjson_module

            data = hjson_module.loads(text, object_pairs_hook=object_pairs_hook, parse_int=_parse_int,
                                      parse_float=_parse_float)
        else:
            data = json.loads(text, object_pairs_hook=object_pairs_hook, parse_int=_parse_int,
                              parse_float=_parse_float)
    except _Refused as err:
        raise ConfigError(field, path, err.problem, err.fix) from None
    except RecursionError:
        raise _too_deep(field, path) from None
    check_tree(data, field, path)
    return data


def load_yaml(text: str, path: str, field: str = "--config") -> Any:
    """YAML through a safe loader that refuses duplicate keys, deep nesting and huge numbers; the result is
    checked with :func:`check_tree` (so alias chains are bounded). ``yaml.YAMLError`` is the caller's."""
    import yaml

    class Loader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):
            self.depth += 1
            try:
                if self.depth > MAX_DEPTH:
                    raise _too_deep(field, path, f"line {self.peek_event().start_mark.line + 1}")
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' keys may be overridden
                        continue
                    key = self.construct_object(key_node, deep=True)
                    line = key_node.start_mark.line + 1
                    try:
                        if key in seen:
                            raise ConfigError(field, path, f"duplicate key {key!r} (lines {seen[key]} and {line}; "
                                              "YAML would keep the last one silently)", "keep one of them")
                        seen[key] = line
                    except TypeError:  # an unhashable key: the base class reports it
                        continue
            return super().construct_mapping(node, deep=deep)

        def construct_object(self, node, deep=False):
            try:
                return super().construct_object(node, deep=deep)
            except (ConfigError, RecursionError):
                raise
            except (ValueError, TypeError, KeyError, AttributeError, IndexError) as err:  # '!!int abc', '!!bool x'
                raise ConfigError(field, path, f"{node.tag.rsplit(':', 1)[-1]} {_short(str(node.value))!r} at line "
                                  f"{node.start_mark.line + 1} cannot be read as one ({' '.join(str(err).split())})",
                                  "give a value of that type, or drop the tag") from None

        def construct_yaml_int(self, node):
            text = str(node.value).replace("_", "")
            digits = text.lstrip("+-")
            parts = digits.split(":")  # YAML 1.1's base 60, 1:30 = 90: each part multiplies by 60
            if digits.isdigit() and len(digits) > 19 or len(parts) > 11 or len(parts) > 1 and len(parts[0]) > 19:
                raise ConfigError(field, path, f"the integer {_short(text)} at line {node.start_mark.line + 1} is "
                                  f"beyond the 64-bit limit of +-{MAX_INT}", "give a number that fits in 64 bits")
            return super().construct_yaml_int(node)

        def construct_yaml_float(self, node):
            value = super().construct_yaml_float(node)
            text = str(node.value).lower().lstrip("+-")
            if math.isinf(value) and "inf" not in text:
                raise ConfigError(field, path, f"the number {_short(node.value)} at line {node.start_mark.line + 1} "
                                  "is beyond the range of a float (it reads as infinity)", "give a finite number")
            return value

    Loader.add_constructor("tag:yaml.org,2002:int", Loader.construct_yaml_int)
    Loader.add_constructor("tag:yaml.org,2002:float", Loader.construct_yaml_float)
    try:
        data = yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader subclass)
    except RecursionError:
        raise _too_deep(field, path) from None
    check_tree(data, field, path)
    return data


def check_tree(data: Any, field: str, path: str) -> None:
    """Refuse nesting beyond MAX_DEPTH, more than MAX_VALUES values (aliases expanded), integers beyond 64
    bits and non-finite numbers, naming the key that holds them. Iterative: never recurses."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    count = 0
    while stack:
        value, where, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise ConfigError(field, path, f"holds more than {MAX_VALUES:,} values (YAML aliases repeat what "
                              "they name)", "write a run config's few values out, or use fewer aliases")
        if depth > MAX_DEPTH:
            raise _too_deep(field, path, where)
        if isinstance(value, dict):
            stack.extend((v, f"{where}.{k}" if where else str(k), depth + 1) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value))
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int) and abs(value) > MAX_INT:
            raise ConfigError(where or field, f"<{value.bit_length()}-bit integer>",
                              f"is beyond the 64-bit limit of +-{MAX_INT}", "give a number that fits in 64 bits")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(where or field, value, "is not a finite number", "give a finite number")
