"""The translator: every dialect in, one validated RunConfig out, and each dialect back out."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from zeromega.launch import cli, megatron_args, shell_script, translate
from zeromega.config.schema import RunConfig, validate
from zeromega.config.errors import ConfigError
from zeromega.config.groups import orthogonal_groups, rank_groups
from zeromega.launch.partial import flatten, same

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "configs"
HAVE_YAML = importlib.util.find_spec("yaml") is not None
needs_yaml = pytest.mark.skipif(not HAVE_YAML, reason="PyYAML is not installed (unified YAML files)")
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.filter_too_much])


def read(path, env=None, extra=()) -> RunConfig:
    return translate.resolve(translate.sources(path, env)[0] + list(extra))


# What an example's "auto"s need from the run that only the command line states (the HF Trainer's
# num_training_steps has no default: it comes from the data set and the epochs).
RUN_STATES = {"hf_zero2_auto.json": [("command line", {"scheduler": {"train_iters": 1000}})]}


MICRO1 = {"train_micro_batch_size_per_gpu": 1}  # DeepSpeed needs a micro or a global batch


def ds(data: dict) -> RunConfig:
    return translate.resolve([("DeepSpeed", translate.from_deepspeed(data))])


def assert_same(a: RunConfig, b: RunConfig) -> None:
    """Equal fields (floats to 1e-9); batch sizes compared as resolved, since unstated ones default."""
    fa, fb = flatten(a.model_dump()), flatten(b.model_dump())
    diff = {k: (fa.get(k), fb.get(k)) for k in set(fa) | set(fb)
            if not k.startswith("batch.") and not same(fa.get(k), fb.get(k))}
    assert not diff
    world = a.parallel.tp * a.parallel.pp * a.parallel.cp * a.parallel.ep * (a.parallel.etp or 1)
    assert a.layout(world) == b.layout(world)


# ------------------------------------------------------------------ DeepSpeed JSON in


def test_hf_trainer_auto_config_resolves_from_world_size(tmp_path):
    cfg = read(EXAMPLES / "hf_zero2_auto.json", extra=RUN_STATES["hf_zero2_auto.json"])
    assert cfg.batch.micro == 8 and cfg.batch.global_ is None  # the Trainer's per-device batch; global derived
    assert cfg.zero.stage == 2 and cfg.zero.offload_optimizer.device == "cpu"
    assert cfg.scheduler.decay_style == "linear" and cfg.scheduler.warmup_style == "log"
    layout = cfg.layout(8)
    assert (layout.micro, layout.accumulation, layout.global_batch) == (8, 1, 64)
    assert cfg.ddp.overlap_grad_reduce is True  # read into the ddp section
    zero = translate.to_deepspeed(cfg)["zero_optimization"]
    assert zero["overlap_comm"] is True and zero["reduce_bucket_size"] == 2e8  # and written back


def test_auto_batch_filled_from_megatron_flags():
    partial = translate.from_deepspeed({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                                        "gradient_accumulation_steps": 4})
    flags = translate.from_megatron_args(["--micro-batch-size", "2"])[0]
    layout = translate.resolve([("ds", partial), ("flags", flags)]).layout(8)
    assert (layout.micro, layout.accumulation, layout.global_batch) == (2, 4, 64)


def test_auto_lr_and_warmup_max_lr_come_from_one_place():
    cfg = ds({**MICRO1, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
              "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 3e-4, "warmup_num_steps": 10}}})
    assert cfg.optimizer.lr == 3e-4 and cfg.scheduler.warmup_iters == 10
    with pytest.raises(ConfigError, match="optimizer.lr"):
        ds({**MICRO1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 3e-4}}})


def test_zero3_auto_buckets_from_hidden_size():
    cfg = read(EXAMPLES / "zero3_offload_cpu.json")  # Hjson comments, trailing comma, "auto"s
    zero = cfg.deepspeed_extra["zero_optimization"]
    assert zero["reduce_bucket_size"] == 1024 * 1024
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 1024 * 1024)
    assert zero["stage3_param_persistence_threshold"] == 10 * 1024
    assert cfg.parallel.tp == 2 and cfg.zero.offload_param.device == "cpu"
    with pytest.raises(ConfigError, match="zero_optimization.reduce_bucket_size='auto'.*hidden size"):
        ds({**MICRO1, "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}})


def test_auto_nothing_can_fill_is_rejected():
    with pytest.raises(ConfigError, match="flops_profiler.enabled='auto'"):
        ds({**MICRO1, "flops_profiler": {"enabled": "auto"}})


def test_nvme_config_with_aio_and_cosine_ratios():
    cfg = read(EXAMPLES / "zero3_nvme.json")
    assert cfg.zero.offload_param.nvme_path == "/local_nvme" and cfg.zero.aio.queue_depth == 16
    assert cfg.precision == "fp16" and cfg.loss_scaling.initial_scale_power == 12
    assert cfg.scheduler.decay_style == "cosine" and math.isclose(cfg.scheduler.min_lr, 3e-5)
    assert cfg.optimizer.lr == 3e-4 and cfg.optimizer.weight_decay == 0.1
    assert "optimizer" not in cfg.deepspeed_extra  # plain (decoupled) Adam: zeromega's own AdamW


def test_legacy_spellings():
    cfg = read(EXAMPLES / "legacy_cpu_offload.json")
    assert cfg.precision == "bf16"  # "bfloat16"
    assert cfg.zero.offload_optimizer.device == "cpu" and cfg.zero.offload_optimizer.pin_memory is False
    assert cfg.optimizer.clip_grad == 1.0  # optimizer.params.max_grad_norm
    assert "cpu_offload" not in cfg.deepspeed_extra["zero_optimization"]
    old = ds({**MICRO1, "zero_optimization": True, "allgather_size": 100})
    assert old.zero.stage == 1 and old.deepspeed_extra["zero_optimization"]["allgather_bucket_size"] == 100
    alias = ds({**MICRO1, "zero_optimization": {"stage": 3, "prefetch_bucket_size": 7,
                                      "stage3_gather_fp16_weights_on_model_save": True}})
    zero = alias.deepspeed_extra["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == 7 and zero["stage3_gather_16bit_weights_on_model_save"]
    with pytest.raises(ConfigError, match="prefetch_bucket_size"):
        ds({**MICRO1, "zero_optimization": {"prefetch_bucket_size": 7, "stage3_prefetch_bucket_size": 8}})
    with pytest.raises(ConfigError, match="cpu_offload"):
        ds({**MICRO1, "zero_optimization": {"stage": 2, "cpu_offload": True,
                                            "offload_optimizer": {"device": "cpu"}}})


@pytest.mark.parametrize("text,problem", [
    ('{"zero_optimization": ', "not valid JSON"),
    ('{"a": 1, "a": 2}', "duplicate key 'a'"),
    ("[1, 2]", "top level is not a JSON object"),
])
def test_malformed_files_name_the_problem(tmp_path, text, problem):
    path = tmp_path / "ds.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        read(path)


@needs_yaml
def test_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("parallel:\n  tp: [2\n")
    with pytest.raises(ConfigError, match=r"line \d+ column \d+"):
        read(path)


@pytest.mark.parametrize("data,named", [
    ({"optimizer": {"type": "AdamW", "params": {"betas": 0.9}}}, "optimizer.params.betas=0.9: cannot read it"),
    ({"train_micro_batch_size_per_gpu": "two"}, "train_micro_batch_size_per_gpu='two': cannot read it"),
    ({"zero_optimization": [1]}, "zero_optimization=[1]: cannot read it"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "fp16.enabled=True: fp16 and bf16"),
    ({"zeromega": {"tpp": 2}}, "zeromega.tpp=2: unknown key"),
    ({"zero_optimization": {"offload_param": {"device": "disk"}}}, "zero_optimization.offload_param.device"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_stepz": 5}}}, "scheduler.params.warmup_num_stepz"),
])
def test_wrong_shapes_are_config_errors(data, named):
    with pytest.raises(ConfigError) as err:
        ds(data)
    assert str(err.value).startswith(named), str(err.value)


# Keys a fuzzed config is built from: DeepSpeed's own, at the nesting where DeepSpeed reads them.
_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**9), st.floats(allow_nan=True),
                  st.sampled_from(["auto", "cpu", "nvme", "none", "AdamW", "WarmupLR", "", "x"]),
                  st.lists(st.integers(0, 3), max_size=3))
_KEYS = st.sampled_from(["train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                         "gradient_clipping", "zero_optimization", "stage", "offload_param", "offload_optimizer",
                         "device", "nvme_path", "pin_memory", "fp16", "bf16", "bfloat16", "enabled", "optimizer",
                         "type", "params", "lr", "betas", "scheduler", "warmup_num_steps", "zeromega", "tp", "cp",
                         "aio", "queue_depth", "cpu_offload", "steps_per_print", "sequence_parallel_size"])
_TREE = st.recursive(_LEAF, lambda inner: st.dictionaries(_KEYS, inner, max_size=5), max_leaves=20)


@FAST
@given(st.dictionaries(_KEYS, _TREE, max_size=8))
def test_fuzzed_deepspeed_configs_fail_cleanly(data):
    try:
        cfg = ds(data)
    except ConfigError as err:
        assert "; fix: " in str(err) and "\n" not in str(err)
        return
    translate.to_deepspeed_file(cfg)  # whatever reads also writes


# ------------------------------------------------------------------ Megatron in


def test_a_data_blend_is_read_whole_not_as_one_path():
    partial, unknown = translate.from_megatron_args(["--data-path", "0.3", "a", "0.7", "b", "--split", "9,1,0"])
    assert unknown == [] and partial["data"] == {"blend": ["0.3", "a", "0.7", "b"], "split": "9,1,0"}


def test_megatron_flags_map_and_unknown_are_kept():
    partial, unknown = translate.from_megatron_args(
        ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--context-parallel-size=4",
         "--cp-comm-type", "a2a+p2p", "--hierarchical-context-parallel-sizes", "2", "2", "--num-experts", "8",
         "--disable-bias-linear",  # MoE biases only at expert tp 1 (here etp = tp 2)
         "--moe-router-topk", "2", "--expert-model-parallel-size", "2", "--use-distributed-optimizer",
         "--recompute-activations", "--data-path", "corpus_text_document", "--fp16", "--initial-loss-scale", "4096",
         "--no-bias", "--save", "ck", "--save-interval", "10"])
    assert unknown == ["--no-bias"]
    assert partial["data"]["path"] == "corpus_text_document"
    cfg = validate(partial)
    assert (cfg.parallel.tp, cfg.parallel.cp, cfg.parallel.ep, cfg.parallel.sequence_parallel) == (2, 4, 2, True)
    assert (cfg.sequence.mode, cfg.sequence.ulysses, cfg.sequence.ring) == ("usp", 2, 2)
    assert cfg.zero.stage == 1 and cfg.recompute.granularity == "selective"
    assert cfg.precision == "fp16" and cfg.loss_scaling.initial_scale_power == 12
    assert cfg.moe.num_experts == 8 and cfg.checkpoint.interval == 10


def test_expert_tensor_parallel_size_reaches_megatron_core():
    cfg = validate(translate.from_megatron_args(["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                                 "--expert-model-parallel-size", "2",
                                                 "--expert-tensor-parallel-size", "1"])[0])
    assert cfg.parallel.etp == 1
    assert megatron_args.megatron_core_fields(cfg)["expert_tensor_parallel_size"] == 1
    assert "--expert-tensor-parallel-size" in translate.to_megatron_argv(cfg)
    unstated = validate(translate.from_megatron_args(["--tensor-model-parallel-size", "2"])[0])
    assert unstated.parallel.etp is None  # Megatron's default: etp = tp
    assert megatron_args.megatron_core_fields(unstated)["expert_tensor_parallel_size"] == 2


@pytest.mark.parametrize("argv,mode,sizes", [
    (["--context-parallel-size", "4"], "ring", (1, 4)),
    (["--context-parallel-size", "4", "--cp-comm-type", "p2p"], "ring", (1, 4)),
    (["--context-parallel-size", "4", "--cp-comm-type", "a2a"], "ulysses", (4, 1)),
    (["--ds-sequence-parallel-size", "4"], "ulysses", (4, 1)),
])
def test_megatron_sequence_modes(argv, mode, sizes):
    cfg = validate(translate.from_megatron_args(argv)[0])
    assert (cfg.sequence.mode, (cfg.sequence.ulysses, cfg.sequence.ring), cfg.parallel.cp) == (mode, sizes, 4)


@pytest.mark.parametrize("argv,named", [
    (["--tensor-model-parallel-size", "x"], "--tensor-model-parallel-size='x': invalid int value"),
    (["--bf16", "--fp16"], "--fp16=True: --fp16 and --bf16"),
    (["--micro-batch-size"], "--micro-batch-size=None: expected a value"),
    (["--sequence-parallel=1"], "--sequence-parallel='1': is a switch"),
    (["--cp-comm-type", "allgather"], "--cp-comm-type='allgather'"),
    (["--cp-comm-type", "a2a+p2p"], "--hierarchical-context-parallel-sizes=None"),
    (["--tensor-model-parallel-size", "$TP"], "--tensor-model-parallel-size='$TP': uses the shell variable TP"),
    (["--recompute-granularity", "half"], "--recompute-granularity='half': cannot read it"),
    (["--zero-stage", "0", "--use-distributed-optimizer"], "--zero-stage=0"),
    (["--initial-loss-scale", "1000"], "--initial-loss-scale=1000.0: is not a power of two"),
])
def test_bad_megatron_arguments(argv, named):
    with pytest.raises(ConfigError) as err:
        translate.from_megatron_args(argv)
    assert str(err.value).startswith(named), str(err.value)


def test_megatron_lm_script_with_arrays():
    cfg = read(EXAMPLES / "megatron_lm_gpt_cp.sh")
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp) == (4, 2, 4)
    assert (cfg.sequence.mode, cfg.sequence.ulysses, cfg.sequence.ring) == ("usp", 2, 2)
    assert cfg.parallel.layers_per_virtual_stage == 4 and cfg.recompute.method == "uniform"
    assert cfg.launch.nproc_per_node == 8 and cfg.launch.nnodes == 4
    assert cfg.checkpoint.save == "checkpoints/gpt_cp" and cfg.zero.stage == 1
    assert read(EXAMPLES / "megatron_lm_gpt_cp.sh", {"NUM_NODES": "2"}).launch.nnodes == 2


def test_megatron_deepspeed_script_reads_its_heredoc_config():
    found, unknown = translate.sources(EXAMPLES / "megatron_deepspeed_gpt.sh")
    assert any("written by the script" in name for name, _ in found)
    cfg = translate.resolve(found)
    assert (cfg.sequence.mode, cfg.parallel.cp, cfg.zero.stage, cfg.precision) == ("ulysses", 2, 1, "bf16")
    assert cfg.launch.nproc_per_node == 8 and cfg.logging.interval == 10
    from zeromega.launch import megatron_args

    assert unknown == []  # speed-only flags: accepted with the one-line note (megatron_args.NOTED)
    assert {"--use-flash-attn-v2", "--deepspeed-activation-checkpointing"} <= set(megatron_args.NOTED)


def test_script_variables_unset_resolved_and_arithmetic(tmp_path):
    script = tmp_path / "run.sh"
    script.write_text("MBS=2\nGBS=$(( MBS * 16 ))\npython train.py --micro-batch-size $MBS \\\n"
                      "  --global-batch-size ${GBS} --tensor-model-parallel-size $TP  # tp from outside\n")
    with pytest.raises(ConfigError, match="variable TP"):
        read(script)
    cfg = read(script, {"TP": "2"})
    assert (cfg.batch.micro, cfg.batch.global_, cfg.parallel.tp) == (2, 32, 2)


def test_argv_file_without_a_command(tmp_path):
    args = tmp_path / "train.args"
    args.write_text("--tensor-model-parallel-size 2\n--micro-batch-size 4\n")
    assert translate.detect(args) == "megatron"
    assert shell_script.read(args.read_text()).argv == ["--tensor-model-parallel-size", "2", "--micro-batch-size", "4"]


def test_values_in_two_dialects_must_agree(tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True}}))
    translate.build(str(config), ["--micro-batch-size", "4", "--bf16", "--lr", "1e-4"])  # agreeing is fine
    with pytest.raises(ConfigError, match="batch.micro=2: command-line arguments sets 2"):
        translate.build(str(config), ["--micro-batch-size", "2", "--lr", "1e-4"])
    with pytest.raises(ConfigError, match="precision='fp16'"):
        translate.build(str(config), ["--fp16", "--lr", "1e-4"])


def test_a_megatron_script_without_lr_is_refused(capsys):
    from zeromega.launch import script_args

    with pytest.raises(SystemExit) as stop:
        script_args.read(["--num-layers", "2"], "pretrain_gpt.py")
    assert stop.value.code == 2
    assert "optimizer.lr=None" in capsys.readouterr().err


def test_megatron_flags_take_megatron_lms_defaults_and_a_deepspeed_json_deepspeeds(tmp_path):
    """Unstated values take their dialect's defaults: Megatron-LM's for a Megatron script, DeepSpeed 0.19's
    for what a DeepSpeed JSON leaves unstated."""
    megatron = translate.build(None, ["--lr", "1e-4"])
    assert (megatron.optimizer.weight_decay, megatron.optimizer.clip_grad, megatron.optimizer.beta2) == (0.01, 1.0, 0.999)
    assert (megatron.scheduler.decay_style, megatron.loss_scaling.initial_scale_power) == ("linear", 32)
    assert megatron.logging.interval == 100
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4,
                                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}))
    alone = translate.build(str(config))  # a DeepSpeed user's own train.py: DeepSpeed's defaults throughout
    assert (alone.optimizer.weight_decay, alone.optimizer.clip_grad, alone.optimizer.beta2) == (0.0, 0.0, 0.999)
    assert (alone.scheduler.decay_style, alone.loss_scaling.initial_scale_power, alone.logging.interval) == \
        ("constant", 16, 10)
    # Megatron-DeepSpeed: the JSON owns clipping and loss scaling, Megatron's flags the schedule
    mixed = translate.build(str(config), ["--lr", "1e-4"])
    assert (mixed.optimizer.clip_grad, mixed.loss_scaling.initial_scale_power) == (0.0, 16)
    assert (mixed.scheduler.decay_style, mixed.optimizer.weight_decay) == ("linear", 0.0)


# ------------------------------------------------------------------ writers


@pytest.fixture(scope="module")
def deepspeed_config_class():
    """DeepSpeedConfig with a fake rank/dp, so it checks batch arithmetic without torch.distributed."""
    import deepspeed.runtime.config as dsc

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    original = dsc.dist.get_rank
    dsc.dist.get_rank = lambda *args, **kwargs: 0
    yield dsc.DeepSpeedConfig
    dsc.dist.get_rank = original


class _MPU:
    def __init__(self, dp):
        self.dp = dp

    def get_data_parallel_world_size(self):
        return self.dp


ALL_EXAMPLES = sorted(p.name for p in EXAMPLES.iterdir() if HAVE_YAML or p.suffix != ".yaml")


@pytest.mark.parametrize("name", ALL_EXAMPLES)
def test_examples_write_back_out(name, deepspeed_config_class):
    cfg = read(EXAMPLES / name, extra=RUN_STATES.get(name, ()))
    layout = cfg.layout(32)
    for lay in (None, layout):  # the DeepSpeed file reads back to the same config
        assert_same(read_ds_dict(translate.to_deepspeed_file(cfg, lay)), cfg) if lay is None else None
    written = translate.to_deepspeed_file(cfg, layout)
    checked = deepspeed_config_class(written, mpu=_MPU(layout.dp))
    assert checked.train_batch_size == layout.global_batch
    assert checked.zero_optimization_stage == cfg.zero.stage
    shape = {k: v for k, v in {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 8}.items()
             if getattr(cfg.model, k) is None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        core = megatron_args.transformer_config(cfg, **shape)  # MoE biases only at etp 1: checked by read
    assert core.tensor_model_parallel_size == cfg.parallel.tp
    assert core.context_parallel_size == cfg.parallel.cp


def test_deepspeed_batch_counts_cp_ranks_as_data_parallel():
    cfg = validate({"parallel": {"cp": 2}, "batch": {"micro": 2, "global": 16}})
    layout = cfg.layout(8)  # dp 4
    assert translate.to_deepspeed(cfg, layout)["train_batch_size"] == 2 * 2 * 4 * 2  # micro x acc x (dp x cp)
    standalone = translate.to_deepspeed_file(cfg, layout)
    assert "train_batch_size" not in standalone and standalone["gradient_accumulation_steps"] == 2
    assert ds(standalone).layout(8) == layout


def read_ds_dict(data: dict) -> RunConfig:
    return ds(data)


def test_engine_config_keeps_its_behaviour():
    cfg = translate.build(str(EXAMPLES / "zero1.json"))
    written = translate.to_deepspeed(cfg, cfg.layout(2), "cpu")
    assert "optimizer" not in written and written["steps_per_print"] == 10**9  # zeromega builds AdamW
    assert written["zero_optimization"]["reduce_bucket_size"] == int(2e7)
    assert (written["train_batch_size"], written["gradient_clipping"]) == (16, 1.0)


@needs_yaml
def test_unified_yaml_round_trip(tmp_path):
    cfg = read(EXAMPLES / "unified_moe_ulysses.yaml")
    assert (cfg.sequence.ulysses, cfg.parallel.cp, cfg.moe.num_experts) == (2, 2, 8)
    for suffix, fmt in ((".yaml", "yaml"), (".json", "json")):
        path = tmp_path / f"out{suffix}"
        path.write_text(translate.dumps(translate.to_unified(cfg), fmt))
        assert translate.detect(path) == "zeromega"
        assert read(path) == cfg


# ------------------------------------------------------------------ round trips (hypothesis)

_POS = st.sampled_from([1, 2, 4])


@st.composite
def unified_configs(draw, megatron_only: bool = False):
    """Valid unified configs; ``megatron_only`` keeps to fields Megatron-LM flags can say."""
    tp, pp = draw(_POS), draw(st.sampled_from([1, 2]))
    mode = draw(st.sampled_from(["none", "ulysses", "ring", "usp"]))
    sequence = {"mode": mode}
    if mode in ("ulysses", "usp"):
        sequence["ulysses"] = draw(st.sampled_from([1, 2]))
    if mode in ("ring", "usp"):
        sequence["ring"] = draw(st.sampled_from([1, 2]))
    stage = draw(st.sampled_from([0, 1] if pp > 1 else [0, 1, 2, 3]))
    data = {
        "parallel": {"tp": tp, "pp": pp, "ep": draw(st.sampled_from([1, 2])),
                     "etp": draw(st.sampled_from([None, 1, 2])),
                     "sequence_parallel": tp > 1 and draw(st.booleans())},
        "sequence": sequence,
        "zero": {"stage": stage},
        "batch": {"micro": draw(_POS)},
        "optimizer": {"lr": draw(st.sampled_from([1e-4, 3e-4, 6e-5])), "clip_grad": draw(st.sampled_from([0.0, 1.0])),
                      "weight_decay": draw(st.sampled_from([0.0, 0.1])), "beta2": draw(st.sampled_from([0.95, 0.999])),
                      "eps": draw(st.sampled_from([1e-8, 1e-6]))},
        "scheduler": {"decay_style": draw(st.sampled_from(["constant", "linear", "cosine"])),
                      "warmup_iters": draw(st.sampled_from([0, 10, 100])),
                      "min_lr": draw(st.sampled_from([0.0, 1e-6])),
                      "train_iters": draw(st.sampled_from([None, 1000]))},
        "precision": draw(st.sampled_from(["fp32", "bf16", "fp16"])),
        "loss_scaling": {"initial_scale_power": draw(st.sampled_from([12, 16])),
                         "hysteresis": draw(st.sampled_from([1, 2]))},
        "moe": {"num_experts": draw(st.sampled_from([None, 4, 8])), "topk": draw(st.sampled_from([1, 2]))},
        "model": {"num_layers": draw(st.sampled_from([None, 8])), "num_attention_heads": draw(st.sampled_from([None, 16])),
                  "seq_length": draw(st.sampled_from([None, 1024]))},
    }
    if draw(st.booleans()):
        data["batch"]["global"] = data["batch"]["micro"] * draw(_POS) * 64
    if draw(st.booleans()):
        data["recompute"] = {"granularity": "full", "method": draw(st.sampled_from(["uniform", "block"])),
                             "num_layers": 1}
    if draw(st.booleans()):
        data["checkpoint"] = {"save": "ck", "load": draw(st.sampled_from([None, "ck"])), "interval": 100}
    if megatron_only:
        data["scheduler"]["warmup_init_lr"] = 0.0
    else:
        data["batch"]["accumulation"] = None if "global" in data["batch"] else draw(st.sampled_from([None, 2]))
        data["scheduler"]["warmup_style"] = draw(st.sampled_from(["linear", "log"]))
        data["zero"]["aio"] = {"queue_depth": draw(st.sampled_from([8, 32]))}
        if stage >= 1:
            devices = ["none", "cpu", "nvme"]
            data["zero"]["offload_optimizer"] = {"device": draw(st.sampled_from(devices)), "nvme_path": "/nvme"}
            if stage == 3:
                data["zero"]["offload_param"] = {"device": draw(st.sampled_from(devices)), "nvme_path": "/nvme",
                                                 "pin_memory": draw(st.booleans())}
        data["logging"] = {"interval": draw(st.sampled_from([None, 10])),
                           "metrics_path": draw(st.sampled_from([None, "m.jsonl"]))}
        data["launch"] = {"nproc_per_node": draw(st.sampled_from([None, 8]))}
        data["device"] = draw(st.sampled_from(["auto", "cuda"]))
    try:
        return validate(data)
    except ConfigError:
        assume(False)


@FAST
@given(unified_configs())
def test_unified_to_deepspeed_to_unified_is_identity(cfg):
    assert_same(ds(translate.to_deepspeed_file(cfg)), cfg)


@FAST
@given(unified_configs(megatron_only=True))
def test_unified_to_megatron_argv_to_unified_is_identity(cfg):
    # Megatron-LM has no ZeRO stage beyond its distributed optimizer (ZeRO-1): a higher stage is named, not
    # written; Megatron-DeepSpeed's --zero-stage carries it
    argv, lost = megatron_args.write_argv(cfg)
    assert (cfg.zero.stage > 1) == any("ZeRO stage" in note for note in lost)
    back = validate(translate.from_megatron_args(argv)[0])
    assert_same(back, cfg.model_copy(update={"zero": back.zero}) if cfg.zero.stage > 1 else cfg)
    argv, lost = megatron_args.write_argv(cfg, "megatron-deepspeed")
    try:
        again = validate(translate.from_megatron_args(argv)[0])
    except ConfigError as err:  # expert tp 1 has no Megatron-DeepSpeed flag (said in lost): MoE biases then refused
        assert err.field == "model.add_bias_linear" and any("--expert-tensor-parallel-size" in n for n in lost), err
        return
    assert again.zero.stage == cfg.zero.stage


_FLAG_VALUES = {
    "--tensor-model-parallel-size": ["1", "2", "4"], "--pipeline-model-parallel-size": ["1", "2"],
    "--context-parallel-size": ["1", "2", "4"], "--cp-comm-type": ["p2p", "a2a"],
    "--micro-batch-size": ["1", "2"], "--global-batch-size": ["64", "128"], "--lr": ["0.0003", "1e-4"],
    "--zero-stage": ["0", "1"], "--lr-decay-style": ["cosine", "linear"], "--lr-warmup-iters": ["0", "5"],
    "--num-attention-heads": ["16", "32"], "--seq-length": ["2048"], "--train-iters": ["100"],
    "--num-experts": ["4"], "--expert-model-parallel-size": ["1", "2"], "--expert-tensor-parallel-size": ["1", "2"],
    "--hysteresis": ["3"],
    "--sequence-parallel": [None], "--bf16": [None], "--use-distributed-optimizer": [None],
    "--recompute-activations": [None],
}


@FAST
@given(st.dictionaries(st.sampled_from(sorted(_FLAG_VALUES)), st.integers(0, 2), max_size=10))
def test_megatron_argv_to_unified_to_argv_keeps_every_field(choice):
    argv = []
    for flag, index in choice.items():
        values = _FLAG_VALUES[flag]
        value = values[index % len(values)]
        argv += [flag] if value is None else [flag, value]
    try:
        cfg = validate(translate.from_megatron_args(argv)[0])
    except ConfigError:
        assume(False)
    again = translate.to_megatron_argv(cfg)
    assert_same(validate(translate.from_megatron_args(again)[0]), cfg)


# ------------------------------------------------------------------ groups


def test_groups_for_tp2_pp2_cp2():
    layout = validate({"parallel": {"tp": 2, "pp": 2, "cp": 2}}).layout(8)
    groups = rank_groups(layout)
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["cp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["dp"] == [[0], [1], [2], [3], [4], [5], [6], [7]]
    assert groups["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups["dp-cp"] == groups["cp"]


def test_usp_splits_cp_like_hierarchical_context_parallel():
    layout = validate({"sequence": {"mode": "usp", "ulysses": 2, "ring": 2}}).layout(4)
    groups = rank_groups(layout)
    assert groups["ulysses"] == [[0, 1], [2, 3]] and groups["ring"] == [[0, 2], [1, 3]]


@pytest.mark.parametrize("tp,pp,cp,ep,world,etp", [(1, 1, 1, 1, 8, None), (2, 2, 1, 2, 16, None),
                                                  (2, 1, 2, 1, 8, None), (4, 2, 2, 1, 32, None),
                                                  (1, 2, 1, 4, 16, None), (2, 2, 2, 2, 16, None),
                                                  (2, 1, 1, 2, 2, 1), (4, 1, 1, 2, 8, 2)])
def test_groups_match_megatron_rank_generator(tp, pp, cp, ep, world, etp):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.parallel_state import RankGenerator
    layout = validate({"parallel": {"tp": tp, "pp": pp, "cp": cp, "ep": ep, "etp": etp}}).layout(world)
    dp = world // (tp * pp * cp)
    dense = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
    et = etp or tp
    expert = RankGenerator(tp=et, ep=ep, dp=world // (et * ep * pp), pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    groups = rank_groups(layout)
    for kind in ("tp", "cp", "dp", "dp-cp", "pp"):
        assert groups[kind] == dense.get_ranks(kind), kind
    assert groups["ep"] == expert.get_ranks("ep") and groups["expert-dp"] == expert.get_ranks("dp")
    assert groups["expert-tp"] == expert.get_ranks("tp")
    assert orthogonal_groups({"tp": tp, "pp": pp}, "tp-pp") == RankGenerator(tp, 1, 1, pp, 1, "tp-pp").get_ranks(
        "tp-pp")


# ------------------------------------------------------------------ CLI


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@needs_yaml
def test_cli_translate_to_each_dialect(capsys):
    path = str(EXAMPLES / "megatron_lm_gpt_cp.sh")
    code, out, err = run_cli(capsys, "translate", path, "--to", "deepspeed", "--world-size", "64")
    written = json.loads(out)
    assert code == 0 and written["zeromega"]["parallel"]["tp"] == 4  # world 64 = tp 4 x pp 2 x cp 4 x dp 2
    assert (written["train_micro_batch_size_per_gpu"], written["gradient_accumulation_steps"]) == (1, 32)
    code, out, err = run_cli(capsys, "translate", path, "--to", "megatron")
    assert code == 0 and "--cp-comm-type a2a+p2p \\\n" in out and "--init-method-std 0.006" in out
    code, out, _ = run_cli(capsys, "translate", path, "--to", "megatron-core")
    assert code == 0 and json.loads(out)["hierarchical_context_parallel_sizes"] == [2, 2]
    code, out, err = run_cli(capsys, "translate", str(EXAMPLES / "zero3_nvme.json"), "--to", "zeromega",
                             "--format", "yaml")
    assert code == 0 and "nvme_path: /local_nvme" in out
    code, out, err = run_cli(capsys, "translate", str(EXAMPLES / "zero3_nvme.json"), "--to", "megatron")
    assert code == 0 and "not expressible as Megatron-LM flags: " in err and "zero.offload_param.device" in err


@needs_yaml
def test_cli_check_prints_layout_and_groups(capsys):
    code, out, _ = run_cli(capsys, "check", str(EXAMPLES / "unified_moe_ulysses.yaml"))  # world from launch
    assert code == 0
    assert "world 16 = tp 2 x pp 1 x cp 2 x dp 4" in out and "global 64 = micro 2 x accumulation 8 x dp 4" in out
    code, out, _ = run_cli(capsys, "check", str(EXAMPLES / "zero1.json"), "--world-size", "4", "--json")
    report = json.loads(out)
    assert report["groups"]["dp"] == [[0, 1, 2, 3]] and report["layout"]["global_batch"] == 32


@pytest.mark.parametrize("argv,problem", [
    (["check", "zero1.json"], "--world-size is missing"),
    (["check", "zero1.json", "--world-size", "0"], "must be >= 1"),
    (["check", "tp2.json", "--world-size", "3"], "world_size=3: not divisible"),
    (["check", "nope.json", "--world-size", "2"], "no such file"),
    (["translate", "tp2.json", "--to", "deepspeed", "--world-size", "3"], "world_size=3"),
    (["translate", "tp2.json", "--to", "fairscale"], "invalid choice"),
    (["translate", "run.sh", "--to", "zeromega"], "variable TP"),
    (["translate", "run.sh", "--to", "zeromega", "--env", "TP"], "is not NAME=VALUE"),
    (["check", "heads.json", "--world-size", "2"], "model.num_attention_heads=6"),
])
def test_cli_bad_input_is_one_line_exit_2(capsys, tmp_path, monkeypatch, argv, problem):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zero1.json").write_text((EXAMPLES / "zero1.json").read_text())
    (tmp_path / "tp2.json").write_text('{"zeromega": {"tp": 2}, "train_micro_batch_size_per_gpu": 1}')
    (tmp_path / "heads.json").write_text('{"zeromega": {"tp": 2, "model": {"num_attention_heads": 6}},'
                                         ' "zero_optimization": {"stage": 1}, "train_batch_size": 8}'.replace('"tp": 2', '"tp": 4'))
    (tmp_path / "run.sh").write_text("python train.py --tensor-model-parallel-size $TP\n")
    code, out, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and out == ""
    assert lines[0].startswith(f"zeromega {argv[0]}: error: ") and "; fix: " in lines[0]
    assert problem in lines[0], lines[0]


def test_megatron_sequence_parallel_at_tp1_is_turned_off_with_a_warning():
    """Megatron-LM warns and disables --sequence-parallel at tp 1; zeromega's own dialect refuses it."""
    with pytest.warns(UserWarning, match="disabling sequence parallelism"):
        cfg = translate.build(None, ["--sequence-parallel", "--lr", "1e-4"])
    assert cfg.parallel.sequence_parallel is False and cfg.sequence.mode == "none"
    assert translate.build(None, ["--sequence-parallel", "--tensor-model-parallel-size", "2"]).parallel.sequence_parallel
    with pytest.raises(ConfigError, match="parallel.sequence_parallel"):
        validate({"parallel": {"sequence_parallel": True}})


