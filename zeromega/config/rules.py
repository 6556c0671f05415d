"""The rules a run config must satisfy before any process starts.

Each rule is a small function of the config that raises
:class:`~.errors.ConfigError` naming the field, its value and a fix; ``RULES``
lists them in the order they are checked, so tests can name each one.
Rules that need the world size live in :meth:`RunConfig.layout`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from .errors import ConfigError

if TYPE_CHECKING:
    from .schema import RunConfig


def resolve_sequence(cfg: "RunConfig") -> None:
    """Make sequence.mode/ulysses/ring and parallel.cp/sequence_parallel agree (idempotent).

    ``cp > 1`` with no mode is ring attention (Megatron's default
    ``--cp-comm-type p2p``); ``mode: megatron`` is tp-sp alone.
    """
    s, p = cfg.sequence, cfg.parallel
    cp_given = "cp" in p.model_fields_set
    if s.mode == "megatron":
        if p.cp > 1 or (s.ulysses or 1) > 1 or (s.ring or 1) > 1:
            raise ConfigError("sequence.mode", "megatron", f"is tp sequence parallel alone, but cp = {p.cp}",
                              "use mode ulysses, ring or usp for cp > 1 (with parallel.sequence_parallel for tp-sp)")
        if "sequence_parallel" in p.model_fields_set and not p.sequence_parallel:
            raise ConfigError("parallel.sequence_parallel", False, "contradicts sequence.mode 'megatron'",
                              "set sequence_parallel true or choose another sequence.mode")
        if not p.sequence_parallel:
            p.sequence_parallel = True
        s.ulysses = s.ring = None
        return
    if s.mode == "none":
        if (s.ulysses or 1) > 1 or (s.ring or 1) > 1:
            raise ConfigError("sequence.mode", "none", f"but ulysses = {s.ulysses}, ring = {s.ring}",
                              "set sequence.mode to ulysses, ring or usp")
        if p.cp > 1:
            s.mode, s.ulysses, s.ring = "ring", 1, p.cp
        else:
            s.ulysses = s.ring = None
            if p.sequence_parallel:
                s.mode = "megatron"
        return
    ulysses, ring = s.ulysses, s.ring
    if s.mode == "ulysses":
        if (ring or 1) > 1:
            raise ConfigError("sequence.ring", ring, "is set but mode is 'ulysses'", "use mode usp for both")
        ulysses, ring = ulysses or p.cp, 1
    elif s.mode == "ring":
        if (ulysses or 1) > 1:
            raise ConfigError("sequence.ulysses", ulysses, "is set but mode is 'ring'", "use mode usp for both")
        ulysses, ring = 1, ring or p.cp
    else:  # usp
        if ulysses is None and ring is None:
            raise ConfigError("sequence.mode", "usp", "needs the Ulysses and ring sizes",
                              "set sequence.ulysses and sequence.ring (cp = ulysses x ring)")
        if ulysses is None or ring is None:
            known = ulysses or ring
            if p.cp % known:
                raise ConfigError("parallel.cp", p.cp, f"not divisible by the usp size {known}",
                                  "set both sequence.ulysses and sequence.ring")
            ulysses, ring = (ulysses, p.cp // ulysses) if ring is None else (p.cp // ring, ring)
    if cp_given and p.cp != ulysses * ring:
        raise ConfigError("parallel.cp", p.cp, f"!= sequence.ulysses x sequence.ring = {ulysses} x {ring}",
                          f"set cp to {ulysses * ring} or drop it (it follows from the sequence sizes)")
    if ulysses * ring == 1:  # a split over one rank is no split
        s.mode, s.ulysses, s.ring = ("megatron" if p.sequence_parallel else "none"), None, None
        return
    s.ulysses, s.ring = ulysses, ring
    if p.cp != ulysses * ring:
        p.cp = ulysses * ring


def _sequence_parallel_needs_tp(cfg):
    if cfg.parallel.sequence_parallel and cfg.parallel.tp == 1:
        raise ConfigError("parallel.sequence_parallel", True, "Megatron sequence parallel needs tp > 1",
                          "set tp >= 2 or turn sequence_parallel off")


def _heads_divisible(cfg):
    ulysses = cfg.sequence.ulysses or 1
    m, split = cfg.model, cfg.parallel.tp * ulysses
    how = f"tp x ulysses = {cfg.parallel.tp} x {ulysses} = {split}"
    for name in ("num_attention_heads", "num_query_groups"):
        heads = getattr(m, name)
        if heads is not None and heads % split:
            raise ConfigError(f"model.{name}", heads, f"not divisible by {how}",
                              f"use a multiple of {split} heads, or lower tp / the Ulysses size")
    if m.num_attention_heads and m.num_query_groups and m.num_attention_heads % m.num_query_groups:
        raise ConfigError("model.num_query_groups", m.num_query_groups,
                          f"does not divide num_attention_heads = {m.num_attention_heads}",
                          "use a divisor of the head count")


def _sequence_divisible(cfg):
    seq = cfg.model.seq_length
    if seq is None:
        return
    s, p = cfg.sequence, cfg.parallel
    zigzag = (s.ring or 1) > 1  # ring and usp hold two zigzag chunks per rank
    multiple = p.cp * (2 if zigzag else 1) * (p.tp if p.sequence_parallel else 1)
    if seq % multiple:
        parts = (["2 (zigzag)"] if zigzag else []) + [f"cp {p.cp}"] + ([f"tp {p.tp}"] if p.sequence_parallel else [])
        raise ConfigError("model.seq_length", seq, f"not divisible by {' x '.join(parts)} = {multiple}",
                          f"use a sequence length that is a multiple of {multiple}")


def _zero_with_pipeline(cfg):
    if cfg.zero.stage >= 2 and cfg.parallel.pp > 1:
        raise ConfigError("zero.stage", cfg.zero.stage, f"ZeRO-2/3 shard gradients, which pipeline parallel "
                          f"(pp = {cfg.parallel.pp}) accumulates across micro-batches",
                          "use zero.stage 0 or 1 with pp > 1, or set pp 1")


def _offload_stages(cfg):
    z = cfg.zero
    if z.offload_param.device != "none" and z.stage < 3:
        raise ConfigError("zero.offload_param.device", z.offload_param.device,
                          f"parameter offload needs ZeRO-3 (stage is {z.stage})",
                          "set zero.stage 3 or offload only the optimizer")
    if z.offload_optimizer.device != "none" and z.stage == 0:
        raise ConfigError("zero.offload_optimizer.device", z.offload_optimizer.device,
                          "optimizer offload needs ZeRO stage >= 1", "set zero.stage 1, 2 or 3")


def _nvme_needs_path(cfg):
    for name in ("offload_optimizer", "offload_param"):
        offload = getattr(cfg.zero, name)
        if offload.device == "nvme" and not offload.nvme_path:
            raise ConfigError(f"zero.{name}.nvme_path", offload.nvme_path, "nvme offload without a path",
                              "set nvme_path to a directory on a local NVMe drive")


def _experts_divisible(cfg):
    experts, ep = cfg.moe.num_experts, cfg.parallel.ep
    if experts is None:
        return
    if experts % ep:
        raise ConfigError("moe.num_experts", experts, f"not divisible by ep = {ep}",
                          f"use a multiple of {ep} experts or an ep that divides {experts}")
    if cfg.moe.topk > experts:
        raise ConfigError("moe.topk", cfg.moe.topk, f"routes to more experts than the {experts} there are",
                          f"use a topk <= {experts}")


def _moe_tp_needs_sequence_parallel(cfg):
    """Megatron-Core's MoE layer raises at the first training step when tp > 1 without sequence parallel
    (moe_layer.py: "performance may degrade ..."); Megatron-LM's argument checks let it through."""
    p = cfg.parallel
    if cfg.moe.num_experts and p.tp > 1 and not p.sequence_parallel:
        raise ConfigError("parallel.sequence_parallel", False, f"MoE with tp {p.tp} needs sequence parallelism "
                          "(Megatron-Core's MoE layer refuses to train without it)", "add --sequence-parallel")



