"""The command line of a Megatron-style training script, generated from the translator's tables.

One list of flags (:mod:`.megatron_args`: Megatron-LM's names, zeromega's
few own), one docstring each (the schema field the flag sets), so
``pretrain_gpt.py --help`` lists every flag the translator reads and no
second parser can drift from it. Reading goes through the translator
(:func:`zeromega.launch.translate.build`): a config file (``--config``,
``--deepspeed_config`` or ``ZEROMEGA_CONFIG``) and the flags, conflicts
refused, unstated values at their dialect's defaults.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import warnings
from typing import Optional

from zeromega.config import ConfigError, RunConfig
from zeromega.config.schema import describe

from . import megatron_args, translate

SPECIAL_HELP = {
    "--bf16": "train in bf16 (precision)",
    "--fp16": "train in fp16 with loss scaling (precision)",
    "--use-distributed-optimizer": "shard the optimizer state over dp (ZeRO-1)",
    "--recompute-activations": "selective activation recomputation",
    "--deepspeed": "accepted for Megatron-DeepSpeed scripts",
    "--group-query-attention": "grouped-query attention: model.num_query_groups = --num-query-groups (default 1)",
    "--num-query-groups": "key/value heads under --group-query-attention (ignored without it, as in Megatron-LM)",
    "--num-key-value-heads": "Megatron-DeepSpeed's key/value heads (model.num_query_groups; no switch needed)",
    "--normalization": "LayerNorm or RMSNorm (also Megatron-DeepSpeed's layernorm / rmsnorm): model.normalization",
    "--use-rotary-position-embeddings": "Megatron-DeepSpeed's rope switch: model.position_embedding_type rope",
    "--no-position-embedding": "accepted with rope (no learned position table); refused without it",
    "--apply-layernorm-1p": "refused: zero-centred norm weights need apex or TransformerEngine",
    "--no-query-key-layer-scaling": "accepted: Megatron-Core's default (no 1/layer-number scaling of Q K^T)",
    "--moe-router-load-balancing-type": "moe.router_load_balancing_type (one of Megatron-LM's choices)",
    "--moe-layer-freq": "moe.layer_freq: N, or a 0/1 list expression such as ([1]*3+[0]*1)*3",
    "--create-moe-param-group": "Megatron-DeepSpeed: expert parameters reduced and sharded over the expert-data-"
                                "parallel group (what Megatron-Core's experts always get here)",
    "--disable-moe-top2-2nd-expert-sampling": "Megatron-DeepSpeed: top-2 takes the 2nd most probable expert "
                                              "(without it: the same, with a note that DeepSpeed would sample it)",
    "--cp-comm-type": "context-parallel attention: p2p (ring), a2a (Ulysses), a2a+p2p (USP)",
    "--hierarchical-context-parallel-sizes": "a2a+p2p: the Ulysses size, then the ring size",
    "--ds-sequence-parallel-size": "Megatron-DeepSpeed's Ulysses size",
    "--initial-loss-scale": "fp16: the first dynamic loss scale (a power of two)",
    "--deepspeed_config": "a DeepSpeed JSON (also --deepspeed-config)",
    "--deepspeed-config": argparse.SUPPRESS,
    "--data-path": "prefix of a Megatron .bin/.idx dataset (data.path), or a blend W1 P1 W2 P2 ... / P1 P2 ... "
                   "(data.blend); default: the project's own corpus",
    "--train-data-path": "the train split's own prefix or blend (data.train_path)",
    "--valid-data-path": "the validation split's own prefix or blend (data.valid_path)",
    "--test-data-path": "the test split's own prefix or blend (data.test_path)",
}
IGNORED = ("--local_rank", "--local-rank")
"""Set by the deepspeed launcher on every rank; zeromega reads LOCAL_RANK from the environment."""


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser listing every flag (for ``--help``; values are read by :func:`read`)."""
    p = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="run config in any dialect: DeepSpeed JSON, unified YAML, "
                   "or a Megatron launch script (default: $ZEROMEGA_CONFIG)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag, (path, kind) in megatron_args.TABLE.items():
        section = path.split(".")[0] if "." in path else "run"
        group = groups.setdefault(section, p.add_argument_group(section))
        extra = {"action": "store_true"} if kind == megatron_args.SWITCH else {"metavar": "V"}
        group.add_argument(flag, help=f"{path}: {describe(path)}".replace("%", "%%"), **extra)
    for flag, path in megatron_args.NEGATIONS.items():
        groups[path.split(".")[0]].add_argument(flag, action="store_true", help=f"{path} false")
    special = p.add_argument_group("flags with rules of their own")
    for flag, (_, nargs) in megatron_args.SPECIAL.items():
        extra = {"action": "store_true"} if nargs == 0 else {"metavar": "V", "nargs": None if nargs == 1 else nargs}
        special.add_argument(flag, help=SPECIAL_HELP.get(flag, ""), **extra)
    noted = p.add_argument_group("accepted with a fallback (one line before launch says what runs instead)")
    for flag, (nargs, note) in megatron_args.NOTED.items():
        if flag not in known_flags():
            extra = {"action": "store_true"} if nargs == 0 else {"metavar": "V", "nargs": None if nargs == 1 else nargs}
            noted.add_argument(flag, help=note.replace("%", "%%"), **extra)
    return p


