"""Key tables: how a family's parameters map to Hugging Face checkpoint keys.

A table is a list of `KeyRule`s, one per parameter. Params stacked over layers name their HF key
with `{layer}`. Several params may share one fused HF tensor (Phi-3's `qkv_proj`), each holding a
block of its rows: loading reads each param's rows, exporting concatenates them back. The same
table read backwards is the export. Checking a checkpoint against a table finds every problem at
once — unmapped keys, unfilled params, wrong shapes — before any tensor is read, so a bad
checkpoint costs nothing and the error lists all that is wrong.
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
    # A fused HF tensor: this param is rows [start, stop) of its first (per-layer) axis. None: all of it.
    rows: tuple[int, int] | None = None
    # The HF layer of each entry of the stacked axis, where the stack holds only some layers (a MoE
    # model's sparse or dense layers: jaxft.models.moe.MixedLayers). None: layer i is entry i.
    layer_ids: tuple[int, ...] | None = None

    @property
    def stacked(self) -> bool:
        return LAYER in self.hf

    def hf_keys(self, num_layers: int) -> list[str]:
        if not self.stacked:
            return [self.hf]
        ids = range(num_layers) if self.layer_ids is None else self.layer_ids
        return [self.hf.replace(LAYER, str(i)) for i in ids]


def mirror_rules(param_paths: Iterable[str], stacked_prefix: str) -> list[KeyRule]:
    """Rules for families whose param paths ARE the HF keys, with the layer index folded away."""
    rules = []
    for path in param_paths:
        hf = stacked_prefix + LAYER + "." + path[len(stacked_prefix):] if path.startswith(stacked_prefix) else path
        rules.append(KeyRule(param=path, hf=hf))
    return rules


def unused_keys(tie_word_embeddings: bool) -> list[str]:
    """Regexes of checkpoint keys that hold nothing to load: RoPE buffers some old exports saved,
    and with tied embeddings a redundant lm_head copy (transformers ties it to the embedding)."""
    patterns = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.\w*inv_freq"]
    if tie_word_embeddings:
        patterns.append(r"lm_head\.weight")
    return patterns


def fused_rules(hf: str, parts: Sequence[tuple[str, int]]) -> list[KeyRule]:
    """Rules for params stored side by side in one HF tensor; parts: (param path, row count) in order."""
    rules, start = [], 0
    for path, count in parts:
        rules.append(KeyRule(param=path, hf=hf, rows=(start, start + count)))
        start += count
    return rules


def group_by_key(rules: Sequence[KeyRule]) -> dict[str, list[KeyRule]]:
    """HF key pattern → its rules, ordered by rows (one rule unless the tensor is fused)."""
    groups: dict = {}
    for rule in rules:  # rules of one pattern over different layers (layer_ids) are different keys
        groups.setdefault(rule.hf if rule.layer_ids is None else (rule.hf, rule.layer_ids), []).append(rule)
    return {hf: sorted(group, key=lambda r: r.rows or (0, 0)) for hf, group in groups.items()}


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
    for group in group_by_key(rules).values():
        for rule in group:
            expected = num_layers if rule.layer_ids is None else len(rule.layer_ids)
            if rule.stacked and param_shapes[rule.param][0] != expected:
                problems.append(f"param {rule.param} has {param_shapes[rule.param][0]} layers, config says {expected}")
        per_key, problem = _key_shape(group, param_shapes)
        if problem:
            problems.append(problem)
            continue
        names = "param " + group[0].param if len(group) == 1 else "params " + ", ".join(r.param for r in group)
        for key in group[0].hf_keys(num_layers):
            mapped.add(key)
            if key not in checkpoint_shapes:
                problems.append(f"missing: no checkpoint key {key!r} for {names} {list(per_key)}")
            elif tuple(checkpoint_shapes[key]) != tuple(per_key):
                problems.append(f"shape mismatch: {key!r} in {where.get(key, '?')} is {list(checkpoint_shapes[key])}, "
                                f"{names} {'expects' if len(group) == 1 else 'expect'} {list(per_key)}")
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


def _key_shape(group: list[KeyRule], param_shapes: dict[str, tuple[int, ...]]) -> tuple[tuple[int, ...], str | None]:
    """The shape one HF key must have for this group of rules, or a problem with the table itself."""
    shapes = [tuple(param_shapes[r.param][1:] if r.stacked else param_shapes[r.param]) for r in group]
    if group[0].rows is None:
        if len(group) > 1:
            return (), f"table error: {group[0].hf!r} is mapped by {[r.param for r in group]} without row ranges"
        return shapes[0], None
    stop = 0
    for rule, shape in zip(group, shapes):
        start, end = rule.rows
        if start != stop or end - start != shape[0] or shape[1:] != shapes[0][1:]:
            return (), (f"table error: rows {rule.rows} of {rule.hf!r} do not fit param {rule.param} {list(shape)} "
                        f"after row {stop}")
        stop = end
    return (stop, *shapes[0][1:]), None
