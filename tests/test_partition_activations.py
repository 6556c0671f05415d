"""Megatron-DeepSpeed's ``--partition-activations`` as Megatron-Core's ``distribute_saved_activations``.

In Megatron-DeepSpeed the flag is read only by DeepSpeed's activation checkpointing
(``--deepspeed-activation-checkpointing``): each recomputed chunk's inputs are kept as 1/tp slices per tp rank
and gathered before the recompute. Megatron-Core's full recompute does the same with
``distribute_saved_activations`` (``tensor_parallel.random.CheckpointFunction``), so a tp 2 run with
``--checkpoint-activations`` honours the flag as that: the same losses as without (only what is stored
changes), with the split and gather really taken. Where it cannot act (tp 1, no recompute, sequence parallel,
no DeepSpeed checkpointing) it is accepted with a one-line note saying why.
"""

from __future__ import annotations

import os

import pytest

from distributed import run_world
from zeromega.config import ConfigError
from zeromega.launch import megatron_args, translate

STEPS = 3
COMMON = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
          "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "2", "--split", "1,0,0",
          "--no-progress", "--lr", "3e-3", "--train-iters", str(STEPS), "--zero-stage", "1",
          "--tensor-model-parallel-size", "2", "--make-vocab-size-divisible-by", "64"]
DS_CHECKPOINTING = ["--checkpoint-activations", "--deepspeed-activation-checkpointing"]
PARTITIONED = [*DS_CHECKPOINTING, "--partition-activations"]


def _parse(*flags: str):
    os.environ.pop(megatron_args.NOTED_ENV, None)  # every parse prints its own note
    return translate.build(None, ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                                  "--micro-batch-size", "1", *flags])


def test_partition_activations_reaches_the_transformer_config_where_it_can_act(capfd):
    from zeromega.integrations.megatron import model

    cfg = _parse("--tensor-model-parallel-size", "2", *PARTITIONED)
    assert cfg.recompute.distribute_saved_activations and cfg.recompute.granularity == "full"
    shape = model.GPTShape(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=257)
    assert model.transformer_config(shape, cfg).distribute_saved_activations is True
    assert "--partition-activations" not in capfd.readouterr().err  # honoured: no note
    for target in ("megatron", "megatron-deepspeed"):  # written back as the flag both targets share
        argv, _, _ = translate.to_megatron(cfg, None, target)
        assert "--distribute-saved-activations" in argv
        assert megatron_args.parse(argv).partial["recompute"]["distribute_saved_activations"] is True
    cases = {  # where it cannot act: accepted, off, and the note says why
        "tp 1: nothing to partition": PARTITIONED,
        "only with --deepspeed-activation-checkpointing": ["--tensor-model-parallel-size", "2",
                                                           "--checkpoint-activations", "--partition-activations"],
        "add --checkpoint-activations": ["--tensor-model-parallel-size", "2", "--deepspeed-activation-checkpointing",
                                         "--partition-activations"],
        "already split across the tp ranks": ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                              *PARTITIONED],
    }
    for why, flags in cases.items():
        assert not _parse(*flags).recompute.distribute_saved_activations, why
        err = capfd.readouterr().err
        assert "--partition-activations: " in err and why in err and err.count("\n") == 1, err


def test_distribute_saved_activations_is_refused_where_megatron_refuses_it():
    """Megatron-LM's own flag: its validate_args asserts tp > 1 and full recompute; TransformerConfig refuses
    it under sequence parallel. One line naming the field, before any process starts."""
    assert _parse("--tensor-model-parallel-size", "2", "--recompute-granularity", "full", "--recompute-method",
                  "uniform", "--recompute-num-layers", "1", "--distribute-saved-activations"
                  ).recompute.distribute_saved_activations
    full = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    for flags, why in ((["--tensor-model-parallel-size", "2"], "needs full recomputation"),
                       (full, "needs tp > 1"),
                       (["--tensor-model-parallel-size", "2", "--sequence-parallel", *full], "sequence parallel")):
        with pytest.raises(ConfigError) as err:
            _parse(*flags, "--distribute-saved-activations")
        assert err.value.field == "recompute.distribute_saved_activations" and why in str(err.value)
        assert "\n" not in str(err.value)


