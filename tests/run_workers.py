"""What each rank runs in tests/test_run_fields.py (zeromega.Run on a command line, its log lines kept), and
:func:`run_gpt`: the one way the multi-process tests assemble a whole GPT training run (through zeromega.Run)."""

from __future__ import annotations

from typing import Any, Callable, Optional


def run_logging(argv: list[str]) -> dict[str, Any]:
    """Train the command line's run; this rank's log lines and the run's step records."""
    from zeromega.launch import script_args
    from zeromega.run import Run

    lines: list[str] = []
    run = Run(script_args.read(argv, "pretrain_gpt.py"), log=lines.append)
    records = run.train()
    return {"lines": lines, "records": [r.__dict__ for r in records], "engine": run.engine.name,
            "vocab": run.shape.vocab_size}


def run_refused(argv: list[str]) -> str:
    """The ConfigError the run raises once its ranks are up (as a line), or '' if it trains."""
    from zeromega.config import ConfigError
    from zeromega.launch import script_args
    from zeromega.run import Run

    try:
        Run(script_args.read(argv, "pretrain_gpt.py"), log=lambda line: None).train()
    except ConfigError as err:
        return str(err)
    return ""


class TinyLM:
    """A plain torch model (no Megatron layers) and its data, for the own-model path of zeromega.Run."""

    SEQ, VOCAB = 16, 64

    @staticmethod
    def build():
        import torch

        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Embedding(TinyLM.VOCAB, 32), torch.nn.Linear(32, 64), torch.nn.GELU(),
                                   torch.nn.Linear(64, TinyLM.VOCAB))

    @staticmethod
    def batches(start_sample: int, dp_rank: int, dp_size: int, micro: int):
        import itertools

        import torch

        for base in itertools.count(start_sample + dp_rank * micro, micro * dp_size):
            rows = [torch.randint(0, TinyLM.VOCAB, (TinyLM.SEQ + 1,), generator=torch.Generator().manual_seed(i))
                    for i in range(base, base + micro)]
            sample = torch.stack(rows)
            yield {"tokens": sample[:, :-1], "labels": sample[:, 1:]}

    @staticmethod
    def loss(model, batch):
        import torch.nn.functional as F

        logits = model(batch["tokens"])
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten())


def run_own_model(cfg: dict) -> dict[str, Any]:
    """zeromega.Run over :class:`TinyLM`; its losses, or the ConfigError line it raised."""
    from zeromega.config import ConfigError, validate
    from zeromega.run import Run

    try:
        records = Run(validate(cfg), model=TinyLM.build, batches=TinyLM.batches, loss=TinyLM.loss,
                      log=lambda line: None).train()
    except ConfigError as err:
        return {"error": str(err)}
    return {"loss": [r.loss for r in records], "tokens_per_s": records[-1].tokens_per_s}


# GPTShape keyword -> (config section, field): the shape dicts the tests use, as a config states them.
_SHAPE_FIELDS = {"num_experts": ("moe", "num_experts"), "moe_router_topk": ("moe", "topk"),
                 "moe_ffn_hidden_size": ("moe", "ffn_hidden_size"), "moe_aux_loss_coeff": ("moe", "aux_loss_coeff"),
                 "moe_expert_capacity_factor": ("moe", "expert_capacity_factor"),
                 "moe_token_dispatcher_type": ("moe", "token_dispatcher_type")}


def gpt_config(cfg: dict, shape: dict, data_prefix: str, iters: int, seed: int = 1234) -> dict:
    """``cfg`` with the GPT ``shape`` (GPTShape keywords) in model/moe, the data (whole corpus for training),
    ``iters`` steps (constant lr unless the cfg's scheduler says otherwise) and the seed; quiet."""
    out = {**cfg, "model": dict(cfg.get("model", {})), "moe": dict(cfg.get("moe", {}))}
    for key, value in shape.items():
        section, name = _SHAPE_FIELDS.get(key, ("model", key))
        out[section][name] = value
    out["data"] = {"split": "1,0,0", **cfg.get("data", {}), "path": str(data_prefix)}
    out["scheduler"] = {"decay_style": "constant", **cfg.get("scheduler", {}), "train_iters": iters}
    out["logging"] = {"progress": False, **cfg.get("logging", {})}
    out["seed"] = seed
    return out


def run_gpt(cfg: dict, shape: dict, data_prefix: str, iters: int, seed: int = 1234,
            extra: Optional[Callable[[Any], dict]] = None) -> dict[str, Any]:
    """Train zeromega's GPT of ``shape`` through ``zeromega.Run``: per-step loss and grad norm (every rank).

    The one way the tests assemble a whole training run. ``extra(run)``, called after training, adds to
    the result what a test reads off the finished run (its engine, modules).
    """
    from zeromega.config import validate
    from zeromega.run import Run

    run = Run(validate(gpt_config(cfg, shape, data_prefix, iters, seed)), log=lambda line: None)
    records = run.train()
    result = {"loss": [r.loss for r in records], "grad_norm": [r.grad_norm for r in records]}
    if extra is not None:
        result.update(extra(run))
    return result


