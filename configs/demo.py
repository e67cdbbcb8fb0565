"""The embedded default: fine-tune the bundled tiny model on bundled text. No download, CPU is fine.

    jaxft train --config configs/demo.py
    jaxft train --config configs/demo.py --config.train.steps=10 --config.lora.rank=0
"""

import os

from jaxft import config as config_lib
from jaxft.demo import MODEL_DIR

DEMO_DATA = os.path.join(os.path.dirname(MODEL_DIR), "text.jsonl")


def get_config(arg: str = ""):
    c = config_lib.default_config()
    c.workdir = "workdir/demo"
    c.model.path = MODEL_DIR  # the bundled tiny Llama (2 layers, hidden 64) and its BPE tokenizer
    c.data.train = DEMO_DATA
    c.data.format = "text"
    c.data.seq_len = 64
    c.data.validation_fraction = 0.2
    c.train.steps = 40
    c.train.batch_size = 8
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 4
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.checkpoint.every = 10
    if arg == "smoke":  # the smallest run that exercises every part
        c.train.steps = 4
        c.checkpoint.every = 2
    return c
