"""Optimizers, schedules and the masks that say which parameters train and which decay.

`make_optimizer` builds one optax chain: clip by global norm → the optimizer (with decoupled weight
decay on matrices only: norms and biases never decay) → a schedule → per-layer freezing of stacked
parameters. Frozen *whole* parameters are not passed to the optimizer at all (see jaxft.step), so
they carry no optimizer state; freezing *some layers* of a stacked [L, ...] parameter zeroes those
rows of the update instead, so they stay bit-for-bit unchanged.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adafactor", "lion", "sgd")
SCHEDULES = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # adamw | adafactor | lion | sgd
    learning_rate: float = 1e-4  # peak
    schedule: str = "cosine"  # constant | linear | cosine (after warmup)
    warmup_steps: int = 0
    total_steps: int = 1000  # for the decay of linear/cosine
    end_learning_rate_ratio: float = 0.0  # final lr = ratio * peak
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.0  # sgd
    clip_norm: float | None = 1.0  # global gradient norm; None = no clipping

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"name {self.name!r} is not one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {SCHEDULES}")
        if self.warmup_steps > self.total_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} exceeds total_steps={self.total_steps}")


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.end_learning_rate_ratio
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    else:
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_learning_rate_ratio)
    if cfg.warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def decay_mask(params: Mapping[str, jax.Array], axes: Mapping[str, tuple]) -> dict[str, bool]:
    """Weight decay applies to weight matrices: not to norms, biases, or 1-D params."""
    return {path: not (path.endswith("bias") or "norm" in (axes.get(path) or ()) or _per_layer_ndim(axes.get(path), p) < 2)
            for path, p in params.items()}


def _per_layer_ndim(path_axes, array) -> int:
    return array.ndim - (1 if path_axes and path_axes[0] == "layers" else 0)


def layer_freeze_masks(params: Mapping[str, jax.Array], axes: Mapping[str, tuple], frozen_layers: int) -> dict[str, jax.Array] | None:
    """For stacked params: [L] float masks, 0 for the first `frozen_layers` layers, else 1."""
    if frozen_layers <= 0:
        return None
    masks = {}
    for path, p in params.items():
        if axes.get(path) and axes[path][0] == "layers":
            if frozen_layers > p.shape[0]:
                raise ValueError(f"freeze first {frozen_layers} layers, but the model has {p.shape[0]}")
            masks[path] = (jnp.arange(p.shape[0]) >= frozen_layers).astype(p.dtype)
    return masks


def _mask_layers(masks: dict[str, jax.Array]) -> optax.GradientTransformation:
    def update(updates, state, params=None):
        out = {path: u * masks[path].reshape((-1,) + (1,) * (u.ndim - 1)) if path in masks else u
               for path, u in updates.items()}
        return out, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: OptimConfig, params: Mapping[str, jax.Array], axes: Mapping[str, tuple],
                   frozen_layers: int = 0) -> optax.GradientTransformation:
    """The optax chain for the trainable params (a flat {path: array} dict)."""
    schedule = make_schedule(cfg)
    mask = decay_mask(params, axes)
    if cfg.name == "adamw":
        core = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
    elif cfg.name == "lion":
        core = optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=mask)
    elif cfg.name == "adafactor":
        core = optax.adafactor(schedule, weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=mask)
    else:  # sgd; decay added to the gradient (L2), as torch.optim.SGD's weight_decay does
        core = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask),
                           optax.sgd(schedule, momentum=cfg.momentum or None))
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
    parts.append(core)
    layer_masks = layer_freeze_masks(params, axes, frozen_layers)
    if layer_masks:
        parts.append(_mask_layers(layer_masks))
    return optax.chain(*parts)


def frozen_by_pattern(paths, patterns: tuple[str, ...]) -> set[str]:
    """Params whose path matches any regex in `patterns` (re.search), e.g. r"embed_tokens"."""
    compiled = [re.compile(p) for p in patterns]
    return {path for path in paths if any(c.search(path) for c in compiled)}
