"""GRPO on the bundled tiny model: LoRA learns to name the northern towns. No download.

    jaxft train --config configs/grpo_demo.py                 # ~20 s on 2 CPU cores
    jaxft train --config configs/grpo_demo.py --config.grpo.loss_type=grpo --config.grpo.beta=0.04
    jaxft train --config configs/grpo_demo.py:smoke

Prompts: jaxft/demo/grpo_{train,valid}.jsonl ("Q: Where does NAME live?\\nA:", `python -m
jaxft.demo.grpo`); reward: jaxft/demo/rewards.py:northern_town (1 for one of 6 northern towns,
0.2 for another town, 0 otherwise; a reward file written for TRL). Each step samples 4 completions
for each of 8 prompts from the model being trained; eval rows hold the mean reward of greedy
answers to 64 held-out prompts (eval_reward; eval_loss is its negative).
"""

from jaxft import config as config_lib
from jaxft.demo.config import get_config as demo_config
from jaxft.demo.grpo import GRPO_TRAIN, GRPO_VALID, REWARDS


ARGS = ("smoke",)  # the ARG values of `--config FILE:ARG` this file knows (the default needs none)


def get_config(arg: str = ""):
    c = demo_config()  # the bundled model, LoRA
    c.workdir = "workdir/grpo_demo"
    c.task = "grpo"
    c.data.train = GRPO_TRAIN
    c.data.validation = GRPO_VALID
    c.data.format = "text"  # unused: prompt rows are read by the task
    c.grpo.rewards = (f"{REWARDS}:northern_town",)
    c.grpo.num_generations = 4
    c.grpo.max_prompt_length = 24
    c.grpo.max_new_tokens = 8
    c.data.seq_len = 32  # = max_prompt_length + max_new_tokens
    c.grpo.temperature = 1.0
    c.eval.task_file = None
    c.eval.at_start = True
    c.eval.samples = 6
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.train.steps = 60
    c.train.batch_size = 32  # completions: 8 prompts × 4
    c.train.learning_rate = 5e-4
    c.train.warmup_steps = 4
    c.train.eval_every = 20
    c.checkpoint.every = 30
    return config_lib.smoke(c) if arg == "smoke" else c
