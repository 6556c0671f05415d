"""The training run: config in, every field applied, the loop run.

:class:`Run` is what ``examples/pretrain_gpt.py``, the long-context and
large-model examples, the benchmarks and a user's own ``train.py`` call::

    cfg = zeromega.load_config("ds_config.json")
    zeromega.Run(cfg, model=build_model, batches=my_batches, loss=my_loss).train()

Without ``model`` the run builds Megatron-Core's GPT from ``cfg.model`` and
reads ``cfg.data`` (or ``batches``, when given); with it, ``model()`` is called inside zeromega's init
context (ZeRO-3 partitions while it builds), ``batches(start_sample,
dp_rank, dp_size, micro)`` yields this data-parallel rank's micro-batches
and ``loss(model, batch)`` returns the scalar loss.
"""

from __future__ import annotations

import gc
import json
import os
import time
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from zeromega.config import ConfigError, RunConfig
from zeromega.integrations import comm
from zeromega.integrations.megatron import parallel
from zeromega.integrations.megatron import model as gpt_model
from zeromega.plugins.zero.report import proc_io

from . import checkpointing, engines, flops, gpt, loop, schedule, shared_fs, tensorboard
from . import wandb as wandb_log
from .loop import StepRecord, gpt_loss


class Run:
    """One training run of ``cfg`` (see the module docstring for the own-model arguments)."""

    def __init__(self, cfg: RunConfig, model: Optional[Callable[[], torch.nn.Module]] = None,
                 batches: Optional[Callable[[int, int, int, int], Iterator[dict]]] = None,
                 loss: Optional[Callable[[torch.nn.Module, dict], torch.Tensor]] = None, log=print):
        if model is not None and (batches is None or loss is None):
            raise ConfigError("Run(model=...)", "own model", "needs its data and loss too",
                              "pass batches=(start_sample, dp_rank, dp_size, micro) -> iterator and "
                              "loss=(model, batch) -> tensor")
        if model is None and loss is not None:
            raise ConfigError("Run(loss=...)", "GPT", "zeromega's GPT brings its own loss",
                              "drop loss=, or pass your model with model=")
        before_launch(cfg, gpt=model is None)
        self.cfg, self._model_fn, self._batches_fn, self._loss_fn, self._log = cfg, model, batches, loss, log
        self.layout = self.engine = self.schedule = self.shape = None
        self.records: list[StepRecord] = []
        self.setup_seconds = 0.0
        """Seconds spent building the model and the engine (ZeRO-3 partitioning, swap files included)."""
        self.setup_storage_write_bytes = 0
        """Bytes this rank wrote to storage meanwhile (NVMe offload's initial swap-out)."""
        self.evaluations: list[dict] = []
        """Evaluation records (``{"kind": "valid" | "test", "step", "loss", "ppl"}``), the same on every rank."""

    def say(self, text: str) -> None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            self._log(f"zeromega: {text}")

    def say_raw(self, text: str) -> None:
        """A line in Megatron-LM's own format (no prefix), on rank 0."""
        if not dist.is_initialized() or dist.get_rank() == 0:
            self._log(text)

    def train(self) -> list[StepRecord]:
        """Set up (device, groups, seeds, model, engine, schedule, checkpoints), train, shut down."""
        cfg = self.cfg
        self._started = time.time()  # --exit-duration-in-mins counts from here, as Megatron-LM's _TRAIN_START_TIME
        comm.install()
        self.layout = layout = parallel.initialize(cfg, seed=cfg.seed)
        try:
            return self._train(cfg, layout)
        finally:
            parallel.shutdown()

    def _train(self, cfg: RunConfig, layout) -> list[StepRecord]:
        from megatron.core import parallel_state

        self.say(f"world {layout.world} = tp {layout.tp} x pp {layout.pp} x cp {layout.cp} x dp {layout.dp}; "
                 f"ZeRO-{cfg.zero.stage}, {cfg.precision}; global batch {layout.global_batch} = micro "
                 f"{layout.micro} x accumulation {layout.accumulation} x dp {layout.dp}")
        own = self._model_fn is not None
        prefix = None
        if not own:
            # the project's corpus is built by each node's first rank: nodes need not share ZEROMEGA_DATA
            prefix = gpt.corpus(cfg, int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0)
            dist.barrier()
        shared_fs.check(cfg, [] if own or prefix.mock else [str(p) for p in prefix.prefixes()])
        if not own:
            self.shape = gpt.shape(cfg, gpt.vocab_size(cfg, prefix))
            padding = gpt_model.padding_note(self.shape.vocab_size, self.shape.make_vocab_size_divisible_by,
                                             cfg.parallel.tp)
            if padding:
                self.say(padding)
        weights = checkpointing.read_weights(cfg)
        if weights is not None:
            self.say(f"weights from {weights.path}: {weights.source}")
        if checkpointing.note(cfg):
            self.say(checkpointing.note(cfg))
        kind = engines.select(cfg, layout, checkpointing.resumes_megatron(cfg), own_model=own)
        started, written = time.perf_counter(), proc_io()["write_bytes"]
        self.engine = self._build_engine(kind, cfg, layout, weights)
        if self._model_fn is None:  # Megatron-LM prints each rank's count; this is the whole model's
            from .params import model_parameter_count

            with comm.paused():
                self.say(f"model parameters: {model_parameter_count(self.engine.modules):,}")
        self.setup_seconds = time.perf_counter() - started
        self.setup_storage_write_bytes = proc_io()["write_bytes"] - written
        seq_length = cfg.model.seq_length or 0
        batching = schedule.Batching(cfg, layout.global_batch, layout.micro, layout.dp)
        iters = batching.iterations(cfg)
        if iters != cfg.scheduler.train_iters:
            self.say(f"setting training iterations to {iters}" + (
                f" (--train-tokens {cfg.scheduler.train_tokens})" if cfg.scheduler.train_tokens else ""))
        self.schedule = schedule.build(cfg, self.engine.optimizer, layout.global_batch, seq_length)
        ckpt = None
        if cfg.checkpoint.save or cfg.checkpoint.load:
            meta = self.shape.__dict__ if self.shape is not None else {"own_model": True}
            ckpt = self.engine.checkpointer(layout, cfg, self.schedule, dict(meta))
        policy = checkpointing.CheckpointPolicy(cfg, ckpt, layout.global_batch, self.schedule, weights)
        start_step, consumed = policy.resume()
        if start_step:
            self.say(f"resumed at step {start_step} ({consumed} samples consumed)")
        dp_rank = parallel_state.get_data_parallel_rank()
        evaluation = None
        if self._batches_fn is not None:
            batches = self._batches_fn(consumed, dp_rank, layout.dp, layout.micro)
            if cfg.logging.eval_interval and cfg.logging.eval_iters:
                self.say("note: --eval-interval evaluates zeromega's GPT data splits; with batches= there is no "
                         "validation data, so this run does not evaluate")
        else:
            train_ds, valid_ds, test_ds = gpt.datasets(cfg, prefix, seq_length, iters, layout)
            batches = gpt.batches(cfg, prefix, seq_length, iters, layout, consumed, dp_rank, dataset=train_ds)
            evaluation = self._evaluation(valid_ds, test_ds, start_step, dp_rank)
        dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        self._dp_group = dp_group

        def after_step(record) -> bool:
            stop = policy.after_step(record)
            if cfg.checkpoint.exit_duration_in_mins and self._out_of_time():
                policy.save(record.step)
                self.say(f"exiting after step {record.step}: the run has passed --exit-duration-in-mins "
                         f"{cfg.checkpoint.exit_duration_in_mins:g}")
                stop = True
            return stop

        if cfg.batch.rampup is not None:  # checkpoints record the samples each step really consumed
            consumed_at = {start_step: consumed}
            policy.consumed = lambda step: consumed_at[step]  # noqa: E731
        board = tensorboard.TensorBoard(cfg, layout.global_batch)
        wandb_run = wandb_log.WandB(cfg)

        def observe(record) -> list[dict]:  # TensorBoard and evaluation after each step, on every rank
            if cfg.batch.rampup is not None:
                consumed_at[record.step] = record.consumed_samples
            board.step(record, self.engine)
            out = evaluation.periodic(record) if evaluation is not None else []
            for result in out:
                board.evaluation(result, record.consumed_samples)
                wandb_run.evaluation(result)
            return out

        flops_per_sample, peak = self._flops(seq_length)
        profiler = tensorboard.profiler(cfg, start_step)

        try:
            self.records = loop.train(  # through the module: tests hook loop.train
                self.engine, batches, iters=iters, accumulation=layout.accumulation,
                global_batch=layout.global_batch, seq_length=seq_length, dp_group=dp_group,
                metrics_out=cfg.logging.metrics_path, schedule=self.schedule, progress=cfg.logging.progress,
                log_interval=cfg.logging.interval, log=self._log, start_step=start_step, start_samples=consumed,
                on_step=after_step, timeout_minutes=cfg.launch.distributed_timeout_minutes, after_step=observe,
                batching=batching if cfg.batch.rampup is not None else None, flops_per_sample=flops_per_sample,
                peak_flops=peak, profiler=profiler, observers=(wandb_run,) if wandb_run.run is not None else (),
                log_throughput=cfg.logging.log_throughput,
                manual_gc_interval=cfg.scheduler.manual_gc_interval if cfg.scheduler.manual_gc else None,
                check_for_nan=cfg.scheduler.check_for_nan_in_loss_and_grad,
            )
            policy.finish()
            if evaluation is not None and self.records and self.records[-1].step == iters:
                for result in evaluation.final(iters):  # Megatron-LM exits before it on --exit-* stops
                    board.evaluation(result, self.records[-1].consumed_samples)
                    wandb_run.evaluation(result)
        finally:
            board.close()
            wandb_run.close()
        if self.records:
            first, last = self.records[0], self.records[-1]
            self.say(f"loss {first.loss:.4f} -> {last.loss:.4f} over {len(self.records)} steps; last step "
                     f"{last.tokens_per_s:,.0f} tokens/s, peak {last.peak_mem_bytes / 2**20:,.0f} MiB/rank")
        return self.records

    def _flops(self, seq_length: int) -> tuple:
        """(model FLOPs per sample, peak FLOP/s per rank) for TFLOP/s and MFU; (None, None) for an own model.
        The peak comes from rank 0 (a CPU's is measured once and cached) and is the same on every rank."""
        if self.shape is None or not seq_length:
            return None, None
        from zeromega.integrations import accelerator as accel

        padded = gpt_model.padded_vocab_size(self.shape.vocab_size, self.shape.make_vocab_size_divisible_by,
                                             self.cfg.parallel.tp)
        per_sample = flops.flops_per_sample(self.shape, seq_length, padded)
        value = torch.zeros(1, dtype=torch.float64)
        if not dist.is_initialized() or dist.get_rank() == 0:
            peak, source = flops.peak_flops(accel.current().device_type)
            value[0] = peak or 0.0
            self.say(f"MFU against {peak / 1e12:,.2f} TFLOP/s per rank ({source})" if peak else
                     f"note: no MFU: {source}")
        if dist.is_initialized() and dist.get_world_size() > 1:
            with comm.paused():
                dist.broadcast(value, src=0)
        return per_sample, float(value.item()) or None

    def _out_of_time(self) -> bool:
        """Whether any rank has passed --exit-duration-in-mins (all-reduced: every rank stops at one step)."""
        late = time.time() - self._started > 60.0 * self.cfg.checkpoint.exit_duration_in_mins
        flag = torch.tensor([1.0 if late else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            with comm.paused():
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _evaluation(self, valid_ds, test_ds, start_step: int, dp_rank: int):
        """The run's evaluations (--eval-interval / --eval-iters), or None when none is asked for."""
        log = self.cfg.logging
        if not (log.eval_interval and log.eval_iters):
            return None
        if valid_ds is None:
            self.say(f"note: --split {self.cfg.data.split!r} leaves no validation data: no evaluation during "
                     "training (Megatron-LM skips it too)")
        return _Evaluation(self, valid_ds, test_ds, start_step, dp_rank)

    def _build_engine(self, kind: str, cfg: RunConfig, layout, weights):
        if kind == engines.MEGATRON:
            engine = engines.MegatronEngine(self.shape, cfg, layout, weights=weights)
            self.say(f"GPT {self.shape.num_layers}x{self.shape.hidden_size} on Megatron-Core's "
                     f"{'interleaved' if engine.trainer.virtual_stages > 1 else '1F1B'} schedule"
                     f"{', distributed optimizer (ZeRO-1)' if cfg.zero.stage >= 1 else ''}")
            return engine
        from zeromega.plugins.zero.engine import model_init_context

        plan_fn = self._memory_plan(cfg, layout)
        with model_init_context(cfg, layout, plan_fn):
            module = self._model_fn() if self._model_fn is not None else gpt_model.build_gpt(
                self.shape, cfg, layer_spec=gpt.layer_spec(self.shape, cfg))
        if self._model_fn is None:
            # The same weights Megatron-Core's engine draws for this seed: pp and ep do not change the model.
            gpt_model.init_by_name([module], self.shape, cfg.seed)
            if weights is not None:  # before the engine builds its optimizer, whose masters start from them
                from zeromega.checkpoint.weights import load_by_name

                load_by_name([module], weights)
            loss = self._gpt_loss()
        else:
            _refuse_model_parallel_without_megatron_layers(module, layout)
            loss = self._loss_fn
        if cfg.parallel.sequence_parallel:
            from zeromega.plugins.megatron.sequence_parallel import sum_sequence_parallel_grads

            sum_sequence_parallel_grads(module)
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
        self.say(f"{'model' if self._model_fn else f'GPT {self.shape.num_layers}x{self.shape.hidden_size}'}, "
                 f"{n_params / 1e6:.2f}M parameters per tp rank, DeepSpeed engine")
        return engines.DeepSpeedEngine(module, cfg, layout, loss, plan_fn)

    def _memory_plan(self, cfg: RunConfig, layout):
        """``plan_fn(ds) -> MemoryPlan`` for zeromega's GPT (None for an own model): the engine's corrections
        (swap buffers sized from the largest parameter) use it, and with offload rank 0 prints the plan
        before the model is built, so the run says where its bytes will live."""
        if self.shape is None:
            return None
        from zeromega.plugins.zero import plan as zplan
        from zeromega.plugins.zero.engine import zero_config
        from zeromega.integrations import accelerator as accel

        shape = dict(self.shape.__dict__, tied=not self.shape.untie_embeddings_and_output_weights,
                     learned_positions=self.shape.position_embedding_type == "learned_absolute")

        def plan_fn(ds: dict):
            return zplan.for_run(ds, layout, shape=shape, sequence_parallel=cfg.parallel.sequence_parallel,
                                 recompute=cfg.recompute.granularity)

        offload = {cfg.zero.offload_optimizer.device, cfg.zero.offload_param.device} - {"none"}
        if offload and (not dist.is_initialized() or dist.get_rank() == 0):
            device = accel.current().device_type
            ds, _ = zero_config(cfg, layout, device, plan_fn)
            self._log(plan_fn(ds).table(device))
        return plan_fn

    def _gpt_loss(self):
        if self.layout.cp == 1:
            return gpt_loss
        from zeromega.plugins.sequence.megatron import sequence_layout

        layout = sequence_layout(self.cfg.sequence.mode, rotary=self.shape.position_embedding_type == "rope")
        return lambda model, batch: gpt_loss(model, batch, layout)


def before_launch(cfg: RunConfig, gpt: bool = True) -> None:
    """The checks a run makes before any rank trains (``zeromega launch`` runs them too, through
    :mod:`zeromega.run.prelaunch`); ``gpt`` False for an own model (the GPT's model section does not apply)."""
    from .prelaunch import before_launch as checks

    checks(cfg, gpt=gpt)


def _refuse_model_parallel_without_megatron_layers(module: torch.nn.Module, layout) -> None:
    """tp > 1 over a model with no Megatron parallel layers would train tp diverging replicas."""
    if layout.tp > 1 and not any(getattr(p, "tensor_model_parallel", False) for p in module.parameters()):
        raise ConfigError("parallel.tp", layout.tp, "the model has no tensor-parallel layers (Megatron-Core's "
                          "ColumnParallelLinear / RowParallelLinear), so tp ranks would train diverging copies",
                          "use tp 1, or build the model from Megatron-Core's parallel layers")


class _Evaluation:
    """Megatron-LM's evaluation: every ``eval_interval`` steps ``eval_iters`` new global batches of the
    validation split (a resumed run skips those its earlier evaluations read), after the last step the
    validation split once more and the test split once; each a framed log line and a metrics record."""

    def __init__(self, run: Run, valid_ds, test_ds, start_step: int, dp_rank: int):
        from zeromega.integrations.megatron import data

        self.run, self.log = run, run.cfg.logging
        layout = run.layout
        per_eval = self.log.eval_iters * layout.global_batch
        start = (start_step // self.log.eval_interval) * per_eval
        self.valid = None if valid_ds is None else data.sample_batches(
            valid_ds, layout.micro, start_sample=start, dp_rank=dp_rank, dp_size=layout.dp)
        self.test = None if test_ds is None else data.sample_batches(
            test_ds, layout.micro, start_sample=0, dp_rank=dp_rank, dp_size=layout.dp)

    def _run(self, batches, kind: str, step: int, label: str) -> dict:
        loss = loop.evaluate(self.run.engine, batches, iters=self.log.eval_iters,
                             accumulation=self.run.layout.accumulation, dp_group=self.run._dp_group)
        record, line = loop.eval_record(kind, step, loss, label)
        self.run.say_raw(line)
        self.run.evaluations.append(record)
        return record

    def periodic(self, record) -> list[dict]:
        if self.valid is None or record.step % self.log.eval_interval:
            return []
        scheduler = self.run.cfg.scheduler
        collect = scheduler.manual_gc and scheduler.manual_gc_eval  # Megatron-LM: around in-training evaluations
        if collect:
            gc.collect()
        out = [self._run(self.valid, "valid", record.step, f"iteration {record.step}")]
        if collect:
            gc.collect()
        return out

    def final(self, step: int) -> list[dict]:
        out = []
        if self.valid is not None:
            out.append(self._run(self.valid, "valid", step, f"iteration {step} on validation set"))
        if self.test is not None:
            out.append(self._run(self.test, "test", step, f"iteration {step} on test set"))
        path = self.run.cfg.logging.metrics_path
        if path and out and (not dist.is_initialized() or dist.get_rank() == 0):
            with open(path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in out)
        return out
