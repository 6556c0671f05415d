"""What each rank runs in tests/test_run_fields.py: zeromega.Run on a command line, its log lines kept."""

from __future__ import annotations

from typing import Any


def run_logging(argv: list[str]) -> dict[str, Any]:
    """Train the command line's run; this rank's log lines and the run's step records."""
    from zeromega.launch import script_args
    from zeromega.run import Run

    lines: list[str] = []
    run = Run(script_args.read(argv, "pretrain_gpt.py"), log=lines.append)
    records = run.train()
    return {"lines": lines, "records": [r.__dict__ for r in records], "engine": run.engine.name,
            "vocab": run.shape.vocab_size}


def run_refused(argv: list[str]) -> str:
    """The ConfigError the run raises once its ranks are up (as a line), or '' if it trains."""
    from zeromega.config import ConfigError
    from zeromega.launch import script_args
    from zeromega.run import Run

    try:
        Run(script_args.read(argv, "pretrain_gpt.py"), log=lambda line: None).train()
    except ConfigError as err:
        return str(err)
    return ""