# ------------------------------------------------------------------ Megatron-LM's semantics (core_v0.16.1)


def megatron(*argv: str, ds: dict | None = None) -> RunConfig:
    found = [("command-line arguments", translate.from_megatron_args(list(argv))[0])]
    if ds is not None:
        found.insert(0, ("DeepSpeed config ds.json", translate.from_deepspeed(ds)))
    return translate.resolve(found, megatron=True)


def test_save_interval_without_save_saves_nothing_as_megatron_lm():
    with pytest.warns(UserWarning, match="without --save: nothing is saved"):
        cfg = megatron("--micro-batch-size", "1", "--save-interval", "10")
    assert cfg.checkpoint.interval is None and cfg.checkpoint.save is None
    with pytest.raises(ConfigError, match="checkpoint.interval"):  # zeromega's own dialect still refuses it
        validate({"checkpoint": {"interval": 10}})


def test_save_without_save_interval_is_refused_as_megatron_lm_refuses_it():
    with pytest.raises(ConfigError) as err:
        megatron("--micro-batch-size", "1", "--train-iters", "6", "--save", "ckpt")
    assert err.value.field == "--save" and "--save-interval" in err.value.fix and "6" in err.value.fix
    assert "\n" not in str(err.value)
    cfg = megatron("--micro-batch-size", "1", "--save", "ckpt", "--save-interval", "3")
    assert cfg.checkpoint.save == "ckpt" and cfg.checkpoint.interval == 3


