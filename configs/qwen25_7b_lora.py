"""Qwen2.5-7B, LoRA r=16 on all linear layers, seq 2048.

Hardware: TPU v5e-8 / v4-8 (FSDP over 8 chips), or one H100 80 GB with `:h100`.

    jaxft train --config configs/qwen25_7b_lora.py:h100 --config.data.train=my_data.jsonl
"""

from jaxft import config as config_lib


def get_config(arg: str = "v5e-8"):
    c = config_lib.default_config()
    c.workdir = "workdir/qwen25_7b_lora"
    c.model.path = "Qwen/Qwen2.5-7B"
    c.model.dtype = "bfloat16"
    c.data.train = "data/train.jsonl"
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
    c.mesh.shape = {"data": 1} if arg == "h100" else {"fsdp": 8}
    c.train.grad_accum = 4 if arg == "h100" else 1
    return c
