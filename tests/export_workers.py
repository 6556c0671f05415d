"""What the one rank of the Megatron-engine export tests runs: a fresh 1-process GPTModel fed an exported file.

The model's shape comes from the checkpoint's manifest (``model``), so the
same worker scores a dense pp run's export and an MoE ep run's.
"""

from __future__ import annotations

from typing import Any


def loss_of_exported(path: str, model_meta: dict, corpus: str, samples: int, step: int,
                     global_batch: int) -> dict[str, Any]:
    """The loss of the exported weights on the global batch of ``step``, and the 1-process model's
    state-dict shapes (name -> shape, ``_extra_state`` left out) to compare the file's names with."""
    import torch

    from zeromega.checkpoint.export import load_safetensors
    from zeromega.integrations.megatron import data, model, parallel
    from zeromega.config.schema import RunConfig
    from zeromega.run.loop import gpt_loss

    cfg = RunConfig.model_validate({"batch": {"micro": global_batch, "global": global_batch}})
    parallel.initialize(cfg, seed=11)  # a seed no rank trained with: every weight must come from the file
    try:
        shape = model.GPTShape(**model_meta)
        gpt = model.build_gpt(shape, cfg)
        expected = {name: list(t.shape) for name, t in gpt.state_dict().items() if not name.endswith("_extra_state")}
        missing, unexpected = gpt.load_state_dict(load_safetensors(path), strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
        train_ds, _, _ = data.build_gpt_datasets(corpus, shape.seq_length, 1234, (samples, 0, 0), split="1,0,0")
        batch = next(data.sample_batches(train_ds, global_batch, start_sample=(step - 1) * global_batch))
        gpt.eval()
        with torch.no_grad():
            loss = float(gpt_loss(gpt, batch))
    finally:
        parallel.shutdown()
    return {"loss": loss, "shapes": expected}
