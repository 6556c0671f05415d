"""What each rank runs in tests/test_run_eval.py: zeromega.Run on a command line, its log lines, step records
and evaluation records kept."""

from __future__ import annotations

from typing import Any


def run_eval(argv: list[str]) -> dict[str, Any]:
    from zeromega.launch import script_args
    from zeromega.run import Run

    lines: list[str] = []
    run = Run(script_args.read(argv, "pretrain_gpt.py"), log=lines.append)
    records = run.train()
    return {"lines": lines, "records": [r.__dict__ for r in records], "engine": run.engine.name,
            "evaluations": run.evaluations}
