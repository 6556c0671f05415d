"""What each rank runs in the sequence-parallel tests (module level, so forked children find it).

Attention workers rebuild the same full tensors from a seed on every rank,
take this rank's part, run one mode forward and backward, and return the
local out/dq/dk/dv as numpy arrays (tensors from a forked child do not
outlive it); the test reassembles them and compares with full attention.
"""

from __future__ import annotations

from typing import Any

import torch

def make_inputs(case: dict) -> dict[str, torch.Tensor]:
    """Full q, k, v, dout ``[b, s, h, d]`` (fp32, deterministic from the case's seed)."""
    g = torch.Generator().manual_seed(case["seed"])
    b, s, h, kv, d = case["b"], case["s"], case["h"], case["kv"], case["d"]
    return {"q": torch.randn(b, s, h, d, generator=g), "k": torch.randn(b, s, kv, d, generator=g),
            "v": torch.randn(b, s, kv, d, generator=g), "dout": torch.randn(b, s, h, d, generator=g)}


def layout_of(mode: str) -> str:
    return "contiguous" if mode == "ulysses" else "zigzag"


def _init_world():
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist


def attention_fn(mode: str, ulysses_size: int = 2):
    """``fn(q, k, v, causal)`` running ``mode`` over the whole world."""
    from zeromega.plugins.sequence import ring_attention, ulysses_attention, usp_attention
    from zeromega.plugins.sequence.usp import build_usp_groups

    dist = _init_world()
    world = dist.group.WORLD
    if mode == "ulysses":
        return lambda q, k, v, causal: ulysses_attention(q, k, v, world, causal, layout="contiguous")
    if mode == "ulysses-zigzag":
        return lambda q, k, v, causal: ulysses_attention(q, k, v, world, causal, layout="zigzag")
    if mode == "ring":
        return lambda q, k, v, causal: ring_attention(q, k, v, world, causal, layout="zigzag")
    if mode == "usp":
        groups = build_usp_groups(ulysses_size)
        return lambda q, k, v, causal: usp_attention(q, k, v, groups, causal, layout="zigzag")
    raise ValueError(mode)


def attention_cases(mode: str, cases: list[dict]) -> list[dict[str, Any]]:
    """Local (out, dq, dk, dv) of every case on this rank, as fp32 numpy arrays."""
    from zeromega.plugins.sequence.layout import shard

    dist = _init_world()
    rank, size = dist.get_rank(), dist.get_world_size()
    fn = attention_fn(mode)
    results = []
    for case in cases:
        full = make_inputs(case)
        dtype = getattr(torch, case["dtype"])
        local = {n: shard(t, 1, rank, size, layout_of(mode)).to(dtype) for n, t in full.items()}
        q, k, v = (local[n].requires_grad_() for n in ("q", "k", "v"))
        out = fn(q, k, v, case["causal"])
        out.backward(local["dout"])
        results.append({n: t.detach().float().numpy() for n, t in
                        (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad))})
    return results


def rejected(mode: str, shapes: list[tuple]) -> list[str]:
    """The error message each bad (q shape, kv heads) raises on this rank, or 'accepted'."""
    fn = attention_fn(mode)
    messages = []
    for b, s_l, h, kv, d in shapes:
        q = torch.zeros(b, s_l, h, d)
        k = torch.zeros(b, s_l, kv, d)
        try:
            fn(q, k, k.clone(), True)
            messages.append("accepted")
        except ValueError as err:
            messages.append(str(err))
    return messages


