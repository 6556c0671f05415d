"""Save and resume a :class:`~zeromega.plugins.megatron.pipeline.MegatronTrainer` run (pp > 1, MoE) with
Megatron-Core's own dist checkpointing, inside zeromega's checkpoint directories.

One checkpoint, ``SAVE/iter_NNNNNNN/`` (staged, hashed into ``manifest.json``
and published by rename exactly as :mod:`zeromega.checkpoint.files` does for
DeepSpeed's files)::

    metadata.json, common.pt, .metadata, __R_0.distcp   Megatron-Core's torch_dist checkpoint
    zeromega/rng_rank_RRRRR.pt                        every RNG of global rank R
    manifest.json                                     engine, step, samples, scheduler, layout, model shape

What goes into the dist checkpoint: each model chunk's ``sharded_state_dict()``
(tensors under their 1-process names: global layer numbers, global expert
numbers, the tied output weight as the first stage's embedding) and the
optimizer's ``sharded_state_dict`` in the distributed optimizer's
``fully_reshardable`` form: fp32 params and Adam moments cut back into
model-parameter shapes. Megatron's newer default, ``fully_sharded_model_space``,
raises "flattened_range is not supported" in 0.16.1, and ``dp_reshardable``
only survives a dp change. So another pp, vpp, ep or dp reads the same files
and Megatron-Core re-slices them; :func:`zeromega.checkpoint.reshard.plan_megatron`
says which changes are allowed. One change is not Megatron's to handle: at
ep 1 expert weights sit in the dense optimizer, at ep > 1 in one of their
own, so an ep change changes the number of optimizers; each then keeps its
own param groups and takes the saved Adam step (the scheduler, restored from
the manifest, sets lr and weight decay). ZeRO-0 (Megatron's plain optimizer)
keys its state by global names as well, so it reshards too, except across
ep; and a dense model's state moves between the two optimizers
(:func:`_retarget_masters`, :func:`_load_across_optimizers`).

On CPU the torch_dist save reaches two ``torch.cuda`` calls, patched in
:mod:`zeromega.integrations.megatron.cpu_patches`; its writer forks one
process per rank, so a script that saves needs an ``if __name__ == "__main__":``
guard. Megatron would also spawn, once per process, a ``multiprocessing.Manager``
whose queue carries the writer's result back; the save here is synchronous, so
the result is put and taken in the saving process and a plain queue serves
(:func:`_results_in_process`). A spawned Manager outlives a SIGKILLed rank and
keeps the launcher's stdout and stderr open: ``zeromega launch`` piped into a
log never saw end-of-file after a rank was killed (measured, pp2 under
``--max-restarts``).

Three accommodations, each for a gap in Megatron-Core 0.16.1 when it runs with
torch's own Adam (no Apex / TransformerEngine), none of them a patch:

- torch's Adam creates its state at the first step, but the distributed
  optimizer's ``state_dict`` asserts that a ``step`` is there: a fresh run's
  state is created up front, as torch would (:func:`_create_adam_state`);
- ``_set_main_param_and_optimizer_states`` copies every key of the state,
  ``step`` included, from the loaded tensors, which have no ``step``; and
  the load hands every parameter the *same* ``step`` tensor, which torch's
  Adam then increments once per parameter (measured: the loss drifts from
  the second step on). :func:`_load_optimizer` holds ``step`` aside during
  the tensor load and gives each parameter its own copy;
- on CPU the distributed optimizer gathers its state over its gloo group
  (``..._mem_efficient``: the other path puts tensors on ``torch.cuda``);
  zeromega builds no separate gloo groups there because every CPU group is gloo.

And one for a bug in Megatron-Core 0.16.1 on every device: its
``fully_reshardable`` save cut parameters after a padded grad-buffer bucket
from the wrong offset (:func:`_world_tensors_in_buffer_coordinates`), so a
tied embedding resumed shifted. Every save now checks that the masters it
writes equal the model's weights (:func:`misplaced_masters`) and refuses,
before writing anything, when they do not; a load checks the same of what it
read before anything reaches the model.
"""

from __future__ import annotations

import contextlib
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from zeromega.integrations import accelerator as accel

from . import (RNG_FILE, Resumed, _agree, _barrier, _gather, _rank, fresh_stage, layout_meta, open_verified, reshard,
               rng, tag_for)
from .export import master_off_weight
from .files import (CheckpointError, dist_checkpoint_loads, hash_file, publish, records_as_dicts, records_from_dicts,
                    safe_load, torch_save)

