"""Which flags of real launch scripts zeromega honours, notes or refuses, asked of zeromega's own translator.

    python bench/flag_census.py [--world-size 2] [--env NAME=VALUE ...] [-v] [SCRIPT ...]

Each script is read as ``zeromega launch --config SCRIPT`` reads it (the static bash reader), and every flag of
its training command is put in one class:

- refused: the reader or the checks ``zeromega launch`` runs before any rank starts (the translator, the
  layout for the world size, the ZeRO pre-flight and the run's own pre-launch checks) stop on it. The census
  takes the refused flag out and asks again, until the rest is accepted, so every refusal is found, each with
  its one-line reason. A flag no table knows is refused ("did you mean").
- noted: accepted with a one-line note: a flag of ``megatron_args.NOTED`` (speed or plumbing, what runs
  instead is said), or one a warning of the translator names (a Megatron-LM warning restated, a fallback).
- honoured: accepted silently with its Megatron-LM (or Megatron-DeepSpeed) meaning.

Refusals can depend on the machine (fp16 on a CPU device): the census runs where it is run.
Without SCRIPT it reads the shrunk published scripts of ``examples/published`` (``SCRIPTS``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {  # example -> the published script it shrinks
    "megatron_lm_gpt3_175b.sh": "Megatron-LM examples/gpt3/train_gpt3_175b_distributed.sh",
    "megatron_lm_llama3_8b_fp8.sh": "Megatron-LM examples/llama/train_llama3_8b_h100_fp8.sh",
    "megatron_lm_mixtral_8x7b.sh": "Megatron-LM examples/mixtral/train_mixtral_8x7b_distributed.sh",
    "megatron_deepspeed_gpt_345m.sh": "Megatron-DeepSpeed examples/pretrain_gpt_distributed_with_mp.sh",
    "megatron_deepspeed_llama2.sh": "Megatron-DeepSpeed examples_deepspeed/pretrain_llama2_distributed.sh",
    "megatron_deepspeed_uc_llama.sh": "Megatron-DeepSpeed examples_deepspeed/universal_checkpointing/llama/"
                                      "run_llama_bf16.sh",
    "megatron_deepspeed_ulysses_32k.sh": "Megatron-DeepSpeed examples_deepspeed/sequence_parallel/"
                                         "ds_pretrain_gpt_1.3B_seq_parallel_32k.sh",
    "megatron_deepspeed_moe_125m.sh": "Megatron-DeepSpeed examples_deepspeed/MoE/ds_pretrain_gpt_125M_MoE64.sh",
}
# What the scripts' unknowable values ($(nvidia-smi ...), $(date), $HOSTNAME) are pinned to, as
# `zeromega launch --env` pins them.
SCRIPT_ENV = {
    "megatron_deepspeed_ulysses_32k.sh": {"num_gpus": "2", "num_gpus_pernode": "2", "current_time": "now",
                                          "host": "localhost"},
    "megatron_deepspeed_moe_125m.sh": {"NUM_GPUS": "2", "NUM_GPUS_PERNODE": "2", "current_time": "now",
                                       "host": "localhost"},
}


def _flags(argv: list[str]) -> list[str]:
    out: list[str] = []
    for token in argv:
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
            if flag not in out:
                out.append(flag)
    return out


def _without(argv: list[str], flag: str) -> list[str]:
    """``argv`` without ``flag`` and the values after it (up to the next ``--`` word)."""
    out, skipping = [], False
    for token in argv:
        if token.startswith("--"):
            skipping = token.split("=", 1)[0] == flag
            if skipping:
                continue
        elif skipping:
            continue
        out.append(token)
    return out


def _attribute(field: str, argv: list[str]) -> str | None:
    """The flag of ``argv`` a refusal's field names (a flag, or the unified field a flag sets)."""
    from zeromega.launch import megatron_args as M

    present = _flags(argv)
    if field.startswith("--"):
        field = field.split("=", 1)[0]
        return M.ALIASES.get(field, field) if M.ALIASES.get(field, field) in present or field in present else None
    by_path = {path: flag for flag, (path, _) in M.FLAGS.items()}
    by_path.update({path: flag for flag, path in M.NEGATIONS.items()})
    extra = {"precision": ("--fp16", "--bf16"), "fp16.enabled": ("--fp16",), "bf16.enabled": ("--bf16",),
             "parallel.ep": ("--expert-model-parallel-size", "--moe-expert-parallel-size"),
             "parallel.cp": ("--context-parallel-size", "--ds-sequence-parallel-size"),
             "moe.topk": ("--moe-router-topk", "--topk"), "moe.num_experts": ("--num-experts",),
             "moe.aux_loss_coeff": ("--moe-aux-loss-coeff", "--moe-loss-coeff"),
             "model.num_query_groups": ("--num-query-groups", "--num-key-value-heads"),
             "model.normalization": ("--normalization",), "data.path": ("--data-path",),
             "data.blend": ("--data-path",)}
    candidates = extra.get(field, ()) + ((by_path[field],) if field in by_path else ())
    return next((flag for flag in candidates if flag in present), None)


