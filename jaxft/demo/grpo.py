"""The GRPO demo's prompts: "Q: Where does NAME live?\\nA:" for made-up people.

    python -m jaxft.demo.grpo         # rewrites grpo_train.jsonl / grpo_valid.jsonl (seeded: same bytes)
    jaxft train --config configs/grpo_demo.py

Each row also carries the person's `name`, a field the reward functions receive as a keyword
argument (as TRL passes every other column). The rewards: jaxft/demo/rewards.py.
"""

from __future__ import annotations

import json
import os
import random

from jaxft.demo import DEMO_DIR
from jaxft.demo.preferences import _name

GRPO_TRAIN = os.path.join(DEMO_DIR, "grpo_train.jsonl")
GRPO_VALID = os.path.join(DEMO_DIR, "grpo_valid.jsonl")
REWARDS = os.path.join(DEMO_DIR, "rewards.py")


def rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        name = _name(rng)
        out.append({"prompt": f"Q: Where does {name} live?\nA:", "name": name})
    return out


def write() -> None:
    for path, count, seed in ((GRPO_TRAIN, 512, 0), (GRPO_VALID, 64, 1)):
        with open(path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows(count, seed))


if __name__ == "__main__":
    write()