def _moe_biases_need_expert_tp1(cfg):
    """Megatron-Core keeps linear biases in an MoE model only at expert tensor parallel 1 (TransformerConfig
    asserts "Bias in Moe is only supported when ETP==1" inside every rank). Megatron-LM's expert tp is tp unless
    --expert-tensor-parallel-size says otherwise, and its linear biases are on unless --disable-bias-linear."""
    p = cfg.parallel
    etp = p.etp or p.tp
    if cfg.moe.num_experts and cfg.model.add_bias_linear and etp > 1:
        given = f"expert tensor parallel {etp}" + ("" if p.etp else f" (tp {p.tp}: the expert tp when none is given)")
        with_ep = " with --expert-model-parallel-size > 1 (parallel.ep)" if p.ep == 1 and p.tp > 1 else ""
        raise ConfigError("model.add_bias_linear", True, f"MoE with linear biases at {given}: Megatron-Core keeps "
                          "MoE biases only at expert tensor parallel 1",
                          "pass --disable-bias-linear (model.add_bias_linear: false), or "
                          f"--expert-tensor-parallel-size 1 (parallel.etp: 1){with_ep}")


def _expert_tp_below_tp_needs_ep(cfg):
    """Megatron-Core treats expert weights as expert-parallel (reduced over the expert-data-parallel group) only
    at ep > 1; at ep 1 with expert tp below tp each tp rank holds a whole copy of every expert, trains it on its
    own tokens and reduces it over the data-parallel group alone, so the copies drift apart (measured)."""
    p = cfg.parallel
    if cfg.moe.num_experts and p.ep == 1 and p.etp is not None and p.etp < p.tp:
        raise ConfigError("parallel.etp", p.etp, f"expert tensor parallel below tp {p.tp} at ep 1: Megatron-Core "
                          "reduces the experts' gradients over the data-parallel group only, so the tp ranks' "
                          "copies of each expert drift apart",
                          f"set --expert-tensor-parallel-size {p.tp} (parallel.etp, the tp), or "
                          "--expert-model-parallel-size > 1 (parallel.ep)")


