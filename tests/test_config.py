"""The unified run config: sequence resolution, batch arithmetic, and every validation rule."""

from __future__ import annotations

import pytest

from zeromega.config.schema import RunConfig, validate
from zeromega.config.errors import ConfigError


def test_defaults_resolve_to_plain_data_parallel():
    layout = RunConfig().layout(4)
    assert (layout.tp, layout.pp, layout.cp, layout.dp) == (1, 1, 1, 4)
    assert (layout.micro, layout.accumulation, layout.global_batch) == (1, 1, 4)


# (sequence section, parallel section) -> (mode, ulysses, ring, cp, sequence_parallel)
SEQUENCES = {
    "cp alone is ring (Megatron's p2p default)": ({}, {"cp": 4}, ("ring", 1, 4, 4, False)),
    "tp-sp alone is megatron mode": ({}, {"tp": 2, "sequence_parallel": True}, ("megatron", None, None, 1, True)),
    "megatron mode turns tp-sp on": ({"mode": "megatron"}, {"tp": 2}, ("megatron", None, None, 1, True)),
    "ulysses takes cp": ({"mode": "ulysses"}, {"cp": 2}, ("ulysses", 2, 1, 2, False)),
    "ulysses size gives cp": ({"mode": "ulysses", "ulysses": 4}, {}, ("ulysses", 4, 1, 4, False)),
    "usp from both sizes": ({"mode": "usp", "ulysses": 2, "ring": 4}, {}, ("usp", 2, 4, 8, False)),
    "usp from cp and one size": ({"mode": "usp", "ulysses": 2}, {"cp": 8}, ("usp", 2, 4, 8, False)),
    "ring with tp-sp": ({"mode": "ring", "ring": 2}, {"tp": 2, "sequence_parallel": True},
                        ("ring", 1, 2, 2, True)),
}


@pytest.mark.parametrize("case", list(SEQUENCES))
def test_sequence_modes_resolve(case):
    sequence, parallel, expected = SEQUENCES[case]
    cfg = validate({"sequence": sequence, "parallel": parallel})
    s, p = cfg.sequence, cfg.parallel
    assert (s.mode, s.ulysses, s.ring, p.cp, p.sequence_parallel) == expected
    again = validate(cfg.model_dump(by_alias=True))  # resolution is idempotent
    assert again == cfg


# batch section, world -> (micro, accumulation, global), DeepSpeed's derivation rules
BATCHES = [
    ({}, 4, (1, 1, 4)),
    ({"micro": 2}, 4, (2, 1, 8)),
    ({"micro": 2, "accumulation": 3}, 4, (2, 3, 24)),
    ({"global": 32, "micro": 2}, 4, (2, 4, 32)),
    ({"global": 32, "accumulation": 2}, 4, (4, 2, 32)),
    ({"global": 32}, 4, (8, 1, 32)),
    ({"global": 32, "micro": 2, "accumulation": 4}, 4, (2, 4, 32)),
]


@pytest.mark.parametrize("batch,world,expected", BATCHES)
def test_batch_arithmetic(batch, world, expected):
    layout = validate({"batch": batch}).layout(world)
    assert (layout.micro, layout.accumulation, layout.global_batch) == expected
    assert layout.global_batch == layout.micro * layout.accumulation * layout.dp


