#!/usr/bin/env python
"""A Hugging Face LlamaForCausalLM trained by zeromega from your own train.py (the README's quick start).

    zeromega launch --nproc-per-node 2 --config examples/hf_llama/ds_zero3_offload.json examples/hf_llama/train.py
    deepspeed --num_gpus 2 examples/hf_llama/train.py --deepspeed_config examples/hf_llama/ds_zero3_offload.json
    zeromega launch --nproc-per-node 2 --config examples/hf_llama/ds_ring.json examples/hf_llama/train.py

The model is built from a tiny local LlamaConfig (nothing is downloaded);
`pip install 'zeromega[hf]'` brings transformers. The DeepSpeed JSON says
everything about the run: ZeRO stage and offload, batch, optimizer,
scheduler; its "zeromega" block the steps, checkpoints, metrics file and
sequence parallelism ("sequence": {"mode": "ulysses" | "ring" | "usp"}),
which this script turns into transformers' attn_implementation
"zeromega_ulysses" | "zeromega_ring" | "zeromega_usp".
"""

import argparse
import functools
import itertools
import os

import numpy as np
import torch
import torch.nn.functional as F

import zeromega

SEQ = 64  # tokens per sample; bytes of the project's corpus, so the vocabulary is 256


def llama_config(attention: str = "sdpa"):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4 * SEQ,
                       use_cache=False, attn_implementation=attention)


def build_model(attention: str = "sdpa") -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)  # every rank builds the same model
    return LlamaForCausalLM(llama_config(attention))


def my_batches(start_sample: int, dp_rank: int, dp_size: int, micro: int):
    """This data-parallel rank's micro-batches: sample i is bytes [i*SEQ, (i+1)*SEQ) of the corpus."""
    from zeromega.integrations.megatron import data

    corpus = np.memmap(f"{data.default_corpus_prefix()}.bin", dtype=np.uint8, mode="r")
    for base in itertools.count(start_sample + dp_rank * micro, micro * dp_size):
        ids = torch.from_numpy(np.stack([np.asarray(corpus[i * SEQ:(i + 1) * SEQ], dtype=np.int64)
                                         for i in range(base, base + micro)]))
        yield {"input_ids": ids, "labels": ids}


def my_loss(model, batch: dict, mode: str = "contiguous") -> torch.Tensor:
    """Next-token loss; under sequence parallelism over this rank's share of each sequence."""
    local = zeromega.shard_batch(batch, mode)  # this rank's input_ids, shift_labels, position_ids
    logits = model(input_ids=local["input_ids"].to(model.device),
                   position_ids=local["position_ids"].to(model.device)).logits
    labels = local["shift_labels"].to(logits.device).flatten()
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), labels, ignore_index=-100, reduction="none")
    return zeromega.cp_loss(per_token, labels != -100)  # the whole sequence's mean, on every rank


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--deepspeed_config", "--config", default=os.environ.get("ZEROMEGA_CONFIG"))
    p.add_argument("--local_rank", type=int, default=None)  # what the deepspeed launcher passes
    args = p.parse_args()
    cfg = zeromega.load_config(args.deepspeed_config)
    mode = cfg.sequence.mode if cfg.sequence.mode in ("ulysses", "ring", "usp") else "contiguous"
    attention = "sdpa"
    if mode != "contiguous":
        zeromega.register_hf_attention()
        attention = f"zeromega_{mode}"
    zeromega.Run(cfg, model=functools.partial(build_model, attention), batches=my_batches,
                 loss=functools.partial(my_loss, mode=mode)).train()


if __name__ == "__main__":
    main()
