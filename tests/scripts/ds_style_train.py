"""An unmodified DeepSpeed-style training script, as DeepSpeed's tutorials write them.

It declares ``--local_rank`` (the deepspeed launcher passes it) and its own
``--lr``, adds DeepSpeed's ``--deepspeed_config``, and hands ``args`` to
``deepspeed.initialize``, which checks ``args.local_rank`` against the
``LOCAL_RANK`` environment variable ("Mismatch in local rank setting").
Its ``--lr`` is its own business: the optimizer comes from the JSON.
"""

import argparse
import json
import os

import deepspeed
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=2)
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    engine, _, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())
    for _ in range(args.steps):
        x = torch.ones(4, 8) * (engine.global_rank + 1)
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
    os.write(1, (json.dumps({"rank": engine.global_rank, "local_rank_arg": args.local_rank,
                             "LOCAL_RANK": int(os.environ["LOCAL_RANK"]), "lr": args.lr,
                             "optimizer_lr": engine.optimizer.param_groups[0]["lr"]}) + "\n").encode())


if __name__ == "__main__":
    main()