OPTIMIZER_FORMAT = "fully_reshardable"
BACKEND = "torch_dist"


def _optimizers(optimizer) -> list:
    """The Megatron optimizers inside ``optimizer`` (MoE: one for dense params, one for experts)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _sharding_metadata() -> dict:
    return {"distrib_optim_sharding_type": OPTIMIZER_FORMAT, "chained_optim_avoid_prefix": True,
            "distrib_optim_fully_reshardable_mem_efficient": not accel.current().is_cuda}


def _gather_over_gloo_on_cpu(optimizer) -> None:
    """The memory-efficient gather runs over ``data_parallel_group_gloo``; on CPU the dp group is gloo."""
    if accel.current().is_cuda:
        return
    for opt in _optimizers(optimizer):
        if getattr(opt, "data_parallel_group_gloo", False) is None:
            opt.data_parallel_group_gloo = opt.data_parallel_group


@contextlib.contextmanager
def _results_in_process() -> Iterator[None]:
    """Meanwhile Megatron's writer hands its result back through a plain queue, not a spawned Manager's
    (module docstring); only for synchronous saves, whose put and get happen in this process."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = filesystem_async._results_queue
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = previous


def _in_buffer_coordinates(optimizer, state: Optional[dict]) -> Optional[dict]:
    """``get_parameter_state_dp_zero``'s world tensors laid out as the grad buffer is, bucket-end padding
    included, so that ``param_index_map`` offsets index them (see :func:`_world_tensors_in_buffer_coordinates`)."""
    if state is None:
        return None
    for gbuf_idx, buffer in enumerate(optimizer.buffers):
        for world in state[gbuf_idx].values():
            for key in ("param", "exp_avg", "exp_avg_sq"):
                packed, laid_out, start = world[key], torch.zeros(buffer.numel, dtype=world[key].dtype), 0
                for bucket in buffer.buckets:
                    laid_out[bucket.offset:bucket.offset + bucket.numel_unpadded] = \
                        packed[start:start + bucket.numel_unpadded]
                    start += bucket.numel_unpadded
                if start != packed.numel():
                    raise CheckpointError(f"the distributed optimizer's gathered state holds {packed.numel()} "
                                          f"elements, its buckets {start}", "report this with the model shape")
                world[key] = laid_out
    return state


@contextlib.contextmanager
def _world_tensors_in_buffer_coordinates(optimizer) -> Iterator[None]:
    """Meanwhile the distributed optimizer's ``fully_reshardable`` state reads every parameter from its place.

    Megatron-Core 0.16.1 gathers the optimizer state with each bucket's end
    padding stripped (``get_parameter_state_dp_zero``) and then slices it by
    ``param_index_map``, whose offsets still count that padding. Every
    parameter after a padded bucket is read shifted by the padding before
    it, its tail zero-filled ("param range exceeds unpadded buffer"). Tied
    embeddings always get a bucket of their own, so a pipeline stage whose
    other parameters do not fill a multiple of lcm(dp, 128) saved its
    embedding's master weights and Adam moments shifted (measured: one
    transformer layer of hidden 64 per stage is 49,984 elements, padded by
    64; the resumed embedding was the saved one moved by 64 elements, the
    one-layer-per-stage resume bug). Fixed upstream in Megatron-LM PR 5077,
    after 0.16; here the gathered tensors are re-laid out in buffer
    coordinates for the save and the load request only.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    relaid = [opt for opt in _optimizers(optimizer) if isinstance(opt, DistributedOptimizer)]
    for opt in relaid:
        gather = opt.get_parameter_state_dp_zero
        opt.get_parameter_state_dp_zero = \
            lambda *a, _gather=gather, _opt=opt, **k: _in_buffer_coordinates(_opt, _gather(*a, **k))
    try:
        yield
    finally:
        for opt in relaid:
            del opt.get_parameter_state_dp_zero


def sharded_state_dict(trainer, loading: bool) -> dict:
    """Megatron-LM's layout: ``model0..model{v-1}`` (one per chunk) and ``optimizer``."""
    trainer.sync_params()  # under --overlap-param-gather the step left the weights' all-gather to the next forward
    _gather_over_gloo_on_cpu(trainer.optimizer)
    metadata = _sharding_metadata()
    state = {f"model{i}": chunk.module.sharded_state_dict(metadata=dict(metadata))
             for i, chunk in enumerate(trainer.chunks)}
    with _world_tensors_in_buffer_coordinates(trainer.optimizer):
        state["optimizer"] = trainer.optimizer.sharded_state_dict(state, is_loading=loading,
                                                                  metadata=dict(metadata))
    return state


