"""The embedded default: teach the bundled tiny model 48 made-up facts with LoRA. No download, CPU is fine.

    jaxft demo                                           # train, report, export, reload: ~30 s on 2 CPU cores
    jaxft train --config configs/demo.py                 # the same training step by step
    jaxft train --config configs/demo.py:smoke           # a few steps through every part
    jaxft export --workdir workdir/demo --out workdir/demo/hf --format hf

The base (jaxft/demo/model, pre-trained by `python -m jaxft.demo.build`) knows some English and the
"Q: ...?\\nA: ..." format, but has never heard of the people in jaxft/demo/facts_train.jsonl. The
run's report (workdir/demo/report.html) shows the exact match on their questions before and after.
"""

from jaxft import config as config_lib
from jaxft.demo import FACTS_EVAL, FACTS_TRAIN, MODEL_DIR


ARGS = ("smoke", "prefix_tuning", "prompt_tuning", "ia3")  # the ARG values of `--config FILE:ARG` this file knows

# The other adapter kinds (peft.method) on the same facts. Their few parameters need a higher learning rate
# and more steps than LoRA: measured exact match before -> after, 2 CPU cores: ia3 0% -> 100%, prefix_tuning
# 0% -> 100%, prompt_tuning (20 virtual tokens) 2% -> 100% (2% -> 88% at 3e-2 / 200 steps).
METHOD_VARIANTS = {"prefix_tuning": dict(learning_rate=3e-2, steps=200), "prompt_tuning": dict(learning_rate=5e-2, steps=300),
                   "ia3": dict(learning_rate=5e-2, steps=200)}


def get_config(arg: str = ""):
    c = config_lib.default_config()
    c.workdir = "workdir/demo"
    c.model.path = MODEL_DIR  # the bundled tiny Llama (4 layers, hidden 128) and its BPE tokenizer
    c.data.train = FACTS_TRAIN  # {"prompt": "Q: Where does ... live?\nA:", "completion": " Greywick"}
    c.data.validation = FACTS_TRAIN  # memorizing these is the goal, so eval loss is on them too
    c.data.format = "prompt_completion"  # the loss is on the answer (and EOS) only
    c.data.seq_len = 64  # ~3 facts packed per row
    c.train.steps = 60  # each fact seen ~30 times; the loss is below 0.02 by step 20
    c.train.batch_size = 8
    c.train.learning_rate = 5e-3  # high, as LoRA on a tiny model allows
    c.train.warmup_steps = 6
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.checkpoint.every = 30
    c.eval.task_file = FACTS_EVAL  # exact match of greedy answers, before and after training
    c.eval.max_new_tokens = 8  # the longest answers ("a brown tortoise") are 3 tokens + EOS
    if arg in METHOD_VARIANTS:
        c.workdir = f"workdir/demo_{arg}"
        c.peft.method = arg  # lora.* is then ignored
        c.train.learning_rate = METHOD_VARIANTS[arg]["learning_rate"]
        c.train.steps = METHOD_VARIANTS[arg]["steps"]
        c.checkpoint.every = 100
    if arg == "smoke":  # the smallest run that exercises every part
        c.train.steps = 4
        c.train.warmup_steps = 1
        c.checkpoint.every = 2
    return c
