"""The writers' output is what each target accepts.

``--to megatron``: valid NVIDIA Megatron-LM core 0.16 input (every value that differs from Megatron-LM's
default, integers as integers, the micro batch always, no flag it lacks); ``--to megatron-deepspeed``
adds ``--deepspeed``, ``--deepspeed_config`` and ``--zero-stage``; ``--to deepspeed`` passes DeepSpeed's own
``DeepSpeedConfig`` and adds nothing the input did not say. Every emitted flag is checked against the
target's flag table (launch/targets, data); where the Megatron-LM / Megatron-DeepSpeed sources are on this
machine their own argparse parsers read the output too.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zeromega.config.errors import ConfigError
from zeromega.config.schema import RunConfig, validate
from zeromega.launch import cli, megatron_args, translate
from zeromega.launch.partial import flatten, same

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.filter_too_much])
MEGATRON_LM = Path("/work/.mirror/NVIDIA+Megatron-LM/repo")
MEGATRON_DEEPSPEED = Path("/work/.mirror/microsoft+Megatron-DeepSpeed/repo")


def words_by_flag(argv: list[str]) -> dict[str, list[str]]:
    out, flag = {}, None
    for word in argv:
        if word.startswith("--"):
            flag = word
            out[flag] = []
        else:
            out[flag].append(word)
    return out


def assert_valid_for(argv: list[str], target: str) -> None:
    """Every flag is the target's, with values of its kind (integers as integers), count and choices."""
    table = megatron_args.target_flags(target)
    for flag, values in words_by_flag(argv).items():
        assert flag in table, (flag, target)
        fact = table[flag]
        if fact.kind in ("switch", "switch_false"):
            assert values == [], (flag, values)
            continue
        expected = {None: 1, "+": None, "*": None}.get(fact.nargs, fact.nargs)
        assert values and (expected is None or len(values) == expected), (flag, values, fact.nargs)
        for value in values:
            if fact.kind == "int":
                assert str(int(value)) == value, (flag, value)  # '60', never '60.0'
            elif fact.kind == "float":
                float(value)
            if fact.choices:
                assert value in [str(c) for c in fact.choices], (flag, value)


# ------------------------------------------------------------------ configs to write


@st.composite
def configs(draw) -> RunConfig:
    tp, pp = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    data = {
        "parallel": {"tp": tp, "pp": pp, "sequence_parallel": tp > 1 and draw(st.booleans())},
        "zero": {"stage": draw(st.sampled_from([0, 1, 2, 3]))},
        "batch": draw(st.sampled_from([{}, {"micro": 2}, {"micro": 2, "global": 64}, {"global": 32}])),
        "optimizer": {"lr": draw(st.sampled_from([1e-3, 3e-4])), "weight_decay": draw(st.sampled_from([0.0, 0.01, 0.1])),
                      "beta2": draw(st.sampled_from([0.95, 0.999])), "clip_grad": draw(st.sampled_from([0.0, 1.0]))},
        "scheduler": {"decay_style": draw(st.sampled_from(["constant", "linear", "cosine"])),
                      "warmup_iters": draw(st.sampled_from([0, 10])), "train_iters": draw(st.sampled_from([None, 100]))},
        "precision": draw(st.sampled_from(["fp32", "bf16", "fp16"])),
        "loss_scaling": {"initial_scale_power": draw(st.sampled_from([16, 32]))},
        "launch": {"distributed_timeout_minutes": draw(st.sampled_from([10.0, 60.0, 0.5]))},
        "model": {"num_layers": 4 * pp, "hidden_size": 64, "num_attention_heads": 4,
                  "normalization": draw(st.sampled_from(["LayerNorm", "RMSNorm"])),
                  "num_query_groups": draw(st.sampled_from([None, 2]))},
        "checkpoint": draw(st.sampled_from([{}, {"save": "ckpt", "interval": 50}])),
        "seed": draw(st.sampled_from([1234, 7])),
    }
    try:
        return validate(data)
    except ConfigError:
        from hypothesis import assume

        assume(False)


