"""Chat SFT: Qwen2.5-1.5B-Instruct on a messages dataset, LoRA, loss on assistant turns only.

Hardware: one free Colab TPU v5e-1 (16 GB), any single GPU with >= 16 GB, or CPU for a smoke test
(`:smoke`, with a local model path).

    jaxft train --config configs/chat_sft.py --config.data.train=chats.jsonl
Rows: {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}
"""

from jaxft import config as config_lib


ARGS = ()  # the ARG values of `--config FILE:ARG` this file knows (the default needs none)


def get_config(arg: str = ""):
    c = config_lib.default_config()
    c.workdir = "workdir/chat_sft"
    c.model.path = "Qwen/Qwen2.5-1.5B-Instruct"
    c.model.dtype = "bfloat16"
    c.data.train = "data/chats.jsonl"
    c.data.format = "chat"  # rendered with the tokenizer's own chat template
    c.data.train_on = "all_assistant"
    c.data.seq_len = 2048
    c.data.validation_fraction = 0.02
    c.train.steps = 1000
    c.train.batch_size = 8
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 30
    c.train.remat = "full"
    c.train.eval_every = 100
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.dropout = 0.05
    c.mesh.shape = {"data": 1}
    c.checkpoint.every = 100
    return c