def run_architecture(argv: list[str]) -> dict[str, Any]:
    """Train the command line's GPT through zeromega.Run: per-step loss and grad norm, the engine, and this
    rank's parameters by their 1-process names (name -> shape; tests/test_architectures.py)."""
    from zeromega.integrations.megatron.model import global_param_names
    from zeromega.launch import script_args
    from zeromega.run import Run

    run = Run(script_args.read(argv, "pretrain_gpt.py"), log=lambda line: None)
    records = run.train()
    params: dict[str, list[int]] = {}
    for module in run.engine.modules:
        chunk = getattr(module, "module", module)
        names = global_param_names(chunk)
        for name, param in chunk.named_parameters():
            params[names[name]] = list(param.shape)
    return {"loss": [r.loss for r in records], "grad_norm": [r.grad_norm for r in records],
            "engine": run.engine.name, "params": params}


def build_architectures(argvs: list[list[str]]) -> list[dict[str, Any]]:
    """Each command line's GPT as Run builds it (flags -> config -> shape -> Megatron-Core model) on one
    process, without training: parameter name -> shape, and the TransformerConfig fields the flags set."""
    from zeromega.integrations import comm
    from zeromega.integrations.megatron import model, parallel
    from zeromega.launch import script_args
    from zeromega.run import gpt

    comm.install()
    parallel.initialize(script_args.read(argvs[0], "pretrain_gpt.py"))
    out = []
    try:
        for argv in argvs:
            cfg = script_args.read(argv, "pretrain_gpt.py")
            gpt_model = model.build_gpt(gpt.shape(cfg, 257), cfg)
            c = gpt_model.config
            rotary = getattr(gpt_model, "rotary_pos_emb", None)
            out.append({
                "params": {name: list(p.shape) for name, p in gpt_model.named_parameters()},
                "norms": sorted({type(m).__name__ for m in gpt_model.modules() if "Norm" in type(m).__name__}),
                "activation": c.activation_func.__name__, "gated": c.gated_linear_unit,
                "num_query_groups": c.num_query_groups, "kv_channels": c.kv_channels,
                "rotary_inv_freq0": None if rotary is None else float(rotary.inv_freq[1]),
                "rotary_dim": None if rotary is None else 2 * rotary.inv_freq.numel(),
                "moe_layers": [i for i, layer in enumerate(gpt_model.decoder.layers) if hasattr(layer.mlp, "router")],
                "load_balancing": c.moe_router_load_balancing_type, "drop_policy": c.moe_token_drop_policy,
            })
    finally:
        parallel.shutdown()
    return out


def run_architecture_unshuffled_fc1(argv: list[str]) -> dict[str, Any]:
    """:func:`run_architecture` with gated fc1 weights cut into contiguous tp blocks (the negative control of
    ``model.mark_gated_fc1``: rank 0 would get the whole gate half, rank 1 the up half)."""
    from zeromega.integrations.megatron import model

    model.mark_gated_fc1 = lambda module: None
    return run_architecture(argv)


def loss_of_exported(path: str, corpus: str, step: int, shape: dict, micro: int = 8) -> float:
    """A fresh 1-process GPTModel (``shape``: GPTShape keywords) loaded from an exported safetensors file (strict
    but for Megatron's ``_extra_state``): its loss on the global batch of ``step`` (``micro`` samples)."""
    import torch

    from zeromega.checkpoint.export import load_safetensors
    from zeromega.config.schema import RunConfig
    from zeromega.integrations.megatron import data, model, parallel
    from zeromega.run.loop import gpt_loss

    cfg = RunConfig.model_validate({"batch": {"micro": micro, "global": micro}})
    parallel.initialize(cfg, seed=7)  # another seed: every weight must come from the file
    gpt_shape = model.GPTShape(**shape)
    gpt = model.build_gpt(gpt_shape, cfg)
    missing, unexpected = gpt.load_state_dict(load_safetensors(path), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    train_ds, _, _ = data.build_gpt_datasets(corpus, gpt_shape.seq_length, 1234, (step * micro, 0, 0), split="1,0,0")
    batch = next(data.sample_batches(train_ds, micro, start_sample=(step - 1) * micro))
    gpt.eval()
    with torch.no_grad():
        loss = float(gpt_loss(gpt, batch))
    parallel.shutdown()
    return loss
