"""The RunConfig schema, its rules and its errors: the bottom layer, importing nothing else of zeromega.

Dialect readers (:mod:`zeromega.launch`) build a :class:`RunConfig`; the run
(:mod:`zeromega.run`), the engines and the plugins read it.
"""

from .errors import ConfigError
from .schema import Layout, RunConfig, coerce, config_error, describe, resolve_batch, validate

__all__ = ["ConfigError", "Layout", "RunConfig", "coerce", "config_error", "describe", "resolve_batch", "validate"]