@FAST
@given(configs(), st.sampled_from(["megatron", "megatron-deepspeed"]))
def test_every_emitted_flag_is_the_targets_with_a_value_of_its_kind(cfg, target):
    argv, lost = megatron_args.write_argv(cfg, target, deepspeed_config="ds.json")
    assert_valid_for(argv, target)
    flags = words_by_flag(argv)
    if cfg.batch.micro is not None or cfg.batch.global_ is None:
        assert "--micro-batch-size" in flags  # Megatron-LM asserts it
    else:
        assert any(note.startswith("--micro-batch-size") for note in lost)
    assert ("--zero-stage" in flags) == (target == "megatron-deepspeed")
    if target == "megatron-deepspeed":
        assert flags["--deepspeed_config"] == ["ds.json"] and "--deepspeed" in flags
    elif cfg.zero.stage > 1:
        assert any("ZeRO stage" in note for note in lost)
    minutes = cfg.launch.distributed_timeout_minutes
    if minutes.is_integer() and minutes != 10:
        assert flags["--distributed-timeout-minutes"] == [str(int(minutes))]
    elif not minutes.is_integer():
        assert "--distributed-timeout-minutes" not in flags
        assert any("--distributed-timeout-minutes 0.5" in note for note in lost)


@FAST
@given(configs())
def test_every_value_differing_from_megatron_lms_default_is_written(cfg):
    """Read back as Megatron-LM reads it: the flags written, the rest at Megatron-LM's defaults (the table)."""
    argv, lost = megatron_args.write_argv(cfg, "megatron", cfg.layout(cfg.parallel.tp * cfg.parallel.pp * 2))
    table, given_flags = megatron_args.target_flags("megatron"), words_by_flag(argv)
    for flag, (path, kind) in megatron_args.FLAGS.items():
        if flag not in table or path in ("parallel.cp", "batch.micro", "batch.global", "zero.stage"):
            continue
        if any(note.startswith(f"{flag} ") for note in lost):
            continue  # named as not expressible (a fraction for an integer flag), never written wrongly
        value = megatron_args._get(cfg, path)
        if value is None or flag in given_flags:
            continue
        megatron_value = table[flag].default
        if kind == megatron_args.SWITCH:
            assert not value, flag
        elif megatron_args.SAME_MEANING.get(flag) != (value,):
            assert same(value, megatron_value), (flag, value, megatron_value)


def test_megatron_lms_defaults_that_differ_from_zeromegas_are_written():
    cfg = validate({"optimizer": {"weight_decay": 0.0, "beta2": 0.95, "clip_grad": 0.0},
                    "scheduler": {"decay_style": "constant"}, "loss_scaling": {"initial_scale_power": 16},
                    "launch": {"distributed_timeout_minutes": 60.0}, "zero": {"stage": 2}})
    argv, lost = megatron_args.write_argv(cfg)
    flags = words_by_flag(argv)
    assert flags["--lr"] == ["0.001"]  # Megatron-LM has no default lr
    assert flags["--weight-decay"] == ["0.0"] and flags["--adam-beta2"] == ["0.95"] and flags["--clip-grad"] == ["0.0"]
    assert flags["--lr-decay-style"] == ["constant"] and flags["--initial-loss-scale"] == ["65536.0"]
    assert flags["--distributed-timeout-minutes"] == ["60"] and flags["--micro-batch-size"] == ["1"]
    assert "--zero-stage" not in flags and lost == [
        "ZeRO stage 2 (Megatron-LM has no --zero-stage; its --use-distributed-optimizer is ZeRO-1: use --to "
        "megatron-deepspeed)"]
    argv, _ = megatron_args.write_argv(cfg.model_copy(update={"zero": validate({"zero": {"stage": 1}}).zero}))
    assert "--use-distributed-optimizer" in argv


