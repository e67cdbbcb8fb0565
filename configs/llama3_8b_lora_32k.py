"""Llama-3.1-8B, LoRA r=16 on all linear layers, at seq 32768: context parallelism.

One 32k sequence does not fit a chip's activations, so the `context` mesh axis splits every
sequence over the chips (jaxft.models.context_parallel: each chip holds T / context tokens of
every activation; attention gathers the keys and values, 128 MiB per layer for 32k tokens under
Llama-3's GQA). The base's weights are split over the same chips (ZeRO-3 along `embed`).

Hardware (the ARG):
  v5e-8  (default) TPU v5e-8: 8 chips of 16 GiB, context=8: 4096 tokens per chip, one sequence
         per micro-batch, 8 accumulated per step
  v5p-8  TPU v5p-8: 4 chips of 95 GiB, context=4: 8192 tokens per chip, micro-batches of 2
         (data=-1 takes the chips left over: 1 on the slice)

    jaxft plan  --config configs/llama3_8b_lora_32k.py --device v5e
    jaxft train --config configs/llama3_8b_lora_32k.py:v5p-8 --config.data.train=my_long_docs.jsonl
"""

from jaxft import config as config_lib


ARGS = ("v5e-8", "v5p-8")  # the ARG values of `--config FILE:ARG` this file knows (the default needs none)


def get_config(arg: str = "v5e-8"):
    c = config_lib.default_config()
    c.workdir = "workdir/llama3_8b_lora_32k"
    c.model.path = "meta-llama/Llama-3.1-8B"
    c.model.dtype = "bfloat16"  # the frozen base; adapters and their optimizer state stay float32
    c.data.train = "data/train.jsonl"  # your data: long text, prompt_completion or chat rows
    c.data.format = "text"
    c.data.seq_len = 32768
    c.data.packing = True  # short documents packed into 32k rows (segment ids keep them apart)
    c.data.validation_fraction = 0.02
    c.train.steps = 500
    c.train.learning_rate = 2e-4
    c.train.warmup_steps = 20
    c.train.remat = "full"  # keep only each layer's input: 32 MiB per layer per chip at 4096 tokens
    c.train.loss_chunk = 1024  # per context shard: [1, 1024, 128256] f32 logits at a time, not [1, 4096, ..]
    c.train.eval_every = 100
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.dropout = 0.05
    c.checkpoint.every = 100
    if arg == "v5e-8":
        c.mesh.shape = {"context": 8}
        c.train.batch_size = 8
        c.train.grad_accum = 8
    elif arg == "v5p-8":
        c.mesh.shape = {"context": 4, "data": -1}
        c.train.batch_size = 8
        c.train.grad_accum = 4
    else:
        raise ValueError(f"unknown hardware {arg!r}: v5e-8 or v5p-8")
    return c