def known_flags() -> list[str]:
    return ["--config", *megatron_args.TABLE, *megatron_args.NEGATIONS, *megatron_args.SPECIAL]


def all_flags() -> list[str]:
    """Every flag the script accepts, the noted ones and Megatron-LM's second spellings included."""
    return [*known_flags(), *megatron_args.NOTED, *megatron_args.ALIASES]


def _without_ignored(argv: list[str]) -> list[str]:
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in IGNORED:
            skip = True
        elif not token.startswith(tuple(f"{flag}=" for flag in IGNORED)):
            out.append(token)
    return out


def read(argv: list[str], prog: str) -> RunConfig:
    """The RunConfig of a script's command line; bad input: one line naming it, exit code 2."""
    argv = _without_ignored(argv)
    warnings.formatwarning = lambda message, *_args, **_kw: f"{prog}: warning: {message}\n"  # one line each
    config = os.environ.get("ZEROMEGA_CONFIG") or None
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            _fail(prog, "--config needs a file")
        config = argv[at + 1]
        argv = argv[:at] + argv[at + 2:]
    try:
        check_flags(argv, prog)
        pins = os.environ.get(translate.CONFIG_ENV)  # zeromega launch --env: the launch script's pinned variables
        cfg = translate.build(config, megatron_argv=argv, env=json.loads(pins) if pins else None)
        check_config(cfg)
        return cfg
    except ConfigError as err:
        _fail(prog, str(err))


def check_flags(argv: list[str], prog: str) -> None:
    """Refuse a flag neither the script nor zeromega knows, with the closest known flag. ``zeromega launch``
    calls it too, so a typo stops the job before any rank starts."""
    argv = _without_ignored(argv)
    if "--config" in argv:
        at = argv.index("--config")
        argv = argv[:at] + argv[at + 2:]
    _, unknown = translate.from_megatron_args(argv)
    if unknown:
        flag = next((t for t in unknown if t.startswith("-")), unknown[0]).split("=")[0]
        close = difflib.get_close_matches(flag, all_flags(), n=1)
        fix = f"did you mean {close[0]}?" if close else f"see `{prog} --help`"
        raise ConfigError("arguments", " ".join(unknown), "not a flag this script or zeromega knows", fix)


def check_config(cfg: RunConfig) -> None:
    """What the script needs beyond a valid config: a learning rate (Megatron-LM has no default)."""
    if "lr" not in cfg.optimizer.model_fields_set:
        raise ConfigError("optimizer.lr", None, "no source states the learning rate, and Megatron-LM has no "
                          "default for it", "pass --lr (or an optimizer block with params.lr in the DeepSpeed "
                          "JSON)")


def _fail(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse(argv: Optional[list[str]], prog: str, description: str) -> RunConfig:
    """``--help`` prints every flag; otherwise :func:`read`."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        parser(prog, description).print_help()
        raise SystemExit(0)
    return read(argv, prog)


def run(argv: Optional[list[str]] = None, prog: str = "pretrain_gpt.py", description: str = "") -> list:
    """Read the command line and train :class:`zeromega.Run` on it (what ``examples/pretrain_gpt.py`` does);
    a ConfigError raised once the ranks run is one line and exit code 2 as well."""
    from zeromega.checkpoint import CheckpointError
    from zeromega.plugins.zero.space_guard import OffloadSpaceError
    from zeromega.run import Run
    from zeromega.run.loop import NotFinite

    cfg = parse(argv, prog, description)
    try:
        return Run(cfg).train()
    except (ConfigError, CheckpointError, OffloadSpaceError) as err:
        _refuse_in_rank(prog, str(err))
    except NotFinite as err:  # a diverged run (Megatron-LM's NaN check): a failure, not bad input
        _refuse_in_rank(prog, str(err), code=1)


def _refuse_in_rank(prog: str, message: str, code: int = 2) -> None:
    """A refusal inside a rank (bad config, a checkpoint that cannot load or save, a full nvme drive; ``code``
    2), or a run stopped by its NaN check (``code`` 1): one line, not a traceback per rank. Under a launcher that reads error files (zeromega launch,
    torchrun: ``TORCHELASTIC_ERROR_FILE``) the line goes there and the launcher shows it once; alone, it is
    printed."""
    import json
    import time

    line = f"{prog}: error: {' '.join(message.split())}"
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w") as f:  # the layout torch.distributed.elastic's @record writes
                json.dump({"message": {"message": line, "extraInfo": {"py_callstack": "",
                                                                       "timestamp": str(int(time.time()))}}}, f)
        except OSError:
            print(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr)
    raise SystemExit(code)
