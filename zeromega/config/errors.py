"""The error every config check raises: it names the field, the value and the fix."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A run config that cannot work. ``str(err)`` is one line a user can act on."""

    def __init__(self, field: str, value: Any, problem: str, fix: str):
        self.field, self.value, self.problem, self.fix = field, value, problem, fix
        super().__init__(f"{field}={value!r}: {problem}; fix: {fix}")
