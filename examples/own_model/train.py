#!/usr/bin/env python
"""Your own nn.Module and your own train.py, trained by zeromega (the README's first quick start).

    zeromega launch --nproc-per-node 2 --config examples/own_model/ds_config.json examples/own_model/train.py
    deepspeed --num_gpus 2 examples/own_model/train.py --deepspeed_config examples/own_model/ds_config.json

The DeepSpeed JSON says everything about the run (ZeRO stage, batch,
optimizer, scheduler; its "zeromega" block the steps and the metrics
file); this file says only what the model is, where its data comes from
and what its loss is.
"""

import argparse
import itertools
import os

import numpy as np
import torch
import torch.nn.functional as F

import zeromega

SEQ, VOCAB = 64, 256  # byte-level language model over the project's corpus


class TinyLM(torch.nn.Module):
    """A small causal transformer written with plain torch.nn layers."""

    def __init__(self, width: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, width)
        self.position = torch.nn.Embedding(SEQ, width)
        layer = torch.nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(width, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], device=tokens.device)
        return self.head(self.blocks(self.embed(tokens) + self.position(positions), mask=mask, is_causal=True))


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)  # every rank builds the same model
    return TinyLM()


def corpus() -> np.ndarray:
    from zeromega.integrations.megatron import data

    return np.memmap(f"{data.default_corpus_prefix()}.bin", dtype=np.uint8, mode="r")


def my_batches(start_sample: int, dp_rank: int, dp_size: int, micro: int):
    """This data-parallel rank's micro-batches: sample i is bytes [i*SEQ, (i+1)*SEQ + 1) of the corpus."""
    tokens = corpus()
    for base in itertools.count(start_sample + dp_rank * micro, micro * dp_size):
        rows = [np.asarray(tokens[i * SEQ:(i + 1) * SEQ + 1], dtype=np.int64) for i in range(base, base + micro)]
        sample = torch.from_numpy(np.stack(rows))
        yield {"tokens": sample[:, :-1], "labels": sample[:, 1:]}


def my_loss(model, batch: dict) -> torch.Tensor:
    logits = model(batch["tokens"].to(model.device))
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].to(model.device).flatten())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--deepspeed_config", "--config", default=os.environ.get("ZEROMEGA_CONFIG"))
    p.add_argument("--local_rank", type=int, default=None)  # what the deepspeed launcher passes
    args = p.parse_args()
    cfg = zeromega.load_config(args.deepspeed_config)
    zeromega.Run(cfg, model=build_model, batches=my_batches, loss=my_loss).train()


if __name__ == "__main__":
    main()
