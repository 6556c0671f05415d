"""What each rank runs in the multi-process tests (module level, so forked children find it)."""

from __future__ import annotations

from typing import Any


def train_gpt(cfg: dict, shape: dict, data_prefix: str, iters: int, seed: int = 1234) -> dict[str, Any]:
    """Train a small Megatron-Core GPT through ``zeromega.Run`` (DeepSpeed's engine at pp 1); per-step loss
    and grad norm (:func:`run_workers.run_gpt`)."""
    from run_workers import run_gpt

    return run_gpt(cfg, shape, data_prefix, iters, seed)


def comm_bytes_one_step(cfg: dict, shape: dict, data_prefix: str) -> dict[str, Any]:
    """Bytes this rank handed to each collective kind in one training step, and its parameter bytes."""
    from megatron.core import parallel_state

    from zeromega.integrations import comm
    from zeromega.plugins.zero.engine import build_engine
    from zeromega.integrations.megatron import data, model, parallel
    from zeromega.config.schema import RunConfig
    from zeromega.run.loop import train_step

    comm.install()
    run = RunConfig.model_validate(cfg)
    layout = parallel.initialize(run, seed=1)
    gpt_shape = model.GPTShape(**shape)
    train_ds, _, _ = data.build_gpt_datasets(data_prefix, gpt_shape.seq_length, 1, (4 * layout.global_batch, 0, 0),
                                             split="1,0,0")
    engine = build_engine(model.build_gpt(gpt_shape, run), run, layout)
    batches = data.sample_batches(train_ds, layout.micro, dp_rank=parallel_state.get_data_parallel_rank(),
                                  dp_size=layout.dp)
    train_step(engine, batches, layout.accumulation)  # warm-up: first step may differ
    comm.take()
    train_step(engine, batches, layout.accumulation)
    counted = comm.take()
    param_bytes = sum(p.numel() * p.element_size() for p in engine.module.parameters())
    parallel.shutdown()
    return {"bytes": counted, "param_bytes": param_bytes}


def p2p_counts() -> list[dict[str, int]]:
    """Bytes counted for one batched exchange (P2POp) and one plain isend/recv of 10 fp32 each way."""
    import torch
    import torch.distributed as dist

    from zeromega.integrations import comm

    comm.install()
    dist.init_process_group("gloo")
    peer = 1 - dist.get_rank()
    sent, received = torch.ones(10), torch.zeros(10)
    ops = [dist.P2POp(dist.isend, sent, peer), dist.P2POp(dist.irecv, received, peer)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    batched = comm.take()
    request = dist.isend(sent, peer)
    dist.recv(received, peer)
    request.wait()
    plain = comm.take()
    dist.destroy_process_group()
    return [batched, plain]