def test_the_micro_batch_is_always_written_derived_with_a_world_size():
    cfg = validate({"batch": {"global": 64, "accumulation": 4}})
    argv, lost = megatron_args.write_argv(cfg)
    assert "--micro-batch-size" not in argv and lost and "--world-size" in lost[0]
    argv, lost = megatron_args.write_argv(cfg, layout=cfg.layout(8))
    flags = words_by_flag(argv)
    assert flags["--micro-batch-size"] == ["2"] and flags["--global-batch-size"] == ["64"] and not lost


# ------------------------------------------------------------------ round trips


@st.composite
def megatron_argvs(draw) -> list[str]:
    argv = ["--micro-batch-size", draw(st.sampled_from(["1", "4"])), "--lr", draw(st.sampled_from(["3e-4", "0.001"]))]
    for flag, values in {"--tensor-model-parallel-size": ["1", "2"], "--global-batch-size": ["64"],
                         "--weight-decay": ["0.0", "0.1"], "--adam-beta2": ["0.95"], "--clip-grad": ["0.0", "0.5"],
                         "--lr-decay-style": ["cosine", "constant"], "--lr-warmup-iters": ["0", "5"],
                         "--train-iters": ["100"], "--num-layers": ["4"], "--hidden-size": ["64"],
                         "--num-attention-heads": ["4"], "--seq-length": ["128"], "--hysteresis": ["3"],
                         "--distributed-timeout-minutes": ["30"], "--seed": ["7"], "--log-interval": ["1"],
                         "--save": ["ckpt"], "--save-interval": ["10"], "--normalization": ["RMSNorm"],
                         "--initial-loss-scale": ["65536"]}.items():
        if draw(st.booleans()):
            argv += [flag, draw(st.sampled_from(values))]
    if "--save" in argv and "--save-interval" not in argv:  # Megatron-LM asserts an interval next to --save
        argv += ["--save-interval", "10"]
    for switch in ("--bf16", "--swiglu", "--use-distributed-optimizer", "--disable-bias-linear",
                   "--untie-embeddings-and-output-weights"):
        if draw(st.booleans()):
            argv.append(switch)
    return argv


def read_megatron(argv: list[str]) -> RunConfig:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return translate.resolve([("command-line arguments", translate.from_megatron_args(argv)[0])], megatron=True)


@FAST
@given(megatron_argvs())
def test_megatron_argv_to_unified_to_argv_round_trips(argv):
    cfg = read_megatron(argv)
    written, lost = megatron_args.write_argv(cfg)
    assert not lost
    back = read_megatron(written)
    assert flatten(back.model_dump()) == flatten(cfg.model_dump())
    assert megatron_args.write_argv(back)[0] == written  # a fixpoint


@st.composite
def deepspeed_files(draw) -> dict:
    ds: dict = {}
    batch = draw(st.sampled_from([{"train_micro_batch_size_per_gpu": 2}, {"train_batch_size": 32},
                                  {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4}]))
    ds.update(batch)
    if draw(st.booleans()):
        ds["gradient_clipping"] = draw(st.sampled_from([1.0, 0.5]))
    stage = draw(st.sampled_from([0, 1, 2, 3]))
    zero: dict = {"stage": stage}
    if stage and draw(st.booleans()):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if stage == 3 and draw(st.booleans()):
        zero["stage3_max_live_parameters"] = 10**8
    if stage >= 2 and draw(st.booleans()):
        zero["overlap_comm"] = True
    ds["zero_optimization"] = zero
    precision = draw(st.sampled_from([None, "bf16", "fp16"]))
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, **draw(st.sampled_from([{}, {"initial_scale_power": 12},
                                                               {"loss_scale_window": 500, "hysteresis": 4}]))}
    if draw(st.booleans()):
        params = {"lr": draw(st.sampled_from([1e-4, 3e-4]))}
        if draw(st.booleans()):
            params["betas"] = [0.9, 0.95]
        if draw(st.booleans()):
            params["weight_decay"] = 0.1
        ds["optimizer"] = {"type": draw(st.sampled_from(["AdamW", "Adam"])), "params": params}
        if draw(st.booleans()):
            ds["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": 10,
                                                              "warmup_max_lr": params["lr"]}}
    if draw(st.booleans()):
        ds["steps_per_print"] = 50
    if draw(st.booleans()):
        ds["wall_clock_breakdown"] = False
    return ds


