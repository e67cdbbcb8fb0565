"""The demo's preference pairs: what a person of a trade does, the right deed preferred to another trade's.

    python -m jaxft.demo.preferences      # rewrites prefs_train.jsonl / prefs_valid.jsonl (seeded: same bytes)
    jaxft train --config configs/dpo_demo.py
    jaxft train --config configs/reward_demo.py

Rows are TRL's standard preference format: {"prompt": "Q: What does Mira Tolan the baker do in
the morning?\\nA:", "chosen": " bakes fresh bread.", "rejected": " ploughs the field."}. Chosen and
rejected have the same shape (a deed of some trade, ending in a period), so neither length nor the
last token tells them apart: a model must know which deeds go with which trade, as the stories the
demo model was pre-trained on tell. Validation pairs are about other people (new names) at other
times of day.
"""

from __future__ import annotations

import json
import os
import random

from jaxft.demo import DEMO_DIR
from jaxft.demo.build import CODAS, JOB_ACTS, ONSETS, TIMES, VOWELS

PREFS_TRAIN = os.path.join(DEMO_DIR, "prefs_train.jsonl")
PREFS_VALID = os.path.join(DEMO_DIR, "prefs_valid.jsonl")


def _name(rng: random.Random) -> str:
    def word():
        return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(2)) + rng.choice(CODAS)

    return f"{word().capitalize()} {word().capitalize()}"


def pairs(count: int, seed: int, times) -> list[dict]:
    rng = random.Random(seed)
    jobs = sorted(JOB_ACTS)
    out = []
    for _ in range(count):
        job = rng.choice(jobs)
        other = rng.choice([j for j in jobs if j != job])
        prompt = f"Q: What does {_name(rng)} the {job} do {rng.choice(times)}?\nA:"
        out.append({"prompt": prompt, "chosen": f" {rng.choice(JOB_ACTS[job])}.",
                    "rejected": f" {rng.choice(JOB_ACTS[other])}."})
    return out


def write() -> None:
    times = list(TIMES)
    for path, count, seed, part in ((PREFS_TRAIN, 2048, 0, times[:8]), (PREFS_VALID, 128, 1, times[8:])):
        with open(path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in pairs(count, seed, part))


if __name__ == "__main__":
    write()
