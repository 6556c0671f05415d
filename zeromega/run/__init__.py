"""The training run: :class:`Run` (config -> groups -> engine -> model -> loop -> checkpoints -> metrics)."""

__all__ = ["Run"]


def __getattr__(name: str):
    """``Run`` on first use: ``zeromega launch`` imports :mod:`zeromega.run.prelaunch` without Megatron-Core."""
    if name == "Run":
        from .run import Run

        return Run
    raise AttributeError(f"module 'zeromega.run' has no attribute {name!r}")
