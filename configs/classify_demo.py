"""Sequence classification on the bundled tiny model: LoRA + a new head learn 4 topics. No download.

    jaxft train --config configs/classify_demo.py            # ~97% validation accuracy in ~20 s on 2 CPU cores
    jaxft train --config configs/classify_demo.py:smoke      # a few steps through every part
    jaxft export --workdir workdir/classify_demo --out workdir/classify_demo/hf --format hf     # *ForSequenceClassification
    jaxft export --workdir workdir/classify_demo --out workdir/classify_demo/adapter --format peft

Data: jaxft/demo/topics_{train,valid}.jsonl, {"text": "...", "label": "weather|work|animals|travel"},
written by `python -m jaxft.demo.topics`. The report (report.html/json) shows eval accuracy and
macro-F1; metrics.jsonl's eval rows carry eval_loss, accuracy and f1.
"""

from jaxft import config as config_lib
from jaxft.demo import MODEL_DIR
from jaxft.demo.config import get_config as demo_config
from jaxft.demo.topics import LABELS, TOPICS_TRAIN, TOPICS_VALID


ARGS = ("smoke",)  # the ARG values of `--config FILE:ARG` this file knows (the default needs none)


def get_config(arg: str = ""):
    c = demo_config()  # the bundled model and the demo's LoRA settings
    c.workdir = "workdir/classify_demo"
    c.task = "classification"
    c.model.path = MODEL_DIR  # a causal LM: the `score` head [4, 128] starts fresh and trains whole
    c.classification.labels = tuple(LABELS)
    c.data.train = TOPICS_TRAIN  # 1000 rows
    c.data.validation = TOPICS_VALID  # 200 rows
    c.data.format = "text"  # unused by classification; reset from the facts demo's prompt_completion
    c.data.seq_len = 32  # the longest row is 28 tokens with BOS
    c.eval.task_file = None  # generation exact match does not apply to a classifier
    c.train.steps = 60  # ~1 epoch at batch 16
    c.train.batch_size = 16
    c.train.learning_rate = 5e-3
    c.train.warmup_steps = 6
    c.train.eval_every = 20
    c.checkpoint.every = 30
    return config_lib.smoke(c) if arg == "smoke" else c