def noncontiguous_grads(mode: str) -> dict[str, Any]:
    """Gradients through ``mode`` when the upstream gradient is non-contiguous (an einsum's backward).

    Also records whether gloo itself writes a scatter into a non-contiguous
    buffer correctly, so the test sees if the upstream trap is still there.
    """
    from zeromega.plugins.sequence.layout import shard

    dist = _init_world()
    rank, size = dist.get_rank(), dist.get_world_size()
    fn = attention_fn(mode)
    case = dict(seed=7, b=2, s=8 * size, h=4, kv=2, d=8)
    full = make_inputs(case)
    w = torch.randn(case["d"], case["d"], generator=torch.Generator().manual_seed(3))
    local = {n: shard(t, 1, rank, size, layout_of(mode)) for n, t in full.items()}
    q, k, v = (local[n].clone().requires_grad_() for n in ("q", "k", "v"))
    # out -> einsum with a transposed weight: the gradient reaching `out` is a non-contiguous view
    loss = torch.einsum("bshd,ed->bshe", fn(q, k, v, True), w.t()).mul(local["dout"][..., :1]).sum()
    loss.backward()
    grad_of_out = torch.einsum("bshe,ed->bshd", local["dout"][..., :1].expand(-1, -1, -1, case["d"]), w.t())
    # the raw gloo behaviour the notes describe
    out = torch.empty(3, 4).t()
    chunks = [torch.arange(12.0).reshape(4, 3) + 100 * r for r in range(size)] if rank == 0 else None
    dist.scatter(out, chunks, src=0)
    scatter_ok = bool(torch.equal(out, torch.arange(12.0).reshape(4, 3) + 100 * rank))
    return {"dq": q.grad.numpy(), "dk": k.grad.numpy(), "dv": v.grad.numpy(),
            "grad_of_out": grad_of_out.numpy(), "gloo_noncontiguous_scatter_ok": scatter_ok}


def train_gpt_cp(cfg: dict, shape: dict, data_prefix: str, iters: int, mode: str | None,
                 ulysses_size: int | None = None, seed: int = 1234,
                 token_layout: str | None = None) -> dict[str, Any]:
    """tests/workers.py's ``train_gpt`` with context parallelism, through ``zeromega.Run``: a Megatron-Core GPT
    whose core attention is ``mode`` over the cp group, batches sharded along the sequence, the cp-aware loss.
    ``mode=None`` is the reference: stock local spec (Megatron's DotProductAttention), plain loss.
    ``token_layout`` overrides the layout (batch shards and attention alike; default: the mode's, zigzag
    under rotary embeddings): Run always takes the mode's, so that negative control is assembled by hand."""
    if token_layout is not None:
        return _train_gpt_cp_with_layout(cfg, shape, data_prefix, iters, mode, ulysses_size, seed, token_layout)
    from run_workers import run_gpt

    if mode is not None:
        cfg = {**cfg, "sequence": {"mode": mode, **({"ulysses": ulysses_size} if ulysses_size else {})}}
    return run_gpt(cfg, shape, data_prefix, iters, seed)