def _uneven_pipeline(cfg):
    """Megatron-LM's --decoder-first/last-pipeline-num-layers: the stages between split the rest evenly."""
    p, layers = cfg.parallel, cfg.model.num_layers
    first, last = p.first_stage_layers, p.last_stage_layers
    field, value = ("parallel.first_stage_layers", first) if first else ("parallel.last_stage_layers", last)
    if p.embedding_in_split or p.loss_in_split:
        field, value = ("parallel.embedding_in_split", True) if p.embedding_in_split else ("parallel.loss_in_split", True)
        if first or last:
            raise ConfigError(field, value, "cannot be combined with first/last stage layer counts (Megatron-Core "
                              "refuses both at once)", "give either the layer counts or the accounting switches")
    if p.pp == 1:
        raise ConfigError(field, value, "uneven pipeline stages need pp > 1", "set pp >= 2 or drop it")
    if p.vpp or p.layers_per_virtual_stage:
        raise ConfigError(field, value, "uneven pipeline stages with virtual stages are not built here",
                          "drop the virtual stages (vpp) or split the layers evenly")
    if layers is None:
        return
    if p.embedding_in_split or p.loss_in_split:
        total = layers + p.embedding_in_split + p.loss_in_split
        if total % p.pp or total // p.pp <= max(p.embedding_in_split, p.loss_in_split):
            raise ConfigError(field, value, f"{layers} layers + embedding / loss = {total} do not split evenly over "
                              f"pp {p.pp} with at least one transformer layer per stage",
                              f"use a layer count that makes {total} a multiple of {p.pp}")
        return
    middle = p.pp - (first is not None) - (last is not None)
    rest = layers - (first or 0) - (last or 0)
    if rest < 0 or (middle and (rest % middle or rest == 0)) or (not middle and rest):
        raise ConfigError(field, value, f"{layers} layers minus first {first or 0} and last {last or 0} leave {rest} "
                          f"for the {middle} other stage(s): they must split evenly, at least one layer each",
                          "choose first/last layer counts that leave a multiple of the stages between")