MASTER_PREFIX = "optimizer.state.param."


def _sharded_tensors(request, loaded=None) -> Iterator[tuple]:
    """(ShardedTensor, its tensor) pairs of a sharded state dict; with ``loaded`` (what
    ``dist_checkpointing.load`` returned for that request, same nesting) the tensor is the loaded one."""
    from megatron.core.dist_checkpointing import ShardedTensor

    if isinstance(request, dict):
        for key, value in request.items():
            yield from _sharded_tensors(value, None if loaded is None else loaded.get(key))
    elif isinstance(request, (list, tuple)):
        for i, value in enumerate(request):
            yield from _sharded_tensors(value, None if loaded is None or i >= len(loaded) else loaded[i])
    elif isinstance(request, ShardedTensor):
        data = request.data if loaded is None else loaded
        if torch.is_tensor(data):
            yield request, data


def misplaced_masters(state: dict, loaded: Optional[dict] = None) -> list[str]:
    """Parameters whose fp32 master (the distributed optimizer's ``param`` state) is not the model's weight
    rounded to the model's dtype: in ``state`` as about to be saved, or in ``loaded`` as just read.

    The optimizer's tensors are cut from a gathered buffer by offsets
    (:func:`_world_tensors_in_buffer_coordinates`); a misplaced cut writes a
    plausible tensor that only a resume reveals. After a step the model
    weight is exactly the master rounded to the model's dtype, so masters
    that disagree with the weights beside them are refused: before a save
    writes anything, and at load (a checkpoint written before the fix).
    Tensors are matched by key and global offset (layers and experts share a key).
    """
    pairs = list(_sharded_tensors(state, loaded))
    weights = _model_tensors(pairs)
    wrong = []
    for master, data in pairs:
        if not master.key.startswith(MASTER_PREFIX):
            continue
        name = master.key[len(MASTER_PREFIX):]
        weight = weights.get((name, tuple(master.global_offset)))
        if weight is not None and weight.shape == data.shape and (why := master_off_weight(data, weight)):
            wrong.append(f"{name} ({why})")
    return wrong


def _model_tensors(pairs) -> dict[tuple, torch.Tensor]:
    """(key, global offset) -> tensor of the model's (not the optimizer's) sharded tensors in ``pairs``."""
    return {(t.key, tuple(t.global_offset)): data for t, data in pairs if not t.key.startswith("optimizer.")}


def _replace_leaves(tree, replacement: Callable) -> None:
    """Put ``replacement(leaf)`` in place of every leaf of nested dicts and lists (``None``: keep it)."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for k, v in list(items):
        if isinstance(v, (dict, list)):
            _replace_leaves(v, replacement)
        elif (new := replacement(v)) is not None:
            tree[k] = new


def _misplaced_on_any_rank(state: dict, loaded: Optional[dict] = None) -> list[str]:
    return [f"rank {rank}: {name}" for rank, names in enumerate(_gather(misplaced_masters(state, loaded)))
            for name in names]


def _refuse_misplaced_masters(state: dict) -> None:
    """Every rank raises when any rank's masters are misplaced, before the collective save starts."""
    wrong = _misplaced_on_any_rank(state)
    if wrong:
        raise CheckpointError(f"the distributed optimizer's fp32 masters disagree with the model weights for "
                              f"{len(wrong)} tensor(s), e.g. {'; '.join(wrong[:3])}; nothing was written",
                              "report this with the model shape and layout; the previous checkpoint is intact")


def _create_adam_state(optimizer) -> None:
    """Give every parameter torch Adam's state (step 0, zero moments) if it has none yet."""
    for opt in _optimizers(optimizer):
        inner = opt.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state[param]:
                    inner.state[param] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param),
                                          "exp_avg_sq": torch.zeros_like(param)}


def _saved_parts(merged: dict) -> list[dict]:
    """The non-tensor part (param groups, sharding type) of each saved optimizer, in chain order.

    ``merged`` is what dist_checkpointing returns: the saved common state laid
    over this run's request, so with another number of optimizers (ep 1 puts
    experts in the dense optimizer, ep > 1 in their own) both shapes meet in it.
    """
    if "param_state_sharding_type" in merged:
        return [merged]
    return [merged[k] for k in sorted(k for k in merged if isinstance(k, int)) if "optimizer" in merged[k]]


