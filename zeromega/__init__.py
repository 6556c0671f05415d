"""zeromega: DeepSpeed ZeRO joined with Megatron-Core tp / pp / sp / ep, one config, one launcher.

The public entry points, imported lazily so ``zeromega --help`` stays fast::

    cfg = zeromega.load_config("ds_config.json")    # any dialect; megatron_argv=... adds Megatron flags
    zeromega.Run(cfg, model=build_model, batches=my_batches, loss=my_loss).train()
    zeromega.Run(cfg).train()                         # Megatron-Core GPT from cfg.model on cfg.data

Long sequences in your own loss (docs/own-models.md): ``shard_batch(batch, mode)``, ``cp_loss``,
``sequence_group()``; ``register_hf_attention()`` adds attn_implementation="zeromega_ulysses|ring|usp".
"""

from zeromega.version import __version__

_EXPORTS = {
    "load_config": ("zeromega.launch.translate", "build"),
    "RunConfig": ("zeromega.config.schema", "RunConfig"),
    "ConfigError": ("zeromega.config.errors", "ConfigError"),
    "initialize": ("zeromega.integrations.megatron.parallel", "initialize"),
    "shutdown": ("zeromega.integrations.megatron.parallel", "shutdown"),
    "GPTShape": ("zeromega.integrations.megatron.model", "GPTShape"),
    "build_gpt": ("zeromega.integrations.megatron.model", "build_gpt"),
    "build_engine": ("zeromega.plugins.zero.engine", "build_engine"),
    "model_init_context": ("zeromega.plugins.zero.engine", "model_init_context"),
    "Run": ("zeromega.run", "Run"),
    "sequence_group": ("zeromega.plugins.sequence.batch", "sequence_group"),
    "shard_batch": ("zeromega.plugins.sequence.batch", "shard_batch"),
    "cp_loss": ("zeromega.plugins.sequence.megatron", "cp_loss"),
    "register_hf_attention": ("zeromega.plugins.sequence.hf", "register_hf_attention"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'zeromega' has no attribute {name!r}")
    import importlib

    module, attribute = _EXPORTS[name]
    return getattr(importlib.import_module(module), attribute)
