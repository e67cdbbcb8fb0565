"""HF key table of the mixture-of-experts family, and the checkpoint layouts it reads and writes.

jaxft stacks each expert projection [E, out, in] per layer. Checkpoints hold them in one of two
layouts, both read here through `checkpoint_view`, which presents each layer's experts as one
virtual tensor `model.layers.{i}.mlp.experts.{gate,up,down}_proj.weight` [E, out, in]:
- the hub's (and what transformers 5 `save_pretrained` writes by default): one tensor per expert,
  Mixtral `block_sparse_moe.experts.{e}.w1/w3/w2.weight` (gate/up/down) and `block_sparse_moe.gate`,
  Qwen-MoE `mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`;
- transformers 5's in-memory layout (`save_pretrained(save_original_format=False)`):
  `mlp.experts.gate_up_proj` [E, 2F, D] (gate rows first) and `mlp.experts.down_proj` [E, D, F].
`save_pretrained` writes the hub layout (`export_tensors`), which every transformers version,
vLLM and llama.cpp read.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import numpy as np

from jaxft.models.keys import KeyRule, mirror_rules, unused_keys
from jaxft.models.mixtral.config import MoEConfig

_LAYERS = "model.layers."
_PROJ = ("gate_proj", "up_proj", "down_proj")
_MIXTRAL_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_PER_EXPERT = re.compile(r"(model\.layers\.\d+)\.(block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight")
_FUSED = re.compile(r"(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_MIXTRAL_ROUTER = re.compile(r"(model\.layers\.\d+)\.block_sparse_moe\.gate\.weight")


def key_table(cfg: MoEConfig, param_paths: Iterable[str]) -> list[KeyRule]:
    """Param paths are HF keys with the layer folded away; in a model with dense and sparse layers
    (MixedLayers) `model.layers.sparse.*` / `model.layers.dense.*` hold the listed layers only."""
    paths = list(param_paths)
    sparse = cfg.sparse_layers
    ids = {"sparse": tuple(i for i, s in enumerate(sparse) if s), "dense": tuple(i for i, s in enumerate(sparse) if not s)}
    rules = []
    for rule in mirror_rules(paths, stacked_prefix=_LAYERS):
        kind = rule.param[len(_LAYERS):].split(".", 1)[0] if rule.stacked else None
        if kind in ids and len(set(sparse)) > 1:
            hf = rule.hf.replace("{layer}." + kind + ".", "{layer}.", 1)
            rule = KeyRule(param=rule.param, hf=hf, layer_ids=ids[kind])
        rules.append(rule)
    return rules


def ignored_keys(cfg: MoEConfig) -> list[str]:
    return unused_keys(cfg.tie_word_embeddings)


class _Virtual:
    """How to read one virtual tensor: shape, and read(index) → array from the real checkpoint."""

    def __init__(self, shape, file, dtype, read: Callable):
        self.shape, self.file, self.dtype, self.read = tuple(shape), file, dtype, read


class ExpertCheckpointView:
    """A hf.Checkpoint with per-expert (or fused) tensors shown as stacked [E, out, in] ones.

    Only complete sets are stacked (experts 0..E-1 of one layer and projection); anything else is
    left under its own key, so the key-table check names it as unexpected."""

    def __init__(self, checkpoint):
        self.base = checkpoint
        self.virtual: dict[str, _Virtual] = {}
        hidden: set[str] = set()
        groups: dict[tuple[str, str], dict[int, str]] = {}
        for key in checkpoint.shapes:
            m = _PER_EXPERT.fullmatch(key)
            if m and (m.group(2) == "mlp" and m.group(4) in _PROJ or m.group(2) == "block_sparse_moe"
                      and m.group(4) in _MIXTRAL_NAMES):
                groups.setdefault((m.group(1), _MIXTRAL_NAMES.get(m.group(4), m.group(4))), {})[int(m.group(3))] = key
            elif (m := _MIXTRAL_ROUTER.fullmatch(key)):
                self._alias(f"{m.group(1)}.mlp.gate.weight", key, hidden)
            elif (m := _FUSED.fullmatch(key)) and len(checkpoint.shapes[key]) == 3:
                self._fused(m.group(1), m.group(2), key, hidden)
        for (layer, proj), experts in groups.items():
            keys = [experts.get(e) for e in range(len(experts))]
            shapes = {tuple(checkpoint.shapes[k]) for k in experts.values()}
            if None in keys or len(shapes) != 1:
                continue
            self.virtual[f"{layer}.mlp.experts.{proj}.weight"] = _Virtual(
                (len(keys), *shapes.pop()), checkpoint.files[keys[0]], checkpoint.dtype(keys[0]),
                lambda index, keys=keys: self._stack(keys, index))
            hidden.update(keys)
        self.shapes = {k: v for k, v in checkpoint.shapes.items() if k not in hidden}
        self.files = {k: v for k, v in checkpoint.files.items() if k not in hidden}
        self.shapes.update({k: v.shape for k, v in self.virtual.items()})
        self.files.update({k: v.file for k, v in self.virtual.items()})

    def _alias(self, name: str, key: str, hidden: set[str]) -> None:
        self.virtual[name] = _Virtual(self.base.shapes[key], self.base.files[key], self.base.dtype(key),
                                      lambda index: self.base.read(key, index))
        hidden.add(key)

    def _fused(self, layer: str, name: str, key: str, hidden: set[str]) -> None:
        experts, rows, cols = self.base.shapes[key]
        file, dtype = self.base.files[key], self.base.dtype(key)
        if name == "down_proj":
            self._alias(f"{layer}.mlp.experts.down_proj.weight", key, hidden)
            return
        if rows % 2:
            return  # not a gate/up pair: left for the check to name
        half = rows // 2
        for part, offset in (("gate_proj", 0), ("up_proj", half)):
            self.virtual[f"{layer}.mlp.experts.{part}.weight"] = _Virtual(
                (experts, half, cols), file, dtype, lambda index, offset=offset: self._rows(key, half, offset, index))
        hidden.add(key)

    def _stack(self, keys: list[str], index: tuple) -> np.ndarray:
        index = tuple(index)
        chosen = range(len(keys))[index[0]] if index else range(len(keys))
        return np.stack([self.base.read(keys[e], index[1:]) for e in chosen])

    def _rows(self, key: str, half: int, offset: int, index: tuple) -> np.ndarray:
        """Rows [offset, offset + half) of axis 1 of a fused [E, 2F, D] tensor, then `index`."""
        index = tuple(index) + (slice(None),) * (3 - len(index))
        rows = range(half)[index[1]]
        shifted = slice(rows.start + offset, rows.stop + offset, rows.step)
        return self.base.read(key, (index[0], shifted, *index[2:]))

    def dtype(self, key: str) -> np.dtype:
        return self.virtual[key].dtype if key in self.virtual else self.base.dtype(key)

    def read(self, key: str, index: tuple = (), out: np.ndarray | None = None) -> np.ndarray:
        if key not in self.virtual:
            return self.base.read(key, index, out=out)
        result = self.virtual[key].read(index)
        if out is None:
            return result
        out[...] = result
        return out


def checkpoint_view(cfg: MoEConfig, checkpoint) -> ExpertCheckpointView:
    return ExpertCheckpointView(checkpoint)


def export_tensors(cfg: MoEConfig, key: str, shape: tuple[int, ...], fetch: Callable[[], np.ndarray]):
    """The hub-layout tensors of one table key: a stacked expert key becomes E per-expert tensors
    (fetched once for all E), Mixtral's sparse block is named block_sparse_moe; others as they are."""
    block = "block_sparse_moe" if cfg.model_type == "mixtral" else "mlp"
    m = re.fullmatch(r"(model\.layers\.\d+)\.mlp\.experts\.(\w+)\.weight", key)
    if m:
        layer, proj = m.groups()
        name = {v: k for k, v in _MIXTRAL_NAMES.items()}[proj] if cfg.model_type == "mixtral" else proj
        cached: dict[str, np.ndarray] = {}

        def expert(e):
            if "all" not in cached:
                cached["all"] = fetch()
            part = cached["all"][e]
            if e == shape[0] - 1:
                cached.clear()
            return part

        return [(f"{layer}.{block}.experts.{e}.{name}.weight", tuple(shape[1:]), lambda e=e: expert(e))
                for e in range(shape[0])]
    m = re.fullmatch(r"(model\.layers\.\d+)\.mlp\.gate\.weight", key)
    if m and cfg.model_type == "mixtral":
        return [(f"{m.group(1)}.block_sparse_moe.gate.weight", shape, fetch)]
    return [(key, shape, fetch)]


