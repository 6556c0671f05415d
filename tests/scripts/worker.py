"""A tiny torch.distributed (gloo) rank for the launcher tests.

``--mode`` picks what ``--fail-rank`` does after joining the group, so one
script covers success, an exception, a signal death and a plain non-zero
exit; the other ranks wait in a barrier, or (``--wait sleep``) somewhere only
the launcher can end them. It accepts ``--local_rank`` because the deepspeed
launcher appends it, and Megatron flags because the launcher's checks read them (it imports
``zeromega.launch.script_args``, which tells ``zeromega launch`` that its arguments are Megatron
flags, as examples/pretrain_gpt.py's are).
If ``ZEROMEGA_TEST_MARKER`` names a file, the rank creates it first: tests of
bad input check that no rank ever started.
"""

import argparse
import os
import signal
import time

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from zeromega.launch import script_args  # noqa: F401  (Megatron flags as zeromega's scripts read them)
from zeromega.launch.launcher import config_path_from_env


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", default="allreduce", choices=["allreduce", "raise", "sigkill", "exit", "sleep"])
    parser.add_argument("--fail-rank", type=int, default=1)
    parser.add_argument("--wait", default="barrier", choices=["barrier", "sleep"])
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None)
    args, _megatron_flags = parser.parse_known_args()
    return args


def say(line: str) -> None:
    """One write per line: ranks share the launcher's stdout, and ``python -u`` makes
    ``print`` write the text and its newline separately, so lines could interleave."""
    os.write(1, (line + "\n").encode())


@record
def main() -> None:
    args = parse()
    marker = os.environ.get("ZEROMEGA_TEST_MARKER")
    if marker:
        open(marker, "a").close()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.mode == "sleep":  # a rank that outlives the test unless something ends it
        say(f"rank={rank} sleeping")
        time.sleep(600)
    elif args.mode == "allreduce":
        total = torch.tensor([rank + 1.0])
        dist.all_reduce(total)
        say(f"rank={rank} world={world} sum={total.item():g} config={config_path_from_env()} "
            f"omp={os.environ.get('OMP_NUM_THREADS')} local_rank_arg={args.local_rank}")
    elif rank == args.fail_rank:
        time.sleep(0.5)  # let the other ranks reach the barrier first
        say(f"rank={rank} failing_at={time.time()}")
        if args.mode == "raise":
            raise RuntimeError("boom")
        if args.mode == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise SystemExit(3)
    elif args.wait == "barrier":
        dist.barrier()
    else:
        time.sleep(600)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