def test_static_loss_scale_next_to_a_configs_dynamic_scale_is_a_conflict():
    dynamic = {"train_micro_batch_size_per_gpu": 1, "fp16": {"enabled": True, "initial_scale_power": 12}}
    with pytest.raises(ConfigError) as err:
        megatron("--fp16", "--loss-scale", "128", ds=dynamic)
    assert err.value.field == "--loss-scale" and "fp16.initial_scale_power=12" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="loss_scaling.loss_scale"):  # the JSON's explicit dynamic 0 disagrees
        megatron("--fp16", "--loss-scale", "128", ds={**dynamic, "fp16": {"enabled": True, "loss_scale": 0}})
    assert megatron("--fp16", "--loss-scale", "128", ds={"train_micro_batch_size_per_gpu": 1}).loss_scaling.loss_scale \
        == 128.0  # no dynamic setting stated: no conflict


@pytest.mark.parametrize("rampup, ok", [(["16", "16", "1000"], True), (["16", "20", "1000"], False),
                                        (["128", "16", "1000"], False)])
def test_rampup_that_does_not_end_at_the_global_batch_is_refused(rampup, ok):
    from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator

    start, increment, samples = map(int, rampup)
    try:  # Megatron-Core's own calculator is the reference
        RampupBatchsizeNumMicroBatchesCalculator(64, 1, 1, False, 0, start, increment, samples)
        accepted = True
    except AssertionError:
        accepted = False
    assert accepted == ok
    argv = ["--micro-batch-size", "1", "--global-batch-size", "64", "--rampup-batch-size", *rampup,
            "--train-samples", "10000"]
    if ok:
        assert megatron(*argv).batch.rampup == (start, increment, samples)
    else:
        with pytest.raises(ConfigError, match="never ends at the global batch 64"):
            megatron(*argv)