def read_ds(ds: dict) -> RunConfig:
    return translate.resolve([("DeepSpeed config", translate.from_deepspeed(json.loads(json.dumps(ds))))])


class _MPU:
    def __init__(self, dp: int):
        self.dp = dp

    def get_data_parallel_world_size(self):
        return self.dp


@pytest.fixture(scope="module")
def deepspeed_config():
    """DeepSpeed's own DeepSpeedConfig, with a data-parallel size from a stand-in mpu and rank 0 (no process
    group: DeepSpeedConfig asks torch.distributed for the rank only)."""
    import deepspeed.runtime.config as dsc

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    original = dsc.dist.get_rank
    dsc.dist.get_rank = lambda *args, **kwargs: 0
    yield lambda config, dp: dsc.DeepSpeedConfig(config, mpu=_MPU(dp))
    dsc.dist.get_rank = original


def said(tree: dict, prefix: str = "") -> set[str]:
    return {path for path in flatten(tree, prefix)} | {f"{prefix}{key}" for key in tree}


@FAST
@given(ds=deepspeed_files())
def test_deepspeed_json_round_trips_adds_nothing_and_passes_deepspeedconfig(deepspeed_config, ds):
    cfg = read_ds(ds)
    written = translate.to_deepspeed_file(cfg)
    assert read_ds(written) == cfg  # DeepSpeed JSON -> unified -> DeepSpeed JSON -> the same run
    extra = set(flatten({k: v for k, v in written.items() if k != "zeromega"})) - set(flatten(ds))
    assert not extra, extra  # nothing the input did not say (no optimizer block, no betas, no defaults)
    for path, value in flatten({k: v for k, v in written.items() if k != "zeromega"}).items():
        stated = flatten(ds)[path]
        assert same(value, stated) or isinstance(value, list) and value == stated, path
    checked = deepspeed_config(written, 2)
    assert checked.zero_optimization_stage == cfg.zero.stage
    assert checked.train_micro_batch_size_per_gpu == cfg.layout(2).micro


def test_deepspeed_output_with_a_world_size_passes_deepspeedconfig(deepspeed_config):
    cfg = read_ds({"train_batch_size": 64, "gradient_accumulation_steps": 4, "zero_optimization": {"stage": 2},
                   "bf16": {"enabled": True}})
    layout = cfg.layout(8)
    checked = deepspeed_config(translate.to_deepspeed_file(cfg, layout), layout.dp)
    assert (checked.train_batch_size, checked.train_micro_batch_size_per_gpu,
            checked.gradient_accumulation_steps) == (64, 2, 4)


# ------------------------------------------------------------------ the targets' own parsers