def _drop_key(files: dict, key: str) -> bool:
    """Take a refused top-level key out of the JSON files the script writes; whether one held it."""
    import json

    dropped = False
    for path, text in files.items():
        try:
            data = json.loads(text or "")
        except ValueError:
            continue
        if isinstance(data, dict) and key in data:
            del data[key]
            files[path] = json.dumps(data)
            dropped = True
    return dropped


def _accept(argv: list[str], script, base: Path, world: int) -> list[str]:
    """Read ``argv`` as ``zeromega launch --config`` would, with its pre-launch checks; the warnings' texts.
    Raises ConfigError (the first refusal)."""
    from zeromega.launch import megatron_args, translate
    from zeromega.launch.partial import set_path
    from zeromega.config.schema import coerce
    from zeromega.launch.plan_cli import launch_preflight
    from zeromega.run.prelaunch import before_launch

    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("always")
        args = megatron_args.parse(argv)
        if args.unknown:
            raise megatron_args.unknown_flags_error(args.unknown, "the script")
        launcher: dict = {}
        for field, value in script.launcher.items():
            set_path(launcher, field, coerce(field, value, f"launcher flag for {field}"))
        found = ([("launcher", launcher)] if launcher else []) + \
            translate._megatron(argv, "script", script.files, base)[0]
        cfg = translate.resolve(found, megatron=True)
        layout = cfg.layout(world)
        launch_preflight(cfg, layout, local_ranks=world)
        before_launch(cfg)
    return [str(w.message) for w in caught]


def census(path: str | Path, world: int = 2, env: dict | None = None) -> dict:
    """{"flags": [...], "honoured": [...], "noted": {flag: note}, "refused": {flag: reason}} for one script."""
    from zeromega.config import ConfigError
    from zeromega.launch import megatron_args, shell_script

    path = Path(path)
    env = dict(SCRIPT_ENV.get(path.name, {}), **(env or {}))
    script = shell_script.read(path.read_text(), env, name=str(path), base=path.parent)
    argv, _ = shell_script.config_flag(script.argv)
    flags = _flags(argv)
    refused: dict[str, str] = {}
    messages: list[str] = []
    saved = megatron_args._note
    printed: dict[str, str] = {}  # what the translator's one line would say on this machine
    megatron_args._note = lambda flags, texts=None: printed.update(
        {f: (texts or {}).get(f, megatron_args.NOTED[f][1]) for f in flags})  # said here in the census's table
    try:
        for _ in range(len(flags) + 1):
            try:
                messages = _accept(argv, script, path.parent, world)
                break
            except ConfigError as err:
                flag = _attribute(err.field, argv)
                if flag is None and f"({err.field})" not in refused and _drop_key(script.files, err.field):
                    refused[f"({err.field})"] = f"{err.problem}; fix: {err.fix}"  # a key of the JSON it writes
                    continue
                if flag is None or flag in refused:
                    refused[f"({err.field})"] = f"{err.problem}; fix: {err.fix}"
                    break
                refused[flag] = f"{err.problem}; fix: {err.fix}"
                argv = _without(argv, flag)
    finally:
        megatron_args._note = saved
    noted: dict[str, str] = {}
    for flag in flags:
        if flag in refused:
            continue
        if flag in megatron_args.NOTED and flag not in megatron_args.TABLE and flag not in megatron_args.SPECIAL:
            if flag in megatron_args.DEVICE_FLAGS and flag not in printed:
                continue  # honoured on this device (integrations/megatron/accel.py): no note
            noted[flag] = printed.get(flag, megatron_args.NOTED[flag][1])
            continue
        said = next((m for m in messages if re.search(re.escape(flag) + r"(?![\w-])", m)), None)
        if said:
            noted[flag] = said.splitlines()[0]
    honoured = [f for f in flags if f not in refused and f not in noted]
    return {"flags": flags, "honoured": honoured, "noted": noted, "refused": refused}