# Every rule, the config that breaks it, the world size (None: fails at construction), the field named.
VIOLATIONS = {
    "world not divisible by tp x pp x cp": ({"parallel": {"tp": 2, "pp": 2}}, 6, "world_size=6"),
    "global batch inconsistent": ({"batch": {"global": 30, "micro": 2}}, 4, "batch.global=30"),
    "accumulation inconsistent": ({"batch": {"global": 32, "micro": 2, "accumulation": 2}}, 4,
                                  "batch.accumulation=2"),
    "ep does not divide dp x cp": ({"parallel": {"ep": 3}}, 4, "parallel.ep=3"),
    "heads vs tp x ulysses": ({"parallel": {"tp": 2}, "sequence": {"mode": "ulysses", "ulysses": 2},
                               "model": {"num_attention_heads": 6}}, None, "model.num_attention_heads=6"),
    "kv heads vs tp x ulysses": ({"parallel": {"tp": 4}, "model": {"num_attention_heads": 8,
                                                                    "num_query_groups": 2}}, None,
                                 "model.num_query_groups=2"),
    "sequence vs 2 x ring (zigzag)": ({"parallel": {"cp": 4}, "model": {"seq_length": 100}}, None,
                                      "model.seq_length=100"),
    "sequence vs ulysses": ({"sequence": {"mode": "ulysses", "ulysses": 4}, "model": {"seq_length": 6}}, None,
                            "model.seq_length=6"),
    "sequence parallel without tp": ({"parallel": {"sequence_parallel": True}}, None,
                                     "parallel.sequence_parallel=True"),
    "ZeRO-2 with pp": ({"zero": {"stage": 2}, "parallel": {"pp": 2}}, None, "zero.stage=2"),
    "ZeRO-3 with pp": ({"zero": {"stage": 3}, "parallel": {"pp": 4}}, None, "zero.stage=3"),
    "param offload below ZeRO-3": ({"zero": {"stage": 2, "offload_param": {"device": "cpu"}}}, None,
                                   "zero.offload_param.device='cpu'"),
    "optimizer offload without ZeRO": ({"zero": {"offload_optimizer": {"device": "cpu"}}}, None,
                                       "zero.offload_optimizer.device='cpu'"),
    "nvme without a path": ({"zero": {"stage": 3, "offload_param": {"device": "nvme"}}}, None,
                            "zero.offload_param.nvme_path=None"),
    "etp x ep vs a stage's tp x cp x dp": ({"parallel": {"tp": 2, "ep": 4, "etp": 1}}, 2, "parallel.etp=1"),
    "experts vs ep": ({"parallel": {"ep": 4}, "moe": {"num_experts": 6}}, None, "moe.num_experts=6"),
    "topk above experts": ({"moe": {"num_experts": 2, "topk": 4}}, None, "moe.topk=4"),
    "moe at tp 2 without sequence parallel": ({"parallel": {"tp": 2}, "moe": {"num_experts": 2}}, None,
                                              "parallel.sequence_parallel=False"),
    "vpp without pp": ({"parallel": {"vpp": 2}}, None, "parallel.vpp=2"),
    "vpp layers not divisible": ({"parallel": {"pp": 2, "layers_per_virtual_stage": 3},
                                  "model": {"num_layers": 16}}, None, "parallel.layers_per_virtual_stage=3"),
    "layers vs pp": ({"parallel": {"pp": 3}, "model": {"num_layers": 16}}, None, "model.num_layers=16"),
    "full recompute without method": ({"recompute": {"granularity": "full", "num_layers": 1}}, None,
                                      "recompute.method"),
    "recompute method without full": ({"recompute": {"granularity": "selective", "method": "block"}}, None,
                                      "recompute.method='block'"),
    "save interval without dir": ({"checkpoint": {"interval": 100}}, None, "checkpoint.interval=100"),
    "cp contradicts sequence sizes": ({"parallel": {"cp": 2}, "sequence": {"mode": "usp", "ulysses": 2,
                                                                           "ring": 2}}, None, "parallel.cp=2"),
    "megatron mode with cp": ({"parallel": {"cp": 2, "tp": 2}, "sequence": {"mode": "megatron"}}, None,
                              "sequence.mode='megatron'"),
    "wrong type": ({"batch": {"micro": "two"}}, None, "batch.micro='two'"),
    "unknown field": ({"parallel": {"dp": 2}}, None, "parallel.dp=2"),
    "unknown choice": ({"precision": "fp8"}, None, "precision='fp8'"),
}


@pytest.mark.parametrize("case", list(VIOLATIONS))
def test_each_rule_names_field_value_and_fix(case):
    data, world, named = VIOLATIONS[case]
    with pytest.raises(ConfigError) as err:
        validate(data).layout(world or 8)
        if world is None:
            pytest.fail("should have failed at construction")
    assert str(err.value).startswith(named), str(err.value)
    assert "; fix: " in str(err.value) and "\n" not in str(err.value)


def test_layout_rechecks_after_assignment():
    cfg = RunConfig()
    cfg.zero.stage = 3
    cfg.parallel.pp = 2  # each section alone is valid; the pair is not
    with pytest.raises(ConfigError, match="zero.stage=3"):
        cfg.layout(2)


def test_expert_tensor_parallel_defaults_to_tp_and_frees_tp_ranks_for_ep():
    assert validate({"parallel": {"tp": 2, "ep": 2}}).layout(4).etp == 2
    with pytest.raises(ConfigError, match=r"^parallel.ep=2"):  # etp = tp: ep comes out of dp x cp = 1
        validate({"parallel": {"tp": 2, "ep": 2}}).layout(2)
    layout = validate({"parallel": {"tp": 2, "ep": 2, "etp": 1}}).layout(2)  # ep spans the tp ranks
    assert (layout.tp, layout.ep, layout.etp, layout.dp) == (2, 2, 1, 1)
