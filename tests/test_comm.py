"""The collective counter sees DeepSpeed's and Megatron-Core's traffic, byte for byte."""

from __future__ import annotations

from distributed import run_world
from workers import comm_bytes_one_step

SHAPE = dict(num_layers=1, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=257,
             hidden_dropout=0.0, attention_dropout=0.0)


def test_zero1_data_parallel_moves_twice_the_parameters(small_corpus):
    """ZeRO-1, dp=2: one all-reduce of the gradients + one all-gather of the updated parameters."""
    cfg = {"zero": {"stage": 1}, "batch": {"micro": 2}}
    for result in run_world(2, comm_bytes_one_step, cfg, SHAPE, small_corpus):
        p, counted = result["param_bytes"], result["bytes"]
        assert counted["all_gather"] == p
        # The all-reduce carries the gradients plus a few scalars (overflow flag, grad norm).
        assert p <= counted["all_reduce"] <= p + 64
        assert set(counted) == {"all_reduce", "all_gather"}


def test_tensor_parallel_collectives_are_counted(small_corpus):
    """tp=2 on 2 ranks (dp=1): no gradient traffic, only Megatron's own tp all-reduces."""
    # no clipping: the grad norm's all-reduce (Megatron-LM's default clip 1.0) is not Megatron's tp traffic
    cfg = {"parallel": {"tp": 2}, "zero": {"stage": 0}, "batch": {"micro": 2}, "optimizer": {"clip_grad": 0.0}}
    (r0, r1) = run_world(2, comm_bytes_one_step, cfg, SHAPE, small_corpus)
    assert r0["bytes"] == r1["bytes"]
    # Megatron's tp all-reduces of [s, b, h] activations: forward, the embedding's output and each
    # layer's attention and MLP outputs; backward, the inputs of the output layer and of each layer's
    # QKV and FC1 projections. Vocab-parallel cross-entropy adds three [s, b] fp32 all-reduces.
    s, b, h, layers = SHAPE["seq_length"], 2, SHAPE["hidden_size"], SHAPE["num_layers"]
    activation = s * b * h * 4
    assert r0["bytes"] == {"all_reduce": (2 + 4 * layers) * activation + 3 * s * b * 4}


def test_point_to_point_counts_each_send_once():
    """P2POp must still accept the wrapped isend (torch checks identity), and a batched send is not
    counted twice (once by batch_isend_irecv, once by the isend it calls)."""
    from workers import p2p_counts

    for batched, plain in run_world(2, p2p_counts):
        assert batched == {"p2p": 40}
        assert plain == {"p2p": 40}
