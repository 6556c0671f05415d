"""The training run: :class:`Run` (config -> groups -> engine -> model -> loop -> checkpoints -> metrics)."""

from .run import Run

__all__ = ["Run"]
