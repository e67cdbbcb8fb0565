"""Key tables: how a family's parameters map to Hugging Face checkpoint keys.

A table is a list of `KeyRule`s, one per parameter. Params stacked over layers name their HF key
with `{layer}`. The same table read backwards is the export. Checking a checkpoint against a table
finds every problem at once — unmapped keys, unfilled params, wrong shapes — before any tensor is
read, so a bad checkpoint costs nothing and the error lists all that is wrong.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence

LAYER = "{layer}"


@dataclasses.dataclass(frozen=True)
class KeyRule:
    param: str  # '.'-joined path in the model's nnx.State, e.g. "model.layers.mlp.up_proj.weight"
    hf: str  # HF key, e.g. "model.layers.{layer}.mlp.up_proj.weight"

    @property
    def stacked(self) -> bool:
        return LAYER in self.hf

    def hf_keys(self, num_layers: int) -> list[str]:
        if not self.stacked:
            return [self.hf]
        return [self.hf.replace(LAYER, str(i)) for i in range(num_layers)]


def mirror_rules(param_paths: Iterable[str], stacked_prefix: str) -> list[KeyRule]:
    """Rules for families whose param paths ARE the HF keys, with the layer index folded away."""
    rules = []
    for path in param_paths:
        hf = stacked_prefix + LAYER + "." + path[len(stacked_prefix):] if path.startswith(stacked_prefix) else path
        rules.append(KeyRule(param=path, hf=hf))
    return rules


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model; the message lists every key and shape at fault."""


def check_checkpoint(rules: Sequence[KeyRule], param_shapes: dict[str, tuple[int, ...]], num_layers: int,
                     checkpoint_shapes: dict[str, tuple[int, ...]], where: dict[str, str],
                     ignored_patterns: Sequence[str] = ()) -> None:
    """Raises CheckpointMismatchError naming unmapped keys, unfilled params and shape mismatches.

    where: HF key → the file that holds it (for the message).
    """
    problems: list[str] = []
    mapped: set[str] = set()
    for rule in rules:
        expected = param_shapes[rule.param]
        per_key = expected[1:] if rule.stacked else expected
        if rule.stacked and expected[0] != num_layers:
            problems.append(f"param {rule.param} has {expected[0]} layers, config says {num_layers}")
        for key in rule.hf_keys(num_layers):
            mapped.add(key)
            if key not in checkpoint_shapes:
                problems.append(f"missing: no checkpoint key {key!r} for param {rule.param} {list(per_key)}")
            elif tuple(checkpoint_shapes[key]) != tuple(per_key):
                problems.append(f"shape mismatch: {key!r} in {where.get(key, '?')} is {list(checkpoint_shapes[key])}, "
                                f"param {rule.param} expects {list(per_key)}")
    ignored = [re.compile(p) for p in ignored_patterns]
    unmapped = sorted(k for k in checkpoint_shapes if k not in mapped and not any(p.fullmatch(k) for p in ignored))
    for key in unmapped:
        problems.append(f"unexpected: checkpoint key {key!r} in {where.get(key, '?')} "
                        f"{list(checkpoint_shapes[key])} maps to no parameter")
    if problems:
        shown = problems[:40]
        more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
        raise CheckpointMismatchError(f"checkpoint does not match the model ({len(problems)} problem(s)):\n  "
                                      + "\n  ".join(shown) + more)
