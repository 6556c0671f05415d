"""What each rank runs in the checkpoint tests: what ``examples/pretrain_gpt.py`` runs.

``zeromega.launch.script_args.run(argv)`` (the script's whole body: its
flags read by the translator, then ``zeromega.Run``) runs in the forked
rank, so the tests cover its flags (``--save/--load/...``), not a copy of
its loop. Run as a script, this module is the fault-injection entry for
``zeromega launch``: it kills or hangs one rank at one step of the first attempt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional


def pretrain_main(argv: list[str]) -> None:
    """What ``examples/pretrain_gpt.py`` does with ``argv``."""
    from zeromega.launch import script_args

    script_args.run(argv, "pretrain_gpt.py")


def read_curve(metrics: str | Path) -> dict[int, float]:
    """step -> loss from a --metrics-out file."""
    curve = {}
    for line in Path(metrics).read_text().splitlines():
        record = json.loads(line)
        curve[record["step"]] = record["loss"]
    return curve


def pretrain(argv: list[str], fault_point: Optional[str] = None, fault_rank: int = 0, fault_after: int = 0) -> Any:
    """Run the script's main on this rank; with ``fault_point``, rank ``fault_rank`` raises there
    during the save after ``fault_after`` complete ones."""
    import torch.distributed as dist

    from zeromega import checkpoint

    if fault_point is not None:
        original = checkpoint.Checkpointer.__init__

        def init(self, *args, **kwargs):
            original(self, *args, **kwargs)

            seen = []

            def fault(point):
                if point == fault_point and dist.get_rank() == fault_rank:
                    seen.append(point)
                    if len(seen) > fault_after:
                        raise RuntimeError(f"injected fault at {point}")

            self.fault = fault

        checkpoint.Checkpointer.__init__ = init
    try:
        pretrain_main(argv)
    except BaseException as err:  # the test wants the message, not the traceback
        from zeromega.config import ConfigError
        from zeromega.integrations.megatron import parallel

        parallel.shutdown()
        cause = err.__context__
        if isinstance(err, SystemExit) and err.code == 2 and cause is not None and not isinstance(cause, ConfigError):
            err = cause  # a refusal the script turned into one line and exit code 2 (script_args._refuse_in_rank)
        return {"error": f"{type(err).__name__}: {err}"}
    return {"error": None}


def pretrain_without_nvme_resume_patch(argv: list[str]) -> Any:
    """:func:`pretrain` with zeromega's completion of DeepSpeed's nvme-optimizer load switched off
    (``zeromega.plugins.zero.resume``): the probe that shows the patch is still needed."""
    from zeromega.plugins.zero import resume

    resume.ENABLED = False
    try:
        return pretrain(argv)
    finally:
        resume.ENABLED = True


def pretrain_on_a_full_disk(argv: list[str], fill_after_saves: int) -> Any:
    """:func:`pretrain` where, after ``fill_after_saves`` complete checkpoint saves, every checkpoint write fails
    with ENOSPC on every rank, as on a drive that filled up (what zeromega's hashed writer hands the bytes to)."""
    import errno

    from zeromega import checkpoint
    from zeromega.checkpoint import files

    saves = []
    original_save, original_write = checkpoint.Checkpointer.save, files._HashingWriter.write

    def save(self, *args, **kwargs):
        try:
            return original_save(self, *args, **kwargs)
        finally:
            saves.append(1)

    def write(self, data):
        if len(saves) >= fill_after_saves:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original_write(self, data)

    checkpoint.Checkpointer.save, files._HashingWriter.write = save, write
    try:
        return pretrain(argv)
    finally:
        checkpoint.Checkpointer.save, files._HashingWriter.write = original_save, original_write


def pretrain_sigterm_at(argv: list[str], rank: int, step: int) -> Any:
    """:func:`pretrain`, with SIGTERM sent to global rank ``rank`` by itself after ``step`` (before the
    run's own per-step hook), as a scheduler's preemption notice would arrive."""
    import signal

    import torch.distributed as dist

    import zeromega.run.loop as train_module

    original = train_module.train

    def train(*args, on_step=None, **kwargs):
        def step_hook(record):
            if record.step == step and dist.get_rank() == rank:
                os.kill(os.getpid(), signal.SIGTERM)
            return on_step(record) if on_step else False

        return original(*args, on_step=step_hook, **kwargs)

    train_module.train = train
    try:
        return pretrain(argv)
    finally:
        train_module.train = original


def _fault_during_first_attempt() -> None:
    """Script entry: ZEROMEGA_TEST_KILL='RANK:STEP' SIGKILLs that rank after that step,
    ZEROMEGA_TEST_STOP='RANK:STEP' SIGSTOPs it, and ZEROMEGA_TEST_HANG='RANK:STEP' makes it sleep there
    while the others wait in the next step's collectives; first attempt only."""
    import signal
    import time

    import torch.distributed as dist

    import zeromega.run.loop as train_module

    kill = os.environ.get("ZEROMEGA_TEST_KILL")
    freeze = os.environ.get("ZEROMEGA_TEST_STOP")  # SIGSTOP: the rank is frozen
    rank, step = (int(x) for x in (kill or freeze or os.environ["ZEROMEGA_TEST_HANG"]).split(":"))
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    original = train_module.train

    def train(*args, on_step=None, **kwargs):
        def step_hook(record):
            stop = on_step(record) if on_step else False
            if first_attempt and record.step == step and dist.get_rank() == rank:
                if os.environ.get("ZEROMEGA_TEST_KILL_MARK"):  # proof of the fault for the test
                    with open(os.environ["ZEROMEGA_TEST_KILL_MARK"], "w") as mark:
                        mark.write(f"{rank}:{step}:{os.getpid()}")
                if kill:
                    os.kill(os.getpid(), signal.SIGKILL)
                if freeze:
                    os.kill(os.getpid(), signal.SIGSTOP)
                time.sleep(3600)
            return stop

        return original(*args, on_step=step_hook, **kwargs)

    train_module.train = train
    import sys

    from torch.distributed.elastic.multiprocessing.errors import record

    record(pretrain_main)(sys.argv[1:])  # as examples/pretrain_gpt.py's main is


if __name__ == "__main__":
    _fault_during_first_attempt()
