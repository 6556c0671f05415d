#!/usr/bin/env python
"""Megatron-DeepSpeed's ``--checkpoint-activations`` through zeromega's launcher path, memory side by side.

The same flags as a script would pass them (``script_args.read``, the reader ``pretrain_gpt.py`` uses), with and
without ``--checkpoint-activations`` (full recompute, uniform chunks of ``--checkpoint-num-layers`` 1), one
training step of a 4-layer GPT (h 64, s 1024, micro-batch 2: the attention scores dominate) on the DeepSpeed
engine, each case in its own fresh forked process. Column: how much the process's peak resident set
(``ru_maxrss``) grew over the run. bench/recompute_memory.py compares the recompute settings on the model alone.

    python bench/checkpoint_activations_memory.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
from pathlib import Path

from seq_common import run_world


def one_run(argv: list[str]) -> float:
    from zeromega.launch import script_args
    from zeromega.run import Run

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Run(script_args.read(argv, "pretrain_gpt.py"), log=lambda line: None).train()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # KiB -> MiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from zeromega.integrations.megatron import data

    corpus = str(data.build_corpus(Path(tempfile.mkdtemp()) / "stdlib", max_bytes=600_000))
    base = ["--data-path", corpus, "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "1024", "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1",
            "--split", "1,0,0", "--no-progress", "--lr", "1e-3", "--vocab-size", "512"]
    print(f"{'round':>5}  {'none (MiB)':>10}  {'--checkpoint-activations (MiB)':>30}  {'ratio':>5}")
    for i in range(args.rounds):
        none = run_world(1, one_run, base)[0]
        full = run_world(1, one_run, base + ["--checkpoint-activations"])[0]
        print(f"{i:>5}  {none:>10.0f}  {full:>30.0f}  {full / none:>5.2f}")


if __name__ == "__main__":
    main()
