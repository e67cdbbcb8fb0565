"""Preference tuning on the bundled tiny model: LoRA r16 DPO prefers each trade's own deeds. No download.

    jaxft train --config configs/dpo_demo.py                         # ~20 s on 2 CPU cores
    jaxft train --config configs/dpo_demo.py --config.dpo.loss_type=ipo    # or hinge, simpo, orpo
    jaxft train --config configs/dpo_demo.py:smoke                   # a few steps through every part
    jaxft export --workdir workdir/dpo_demo --out workdir/dpo_demo/hf --format hf

Data: jaxft/demo/prefs_{train,valid}.jsonl (`python -m jaxft.demo.preferences`), TRL's standard
rows {"prompt", "chosen", "rejected"}: "Q: What does NAME the baker do at noon?\\nA:" → the baker's
deed preferred to another trade's. The reference is the base with the adapters off (no copy). The
report shows eval_rewards/accuracies before (0: policy = reference, every margin is 0) and after,
and held-out pairs with the policy's log-prob margin log p(chosen) − log p(rejected) before/after.
"""

from jaxft import config as config_lib
from jaxft.demo import MODEL_DIR
from jaxft.demo.config import get_config as demo_config
from jaxft.demo.preferences import PREFS_TRAIN, PREFS_VALID


ARGS = ("smoke",)  # the ARG values of `--config FILE:ARG` this file knows (the default needs none)


def get_config(arg: str = ""):
    c = demo_config()  # the bundled model
    c.workdir = "workdir/dpo_demo"
    c.task = "dpo"
    c.model.path = MODEL_DIR
    c.data.format = "preference"
    c.data.train = PREFS_TRAIN  # 2048 pairs
    c.data.validation = PREFS_VALID  # 128 pairs, other people at other times of day
    c.data.seq_len = 32  # the longest pair is 25 tokens with BOS and EOS
    c.eval.task_file = None
    c.eval.at_start = True  # the report shows reward accuracy and margins before and after
    c.eval.samples = 6
    c.dpo.loss_type = "sigmoid"
    c.dpo.beta = 0.1
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.train.steps = 96  # 0.75 epoch of the 2048 pairs at batch 16
    c.train.batch_size = 16  # pairs (32 sequences)
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 4
    c.train.eval_every = 32
    c.checkpoint.every = 48
    return config_lib.smoke(c) if arg == "smoke" else c