def _adam_step(parts: list[dict]) -> float:
    steps = {group["step"] for part in parts for group in part["optimizer"]["param_groups"] if "step" in group}
    if len(steps) != 1:
        raise CheckpointError(f"the checkpoint's optimizers disagree on Adam's step ({sorted(steps)})",
                              "load another checkpoint")
    return steps.pop()


PLAIN_MASTER_PREFIX = "optimizer.state.fp32_param."


def _retarget_masters(request: dict, saved_distributed: bool, precision: str) -> None:
    """Point this run's optimizer request at the fp32 masters where the *other* optimizer saved them.

    The distributed optimizer saves its masters as ``optimizer.state.param.K``;
    Megatron's plain optimizer as ``optimizer.state.fp32_param.K`` for bf16/fp16
    and not at all for fp32, whose masters are the model weights ``K``. Adam's
    moments have the same keys in both (``optimizer.state.exp_avg.K``).
    """
    from dataclasses import replace

    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject

    def retargeted(tensor):
        if not isinstance(tensor, ShardedTensor):
            return None
        key = tensor.key
        if saved_distributed and key.startswith(PLAIN_MASTER_PREFIX):  # this run: plain, half precision
            return replace(tensor, key=MASTER_PREFIX + key[len(PLAIN_MASTER_PREFIX):])
        if not saved_distributed and key.startswith(MASTER_PREFIX):  # this run: distributed
            name = key[len(MASTER_PREFIX):]
            if precision != "fp32":
                return replace(tensor, key=PLAIN_MASTER_PREFIX + name)
            # The model weight itself, which the request already reads: filled in after the load.
            return LocalNonpersistentObject(_ModelWeight(name, tuple(tensor.global_offset)))
        return None

    _replace_leaves(request["optimizer"], retargeted)


@dataclass(frozen=True)
class _ModelWeight:
    """Where an fp32 master comes from when a ZeRO-0 fp32 checkpoint kept none: the model tensor."""

    key: str
    global_offset: tuple


def _fill_model_weights(request: dict, loaded: dict) -> None:
    """Replace each :class:`_ModelWeight` in ``loaded["optimizer"]`` by the model tensor it names."""
    weights = _model_tensors(_sharded_tensors(request, loaded))
    _replace_leaves(loaded["optimizer"], lambda v: weights[(v.key, v.global_offset)].detach().clone()
                    if isinstance(v, _ModelWeight) else None)


