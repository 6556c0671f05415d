"""What each rank runs in the hybrid-parallel tests (module level, so forked children find it)."""

from __future__ import annotations

from typing import Any, Optional


def train_gpt_deepspeed(cfg: dict, shape: dict, data_prefix: str, iters: int, seed: int = 1234,
                        sum_sp_grads: bool = True) -> dict[str, Any]:
    """The DeepSpeed-engine path (pp == 1) with tp-sp through ``zeromega.Run``: per-step loss and grad norm,
    and how many sequence-parallel parameters have their grads summed over tp.

    ``sum_sp_grads=False`` leaves out the tp sum of sequence-parallel grads (the negative control), which Run
    always applies, so that run is assembled by hand (same weights by name, data, engine and loss as Run's).
    """
    if not sum_sp_grads:
        return _train_gpt_deepspeed_without_sp_sum(cfg, shape, data_prefix, iters, seed)
    from run_workers import run_gpt

    def hooked(run) -> dict:
        from zeromega.plugins.megatron.sequence_parallel import sequence_parallel_params

        summed = run.cfg.parallel.sequence_parallel and run.layout.tp > 1  # Run hooks them then
        return {"sp_params_hooked": len(sequence_parallel_params(run.engine.modules[0])) if summed else 0}

    return run_gpt(cfg, shape, data_prefix, iters, seed, extra=hooked)


def _train_gpt_deepspeed_without_sp_sum(cfg: dict, shape: dict, data_prefix: str, iters: int,
                                        seed: int) -> dict[str, Any]:
    from megatron.core import parallel_state

    from zeromega.integrations import comm
    from zeromega.plugins.zero.engine import build_engine, model_init_context
    from zeromega.integrations.megatron import data, model, parallel
    from zeromega.config.schema import RunConfig
    from zeromega.run.loop import _reduce_step_stats, train_step
    from run_workers import gpt_config

    comm.install()
    run = RunConfig.model_validate(gpt_config(cfg, shape, data_prefix, iters, seed))
    layout = parallel.initialize(run, seed=seed)
    gpt_shape = model.GPTShape(**shape)
    train_ds, _, _ = data.build_gpt_datasets(data_prefix, gpt_shape.seq_length, seed,
                                             (iters * layout.global_batch, 0, 0), split="1,0,0")
    with model_init_context(run, layout):
        gpt = model.build_gpt(gpt_shape, run)
    model.init_by_name([gpt], gpt_shape, seed)  # the weights Run draws
    engine = build_engine(gpt, run, layout)
    batches = data.sample_batches(train_ds, layout.micro, dp_rank=parallel_state.get_data_parallel_rank(),
                                  dp_size=layout.dp)
    losses, grad_norms = [], []
    for _ in range(iters):
        loss = train_step(engine, batches, layout.accumulation)
        losses.append(_reduce_step_stats(loss, 0, parallel_state.get_data_parallel_group())[0])
        norm = engine.get_global_grad_norm()
        grad_norms.append(None if norm is None else float(norm))
    parallel.shutdown()
    return {"loss": losses, "grad_norm": grad_norms, "sp_params_hooked": 0}


def train_gpt_megatron(cfg: dict, shape: dict, data_prefix: str, iters: int, seed: int = 1234,
                       virtual_stages: Optional[int] = None, distributed_optimizer: bool = True) -> dict[str, Any]:
    """Megatron-Core's engine (schedules, DDP, distributed optimizer): per-step loss, grad norm, bubble.

    Weights are drawn by their 1-process names, so every layout starts from the same model.
    """
    from megatron.core import parallel_state

    from zeromega.integrations import comm
    from zeromega.integrations.megatron import data, model, parallel
    from zeromega.config.schema import RunConfig
    from zeromega.plugins.megatron.pipeline import MegatronTrainer

    comm.install()
    run = RunConfig.model_validate(cfg)
    layout = parallel.initialize(run, seed=seed)
    gpt_shape = model.GPTShape(**shape)
    train_ds, _, _ = data.build_gpt_datasets(data_prefix, gpt_shape.seq_length, seed,
                                             (iters * layout.global_batch, 0, 0), split="1,0,0")
    trainer = MegatronTrainer(gpt_shape, run, layout, virtual_stages=virtual_stages,
                              distributed_optimizer=distributed_optimizer, init_seed=seed)
    batches = data.sample_batches(train_ds, layout.micro, dp_size=layout.dp,
                                  dp_rank=parallel_state.get_data_parallel_rank(with_context_parallel=True))
    losses, grad_norms, idle = [], [], []
    for _ in range(iters):
        result = trainer.train_step(next(batches) for _ in range(layout.accumulation))
        losses.append(result.loss)
        grad_norms.append(result.grad_norm)
        idle.append(result.idle)
    dtypes = sorted({str(p.dtype) for chunk in trainer.chunks for p in chunk.module.parameters()})
    parallel.shutdown()
    return {"loss": losses, "grad_norm": grad_norms, "idle": idle, "param_dtypes": dtypes}


def one_training_step(cfg: dict, shape: dict, skip_patches: list[str], virtual_stages: Optional[int] = None) -> float:
    """One Megatron-engine step on random tokens, with ``skip_patches`` left out (the CPU-patch probes)."""
    import os

    import torch

    from zeromega.integrations.megatron import model, parallel
    from zeromega.config.schema import RunConfig
    from zeromega.plugins.megatron.pipeline import MegatronTrainer

    os.environ["ZEROMEGA_SKIP_PATCH"] = ",".join(skip_patches)
    run = RunConfig.model_validate(cfg)
    layout = parallel.initialize(run, seed=1)
    gpt_shape = model.GPTShape(**shape)
    trainer = MegatronTrainer(gpt_shape, run, layout, virtual_stages=virtual_stages)
    tokens = torch.randint(0, gpt_shape.vocab_size, (layout.micro, gpt_shape.seq_length),
                           generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens, "labels": tokens.roll(-1, 1), "loss_mask": torch.ones(tokens.shape),
             "position_ids": torch.arange(gpt_shape.seq_length).expand_as(tokens)}
    loss = trainer.train_step([batch] * layout.accumulation).loss
    parallel.shutdown()
    return loss