def _virtual_pipeline(cfg):
    p, layers = cfg.parallel, cfg.model.num_layers
    if p.first_stage_layers or p.last_stage_layers or p.embedding_in_split or p.loss_in_split:
        return _uneven_pipeline(cfg)
    field, value = ("parallel.vpp", p.vpp) if p.vpp else ("parallel.layers_per_virtual_stage",
                                                         p.layers_per_virtual_stage)
    if value is None:
        if layers is not None and layers % p.pp:
            raise ConfigError("model.num_layers", layers, f"not divisible by pp = {p.pp}",
                              f"use a multiple of {p.pp} layers")
        return
    if p.pp == 1:
        raise ConfigError(field, value, "virtual pipeline stages need pp > 1", "set pp >= 2 or drop it")
    if layers is None:
        return
    if layers % p.pp:
        raise ConfigError("model.num_layers", layers, f"not divisible by pp = {p.pp}", "use a multiple of pp")
    per_rank = layers // p.pp
    if p.layers_per_virtual_stage and per_rank % p.layers_per_virtual_stage:
        raise ConfigError("parallel.layers_per_virtual_stage", p.layers_per_virtual_stage,
                          f"does not divide the {per_rank} layers per pipeline rank ({layers} / pp {p.pp})",
                          "choose a divisor of num_layers / pp")
    if p.vpp and per_rank % p.vpp:
        raise ConfigError("parallel.vpp", p.vpp, f"does not divide the {per_rank} layers per pipeline rank",
                          "choose a divisor of num_layers / pp")
    if p.vpp and p.layers_per_virtual_stage and p.vpp * p.layers_per_virtual_stage != per_rank:
        raise ConfigError("parallel.vpp", p.vpp, f"x layers_per_virtual_stage {p.layers_per_virtual_stage} "
                          f"!= {per_rank} layers per pipeline rank", "state only one of the two")


def _recompute(cfg):
    r = cfg.recompute
    if r.granularity == "full" and (r.method is None or r.num_layers is None):
        raise ConfigError("recompute.method" if r.method is None else "recompute.num_layers", None,
                          "full recomputation needs a method and a number of layers",
                          "set recompute.method (uniform|block) and recompute.num_layers")
    if r.distribute_saved_activations:  # Megatron-LM's validate_args asserts and TransformerConfig's check
        p = cfg.parallel
        why = ("needs full recomputation (its chunks' inputs are what is split)" if r.granularity != "full" else
               "needs tp > 1 (it splits across the tp ranks)" if p.tp == 1 else
               "cannot run with sequence parallel (Megatron-Core refuses it: the inputs are already split)"
               if p.sequence_parallel else None)
        if why:
            raise ConfigError("recompute.distribute_saved_activations", True, why,
                              "drop it, or set recompute.granularity full at tp > 1 without sequence parallel")
    if r.granularity != "full" and (r.method is not None or r.num_layers is not None):
        field, value = ("recompute.method", r.method) if r.method else ("recompute.num_layers", r.num_layers)
        raise ConfigError(field, value, f"applies to full recomputation only (granularity is {r.granularity})",
                          "set recompute.granularity full, or drop it")


def _recompute_chunks(cfg):
    """Full uniform recompute checkpoints layers ``[i, i + num_layers)`` of each model chunk for
    ``i = 0, num_layers, ...`` and reads past the chunk's last layer when the chunks do not tile it
    (Megatron-Core's ``TransformerBlock._checkpointed_forward``: ``IndexError`` at the first forward).
    Block recompute takes the first ``num_layers`` of each chunk, all of them when it has fewer."""
    r, p, layers = cfg.recompute, cfg.parallel, cfg.model.num_layers
    if r.granularity != "full" or r.method != "uniform" or layers is None or layers % p.pp \
            or p.first_stage_layers or p.last_stage_layers:
        return
    per_chunk, where = layers // p.pp, f"{layers} layers / pp {p.pp}"
    if p.layers_per_virtual_stage:
        per_chunk, where = p.layers_per_virtual_stage, "parallel.layers_per_virtual_stage"
    elif p.vpp and per_chunk % p.vpp == 0:
        per_chunk, where = per_chunk // p.vpp, f"{where} / vpp {p.vpp}"
    if per_chunk % r.num_layers:
        divisors = [d for d in range(1, per_chunk + 1) if per_chunk % d == 0]
        raise ConfigError("recompute.num_layers", r.num_layers,
                          f"uniform recompute needs chunks that tile the {per_chunk} layers of each model chunk "
                          f"({where}); Megatron-Core would index past the last layer",
                          f"use one of {divisors}, or recompute.method block")