def _load_across_optimizers(optimizer, merged: dict, saved_distributed: bool) -> None:
    """Load the other optimizer's state (ZeRO-0 <-> distributed optimizer, one optimizer, not MoE):
    Adam's moments and fp32 masters come from the tensors :func:`_retarget_masters` asked for, the
    step from the saved param groups or ``common_step``; the param groups are this run's own."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    opts = _optimizers(optimizer)
    if len(opts) != 1 or (saved_distributed and isinstance(opts[0], DistributedOptimizer)):
        raise CheckpointError(f"the optimizer state moves between ZeRO-0 and the distributed optimizer for one "
                              f"optimizer only; this run chains {len(opts)} (a MoE model)",
                              "resume with the saved --zero-stage, or load the weights alone (--no-load-optim)")
    opt = opts[0]
    if not saved_distributed:  # ZeRO-0 checkpoint -> distributed optimizer
        plain = merged["state"] if "state" in merged else merged["optimizer"]["state"]
        step = float(plain["common_step"])
        part = opt.state_dict()
        for group in part["optimizer"]["param_groups"]:
            group["step"] = step
        opt.load_state_dict(part)
        _load_tensors_keeping_steps(opt, merged["param_state"])
        return
    step = torch.tensor(float(_adam_step([merged])), dtype=torch.float32)
    current = opt.state_dict()
    if "fp32_from_fp16_params" in current:  # bf16 / fp16: Megatron's Float16OptimizerWithFloat16Params
        state = {"optimizer": {"state": {**merged["optimizer"]["state"], "common_step": step},
                               "param_groups": current["optimizer"]["param_groups"]},
                 "fp32_from_fp16_params": merged["fp32_from_fp16_params"]}
        if "grad_scaler" in current and "grad_scaler" in merged:
            state["grad_scaler"] = merged["grad_scaler"]
    else:
        state = {"state": {**merged["state"], "common_step": step}, "param_groups": current["param_groups"]}
    opt.load_state_dict(state)


def _load_tensors_keeping_steps(opt, tensors: dict) -> None:
    """The distributed optimizer's fully_reshardable tensor load, Adam's ``step`` (set by
    ``load_state_dict``) held aside and handed back as one copy per parameter (module docstring)."""
    adam = opt.optimizer.state
    steps = {param: entry.pop("step") for param, entry in adam.items() if "step" in entry}
    opt.load_parameter_state_from_fully_reshardable(tensors)
    for param, step in steps.items():
        adam[param]["step"] = step.clone()


def _load_optimizer(optimizer, merged: dict) -> None:
    """Megatron's distributed-optimizer load, per optimizer of the chain, with torch Adam's ``step`` held
    aside during the tensor load (module docstring). When the chain's length changed with ep, each
    optimizer keeps its own param groups and takes the saved Adam step (the scheduler sets lr and wd)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    opts = _optimizers(optimizer)
    if not any(isinstance(opt, DistributedOptimizer) for opt in opts):
        optimizer.load_state_dict(merged)  # ZeRO-0, same layout: Megatron copies the common step per parameter
        return
    saved = _saved_parts(merged)
    tensors = [merged["param_state"]] if len(opts) == 1 else [merged[i]["param_state"] for i in range(len(opts))]
    for part in saved:
        if part.get("param_state_sharding_type") != OPTIMIZER_FORMAT:
            raise CheckpointError(f"optimizer state saved as {part.get('param_state_sharding_type')!r}, zeromega "
                                  f"reads the distributed optimizer's {OPTIMIZER_FORMAT!r}",
                                  "load a checkpoint zeromega wrote")
    for i, opt in enumerate(opts):
        if not isinstance(opt, DistributedOptimizer):
            raise CheckpointError(f"{type(opt).__name__} cannot load a distributed-optimizer checkpoint",
                                  "resume with --zero-stage 1 or more")
        if len(saved) == len(opts):
            part = {k: v for k, v in saved[i].items() if k not in ("param_state", "param_state_sharding_type")}
        else:
            part = opt.state_dict()
            for group in part["optimizer"]["param_groups"]:
                group["step"] = _adam_step(saved)
        opt.load_state_dict(part)  # param groups, Adam's step, grad scaler
        _load_tensors_keeping_steps(opt, tensors[i])
    if len(opts) > 1:
        optimizer._synchronize_steps()  # as ChainedOptimizer.load_state_dict does


def _first_failure(err, ckpt: Path) -> CheckpointError:
    """The CheckpointError inside a torch.distributed.checkpoint ``CheckpointException`` (lowest rank first), or
    one made from the first rank's exception."""
    failures = sorted(err.failures.items())
    for _, (exc, _trace) in failures:
        if isinstance(exc, CheckpointError):
            return exc
    rank, (exc, _trace) = failures[0] if failures else (0, (err, None))
    first = (str(exc).splitlines() or [""])[0][:400]
    return CheckpointError(f"Megatron-Core could not load {ckpt} (rank {rank}): {type(exc).__name__}: {first}",
                           "resume with the layout and model it was saved with")