def peft_modules(cfg: MoEConfig, module_path: str, shape: tuple[int, ...]):
    """(HF module, index into the adapter param) pairs of one adapted jaxft module, in the per-expert
    layout PEFT writes for transformers 4 MoE models and converts onto transformers 5's fused experts
    when it loads them (peft.utils.transformers_weight_conversion): Mixtral
    `block_sparse_moe.experts.{e}.w1/w3/w2`, Qwen-MoE `mlp.experts.{e}.gate_proj/up_proj/down_proj`.
    None for modules outside the decoder layers."""
    if not module_path.startswith(_LAYERS):
        return None
    rest = module_path[len(_LAYERS):]
    kind = rest.split(".", 1)[0]
    if kind in ("sparse", "dense") and len(set(cfg.sparse_layers)) > 1:
        ids = [i for i, s in enumerate(cfg.sparse_layers) if s == (kind == "sparse")]
        rest = rest.split(".", 1)[1]
    else:
        ids = list(range(cfg.num_hidden_layers))
    if rest == "mlp.gate":
        raise ValueError(f"LoRA on the MoE router ({module_path}) has no PEFT form that transformers 5 loads (its router "
                         "is not a Linear); export the merged model with --format hf, or leave 'gate' out of lora.targets")
    m = re.fullmatch(r"mlp\.experts\.(\w+)", rest)
    if not m:
        if rest.rsplit(".", 1)[-1] in _PROJ:
            # PEFT (0.21, transformers 5) moves every gate_proj/up_proj/down_proj target onto the fused
            # experts when it loads a MoE adapter, so an adapter here would be dropped on load, silently.
            raise ValueError(f"{module_path}: a dense MLP projection's adapter in a {cfg.model_type} model has no PEFT "
                             "form that PEFT loads beside expert adapters; export the merged model with --format hf")
        return [(f"{_LAYERS}{layer}.{rest}", (j,)) for j, layer in enumerate(ids)]
    if cfg.model_type == "qwen2_moe":
        # Tested: PEFT 0.21 does not convert per-expert adapters onto qwen2_moe's fused experts (they load as
        # missing/unexpected keys and the experts stay the base), so the merged export is the only faithful form.
        raise ValueError(f"{module_path}: PEFT does not load per-expert adapters of qwen2_moe models onto transformers "
                         "5's fused experts; export the merged model with --format hf")
    proj = m.group(1)
    block, name = ("block_sparse_moe", {v: k for k, v in _MIXTRAL_NAMES.items()}[proj]) if cfg.model_type == "mixtral" \
        else ("mlp", proj)
    return [(f"{_LAYERS}{layer}.{block}.experts.{e}.{name}", (j, e)) for j, layer in enumerate(ids)
            for e in range(cfg.num_experts)]
