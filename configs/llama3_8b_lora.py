"""Llama-3.1-8B, LoRA r=16 on all linear layers, seq 2048.

Hardware (the ARG):
  v5e-8  (default) TPU v5e-8 or v4-8: 8 chips, base sharded FSDP over all 8 (2 GB of bf16 weights each)
  h100   one H100 80 GB: bf16 base (16 GB), micro-batches of 4 accumulated to 16

    jaxft train --config configs/llama3_8b_lora.py:h100 --config.data.train=my_data.jsonl
"""

from jaxft import config as config_lib


ARGS = ("v5e-8", "h100")  # the ARG values of `--config FILE:ARG` this file knows (the default needs none)


def get_config(arg: str = "v5e-8"):
    c = config_lib.default_config()
    c.workdir = "workdir/llama3_8b_lora"
    c.model.path = "meta-llama/Llama-3.1-8B"
    c.model.dtype = "bfloat16"  # the frozen base; adapters and their optimizer state stay float32
    c.data.train = "data/train.jsonl"  # your data: text, prompt_completion or chat rows
    c.data.format = "prompt_completion"
    c.data.seq_len = 2048
    c.data.validation_fraction = 0.02
    c.train.steps = 2000
    c.train.batch_size = 16
    c.train.learning_rate = 2e-4
    c.train.warmup_steps = 50
    c.train.remat = "full"
    c.train.eval_every = 200
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.dropout = 0.05
    c.checkpoint.every = 200
    if arg == "v5e-8":
        c.mesh.shape = {"fsdp": 8}
    elif arg == "h100":
        c.mesh.shape = {"data": 1}
        c.train.grad_accum = 4
    else:
        raise ValueError(f"unknown hardware {arg!r}: v5e-8 or h100")
    return c
