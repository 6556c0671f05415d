#!/usr/bin/env python
"""Megatron-style GPT pretraining through zeromega: Megatron-LM's flags, a DeepSpeed JSON if you have one.

    zeromega launch --nproc-per-node 2 --config examples/configs/zero1.json \\
        examples/pretrain_gpt.py --num-layers 4 --hidden-size 256 --num-attention-heads 8 \\
        --seq-length 128 --train-iters 300 --metrics-out runs/metrics.jsonl

Every flag is listed by ``--help`` (generated from zeromega's translator);
without ``--data-path`` the run trains on the project's own corpus, built
on first use. The run itself is :class:`zeromega.Run`.
"""

from torch.distributed.elastic.multiprocessing.errors import record

from zeromega.launch import script_args


@record
def main(argv=None):
    # = zeromega.Run(cfg).train() on the RunConfig of the command line (bad input: one line, exit code 2)
    script_args.run(argv, "pretrain_gpt.py", __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