def _train_gpt_cp_with_layout(cfg: dict, shape: dict, data_prefix: str, iters: int, mode: str,
                              ulysses_size: int | None, seed: int, seq_layout: str) -> dict[str, Any]:
    """Run's cp run (same weights by name, data, engine) with the batch and attention in ``seq_layout``."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from zeromega.integrations import comm
    from zeromega.plugins.zero.engine import build_engine
    from zeromega.integrations.megatron import data, model, parallel
    from zeromega.config.schema import RunConfig
    from zeromega.plugins.sequence.megatron import cp_loss, gpt_layer_spec, shard_batch
    from zeromega.run.loop import _reduce_step_stats
    from run_workers import gpt_config

    comm.install()
    run = RunConfig.model_validate(gpt_config(cfg, shape, data_prefix, iters, seed))
    layout = parallel.initialize(run, seed=seed)
    gpt_shape = model.GPTShape(**shape)
    train_ds, _, _ = data.build_gpt_datasets(data_prefix, gpt_shape.seq_length, seed,
                                             (iters * layout.global_batch, 0, 0), split="1,0,0")
    spec = gpt_layer_spec(mode, ulysses_size=ulysses_size, layout=seq_layout)
    gpt = GPTModel(config=model.transformer_config(gpt_shape, run), transformer_layer_spec=spec,
                   vocab_size=model.padded_vocab_size(gpt_shape.vocab_size, gpt_shape.make_vocab_size_divisible_by,
                                                      run.parallel.tp),
                   max_sequence_length=gpt_shape.seq_length, position_embedding_type=gpt_shape.position_embedding_type,
                   share_embeddings_and_output_weights=not gpt_shape.untie_embeddings_and_output_weights)
    model.init_by_name([gpt], gpt_shape, seed)  # the weights Run draws
    engine = build_engine(gpt, run, layout)
    batches = data.sample_batches(train_ds, layout.micro, dp_rank=parallel_state.get_data_parallel_rank(),
                                  dp_size=layout.dp)
    cp_group = parallel_state.get_context_parallel_group()
    dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    losses, grad_norms = [], []
    for _ in range(iters):
        total = 0.0
        for _ in range(layout.accumulation):
            local = shard_batch(next(batches), seq_layout, cp_group)
            per_token = engine(local["tokens"], local["position_ids"], None, labels=local["labels"])
            loss = cp_loss(per_token, local["loss_mask"], cp_group)
            engine.backward(loss)
            engine.step()
            total += loss.item()
        losses.append(_reduce_step_stats(total / layout.accumulation, 0, dp_cp_group)[0])
        norm = engine.get_global_grad_norm()
        grad_norms.append(None if norm is None else float(norm))
    parallel.shutdown()
    return {"loss": losses, "grad_norm": grad_norms}


def adapter_checks() -> dict[str, Any]:
    """On a cp=2 world: what the Megatron adapter rejects at build time, and the cp loss weighting."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from zeromega.integrations.megatron import parallel
    from zeromega.config.schema import RunConfig
    from zeromega.plugins.sequence.megatron import ContextParallelAttention, cp_loss

    parallel.initialize(RunConfig.model_validate({"parallel": {"cp": 2}}))

    def build(mode=None, cp_comm_type=None, **overrides):
        fields = dict(num_layers=1, hidden_size=64, num_attention_heads=4, context_parallel_size=2,
                      attention_dropout=0.0, hidden_dropout=0.0, use_cpu_initialization=True)
        config = TransformerConfig(**{**fields, **overrides})
        try:
            module = ContextParallelAttention(config, 1, AttnMaskType.causal, "self", mode=mode,
                                              cp_comm_type=cp_comm_type)
            return module.mode
        except ValueError as err:
            return str(err)

    found = {
        "dropout": build("ring", attention_dropout=0.1),
        "ulysses_dropout": build("ulysses", attention_dropout=0.1),
        "heads": build("ulysses", hidden_size=48, num_attention_heads=3),
        "all_gather": build(cp_comm_type="all_gather"),
        "a2a": build(cp_comm_type="a2a"),
        "p2p": build(cp_comm_type="p2p"),
        "usp_without_size": build(cp_comm_type="a2a+p2p"),
    }
    # Ulysses applies its dropout in training only (DeepSpeed-Ulysses' local attention does)
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, context_parallel_size=2,
                               attention_dropout=0.5, hidden_dropout=0.0, use_cpu_initialization=True)
    module = ContextParallelAttention(config, 1, AttnMaskType.causal, "self", mode="ulysses")
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 1, 4, 16) for _ in range(3))
    plain = module.eval()(q, k, v, None)
    found["ulysses_dropout_changes_training_only"] = (
        not torch.allclose(module.train()(q, k, v, None), plain)
        and torch.equal(module.eval()(q, k, v, None), plain))
    rank = parallel_state_rank()
    # rank 0 keeps 3 tokens of loss 1.0, rank 1 one token of loss 5.0: the sequence's mean is 2.0
    per_token = torch.full((1, 4), 1.0 if rank == 0 else 5.0)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]]) if rank == 0 else torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    found["cp_loss"] = float(cp_loss(per_token, mask))
    parallel.shutdown()
    return found


def parallel_state_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_rank()