def _block_grads(cfg: dict, shape: dict) -> dict:
    """One forward and backward of the GPT the config builds (tp 2, full recompute, distribute_saved_activations
    on), then the same with the switch off on the same weights and RNG states: losses, gradients, and how many
    inputs Megatron-Core's CheckpointFunction split into 1/tp slices in each."""
    import torch
    from megatron.core.tensor_parallel import random

    from zeromega.config import validate
    from zeromega.integrations.megatron import model, parallel

    run = validate(cfg)
    parallel.initialize(run, seed=7)
    gpt = model.build_gpt(model.GPTShape(**shape), run)
    built = gpt.config.distribute_saved_activations
    real, splits = random.split_tensor_into_1d_equal_chunks, []

    def counted(*args, **kwargs):
        splits.append(1)
        return real(*args, **kwargs)

    random.split_tensor_into_1d_equal_chunks = counted
    generator = torch.Generator().manual_seed(3)  # the same tokens on both tp ranks
    tokens = torch.randint(0, shape["vocab_size"], (2, shape["seq_length"] + 1), generator=generator)
    positions = torch.arange(shape["seq_length"]).expand(2, -1)
    out = {"built": built}
    try:
        for name, distribute in (("partitioned", True), ("whole", False)):
            gpt.config.distribute_saved_activations = distribute
            parallel.set_seed(7)  # the same dropout masks in both passes
            gpt.zero_grad(set_to_none=True)
            before = len(splits)
            loss = gpt(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).mean()
            loss.backward()
            out[name] = {"loss": loss.item(), "splits": len(splits) - before,
                         "grads": [p.grad.clone() for p in gpt.parameters() if p.grad is not None]}
    finally:
        random.split_tensor_into_1d_equal_chunks = real
        parallel.shutdown()
    pairs = list(zip(out["partitioned"].pop("grads"), out["whole"].pop("grads")))  # tensors stay in the rank
    out["grads"] = len(pairs)
    out["grad_diff"] = max(float((g - r).abs().max()) for g, r in pairs) if pairs else None
    return out


def test_partitioned_activations_keep_forward_and_backward_at_tp2():
    """Fast: 2 gloo ranks, tp 2, dropout on. The built TransformerConfig has distribute_saved_activations; with it
    each layer's input is kept as a 1/tp slice (2 layers in chunks of 1: 2 splits) and the loss and every
    gradient are those of the same step without it, bit for bit (only where the input is stored changes)."""
    cfg = {"parallel": {"tp": 2}, "precision": "fp32", "batch": {"micro": 2, "global": 2},
           "recompute": {"granularity": "full", "method": "uniform", "num_layers": 1,
                         "distribute_saved_activations": True}}
    shape = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=256,
                 hidden_dropout=0.1, attention_dropout=0.1)
    for rank, result in enumerate(run_world(2, _block_grads, cfg, shape)):
        assert result["built"] is True
        got, ref = result["partitioned"], result["whole"]
        assert (got["splits"], ref["splits"]) == (2, 0), rank
        assert got["loss"] == ref["loss"], (rank, got["loss"], ref["loss"])
        assert result["grads"] > 0 and result["grad_diff"] == 0.0, (rank, result["grads"], result["grad_diff"])


def _train_counting_splits(argv: list[str]) -> dict:
    """The run's losses, and how many splits Megatron-Core's CheckpointFunction took (the chunk inputs it kept
    as 1/tp slices)."""
    from megatron.core.tensor_parallel import random

    from run_workers import run_architecture

    real, splits = random.split_tensor_into_1d_equal_chunks, []

    def counted(*args, **kwargs):
        splits.append(1)
        return real(*args, **kwargs)

    random.split_tensor_into_1d_equal_chunks = counted
    try:
        return {"loss": run_architecture(argv)["loss"], "splits": len(splits)}
    finally:
        random.split_tensor_into_1d_equal_chunks = real


@pytest.mark.slow
def test_partitioned_activations_keep_the_loss_curve_at_tp2(small_corpus):
    """Slow (37-81 s on 2 shared cores): the whole run from the flags. 2 gloo ranks, tp 2, dropout on (the recompute restores the RNG states): the same losses, bit for bit
    (only where the chunk inputs are stored changes), and the split is taken for every chunk of every
    micro-batch (2 layers in chunks of 1, 1 micro-batch per step, 3 steps: 6); none without the flag."""
    argv = [*COMMON, "--data-path", small_corpus]
    reference = run_world(2, _train_counting_splits, [*argv, *DS_CHECKPOINTING])
    partitioned = run_world(2, _train_counting_splits, [*argv, *PARTITIONED])
    for rank, (ref, got) in enumerate(zip(reference, partitioned)):
        assert ref["splits"] == 0 and got["splits"] == 2 * STEPS, (rank, ref["splits"], got["splits"])
        assert got["loss"] == ref["loss"], (rank, got["loss"], ref["loss"])
        assert ref["loss"][-1] < ref["loss"][0], "the run must learn"
