"""zeromega: DeepSpeed ZeRO joined with Megatron-Core tp / pp / sp / ep, one config, one launcher.

The public entry points, imported lazily so ``zeromega --help`` stays fast::

    cfg = zeromega.load_config("ds_config.json", megatron_argv=sys.argv[1:])
    layout = zeromega.initialize(cfg)       # device, process groups, seeds
    model = zeromega.build_gpt(shape, cfg)  # Megatron-Core GPTModel
    engine = zeromega.build_engine(model, cfg, layout)
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
    "build_engine": ("zeromega.integrations.deepspeed", "build_engine"),
    "model_init_context": ("zeromega.integrations.deepspeed", "model_init_context"),
    "train": ("zeromega.train", "train"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'zeromega' has no attribute {name!r}")
    import importlib

    module, attribute = _EXPORTS[name]
    return getattr(importlib.import_module(module), attribute)
