"""Reward functions for online RL, written as TRL's: `fn(prompts, completions, **kwargs) -> [float | None]`.

    functions = load_rewards(["jaxft/demo/rewards.py:town_answer", "my_pkg.rewards:length_penalty"])
    per_function = score(functions, prompts, completions, completion_ids, rows)   # [N, F], NaN for None

A spec is "path/to/file.py:function" (loaded from the file) or "package.module:function"
(imported). A function is called as TRL calls one: keyword arguments `prompts`, `completions`
(strings; lists of {"role": "assistant", "content": ...} for conversational prompts),
`completion_ids` (token ids), and every other field of the data rows as a list, one entry per
completion. It returns one float per completion, or None where it does not apply (a NaN here,
ignored in the weighted sum as TRL does). So a reward file written for TRL runs unchanged.
A function that raises is reported with its name and the batch's first prompt; one that returns
the wrong number of values is an error naming it and both counts.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from typing import Any, Callable, Sequence

import numpy as np


class RewardError(RuntimeError):
    """A reward function failed or returned something unusable; the message names it."""


def load_rewards(specs: Sequence[str]) -> list[tuple[str, Callable]]:
    """[(name, function)] for "file.py:function" / "module:function" specs."""
    out = []
    for spec in specs:
        where, sep, name = str(spec).rpartition(":")
        if not sep or not where or not name:
            raise ValueError(f"grpo.rewards entry {spec!r} must look like 'path/to/file.py:function' or "
                             "'package.module:function'")
        if where.endswith(".py"):
            if not os.path.exists(where):
                raise FileNotFoundError(f"grpo.rewards entry {spec!r}: no such file {where!r}")
            module_spec = importlib.util.spec_from_file_location(f"jaxft_rewards_{abs(hash(where))}", where)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
        function = getattr(module, name, None)
        if not callable(function):
            raise ValueError(f"grpo.rewards entry {spec!r}: {where} has no function {name!r}")
        out.append((name, function))
    return out


def score(functions: Sequence[tuple[str, Callable]], prompts: list, completions: list, completion_ids: list[list[int]],
          rows: list[dict], prompt_field: str = "prompt") -> np.ndarray:
    """[len(completions), len(functions)] float32 rewards (NaN where a function returned None)."""
    extra: dict[str, list[Any]] = {}
    for key in rows[0] if rows else ():
        if key not in (prompt_field, "prompt", "completion", "completion_ids"):
            extra[key] = [row.get(key) for row in rows]
    out = np.full((len(completions), len(functions)), np.nan, np.float32)
    for i, (name, function) in enumerate(functions):
        try:
            values = function(prompts=prompts, completions=completions, completion_ids=completion_ids, **extra)
        except Exception as e:  # noqa: BLE001 - the user's code: say whose and on what
            raise RewardError(f"reward function {name!r} raised {type(e).__name__}: {e} (first prompt of the batch: "
                              f"{str(prompts[0])[:200]!r})") from e
        values = list(values) if values is not None else []
        if len(values) != len(completions):
            raise RewardError(f"reward function {name!r} returned {len(values)} values for {len(completions)} "
                              "completions (one float, or None, per completion)")
        for j, value in enumerate(values):
            if value is None:
                continue
            if not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(float(value)):
                raise RewardError(f"reward function {name!r} returned {value!r} for completion {j}: rewards are "
                                  "finite numbers or None")
            out[j, i] = float(value)
    return out
