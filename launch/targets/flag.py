"""One flag of a target's command line, as data: the facts a writer needs to emit a value it accepts."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional


class Flag(NamedTuple):
    kind: str
    """``int``, ``float``, ``str``, ``switch`` (store_true), ``switch_false`` (store_false) or
    ``moe_freq_type`` (an integer or a list expression)."""
    default: Any
    """The value the target uses when the flag is absent."""
    nargs: Any = None
    """argparse's nargs: None for one value, '+', '*' or a count."""
    choices: Optional[tuple] = None
    """The values the target accepts, when it lists them."""