def runnable(text: str, refused) -> str:
    """The script without what zeromega refuses (what ``zeromega launch`` then runs): the lines that hold a
    refused flag (each published script writes one flag per line), and a refused top-level block
    ``"(key)"`` of the DeepSpeed JSON the script writes (its lines, up to the closing brace)."""
    flags = [f for f in refused if f.startswith("--")]
    blocks = [f[1:-1] for f in refused if f.startswith("(") and "." not in f]
    keep, depth = [], 0
    for line in text.splitlines(keepends=True):
        word = line.strip().lstrip("\"'")
        if depth:
            depth += line.count("{") - line.count("}")
            continue
        if any(line.strip().startswith(f'"{key}"') for key in blocks):
            depth = line.count("{") - line.count("}")
            continue
        if any(word == f or word.startswith((f + " ", f + "=", f + "\"", f + "\t")) for f in flags):
            continue
        keep.append(line)
    return "".join(keep)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("scripts", nargs="*", help="launch scripts (default: the examples of SCRIPTS)")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--data-dir", metavar="DIR", help="read the scripts from DIR (where their relative data, "
                   "tokenizer and output paths point; default: here)")
    p.add_argument("-v", "--verbose", action="store_true", help="list each noted and refused flag with its line")
    args = p.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)
    paths = [Path(s).resolve() for s in args.scripts] or [ROOT / "examples" / "published" / name for name in SCRIPTS]
    if args.data_dir:
        os.chdir(args.data_dir)
    totals: dict[str, dict[str, str]] = {}
    rows = []
    for path in paths:
        result = census(path, args.world_size, env)
        rows.append((path.name, result))
        for flag in result["flags"]:
            kind = "refused" if flag in result["refused"] else "noted" if flag in result["noted"] else "honoured"
            totals.setdefault(flag, {})[path.name] = kind
        for key in result["refused"]:
            if not key.startswith("--"):
                totals.setdefault(key, {})[path.name] = "refused"
    width = max(len(name) for name, _ in rows)
    print(f"{'script':<{width}}  flags  honoured  noted  refused")
    for name, r in rows:
        print(f"{name:<{width}}  {len(r['flags']):>5}  {len(r['honoured']):>8}  {len(r['noted']):>5}  "
              f"{len(r['refused']):>7}")
    # a flag counts in its strictest class over the scripts (refused anywhere > noted anywhere > honoured)
    strictest = {f: ("refused" if "refused" in k.values() else "noted" if "noted" in k.values() else "honoured")
                 for f, k in totals.items()}
    count = {kind: sum(1 for v in strictest.values() if v == kind) for kind in ("honoured", "noted", "refused")}
    print(f"{'distinct':<{width}}  {len(strictest):>5}  {count['honoured']:>8}  {count['noted']:>5}  "
          f"{count['refused']:>7}")
    if args.verbose:
        for name, r in rows:
            print(f"\n{name} ({SCRIPTS.get(name, 'given')}):")
            for flag, reason in r["refused"].items():
                print(f"  refused {flag}: {reason}")
            for flag, note in r["noted"].items():
                print(f"  noted   {flag}: {note}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
