"""The Hugging Face example (examples/hf_llama/train.py) through zeromega.Run.

- ZeRO-3 with CPU offload (optimizer and parameters) on 2 gloo ranks gives
  the curve plain DeepSpeed gives (ZeRO-2 with optimizer offload and ZeRO-1
  too, marked slow): ``deepspeed.initialize`` on the same
  model, JSON, data and seed, with transformers' own loss
  (``model(input_ids, labels=...).loss``) and the HF Trainer's decay groups
  (no weight decay on norms and biases: zeromega gives DeepSpeed Megatron's
  groups, which are the same; with ``model.parameters()`` DeepSpeed would
  decay the norms too and the curves part by ~1e-5 after two steps).
- Long sequences: the same Llama with ``attn_implementation="zeromega_ulysses"``
  / ``"zeromega_ring"`` on 2 ranks and ``"zeromega_usp"`` on 4 (2 x 2), each
  rank holding its share of every sequence (``zeromega.shard_batch``), the
  loss from ``zeromega.cp_loss``: losses and gradient norms equal one process
  with transformers' SDPA attention on whole sequences.
- A batch sharded in another mode's layout is refused on every rank, not trained.

fp32 everywhere; relative tolerance 1e-5 (observed differences are float
reassociation, ~1e-7).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="transformers is the [hf] extra (the [test] extra installs it)")

from distributed import run_world  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hf_llama"
STEPS = 3


def example():
    spec = importlib.util.spec_from_file_location("hf_llama_train", EXAMPLE / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ds_json(stage: int, offload: bool = False, **zeromega_block) -> dict:
    zero = {"stage": stage}
    if offload:
        zero.update(offload_optimizer={"device": "cpu"}, offload_param={"device": "cpu"})
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
            "zero_optimization": zero,
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}},
            "zeromega": {"scheduler": {"train_iters": STEPS, "decay_style": "constant"},
                         "logging": {"progress": False}, **zeromega_block}}


def write(config: dict, tmp_path) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return str(path)


def run_example(path: str) -> dict:
    """What the example's main() does, on this rank, from a DeepSpeed JSON; losses and grad norms per step.

    Under sequence parallelism the first micro-batch is first fed sharded for another mode (contiguous
    for ring and USP, zigzag for Ulysses): the error it raises is kept, then the step goes on right."""
    import functools

    import zeromega

    train = example()
    cfg = zeromega.load_config(path)
    mode = cfg.sequence.mode if cfg.sequence.mode in ("ulysses", "ring", "usp") else "contiguous"
    attention = "sdpa"
    if mode != "contiguous":
        zeromega.register_hf_attention()
        attention = f"zeromega_{mode}"
    refusals = []

    def loss(model, batch):
        if mode != "contiguous" and not refusals:
            try:
                train.my_loss(model, batch, mode="zigzag" if mode == "ulysses" else "contiguous")
                refusals.append("trained")
            except ValueError as err:
                refusals.append(str(err))
        return train.my_loss(model, batch, mode=mode)

    records = zeromega.Run(cfg, model=functools.partial(train.build_model, attention), batches=train.my_batches,
                           loss=loss, log=lambda line: None).train()
    return {"loss": [r.loss for r in records], "grad_norm": [r.grad_norm for r in records], "refused": refusals}


def plain_deepspeed(config: dict) -> dict:
    """The same run as a DeepSpeed user writes it: deepspeed.initialize, HF's loss, data split by rank."""
    import deepspeed
    import torch
    import torch.distributed as dist

    train = example()
    ds = {k: v for k, v in config.items() if k != "zeromega"}
    deepspeed.init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if ds["zero_optimization"]["stage"] == 3:
        with deepspeed.zero.Init(config_dict_or_path=ds):
            model = train.build_model()
    else:
        model = train.build_model()
    # the decay groups of the HF Trainer (and of Megatron, which zeromega uses): no decay on norms and biases
    no_decay = [p for n, p in model.named_parameters()
                if len(getattr(p, "ds_shape", p.shape)) == 1 or n.endswith(".bias")]
    decay = [p for p in model.parameters() if all(p is not q for q in no_decay)]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds)
    batches = train.my_batches(0, rank, world, ds["train_micro_batch_size_per_gpu"])
    losses, norms = [], []
    for _ in range(STEPS):
        total = 0.0
        for _ in range(ds["gradient_accumulation_steps"]):
            batch = next(batches)
            loss = engine(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            engine.backward(loss)
            engine.step()
            total += loss.item()
        mean = torch.tensor([total / ds["gradient_accumulation_steps"]], dtype=torch.float64)
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
        norms.append(float(engine.get_global_grad_norm()))
    return {"loss": losses, "grad_norm": norms}


@pytest.mark.parametrize("stage, offload", [
    (3, True),
    pytest.param(2, True, marks=pytest.mark.slow),
    pytest.param(1, False, marks=pytest.mark.slow),
], ids=["zero3-cpu-offload", "zero2-cpu-offload", "zero1"])
def test_the_example_reproduces_plain_deepspeed(tmp_path, stage, offload):
    config = ds_json(stage, offload=offload)
    if stage < 3:
        config["zero_optimization"].pop("offload_param", None)  # parameter offload is ZeRO-3's
    ours = run_world(2, run_example, write(config, tmp_path))[0]
    theirs = run_world(2, plain_deepspeed, config)[0]
    assert ours["loss"][-1] < ours["loss"][0]
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-5)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, whole sequences, transformers' SDPA attention; micro 4 = 2 x dp 2 worth."""
    return run_world(1, run_example, write(ds_json(1), tmp_path_factory.mktemp("ref")))[0]


@pytest.mark.parametrize("mode, ranks, block", [
    ("ulysses", 2, {"cp": 2, "sequence": {"mode": "ulysses"}}),
    ("ring", 2, {"cp": 2, "sequence": {"mode": "ring"}}),
    ("usp", 4, {"cp": 4, "sequence": {"mode": "usp", "ulysses": 2, "ring": 2}}),
])
def test_sequence_parallel_attention_matches_one_process(one_process, tmp_path, mode, ranks, block):
    results = run_world(ranks, run_example, write(ds_json(1, **block), tmp_path))
    got = results[0]
    assert got["loss"] == pytest.approx(one_process["loss"], rel=1e-5), mode
    assert got["grad_norm"] == pytest.approx(one_process["grad_norm"], rel=1e-5), mode
    # the same batch sharded for another mode was refused on every rank, naming the helper
    for result in results:
        assert f"zeromega.shard_batch(batch, '{mode}')" in result["refused"][0], result["refused"]


def test_readme_quick_start_is_the_example_code():
    """README's "my own train.py" block is the example's code: every code line of it is a line of train.py."""
    root = EXAMPLE.parent.parent
    readme = (root / "README.md").read_text()
    block = readme.split("## Quick start 1", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    example_lines = {line.strip() for line in (EXAMPLE / "train.py").read_text().splitlines()}
    code = [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert len(code) >= 10
    missing = [line for line in code if line not in example_lines]
    assert not missing, f"README lines not in examples/hf_llama/train.py: {missing}"
