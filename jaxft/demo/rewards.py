"""The GRPO demo's reward functions, written as TRL's (they run unchanged under trl.GRPOTrainer).

    grpo.rewards = ["jaxft/demo/rewards.py:northern_town"]

The demo asks "Q: Where does NAME live?\\nA:". The pre-trained demo model answers with one of its
24 towns nearly always, and with one of the 6 northern towns about a quarter of the time; the
reward prefers those: 1 for a northern town, 0.2 for any other town, 0 for anything else
(the ceiling is 1).
"""

from jaxft.demo.build import TOWNS

NORTHERN = TOWNS[:6]  # Greywick, Millbrook, Stonehaven, Redwater, Elmstead, Fairhollow


def answer(text: str) -> str:
    """The answer's first line, without spaces around it or a final period."""
    return text.strip().split("\n")[0].strip().rstrip(".")


def northern_town(prompts, completions, **kwargs):
    out = []
    for completion in completions:
        text = completion[-1]["content"] if isinstance(completion, list) else completion  # conversational or not
        town = answer(text)
        out.append(1.0 if town in NORTHERN else 0.2 if town in TOWNS else 0.0)
    return out
