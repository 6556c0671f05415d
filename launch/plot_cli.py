"""``zeromega plot METRICS.jsonl -o out.png``: a run's curves from its metrics file, as one PNG.

Four panels over the step: the training loss (with the validation and test
losses of ``--eval-interval`` runs as points), the learning rate, the
throughput (tokens/s, and TFLOP/s per rank on a second axis when the file
has it) and the peak memory per rank (MiB). The file is what ``--metrics-out``
writes (one JSON object per line; evaluation records carry ``"kind"``).
Several files draw over each other, labelled by their names, to compare runs.

matplotlib draws it (the ``plot`` extra: ``pip install zeromega[plot]``, or
``pip install matplotlib``); without it the command says so in one line.
Registered in :mod:`zeromega.launch.cli` by listing :func:`_add_plot` in
``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .cli_common import UsageError


def _add_plot(subparsers) -> None:
    p = subparsers.add_parser(
        "plot", allow_abbrev=False, help="draw loss, lr, throughput and memory curves of a metrics file to a PNG",
        description="Draw the training loss (with validation/test points), learning rate, throughput and peak "
                    "memory per step from --metrics-out files into one PNG.",
        epilog="Exit code 2 for a missing or unreadable file, or without matplotlib.")
    p.add_argument("metrics", nargs="+", metavar="METRICS.jsonl", help="metrics file(s) written by --metrics-out")
    p.add_argument("-o", "--output", required=True, metavar="PNG", help="where the image goes")
    p.add_argument("--title", help="figure title (default: the file names)")
    p.set_defaults(handler=_plot, prog=p.prog)


def read_metrics(path: str) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of one metrics file; unreadable lines are skipped."""
    if not os.path.isfile(path):
        raise UsageError(f"metrics file {path!r} not found", "pass the file --metrics-out wrote")
    steps, evals = [], []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        (evals if "kind" in record else steps).append(record)
    if not steps:
        raise UsageError(f"metrics file {path!r} has no training records",
                         "pass a file written by --metrics-out (one JSON object per step)")
    return steps, evals


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def draw(files: list[str], output: str, title: str | None = None) -> None:
    """Write the four-panel PNG for ``files`` to ``output``."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("drawing needs matplotlib, which is not installed",
                         "pip install matplotlib (or pip install zeromega[plot])") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(Path(f).name, *read_metrics(f)) for f in files]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (loss_ax, lr_ax), (speed_ax, mem_ax) = axes
    flops_ax = None
    for name, steps, evals in runs:
        x, y = _series(steps, "loss")
        line, = loss_ax.plot(x, y, label=f"{name} train")
        for kind, marker in (("valid", "o"), ("test", "s")):
            points = [(r["step"], r["loss"]) for r in evals if r.get("kind") == kind and "loss" in r]
            if points:
                loss_ax.plot(*zip(*points), marker, color=line.get_color(), label=f"{name} {kind}")
        lr_ax.plot(*_series(steps, "lr"), label=name)
        speed_ax.plot(*_series(steps, "tokens_per_s"), label=f"{name} tokens/s")
        fx, fy = _series(steps, "tflops_per_gpu")
        if fx:
            flops_ax = flops_ax or speed_ax.twinx()
            flops_ax.plot(fx, fy, linestyle="--", label=f"{name} TFLOP/s per rank")
        mx, my = _series(steps, "peak_mem_bytes")
        mem_ax.plot(mx, [v / 2 ** 20 for v in my], label=name)
    for ax, label in ((loss_ax, "lm loss"), (lr_ax, "learning rate"), (speed_ax, "tokens/s"),
                      (mem_ax, "peak memory per rank (MiB)")):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if flops_ax is not None:
        flops_ax.set_ylabel("TFLOP/s per rank")
        flops_ax.legend(fontsize="small", loc="lower right")
    fig.suptitle(title or ", ".join(name for name, _, _ in runs))
    fig.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)


def _plot(args: argparse.Namespace) -> int:
    draw(args.metrics, args.output, args.title)
    print(f"{args.prog}: wrote {args.output}")
    return 0
