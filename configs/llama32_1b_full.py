"""Llama-3.2-1B, full fine-tuning with float32 master weights and bfloat16 compute, seq 2048.

Hardware: one H100 80 GB or a TPU v5e-8 / v4-8 (mesh fsdp=-1 shards params and AdamW state over
all devices: 1.2B params × 16 bytes of weights + moments = 20 GB in all).

    jaxft train --config configs/llama32_1b_full.py --config.data.train=my_data.jsonl
"""

from jaxft import config as config_lib


ARGS = ()  # the ARG values of `--config FILE:ARG` this file knows (the default needs none)


def get_config(arg: str = ""):
    c = config_lib.default_config()
    c.workdir = "workdir/llama32_1b_full"
    c.model.path = "meta-llama/Llama-3.2-1B"
    c.model.dtype = "float32"  # master weights; the optimizer state follows them
    c.model.compute_dtype = "bfloat16"
    c.data.train = "data/train.jsonl"
    c.data.format = "text"
    c.data.seq_len = 2048
    c.data.validation_fraction = 0.01
    c.train.steps = 3000
    c.train.batch_size = 32
    c.train.learning_rate = 2e-5
    c.train.warmup_steps = 100
    c.train.weight_decay = 0.1
    c.train.remat = "dots_no_batch"
    c.train.eval_every = 250
    c.lora.rank = 0  # full fine-tuning
    c.mesh.shape = {"fsdp": -1}
    c.checkpoint.every = 500
    return c
