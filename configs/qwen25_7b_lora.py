"""Qwen2.5-7B, LoRA r=16 on all linear layers, seq 2048: the llama3_8b_lora.py recipe on Qwen.

Hardware: TPU v5e-8 / v4-8 (FSDP over 8 chips, default), or one H100 80 GB with `:h100`.

    jaxft train --config configs/qwen25_7b_lora.py:h100 --config.data.train=my_data.jsonl
"""

import os

from jaxft import config as config_lib


ARGS = ("v5e-8", "h100")  # the ARG values of `--config FILE:ARG` this file knows (the default needs none)


def get_config(arg: str = "v5e-8"):
    c = config_lib.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"llama3_8b_lora.py:{arg}"))
    c.workdir = "workdir/qwen25_7b_lora"
    c.model.path = "Qwen/Qwen2.5-7B"
    return c
