"""``zeromega export CKPT --to hf|torch OUT``: one consolidated fp32 safetensors file from a checkpoint.

CKPT is a ``--save`` directory (its ``latest`` checkpoint is exported) or one
checkpoint inside it. The checkpoint is verified against its manifest first;
ZeRO partitions are gathered and tensor-parallel shards merged (DeepSpeed's
engine), or Megatron-Core's dist checkpoint (pp > 1, MoE runs) is read in
this one process and its stacked layers and experts split into per-layer,
per-expert names, so OUT loads into a 1-process model without zeromega. See
:mod:`zeromega.checkpoint.export` for the tensor names of each format.
"""

from __future__ import annotations

import argparse
import sys

from .cli_common import UsageError


def _add_export(subparsers) -> None:
    """The ``export`` subcommand (registered in cli.SUBCOMMANDS)."""
    p = subparsers.add_parser(
        "export", allow_abbrev=False, help="write a checkpoint as one consolidated safetensors file",
        description="Write the fp32 weights of a zeromega checkpoint, ZeRO partitions gathered and tp shards "
                    "merged (pp stages and MoE experts too, for Megatron-Core-engine checkpoints), as one "
                    "safetensors file. bf16/fp16 runs export the optimizer's fp32 masters; the file's "
                    "__metadata__['weights'] says which tensors were written.",
        epilog="--to torch: OUT is the file, Megatron-Core names. --to hf: OUT is a directory with "
               "model.safetensors (GPT-2 names) and config.json; dense models only (GPT-2 has no experts).")
    p.add_argument("checkpoint", metavar="CKPT", help="a --save directory, or a checkpoint (iter_NNNNNNN) in it")
    p.add_argument("--to", choices=("hf", "torch"), required=True, help="tensor names and layout to write")
    p.add_argument("out", metavar="OUT", help="output file (--to torch) or directory (--to hf)")
    p.add_argument("--num-attention-heads", type=int, default=None,
                   help="--to hf: heads, when the checkpoint does not record the model's shape")
    p.set_defaults(handler=_export, prog=p.prog)


def _export(args: argparse.Namespace) -> int:
    from zeromega.checkpoint import CheckpointError
    from zeromega.checkpoint.export import export

    try:
        written = export(args.checkpoint, args.out, to=args.to, heads=args.num_attention_heads)
    except CheckpointError as err:
        raise UsageError(err.problem, err.fix, prog=args.prog) from None
    print(f"{args.prog}: wrote {written}", file=sys.stderr)
    return 0
