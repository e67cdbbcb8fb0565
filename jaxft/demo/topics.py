"""The classification demo's data: one-sentence stories labelled by topic, in the demo corpus's words.

    python -m jaxft.demo.topics     # rewrites topics_train.jsonl / topics_valid.jsonl (seeded: same bytes)
    jaxft train --config configs/classify_demo.py

Rows are {"text": ..., "label": one of LABELS}. Each topic has its own sentence shapes, but names,
towns, times and places are shared across topics and a few phrases cross over (a traveller "rides a
horse", a storm keeps "the boats" in), so the head must read the sentence, not one fixed position.
"""

from __future__ import annotations

import json
import os
import random

from jaxft.demo import DEMO_DIR
from jaxft.demo.build import (ANIMALS, COLORS, CODAS, JOB_ACTS, ONSETS, PLACES, TIMES, TOWNS, VOWELS, WEATHER,
                              WEATHER_AFTER)

LABELS = ["weather", "work", "animals", "travel"]
TOPICS_TRAIN = os.path.join(DEMO_DIR, "topics_train.jsonl")
TOPICS_VALID = os.path.join(DEMO_DIR, "topics_valid.jsonl")
ANIMAL_ACTS = ["sleeps by", "runs to", "hides near", "waits at", "plays near", "sits on the wall by"]
TRAVEL_ACTS = ["takes the train to", "walks to", "sails to", "rides a horse to", "travels to", "leaves for"]


def _name(rng: random.Random) -> str:
    def word():
        return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(2)) + rng.choice(CODAS)

    return f"{word().capitalize()} {word().capitalize()}"


def sentence(rng: random.Random, label: str) -> str:
    name, town, time, place = _name(rng), rng.choice(TOWNS), rng.choice(TIMES), rng.choice(PLACES)
    if label == "weather":
        return f"{rng.choice(WEATHER)} in {town} {time}, {rng.choice(WEATHER_AFTER)}."
    if label == "work":
        job = rng.choice(sorted(JOB_ACTS))
        return f"{name} the {job} {rng.choice(JOB_ACTS[job])} {time}."
    if label == "animals":
        return f"{name}'s {rng.choice(COLORS)} {rng.choice(ANIMALS)} {rng.choice(ANIMAL_ACTS)} {place} {time}."
    return f"{name} {rng.choice(TRAVEL_ACTS)} {town} {time}."


def rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        label = LABELS[i % len(LABELS)] if i < len(LABELS) else rng.choice(LABELS)  # every label occurs
        out.append({"text": sentence(rng, label), "label": label})
    return out


def write() -> None:
    for path, count, seed in ((TOPICS_TRAIN, 1000, 0), (TOPICS_VALID, 200, 1)):
        with open(path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows(count, seed))


if __name__ == "__main__":
    write()