def test_load_of_a_directory_without_a_checkpoint_starts_fresh_with_a_warning(tmp_path):
    from zeromega.checkpoint import CheckpointError, resolve_load
    from zeromega.run.checkpointing import CheckpointPolicy

    class Checkpointer:  # the engines' load: the directory as zeromega.checkpoint resolves it
        def load(self, load_dir, allow_empty=False, load_rng=True):
            assert resolve_load(load_dir, allow_empty) is None
            return None

    empty = tmp_path / "empty"
    empty.mkdir()
    for where in (empty, tmp_path / "missing"):
        cfg = validate({"checkpoint": {"load": str(where), "save": str(tmp_path / "out")}})
        with pytest.warns(UserWarning, match="no checkpoint there; starting from random weights"):
            assert CheckpointPolicy(cfg, Checkpointer(), 8).resume() == (0, 0)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("not a checkpoint")
    cfg = validate({"checkpoint": {"load": str(tmp_path / "foreign")}})
    with pytest.raises(CheckpointError, match="no zeromega checkpoint"):  # never started over silently
        CheckpointPolicy(cfg, Checkpointer(), 8).resume()


def test_vocabulary_multiple_in_a_config_and_megatron_flags_is_compared_as_the_user_wrote_it(tmp_path):
    """Megatron flags hold the multiple as Megatron-LM's product (--make-vocab-size-divisible-by x tp); a unified
    config states the field itself. Its value wins over the flags' implied default at tp 2 (no conflict with a
    256 nobody typed); a typed flag agrees when it pads to the same multiple; a real conflict is one line naming
    the user's own values and both fixes; a flag next to a config's tp is multiplied by that tp."""
    yaml = tmp_path / "run.yaml"
    yaml.write_text("model:\n  make_vocab_size_divisible_by: 128\n")
    tp2 = ["--tensor-model-parallel-size", "2"]
    for argv in (tp2, [*tp2, "--make-vocab-size-divisible-by", "64"], ["--make-vocab-size-divisible-by", "128"]):
        cfg = translate.build(str(yaml), argv)
        assert cfg.model.make_vocab_size_divisible_by == 128, argv
    with pytest.raises(ConfigError) as err:  # Megatron-LM pads to 256 here, the config to 128
        translate.build(str(yaml), [*tp2, "--make-vocab-size-divisible-by", "128"])
    text = str(err.value)
    assert err.value.field == "--make-vocab-size-divisible-by" and err.value.value == 128 and "\n" not in text
    assert "sets model.make_vocab_size_divisible_by 128" in text and "sets 256" not in text
    assert "--make-vocab-size-divisible-by 64" in err.value.fix and "make_vocab_size_divisible_by 256" in err.value.fix
    yaml.write_text("parallel:\n  tp: 2\n")  # the run's tp comes from the config: Megatron-LM's 128 x 2
    assert translate.build(str(yaml), ["--make-vocab-size-divisible-by", "128"]).model.make_vocab_size_divisible_by \
        == 256
    assert translate.build(str(yaml), tp2).model.make_vocab_size_divisible_by == 256  # flags alone, as before