def _checkpoint_interval(cfg):
    c = cfg.checkpoint
    if c.interval is not None and not c.save:
        raise ConfigError("checkpoint.interval", c.interval, "saving every N steps needs a directory",
                          "set checkpoint.save (Megatron --save)")


def _hosts_from_launch_flags(cfg: "RunConfig") -> None:
    """The hosts of a job are zeromega launch's ``--hostfile`` (deepspeed's flag), never a config's."""
    if cfg.launch.hostfile is not None:
        raise ConfigError("launch.hostfile", cfg.launch.hostfile, "is not read from a config: the hosts of a job "
                          "are the launcher's", f"drop it and pass zeromega launch --hostfile {cfg.launch.hostfile}")


def _schedule_runs_on_its_class(cfg: "RunConfig") -> None:
    """A log warmup exists only in DeepSpeed's schedulers; Megatron-Core's warms up linearly."""
    s = cfg.scheduler
    if s.warmup_style == "log" and s.deepspeed_type is None:
        raise ConfigError("scheduler.warmup_style", "log", "is DeepSpeed's warmup, but no DeepSpeed scheduler "
                          "class runs this schedule (Megatron-Core's warms up linearly)",
                          "set scheduler.deepspeed_type (WarmupLR, WarmupDecayLR, WarmupCosineLR) or use linear")


def _param_gather_overlap(cfg: "RunConfig") -> None:
    """Megatron-LM's rule: the overlapped all-gather is the distributed optimizer's, and it follows the
    overlapped reduce (its hooks reset the gather after each step's reduce)."""
    d = cfg.ddp
    if not d.overlap_param_gather:
        return
    if cfg.zero.stage < 1:
        raise ConfigError("ddp.overlap_param_gather", True, "gathers the sharded optimizer's parameters, and "
                          "zero.stage 0 shards nothing", "set zero.stage 1 (--use-distributed-optimizer)")
    if not d.overlap_grad_reduce:
        raise ConfigError("ddp.overlap_param_gather", True, f"needs ddp.overlap_grad_reduce (it is "
                          f"{d.overlap_grad_reduce})", "set ddp.overlap_grad_reduce true (--overlap-grad-reduce)")


def _moe_pattern(cfg: "RunConfig") -> None:
    """A per-layer MoE pattern names every layer (Megatron-Core asserts it inside the ranks); sinkhorn
    routing has no aux loss (Megatron-Core asserts the coefficient is 0)."""
    m = cfg.moe
    pattern, layers = m.layer_freq, cfg.model.num_layers
    if isinstance(pattern, list) and layers is not None and len(pattern) != layers:
        raise ConfigError("moe.layer_freq", pattern, f"has {len(pattern)} entries for {layers} layers",
                          "give one 0 (dense) or 1 (MoE) per layer, or an integer frequency")
    if m.router_load_balancing_type == "sinkhorn" and m.aux_loss_coeff:
        raise ConfigError("moe.aux_loss_coeff", m.aux_loss_coeff, "sinkhorn routing has no aux loss",
                          "drop --moe-aux-loss-coeff or use --moe-router-load-balancing-type aux_loss")


RULES: list[Callable[["RunConfig"], None]] = [
    _moe_pattern,
    _param_gather_overlap,
    _hosts_from_launch_flags,
    _schedule_runs_on_its_class,
    _sequence_parallel_needs_tp,
    _heads_divisible,
    _sequence_divisible,
    _zero_with_pipeline,
    _offload_stages,
    _nvme_needs_path,
    _experts_divisible,
    _moe_tp_needs_sequence_parallel,
    _expert_tp_below_tp_needs_ep,
    _moe_biases_need_expert_tp1,
    _virtual_pipeline,
    _recompute,
    _recompute_chunks,
    _checkpoint_interval,
]


def check(cfg: "RunConfig") -> None:
    """Raise the first rule's ConfigError, if any."""
    for rule in RULES:
        rule(cfg)