PARSE = textwrap.dedent('''
    import argparse, importlib.util, json, sys, types, warnings
    warnings.simplefilter("ignore")
    root, kind, cases = sys.argv[1], sys.argv[2], json.loads(sys.stdin.read())
    if kind == "megatron":
        sys.path.insert(0, root)
        stub = types.ModuleType("megatron.training.utils")  # validate_args' helpers, unused by the parser
        for name in ("get_device_arch_version", "update_use_dist_ckpt", "print_rank_0", "warn_rank_0"):
            setattr(stub, name, lambda *a, **k: None)
        sys.modules["megatron.training.utils"] = stub
        import megatron
        megatron.__path__.insert(0, root + "/megatron") if isinstance(megatron.__path__, list) else None
        from megatron.training.arguments import add_megatron_arguments
        parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    else:
        for name in ("megatron.global_vars", "tools", "tools.retro", "tools.retro.utils"):
            module = types.ModuleType(name)
            module.set_retro_args = module.get_retro_args = module.get_args_path = lambda *a, **k: None
            sys.modules[name] = module
        spec = importlib.util.spec_from_file_location("mds_arguments", root + "/megatron/arguments.py")
        mds = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mds)
        parser = argparse.ArgumentParser(allow_abbrev=False)
        for name in sorted(n for n in dir(mds) if n.startswith("_add_") and n.endswith("_args")):
            parser = getattr(mds, name)(parser)
        import deepspeed
        parser = deepspeed.add_config_arguments(parser)
    out = []
    for argv in cases:
        args = parser.parse_args(argv)
        out.append({k: (v if isinstance(v, (int, float, str, bool, list, type(None))) else repr(v))
                    for k, v in vars(args).items()})
    print(json.dumps(out))
''')


