"""The distillation demo: a 4-layer teacher that knows the demo's facts teaches a 2-layer student.

    jaxft demo --variant distill                        # all of it, ~1.5 min on 2 CPU cores
    jaxft train --config configs/distill_demo.py:teacher  # 1. the teacher (then jaxft export ... --format hf)
    jaxft make-student --model jaxft/demo/model --layers 2 --out workdir/distill_demo/student   # 2.
    jaxft train --config configs/distill_demo.py          # 3. the distillation itself

The teacher is the bundled model LoRA-tuned (r16) on the 48 facts mixed with 1000 plain sentences
(jaxft/demo/topics_train.jsonl), so that it answers the facts and still writes sentences; the
student is the bundled base cut to its first 2 layers (jaxft.student). The student learns the
teacher's next-token distribution (forward KL) on the same mixture; eval rows hold its KL to the
teacher on 200 held-out sentences (distill_loss) and the report its exact match on the facts.
"""

from __future__ import annotations

import os

from jaxft import config as config_lib
from jaxft.demo import FACTS_EVAL, FACTS_TRAIN, MODEL_DIR
from jaxft.demo.config import get_config as demo_config
from jaxft.demo.topics import TOPICS_TRAIN, TOPICS_VALID

WORKDIR = "workdir/distill_demo"
MIXTURE = [{"path": FACTS_TRAIN, "format": "prompt_completion"}, {"path": TOPICS_TRAIN, "format": "text"}]


def paths(workdir: str = WORKDIR) -> dict[str, str]:
    return {"run": workdir, "teacher_run": os.path.join(workdir, "teacher"),
            "teacher": os.path.join(workdir, "teacher", "hf"), "student": os.path.join(workdir, "student")}


ARGS = ("teacher", "smoke")  # the ARG values of `--config FILE:ARG` this file knows (the default needs none)


def get_config(arg: str = "", workdir: str = WORKDIR):
    where = paths(workdir)
    c = demo_config()  # the bundled model, its facts and their exact-match task file
    c.data.train = MIXTURE
    c.data.validation = {"path": TOPICS_VALID, "format": "text"}  # held-out sentences
    c.eval.task_file = FACTS_EVAL
    if arg == "teacher":
        c.workdir = where["teacher_run"]
        c.data.weights = [0.7, 0.3]
        c.data.validation = None
        c.lora.rank, c.lora.alpha = 16, 32.0
        c.train.steps = 240
        return c
    c.workdir = where["run"]
    c.task = "distill"
    c.model.path = where["student"]
    c.distill.teacher = where["teacher"]
    c.distill.loss = "forward_kl"
    c.data.weights = [0.5, 0.5]
    c.data.seq_len = 64
    c.eval.at_start = True  # the KL to the teacher before any step
    c.lora.rank = 0  # the student trains whole
    c.train.steps = 300
    c.train.batch_size = 16
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 10
    c.train.eval_every = 100
    c.train.loss_chunk = 32  # neither model's [B, T, V] logits held at once
    c.checkpoint.every = 150
    return config_lib.smoke(c) if arg == "smoke" else c


def prepare(workdir: str = WORKDIR, log=print) -> dict[str, str]:
    """Makes what the distillation needs, unless it is there: the teacher (trained and exported)
    and the student (the bundled model's first 2 layers)."""
    from jaxft import export, train
    from jaxft.student import first_layers

    where = paths(workdir)
    if not os.path.exists(os.path.join(where["teacher"], "config.json")):
        log(f"teacher: LoRA r16 on the facts and plain sentences → {where['teacher']}")
        summary = train.train(get_config("teacher", workdir))
        log(f"  teacher exact match on the facts {summary['task']['after']['exact_match']:.0%}")
        export.export(where["teacher_run"], where["teacher"], format="hf")
    if not os.path.exists(os.path.join(where["student"], "config.json")):
        log(f"student: the first 2 of the bundled model's 4 layers → {where['student']}")
        first_layers(MODEL_DIR, 2, where["student"])
    return where
