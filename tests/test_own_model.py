"""A user's own nn.Module through zeromega.Run (the README's first quick start): every ZeRO stage matches one
process, and model parallelism the model cannot do is refused before the first step."""

from __future__ import annotations

import pytest

from distributed import run_world
from run_workers import run_own_model

BASE = {"batch": {"micro": 2, "accumulation": 2}, "optimizer": {"lr": 3e-3, "clip_grad": 0.0},
        "scheduler": {"train_iters": 4, "decay_style": "constant"}, "logging": {"progress": False}}


def config(**sections) -> dict:
    return {**BASE, **sections}


def test_own_model_trains_at_parity_under_every_zero_stage():
    reference = run_world(1, run_own_model, config(batch={"micro": 4, "accumulation": 2}))[0]
    assert reference["tokens_per_s"] > 0 and reference["loss"][-1] < reference["loss"][0]
    for stage in (1, 2, 3):
        (ranked, _) = run_world(2, run_own_model, config(zero={"stage": stage}))
        assert ranked["loss"] == pytest.approx(reference["loss"], rel=1e-5), f"ZeRO-{stage}"


@pytest.mark.parametrize("sizes, field", [({"tp": 2}, "parallel.tp"), ({"pp": 2}, "parallel.pp")])
def test_model_parallelism_over_a_plain_model_is_refused(sizes, field):
    results = run_world(2, run_own_model, config(parallel=sizes))
    for result in results:
        assert result["error"].startswith(field), result
