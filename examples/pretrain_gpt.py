#!/usr/bin/env python
"""Megatron-style GPT pretraining through zeromega: Megatron-Core model, DeepSpeed engine.

Flags are Megatron-LM's (``--num-layers``, ``--tensor-model-parallel-size``,
``--micro-batch-size``, ``--zero-stage`` ...). ZeRO and precision may also
come from a DeepSpeed JSON (``--deepspeed_config`` / ``--config``, or the
``ZEROMEGA_CONFIG`` that ``zeromega launch --config`` passes to every rank);
a value given both ways must agree.

    zeromega launch --nproc-per-node 2 --config examples/configs/zero1.json \\
        examples/pretrain_gpt.py --train-iters 300 --metrics-out runs/metrics.jsonl

Without ``--data-path`` the script trains on the project's own corpus (the
Python standard library's sources, byte-tokenized), built on first use.

Checkpoints use Megatron-LM's flags: ``--save DIR --save-interval N`` writes
one every N steps and at the end; ``--load DIR`` resumes from the newest
(model, ZeRO partitions, scheduler, every rank's RNGs, data position). On
Megatron-Core's engine (pp > 1 or MoE) the model and distributed-optimizer
state go through Megatron's dist checkpointing, which also reshards pp and ep;
such a checkpoint keeps the run on that engine, even at pp 1. With
``--load`` and ``--save`` naming the same directory, a run that finds no
checkpoint there starts fresh, so one command line serves the first attempt
and every restart (``zeromega launch --max-restarts K``). ``--finetune`` and
``--no-load-optim`` load only the weights (from either engine's checkpoint,
into any layout; :mod:`zeromega.checkpoint.weights`), ``--no-load-rng``
keeps this run's seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from torch.distributed.elastic.multiprocessing.errors import record


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This script's own flags; the run-config flags are read by zeromega's translator."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    model = p.add_argument_group("model")
    model.add_argument("--num-layers", type=int, default=4)
    model.add_argument("--hidden-size", type=int, default=256)
    model.add_argument("--ffn-hidden-size", type=int, default=None)
    model.add_argument("--num-attention-heads", type=int, default=8)
    model.add_argument("--num-query-groups", type=int, default=None)
    model.add_argument("--seq-length", type=int, default=128)
    model.add_argument("--max-position-embeddings", type=int, default=None)
    model.add_argument("--position-embedding-type", choices=["learned_absolute", "rope"], default="learned_absolute")
    model.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    model.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    model.add_argument("--hidden-dropout", type=float, default=0.1)
    model.add_argument("--attention-dropout", type=float, default=0.1)
    model.add_argument("--init-method-std", type=float, default=0.02)
    moe = p.add_argument_group("mixture of experts (--num-experts, --moe-router-topk and ep come from the config)")
    moe.add_argument("--moe-ffn-hidden-size", type=int, default=None)
    moe.add_argument("--moe-aux-loss-coeff", type=float, default=0.0)
    moe.add_argument("--moe-expert-capacity-factor", type=float, default=None)
    moe.add_argument("--moe-token-dispatcher-type", choices=["alltoall", "allgather"], default="alltoall")
    train = p.add_argument_group("training")
    train.add_argument("--train-iters", type=int, default=300)
    train.add_argument("--min-lr", type=float, default=0.0)
    train.add_argument("--lr-warmup-iters", type=int, default=0)
    train.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="cosine")
    train.add_argument("--seed", type=int, default=1234)
    data = p.add_argument_group("data")
    data.add_argument("--data-path", default=None, help="prefix of a Megatron .bin/.idx dataset (byte tokens)")
    data.add_argument("--split", default="98,1,1")
    run = p.add_argument_group("run")
    run.add_argument("--config", "--deepspeed_config", "--deepspeed-config", dest="config",
                     default=os.environ.get("ZEROMEGA_CONFIG"), help="DeepSpeed JSON (optional 'zeromega' block)")
    run.add_argument("--deepspeed", action="store_true", help="accepted for Megatron-DeepSpeed compatibility")
    run.add_argument("--metrics-out", default=None, help="JSON lines, one object per step (rank 0)")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ckpt = p.add_argument_group("checkpointing (--save DIR, --save-interval N and --load DIR are read by zeromega's "
                                "translator, so a config file may state them too)")
    ckpt.add_argument("--exit-interval", type=int, default=None, help="save and exit after a step divisible by this")
    ckpt.add_argument("--exit-signal-handler", action="store_true",
                      help="on SIGTERM, save after the current step and exit")
    ckpt.add_argument("--finetune", action="store_true",
                      help="load only the model weights from --load (any layout, either engine) and start at step 0 "
                           "with a fresh optimizer, scheduler, data position and RNGs")
    ckpt.add_argument("--no-load-optim", action="store_true",
                      help="load the weights, step, data position and scheduler from --load, not the optimizer "
                           "(Adam restarts from zero moments); works across any layout")
    ckpt.add_argument("--no-load-rng", action="store_true", help="do not restore the RNG states from --load")
    args, rest = p.parse_known_args(argv)
    return args, rest


def saves_where_it_loads(args) -> bool:
    """--save and --load name one directory: one command line for the first attempt and every restart."""
    return bool(args.save and args.load) and os.path.abspath(args.save) == os.path.abspath(args.load)


def run_config(args, rest: list[str]):
    """Config file + Megatron flags -> RunConfig; flags neither this script nor the translator know are errors."""
    from zeromega.launch import translate

    from zeromega.config.errors import ConfigError

    try:
        _, unknown = translate.from_megatron_args(rest)
        if unknown:
            raise ConfigError("arguments", " ".join(unknown), "not a flag pretrain_gpt.py or zeromega knows",
                              "see `pretrain_gpt.py --help` and `zeromega translate --help`")
        cfg = translate.build(args.config, megatron_argv=rest)
    except ConfigError as err:  # bad input: one line, exit code 2, no traceback
        print(f"pretrain_gpt.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    # Checkpoint directories may come from the config file as well as from flags (the translator
    # refused them if both were given and disagree).
    args.save, args.load, args.save_interval = cfg.checkpoint.save, cfg.checkpoint.load, cfg.checkpoint.interval
    if args.finetune and saves_where_it_loads(args):
        print(f"pretrain_gpt.py: error: --finetune with --load and --save both {args.load!r}: every restart would "
              f"fine-tune again from step 0, from the run's own checkpoint; fix: save to another directory",
              file=sys.stderr)
        raise SystemExit(2)
    return cfg


class CheckpointedRun:
    """The run's --save/--load/--exit-* policy around :class:`zeromega.checkpoint.Checkpointer` (DeepSpeed's
    engine) or :class:`zeromega.plugins.megatron.checkpoint.MegatronCheckpointer` (Megatron-Core's, ``trainer``)."""

    def __init__(self, args, engine, layout, cfg, scheduler, model_meta: dict, trainer=None, weights=None):
        from zeromega.checkpoint import Checkpointer
        from zeromega.plugins.megatron.checkpoint import MegatronCheckpointer

        self.args, self.global_batch, self.weights, self.scheduler = args, layout.global_batch, weights, scheduler
        if trainer is not None:
            self.ckpt = MegatronCheckpointer(trainer, layout, cfg.zero.stage, cfg.precision, scheduler,
                                             model_meta=model_meta)
        else:
            self.ckpt = Checkpointer(engine, layout, cfg.zero.stage, cfg.precision, scheduler, model_meta=model_meta)
        self.start_step, self.start_samples, self.saved_step = 0, 0, None
        self.stop_requested = False
        if args.exit_signal_handler:
            import signal

            signal.signal(signal.SIGTERM, self._on_sigterm)

    @staticmethod
    def weights_only(args) -> bool:
        return bool(args.load) and (args.finetune or args.no_load_optim)

    @staticmethod
    def resumes_megatron(args) -> bool:
        """Whether --load names a checkpoint of Megatron-Core's engine (collective): such a run stays on
        that engine, whatever its pp, so a pp > 1 checkpoint can resume at pp 1. A weights-only load
        goes into whichever engine this run's layout picks."""
        from zeromega.checkpoint import reshard, saved_engine

        return bool(args.load) and not CheckpointedRun.weights_only(args) and \
            saved_engine(args.load) == reshard.MEGATRON

    @staticmethod
    def read_weights(args):
        """The --load checkpoint's whole fp32 weights for --finetune / --no-load-optim (collective:
        every file verified first); None otherwise, or when the directory is empty and --save names it."""
        from zeromega.checkpoint import open_verified
        from zeromega.checkpoint import weights as weights_io

        if not CheckpointedRun.weights_only(args):
            return None
        found = open_verified(args.load, allow_empty=saves_where_it_loads(args))
        return None if found is None else weights_io.read(*found)

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = True

    def resume(self) -> tuple[int, int]:
        """(step, consumed samples) to start from; (0, 0) for a fresh run."""
        args = self.args
        if not args.load:
            return 0, 0
        if self.weights is not None:
            return self._resume_without_optimizer()
        if self.weights_only(args):  # --finetune / --no-load-optim with nothing saved yet
            return 0, 0
        resumed = self.ckpt.load(args.load, allow_empty=saves_where_it_loads(args), load_rng=not args.no_load_rng)
        if resumed is None:
            return 0, 0
        self.start_step, self.start_samples = resumed.step, resumed.consumed_samples
        self.saved_step = resumed.step
        return resumed.step, resumed.consumed_samples

    def _resume_without_optimizer(self) -> tuple[int, int]:
        """The weights are in the model already; --no-load-optim also takes the step, data position,
        scheduler and (under the saved layout) this rank's RNGs, as Megatron-LM does."""
        from zeromega.checkpoint import RNG_FILE, _rank, rng
        from zeromega.checkpoint.files import safe_load

        if self.args.finetune:
            return 0, 0
        manifest = self.weights.manifest
        if self.scheduler is not None and manifest.get("scheduler") is not None:
            self.scheduler.load_state_dict(manifest["scheduler"])
        rng_file = self.weights.path / RNG_FILE.format(_rank())
        if not self.args.no_load_rng and manifest["layout"] == self.ckpt._layout_meta() and rng_file.is_file():
            rng.restore(safe_load(rng_file))
        self.start_step, self.start_samples = int(manifest["step"]), int(manifest["consumed_samples"])
        self.saved_step = self.start_step
        return self.start_step, self.start_samples

    def consumed(self, step: int) -> int:
        return self.start_samples + (step - self.start_step) * self.global_batch

    def save(self, step: int) -> None:
        if self.args.save and self.saved_step != step:
            self.ckpt.save(self.args.save, step, self.consumed(step))
            self.saved_step = step

    def _signalled(self) -> bool:
        """Whether any rank got SIGTERM (all ranks must stop at the same step)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.stop_requested else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def after_step(self, record) -> bool:
        args, step = self.args, record.step
        if args.save_interval and step % args.save_interval == 0:
            self.save(step)
        stop = bool(args.exit_interval and step % args.exit_interval == 0)
        if args.exit_signal_handler and self._signalled():
            stop = True
        if stop:
            self.save(step)
        self.last_step = step
        return stop

    def finish(self) -> None:
        """Megatron saves once more at the end unless the last step was just saved."""
        step = getattr(self, "last_step", None)
        if step is not None:
            self.save(step)


@record
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args, rest = parse_args(argv)
    cfg = run_config(args, rest)

    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from zeromega.integrations import comm
    from zeromega.integrations.deepspeed import build_engine, model_init_context
    from zeromega.plugins.megatron.pipeline import MegatronTrainer
    from zeromega.plugins.megatron.sequence_parallel import sum_sequence_parallel_grads
    from zeromega.integrations.megatron import data, model, parallel
    from zeromega.train import train

    comm.install()
    layout = parallel.initialize(cfg, seed=args.seed)  # collectives time out after launch.distributed_timeout_minutes
    rank0 = dist.get_rank() == 0
    say = print if rank0 else (lambda *a, **k: None)
    say(f"zeromega: world {layout.world} = tp {layout.tp} x pp {layout.pp} x cp {layout.cp} x dp {layout.dp}; "
        f"ZeRO-{cfg.zero.stage}, {cfg.precision}; global batch {layout.global_batch} = micro {layout.micro} "
        f"x accumulation {layout.accumulation} x dp {layout.dp}")

    prefix = args.data_path
    if prefix is None:
        prefix = data.default_corpus_prefix()
        if rank0:
            data.build_corpus(prefix)
        dist.barrier()
    samples = args.train_iters * layout.global_batch
    train_ds, _, _ = data.build_gpt_datasets(prefix, args.seq_length, args.seed, (samples, 0, 0), split=args.split)
    weights = CheckpointedRun.read_weights(args)  # --finetune / --no-load-optim: weights only, any layout
    if weights is not None:
        say(f"zeromega: weights from {weights.path}: {weights.source}")
        if saves_where_it_loads(args):
            say("zeromega: note: --no-load-optim with --load and --save naming one directory restarts Adam at every "
                "restart too; drop --no-load-optim once this run has saved")

    shape = model.GPTShape(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        seq_length=args.max_position_embeddings or args.seq_length, vocab_size=data.ByteTokenizer().vocab_size,
        ffn_hidden_size=args.ffn_hidden_size, num_query_groups=args.num_query_groups,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std, position_embedding_type=args.position_embedding_type,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        num_experts=cfg.moe.num_experts, moe_router_topk=cfg.moe.topk, moe_ffn_hidden_size=args.moe_ffn_hidden_size,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff, moe_expert_capacity_factor=args.moe_expert_capacity_factor,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
    )
    dp_rank = parallel_state.get_data_parallel_rank()
    trainer = None
    if layout.pp > 1 or cfg.moe.num_experts or CheckpointedRun.resumes_megatron(args):
        # DeepSpeed refuses ZeRO-2/3 with pipelines and cannot reduce Megatron's expert gradients over
        # the expert-data-parallel group: Megatron-Core's schedules, DDP and distributed optimizer run these.
        # Weights drawn by their 1-process names: without it Megatron's CPU init gives every ep rank
        # the same local experts (expert e == expert e + E/ep) and each pp stage its own stream.
        trainer = MegatronTrainer(shape, cfg, layout, distributed_optimizer=cfg.zero.stage >= 1, init_seed=args.seed,
                                  weights=weights)
        engine, optimizer = None, trainer.optimizer
        say(f"zeromega: GPT {args.num_layers}x{args.hidden_size} on Megatron-Core's "
            f"{'interleaved' if trainer.virtual_stages > 1 else '1F1B'} schedule"
            f"{', distributed optimizer (ZeRO-1)' if cfg.zero.stage >= 1 else ''}")
    else:
        with model_init_context(cfg, layout):
            gpt = model.build_gpt(shape, cfg)
        if weights is not None:  # before the engine builds its optimizer, whose masters start from them
            from zeromega.checkpoint.weights import load_by_name

            load_by_name([gpt], weights)
        if cfg.parallel.sequence_parallel:
            sum_sequence_parallel_grads(gpt)
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in gpt.parameters())
        say(f"zeromega: GPT {args.num_layers}x{args.hidden_size}, {n_params / 1e6:.2f}M parameters per tp rank")
        engine = build_engine(gpt, cfg, layout)
        optimizer = engine.optimizer
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if args.lr_warmup_iters else cfg.optimizer.lr, max_lr=cfg.optimizer.lr,
        min_lr=args.min_lr, lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=args.train_iters,
        lr_decay_style=args.lr_decay_style, start_wd=cfg.optimizer.weight_decay,
        end_wd=cfg.optimizer.weight_decay, wd_incr_steps=args.train_iters, wd_incr_style="constant",
    )

    run = CheckpointedRun(args, engine, layout, cfg, scheduler, dataclasses.asdict(shape),
                          trainer=trainer, weights=weights) if (args.save or args.load) else None
    start_step, consumed = run.resume() if run else (0, 0)
    if start_step:
        say(f"zeromega: resumed at step {start_step} ({consumed} samples consumed)")

    # cp ranks of one dp rank read the same samples and split them along the sequence.
    batches = data.sample_batches(train_ds, layout.micro, start_sample=consumed, dp_rank=dp_rank, dp_size=layout.dp)
    step_fn = None
    if engine is None:
        step_fn = lambda: trainer.train_step([next(batches) for _ in range(layout.accumulation)]).loss  # noqa: E731
    sequence_layout = None
    if layout.cp > 1:
        from zeromega.plugins.sequence.megatron import sequence_layout as layout_for

        sequence_layout = layout_for(cfg.sequence.mode, rotary=args.position_embedding_type == "rope")
    records = train(
        engine, batches, iters=args.train_iters, accumulation=layout.accumulation,
        tokens_per_step=layout.global_batch * args.seq_length,
        dp_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
        metrics_out=args.metrics_out, scheduler=scheduler, progress=not args.no_progress,
        start_step=start_step, on_step=run.after_step if run else None,
        step_fn=step_fn, optimizer=optimizer, sequence_layout=sequence_layout,
        timeout_minutes=cfg.launch.distributed_timeout_minutes,
    )
    if run:
        run.finish()
    if records:
        first, last = records[0], records[-1]
        say(f"zeromega: loss {first.loss:.4f} -> {last.loss:.4f} over {len(records)} steps; "
            f"last step {last.tokens_per_s:,.0f} tokens/s, peak {last.peak_mem_bytes / 2**20:,.0f} MiB/rank")
    parallel.shutdown()


if __name__ == "__main__":
    main()
