#!/usr/bin/env python
"""Checkpoint save/load time and bytes per rank, against the raw bandwidth of the same disk, in one run.

Two ranks train a GPT for one step, then save and load a checkpoint
``--repeat`` times into ``--dir``: with ``--engine deepspeed`` (default) dp2
under the ZeRO stage from --zero-stage (zeromega's files around DeepSpeed's),
with ``--engine megatron`` pp2 on Megatron-Core's engine (its dist
checkpointing, distributed optimizer), where the save's check that every
fp32 master equals its model weight is also timed on its own (``check_s``). Each rank also
writes and reads back, with fsync, a plain file as large as its share of the
checkpoint: the raw disk bandwidth at that moment. The ratio (checkpoint
bytes/s over raw bytes/s) is what zeromega's hashing, manifest and rename
cost on top of the disk. Reads of the raw file come from the page cache like
the checkpoint's own (no cache drop: that needs root and a quiet machine).

    python bench/checkpoint_io.py --hidden-size 512 --num-layers 8 --zero-stage 2
    python bench/checkpoint_io.py --engine megatron --hidden-size 512 --num-layers 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def raw_bandwidth(path: Path, nbytes: int) -> tuple[float, float]:
    """(write bytes/s with fsync, read bytes/s) of one file of ``nbytes``."""
    block = os.urandom(1 << 20)
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, nbytes >> 20)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(4 << 20):
            pass
    read_s = time.perf_counter() - start
    size = path.stat().st_size
    path.unlink()
    return size / write_s, size / read_s


def time_saves_and_loads(args: dict, ckpt, fresh_checkpointer, after_save=None) -> dict:
    """Median save and load seconds of ``ckpt`` (``--repeat`` each; every load into a fresh
    checkpointer's model, since ZeRO-3 cannot load into an engine that already holds partitions),
    then the raw disk bandwidth for the same bytes. ``after_save()`` returns extra seconds to report."""
    import torch.distributed as dist

    save_dir = Path(args["dir"]) / "ckpt"
    saves, loads, extra, nbytes = [], [], [], 0
    for i in range(args["repeat"]):
        dist.barrier()
        start = time.perf_counter()
        ckpt.save(save_dir, i + 1, 0)
        saves.append(time.perf_counter() - start)
        nbytes = ckpt.last_save["bytes"]
        if after_save is not None:
            extra.append(after_save())
    for _ in range(args["repeat"]):
        loader = fresh_checkpointer()
        dist.barrier()
        start = time.perf_counter()
        loader.load(save_dir)
        loads.append(time.perf_counter() - start)
    dist.barrier()
    write_bw, read_bw = raw_bandwidth(Path(args["dir"]) / f"raw-{dist.get_rank()}.bin", nbytes)
    out = {"bytes": nbytes, "save_s": statistics.median(saves), "load_s": statistics.median(loads),
           "raw_write_Bps": write_bw, "raw_read_Bps": read_bw}
    if extra:
        out["check_s"] = statistics.median(extra)
    return out


def megatron_rank_work(args: dict, corpus: str) -> dict:
    """pp2 on Megatron-Core's engine: MegatronTrainer + MegatronCheckpointer (dist checkpointing)."""
    from ckpt_megatron_workers import allow_child_processes, use_in_process_queue

    from zeromega.integrations.megatron import data, model, parallel
    from zeromega.config.schema import RunConfig
    from zeromega.checkpoint import megatron as megatron_checkpoint
    from zeromega.plugins.megatron.pipeline import MegatronTrainer

    allow_child_processes()  # Megatron's writer forks one process per rank
    use_in_process_queue()
    cfg = RunConfig.model_validate({"parallel": {"pp": 2}, "zero": {"stage": 1}, "batch": {"micro": 1, "global": 2}})
    layout = parallel.initialize(cfg, seed=1)
    shape = model.GPTShape(num_layers=args["num_layers"], hidden_size=args["hidden_size"],
                           num_attention_heads=8, seq_length=64, vocab_size=257)
    train_ds, _, _ = data.build_gpt_datasets(corpus, 64, 1, (8, 0, 0), split="1,0,0")

    def checkpointer(trainer=None):
        trainer = trainer or MegatronTrainer(shape, cfg, layout, init_seed=1)
        return megatron_checkpoint.MegatronCheckpointer(trainer, layout, 1, "fp32")

    first = MegatronTrainer(shape, cfg, layout, init_seed=1)
    batches = data.sample_batches(train_ds, 1, dp_rank=0, dp_size=1)
    first.train_step([next(batches) for _ in range(layout.accumulation)])

    def check_seconds() -> float:
        state = megatron_checkpoint.sharded_state_dict(first, loading=False)
        start = time.perf_counter()
        assert megatron_checkpoint.misplaced_masters(state) == []
        return time.perf_counter() - start

    result = time_saves_and_loads(args, checkpointer(first), checkpointer, after_save=check_seconds)
    parallel.shutdown()
    return result


def rank_work(args: dict, corpus: str) -> dict:
    import torch.distributed as dist

    from zeromega.checkpoint import Checkpointer
    from zeromega.plugins.zero.engine import build_engine
    from zeromega.integrations.megatron import data, model, parallel
    from zeromega.config.schema import RunConfig
    from zeromega.run.loop import gpt_loss

    cfg = RunConfig.model_validate({"zero": {"stage": args["zero_stage"]}, "batch": {"micro": 1, "global": 2}})
    layout = parallel.initialize(cfg, seed=1)
    shape = model.GPTShape(num_layers=args["num_layers"], hidden_size=args["hidden_size"],
                           num_attention_heads=8, seq_length=64, vocab_size=257)

    def checkpointer(engine=None):
        engine = engine or build_engine(model.build_gpt(shape, cfg), cfg, layout)
        return Checkpointer(engine, layout, args["zero_stage"], "fp32")

    engine = build_engine(model.build_gpt(shape, cfg), cfg, layout)
    train_ds, _, _ = data.build_gpt_datasets(corpus, 64, 1, (8, 0, 0), split="1,0,0")
    batch = next(data.sample_batches(train_ds, 1, dp_rank=dist.get_rank(), dp_size=2))
    engine.backward(gpt_loss(engine, batch))
    engine.step()
    result = time_saves_and_loads(args, checkpointer(engine), checkpointer)
    parallel.shutdown()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--engine", choices=["deepspeed", "megatron"], default="deepspeed")
    p.add_argument("--zero-stage", type=int, default=2, help="DeepSpeed engine only (Megatron's: distributed optimizer)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = p.parse_args()
    from distributed import run_world

    from zeromega.integrations.megatron import data

    workdir = Path(args.dir or tempfile.mkdtemp(prefix="zeromega-ckpt-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = str(data.build_corpus(workdir / "corpus", max_bytes=300_000))
    try:
        work = megatron_rank_work if args.engine == "megatron" else rank_work
        results = run_world(2, work, {**vars(args), "dir": str(workdir)}, corpus, timeout=1200)
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    for rank, r in enumerate(results):
        save_bw, load_bw = r["bytes"] / r["save_s"], r["bytes"] / r["load_s"]
        layout = {"engine": "megatron", "pp": 2} if args.engine == "megatron" else {"zero_stage": args.zero_stage}
        check = {"check_s": round(r["check_s"], 4), "check_vs_save": round(r["check_s"] / r["save_s"], 4)} \
            if "check_s" in r else {}
        print(json.dumps({"rank": rank, **layout, "bytes": r["bytes"], **check,
                          "save_s": round(r["save_s"], 3), "load_s": round(r["load_s"], 3),
                          "save_MBps": round(save_bw / 1e6, 1), "raw_write_MBps": round(r["raw_write_Bps"] / 1e6, 1),
                          "save_vs_raw": round(save_bw / r["raw_write_Bps"], 3),
                          "load_MBps": round(load_bw / 1e6, 1), "raw_read_MBps": round(r["raw_read_Bps"] / 1e6, 1),
                          "load_vs_raw": round(load_bw / r["raw_read_Bps"], 3)}))


if __name__ == "__main__":
    main()
