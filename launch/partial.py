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
    for key in parents:
        tree = tree.setdefault(key, {})
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


def merge(partials: Iterable[tuple[str, dict]]) -> dict:
    """Join (source name, partial) pairs; a field set differently by two sources is an error."""
    merged: dict = {}
    origin: dict[str, tuple[str, Any]] = {}
    for source, partial in partials:
        for path, value in flatten(partial).items():
            if path == "deepspeed_extra":
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
