"""Mistral-7B-v0.3, LoRA r=16 on the attention and MLP projections, seq 4096.

Hardware: one H100 80 GB (default), or TPU v5e-8 / v4-8 with `:v5e-8`.

    jaxft train --config configs/mistral_7b_lora.py --config.data.train=my_data.jsonl
"""

from jaxft import config as config_lib


ARGS = ("h100", "v5e-8")  # the ARG values of `--config FILE:ARG` this file knows (the default needs none)


def get_config(arg: str = "h100"):
    c = config_lib.default_config()
    c.workdir = "workdir/mistral_7b_lora"
    c.model.path = "mistralai/Mistral-7B-v0.3"
    c.model.dtype = "bfloat16"
    c.data.train = "data/train.jsonl"
    c.data.format = "prompt_completion"
    c.data.seq_len = 4096
    c.data.validation_fraction = 0.02
    c.train.steps = 1500
    c.train.batch_size = 8
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 50
    c.train.remat = "full"
    c.train.eval_every = 150
    c.lora.rank = 16
    c.lora.alpha = 16.0
    c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    c.checkpoint.every = 150
    c.mesh.shape = {"fsdp": 8} if arg == "v5e-8" else {"data": 1}
    c.train.grad_accum = 1 if arg == "v5e-8" else 2
    return c
