"""Partial configs: nested dicts holding only what one source states explicitly.

Readers return partials; :func:`merge` joins them and refuses a field two
sources set to different values, so a value given in two dialects at once
must agree.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from zeromega.config.errors import ConfigError

OPAQUE = ("deepspeed_extra",)
"""Fields whose dict values are one value each (never merged key by key)."""


def set_path(tree: dict, path: str, value: Any) -> None:
    """``tree[a][b][c] = value`` for ``path`` 'a.b.c', creating the parents."""
    *parents, leaf = path.split(".")
    for depth, key in enumerate(parents):
        tree = tree.setdefault(key, {})
        if not isinstance(tree, dict):
            section = ".".join(parents[:depth + 1])
            raise ConfigError(section, tree, f"is a single value, but {path} is set inside it",
                              f"write {section} as a section of keys, or drop {path}")
    tree[leaf] = value


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a.b.c': value} for every leaf of a nested dict."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path not in OPAQUE:  # an empty dict states nothing
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def same(a: Any, b: Any) -> bool:
    """Equal, with floats compared to 1e-9 relative (ratios converted to absolute values round)."""
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-15)
        except (TypeError, ValueError):
            return False
    return a == b


def check_keys(tree: Any, where: str = "") -> None:
    """Refuse a key with a dot in a user's nested sections: paths are dotted, so ``parallel.tp: 2`` would
    be read as the section ``parallel`` (and clash with it); ``deepspeed_extra`` is passed through as is."""
    if not isinstance(tree, dict):
        return
    for key, value in tree.items():
        path = f"{where}.{key}" if where else str(key)
        if isinstance(key, str) and "." in key:
            outer, _, inner = key.partition(".")
            raise ConfigError(path, value, "a dotted key (zeromega reads nested sections, not paths)",
                              f"nest it: {outer}: {{{inner}: ...}}")
        if path not in OPAQUE:
            check_keys(value, path)


def merge(partials: Iterable[tuple[str, dict]]) -> dict:
    """Join (source name, partial) pairs; a field set differently by two sources is an error."""
    merged: dict = {}
    origin: dict[str, tuple[str, Any]] = {}
    for source, partial in partials:
        for path, value in flatten(partial).items():
            if path == "deepspeed_extra":
                if not isinstance(value, dict):
                    raise ConfigError(path, value, f"{source} gives it as a single value",
                                      "write deepspeed_extra as an object of DeepSpeed keys")
                _deep_update(merged.setdefault("deepspeed_extra", {}), value)
                continue
            if path in origin and not same(origin[path][1], value):
                first, old = origin[path]
                raise ConfigError(path, value, f"{source} sets {value!r} but {first} sets {old!r}",
                                  "state the value in one place only, or make them agree")
            origin[path] = (source, value)
            set_path(merged, path, value)
    return merged


def _deep_update(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_update(into[key], value)
        else:
            into[key] = value