class MegatronCheckpointer:
    """Saves and resumes one MegatronTrainer's run; collective, every rank calls every method.

    The same interface as :class:`zeromega.checkpoint.Checkpointer` (``save``,
    ``load``, ``fault``, ``last_save``), so a training script holds either.
    """

    def __init__(self, trainer, layout, zero_stage: int, precision: str, scheduler=None,
                 model_meta: Optional[dict] = None, fault: Callable[[str], None] = lambda point: None):
        self.trainer, self.layout, self.scheduler, self.fault = trainer, layout, scheduler, fault
        self.zero_stage, self.precision, self.model_meta = zero_stage, precision, model_meta

    def _layout_meta(self) -> dict:
        return layout_meta(self.layout, self.zero_stage, self.precision, vpp=self.trainer.virtual_stages)

    # ------------------------------------------------------------- save

    def save(self, save_dir: str | Path, step: int, consumed_samples: int) -> Path:
        """Write the checkpoint after ``step`` steps and make it ``latest`` once complete."""
        import megatron.core
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

        save_dir = Path(save_dir).absolute()
        tag = tag_for(step)
        start = time.perf_counter()
        state = sharded_state_dict(self.trainer, loading=False)
        _refuse_misplaced_masters(state)
        stage = fresh_stage(save_dir, tag)
        # One writer process per rank (Megatron forks one per thread): one .distcp file per rank.
        strategy = TorchDistSaveShardedStrategy(BACKEND, 1, thread_count=1)
        with _results_in_process():
            dist_checkpointing.save(state, str(stage),
                                    sharded_strategy=strategy, validate_access_integrity=True)
        mine = [hash_file(path, stage) for path in sorted(stage.glob(f"__{_rank()}_*.distcp"))]
        mine.append(torch_save(rng.capture(), stage / RNG_FILE.format(_rank()), stage))
        self.fault("after_write")
        records = [r for rank_records in _gather(records_as_dicts(mine)) for r in records_from_dicts(rank_records)]
        meta = {
            "engine": reshard.MEGATRON, "step": step, "consumed_samples": consumed_samples,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "layout": self._layout_meta(), "model": self.model_meta,
            "dist_checkpoint": {"backend": BACKEND, "optimizer": OPTIMIZER_FORMAT},
            "versions": {"torch": torch.__version__, "megatron-core": megatron.core.__version__},
        }
        final = _agree(lambda: publish(save_dir, tag, records, meta, self.fault))  # hashes the shared files
        self.last_save = {"seconds": time.perf_counter() - start, "bytes": sum(r.size for r in mine)}
        return final

    # ------------------------------------------------------------- load

    def load(self, load_dir: str | Path, allow_empty: bool = False, load_rng: bool = True) -> Optional[Resumed]:
        """Verify and load the newest checkpoint in ``load_dir``; None when there is none and ``allow_empty``.

        Every file is checked against the manifest and the layout change
        against :func:`~zeromega.checkpoint.reshard.plan_megatron` before
        anything is read. RNG states come back only under the saved layout
        (they belong to ranks); a resharded run keeps its fresh seeds.
        """
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

        found = open_verified(load_dir, allow_empty)
        if found is None:
            return None
        ckpt, manifest = found
        reshard.check_engine(manifest, reshard.MEGATRON, ckpt)
        resharded = reshard.plan_megatron(manifest["layout"], self._layout_meta(), manifest.get("model"),
                                          self.model_meta)
        _create_adam_state(self.trainer.optimizer)
        request = sharded_state_dict(self.trainer, loading=True)
        saved_distributed = manifest["layout"]["zero_stage"] >= 1
        across = saved_distributed != (self.zero_stage >= 1)  # plan_megatron allowed it for one optimizer only
        if across:
            _retarget_masters(request, saved_distributed, self.precision)
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            with dist_checkpoint_loads():
                state = dist_checkpointing.load(request, str(ckpt), sharded_strategy=TorchDistLoadShardedStrategy())
        except CheckpointError:
            raise
        except CheckpointException as err:
            # torch.distributed.checkpoint gathers every rank's exception into this BaseException (not an
            # Exception: @record would not record it, and the launcher saw "no exception recorded"); the first
            # rank's own error, a refusal of unsafe content above all, is what the user needs.
            raise _first_failure(err, ckpt) from None
        except Exception as err:  # a key or shape Megatron cannot find: the message names it
            raise CheckpointError(f"Megatron-Core could not load {ckpt}: {type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:400]}",
                                  "resume with the layout and model it was saved with") from None
        wrong = _misplaced_on_any_rank(request, state)
        if wrong:
            raise CheckpointError(f"{ckpt}: its optimizer's fp32 masters disagree with its model weights for "
                                  f"{len(wrong)} tensor(s), e.g. {'; '.join(wrong[:3])} (written by a zeromega "
                                  f"before the fix for Megatron-Core's misplaced bucket offsets, or damaged); "
                                  f"nothing was loaded", "resume from another checkpoint")
        for i, chunk in enumerate(self.trainer.chunks):
            chunk.module.load_state_dict(state[f"model{i}"], strict=True)
        if across:
            _fill_model_weights(request, state)
            _load_across_optimizers(self.trainer.optimizer, state["optimizer"], saved_distributed)
        else:
            _load_optimizer(self.trainer.optimizer, state["optimizer"])
        if self.scheduler is not None and manifest.get("scheduler") is not None:
            self.scheduler.load_state_dict(manifest["scheduler"])
        restored = False
        rng_file = ckpt / RNG_FILE.format(_rank())
        if load_rng and not resharded and rng_file.is_file():
            rng.restore(safe_load(rng_file))
            restored = True
        _barrier()
        return Resumed(step=int(manifest["step"]), consumed_samples=int(manifest["consumed_samples"]), path=ckpt,
                       resharded=resharded, rng_restored=restored)