def parse_with_the_targets_parser(target: str, cases: list[list[str]], tmp_path: Path) -> list[dict]:
    """Each argv through the target's own argparse parser, exported from the snapshot of its sources."""
    mirror, tag, paths = {"megatron": (MEGATRON_LM, "core_v0.16.1", ["megatron/training"]),
                          "megatron-deepspeed": (MEGATRON_DEEPSPEED, "HEAD", ["megatron/arguments.py"])}[target]
    if not mirror.exists() or shutil.which("git") is None:
        pytest.skip(f"the {target} sources are not on this machine (the flag-table tests cover the output)")
    root = tmp_path / target
    root.mkdir()
    archive = subprocess.run(["git", "-C", str(mirror), "archive", tag, *paths], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    if target == "megatron":
        (root / "megatron" / "training" / "__init__.py").write_text("")  # not its import-everything package init
    proc = subprocess.run([sys.executable, "-c", PARSE, str(root), target], input=json.dumps(cases),
                          capture_output=True, text=True, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


CASES = [
    {"optimizer": {"weight_decay": 0.0, "beta2": 0.95, "clip_grad": 0.0, "lr": 3e-4},
     "scheduler": {"decay_style": "cosine", "warmup_iters": 10, "train_iters": 100},
     "launch": {"distributed_timeout_minutes": 60.0}, "batch": {"micro": 2, "global": 64}, "precision": "bf16",
     "model": {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "normalization": "RMSNorm",
               "num_query_groups": 2, "swiglu": True, "add_bias_linear": False},
     "checkpoint": {"save": "ckpt", "interval": 50}, "zero": {"stage": 1}},
    {"precision": "fp16", "loss_scaling": {"initial_scale_power": 16, "hysteresis": 4},
     "parallel": {"tp": 2, "sequence_parallel": True}, "seed": 7, "logging": {"interval": 1}},
    {"zero": {"stage": 3}, "parallel": {"pp": 1}, "model": {"num_layers": 8}, "batch": {"micro": 4}},
]


@pytest.mark.parametrize("target", ["megatron", pytest.param("megatron-deepspeed", marks=pytest.mark.slow)])
def test_the_targets_own_parser_reads_the_output(target, tmp_path):
    """(The Megatron-DeepSpeed run is slow-marked: 20-40 s of imports; its flag table is checked fast above.)
    The first case, no flags at all, checks launch/targets' defaults against the parser's."""
    cfgs = [validate(case) for case in CASES]
    outputs = [megatron_args.write_argv(cfg, target, deepspeed_config="ds.json")[0] for cfg in cfgs]
    defaults, *parsed = parse_with_the_targets_parser(target, [[], *outputs], tmp_path)
    table = megatron_args.target_flags(target)
    _assert_table_defaults(table, defaults)
    for cfg, argv, args in zip(cfgs, outputs, parsed):
        assert args["micro_batch_size"] == (cfg.batch.micro or 1)
        assert args["lr"] == cfg.optimizer.lr and args["weight_decay"] == cfg.optimizer.weight_decay
        assert args["adam_beta2"] == cfg.optimizer.beta2 and args["clip_grad"] == cfg.optimizer.clip_grad
        assert args["distributed_timeout_minutes"] == int(cfg.launch.distributed_timeout_minutes)
        assert args["lr_decay_style"] == cfg.scheduler.decay_style
        assert args["bf16"] == (cfg.precision == "bf16") and args["fp16"] == (cfg.precision == "fp16")
        assert args["initial_loss_scale"] == 2 ** cfg.loss_scaling.initial_scale_power
        assert args["tensor_model_parallel_size"] == cfg.parallel.tp
        if target == "megatron-deepspeed":
            assert args["zero_stage"] == cfg.zero.stage and args["deepspeed"] and args["deepspeed_config"] == "ds.json"
        else:
            assert args["use_distributed_optimizer"] == (cfg.zero.stage == 1)
        for flag in words_by_flag(argv):  # the table's defaults are the parser's
            dest = flag[2:].replace("-", "_")
            assert dest in args or flag in table, flag


def _assert_table_defaults(table, parsed: dict) -> None:
    """launch/targets' defaults of the flags zeromega reads and writes are the parser's."""
    read = [*megatron_args.FLAGS, *megatron_args.SPECIAL]
    checked = 0
    for flag in read:
        fact, dest = table.get(flag), flag.lstrip("-").replace("-", "_")
        if fact is None or dest not in parsed or isinstance(parsed[dest], str) and isinstance(fact.default, str) \
                and parsed[dest].startswith("<"):
            continue
        assert parsed[dest] == fact.default or same(parsed[dest], fact.default), (flag, parsed[dest], fact.default)
        checked += 1
    assert checked > 40


# ------------------------------------------------------------------ the command line


def test_translate_to_megatron_deepspeed_writes_the_deepspeed_json_beside(tmp_path, capsys):
    script = tmp_path / "run.args"
    script.write_text("--micro-batch-size 2\n--zero-stage 3\n--lr 1e-4\n--bf16\n")
    code = cli.main(["translate", str(script), "--to", "megatron-deepspeed"])
    out, err = capsys.readouterr()
    assert code == 0, err
    written = tmp_path / "run.deepspeed.json"
    flags = words_by_flag(out.replace("\\\n", " ").split())
    assert flags["--deepspeed_config"] == [str(written)] and flags["--zero-stage"] == ["3"]
    ds = json.loads(written.read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"] == {"enabled": True}
    written.write_text("{}")
    assert cli.main(["translate", str(script), "--to", "megatron-deepspeed"]) == 2  # never overwritten
    assert "exists with other content" in capsys.readouterr().err
    code = cli.main(["translate", str(script), "--to", "megatron"])
    out, err = capsys.readouterr()
    assert code == 0 and "--zero-stage" not in out and "ZeRO stage 3" in err


@pytest.mark.parametrize("data", [["--data-path", "0.3", "a", "0.7", "b"],
                                  ["--train-data-path", "t", "--valid-data-path", "v", "--test-data-path", "x"]])
def test_data_blends_ramp_up_and_sample_schedules_survive_the_megatron_writer(data):
    """Fields other helpers' flags fill (blends, per-split paths, the batch ramp-up, sample schedules, tokenizer
    files) are written back, not dropped: the written argv reads back to the same config."""
    argv = ["--micro-batch-size", "2", "--global-batch-size", "16", "--lr", "3e-4", "--num-layers", "4",
            "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "128", *data,
            "--rampup-batch-size", "4", "4", "100", "--train-samples", "1000", "--lr-warmup-samples", "10",
            "--lr-decay-samples", "900", "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "v.json",
            "--merge-file", "m.txt", "--split", "90,5,5", "--save", "ck", "--save-interval", "5"]
    cfg = read_megatron(argv)
    written, lost = megatron_args.write_argv(cfg)
    assert lost == []
    assert read_megatron(written).model_dump() == cfg.model_dump()
