"""A reward model on the bundled tiny model: LoRA r16 + a scalar head score each trade's own deeds higher.

    jaxft train --config configs/reward_demo.py                      # ~35 s on 2 CPU cores
    jaxft train --config configs/reward_demo.py:smoke
    jaxft export --workdir workdir/reward_demo --out workdir/reward_demo/hf --format hf   # *ForSequenceClassification, 1 label
    jaxft export --workdir workdir/reward_demo --out workdir/reward_demo/adapter --format peft

The same pairs as configs/dpo_demo.py (jaxft/demo/prefs_*.jsonl); the head [1, 128] starts fresh and
trains whole beside the adapters. The report shows held-out pair accuracy (r_chosen > r_rejected)
before (a random head: about 0.5) and after, and held-out pairs with both rewards.
"""

from jaxft import config as config_lib
from jaxft.demo import MODEL_DIR
from jaxft.demo.config import get_config as demo_config
from jaxft.demo.preferences import PREFS_TRAIN, PREFS_VALID


ARGS = ("smoke",)  # the ARG values of `--config FILE:ARG` this file knows (the default needs none)


def get_config(arg: str = ""):
    c = demo_config()  # the bundled model
    c.workdir = "workdir/reward_demo"
    c.task = "reward"
    c.model.path = MODEL_DIR  # a causal LM: the `score` head [1, 128] starts fresh
    c.data.format = "preference"
    c.data.train = PREFS_TRAIN  # 2048 pairs
    c.data.validation = PREFS_VALID  # 128 pairs
    c.data.seq_len = 32  # prompt + completion, the reward read at the last token (EOS)
    c.eval.task_file = None
    c.eval.at_start = True
    c.eval.samples = 6
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.train.steps = 192  # 3 epochs of the 2048 pairs
    c.train.batch_size = 32  # pairs (64 sequences)
    c.train.learning_rate = 2e-3
    c.train.warmup_steps = 8
    c.train.eval_every = 64
    c.checkpoint.every = 96
    return config_lib.smoke(c) if arg == "smoke" else c
