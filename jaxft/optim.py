"""Optimizers, schedules and the masks that say which parameters train and which decay.

`make_optimizer` builds one optax chain: clip by global norm → the optimizer (with decoupled weight
decay on matrices only: norms and biases never decay) → a schedule. Frozen *whole* parameters are
not passed to the optimizer at all (see jaxft.step), so they carry no optimizer state; freezing
*some layers* of a stacked [L, ...] parameter (train.freeze_first_layers) runs the chain on rows
[N:] only, so that, as with torch's requires_grad=False, the frozen rows count in neither the
clipped gradient norm nor any moment, keep no moments at all (AdamW's m and v are [L - N, ...]),
and get a zero update (weight decay included): they stay bit-for-bit unchanged. The train step
(StepConfig.freeze_first_layers) computes no gradient for them in the first place.

Each optimizer equals its PyTorch reference step for step (tests/training/test_fidelity.py):
adamw = torch.optim.AdamW; sgd = torch.optim.SGD (momentum, L2 weight_decay); lion = the paper's
and lion-pytorch's Lion; adafactor = transformers.Adafactor(lr=..., relative_step=False,
warmup_init=False, scale_parameter=True, beta1=None) -- see `adafactor` for the one term that differs.
Schedules equal transformers' get_{constant,linear,cosine}_schedule_with_warmup (and the min-lr /
polynomial variants for end_learning_rate_ratio > 0): optimizer step k (from 0) uses schedule(k).
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


def frozen_row_paths(params: Mapping[str, jax.Array], axes: Mapping[str, tuple], frozen_layers: int) -> set[str]:
    """The stacked params whose first `frozen_layers` rows are frozen (train.freeze_first_layers)."""
    if frozen_layers <= 0:
        return set()
    paths = stacked_paths(params, axes)
    for path in paths:
        if frozen_layers > params[path].shape[0]:
            raise ValueError(f"freeze first {frozen_layers} layers, but the model has {params[path].shape[0]}")
    return paths


def _trainable_rows(inner: optax.GradientTransformation, frozen_layers: int, paths: set[str]) -> optax.GradientTransformation:
    """`inner` over rows [frozen_layers:] of the stacked params in `paths` (whole arrays elsewhere):
    its state (moments) holds no frozen row, the frozen rows' gradients reach nothing (clip norm,
    moments) and their updates are zero, so those rows stay bit for bit what they were."""
    def rows(tree):
        if not isinstance(tree, Mapping):  # optax.tree_map_params passes one placeholder for the tree
            return tree
        return {path: value[frozen_layers:] if path in paths else value for path, value in tree.items()}

    def init(params):
        return inner.init(rows(params))

    def update(updates, state, params=None):
        out, state = inner.update(rows(updates), state, None if params is None else rows(params))
        zeros = lambda u: jnp.zeros((frozen_layers, *u.shape[1:]), u.dtype)  # noqa: E731
        return {path: jnp.concatenate([zeros(u), u]) if path in paths else u for path, u in out.items()}, state

    return optax.GradientTransformation(init, update)


def stacked_paths(params: Mapping[str, jax.Array], axes: Mapping[str, tuple]) -> set[str]:
    """Params stacked over decoder layers ([L, ...]): each row is one layer's tensor in torch."""
    return {path for path in params if axes.get(path) and axes[path][0] == "layers"}


def _rms(x: jax.Array, per_layer: bool) -> jax.Array:
    """Root mean square of each layer's slice of a stacked param (keepdims), else of the whole array."""
    x = x.astype(jnp.float32)
    return jnp.sqrt(jnp.mean(jnp.square(x), axis=tuple(range(1, x.ndim)) if per_layer else None, keepdims=True))


def _clip_by_layer_rms(threshold: float, stacked: set[str]) -> optax.GradientTransformation:
    """optax.clip_by_block_rms, with each layer of a stacked param its own block."""
    def update(updates, state, params=None):
        return {path: (u / jnp.maximum(1.0, _rms(u, path in stacked) / threshold)).astype(u.dtype)
                for path, u in updates.items()}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _scale_by_param_layer_rms(min_scale: float, stacked: set[str]) -> optax.GradientTransformation:
    """optax.scale_by_param_block_rms, with each layer of a stacked param its own block."""
    def update(updates, state, params=None):
        if params is None:
            raise ValueError("Adafactor scales updates by each parameter's RMS: pass params to update")
        return {path: (u * jnp.maximum(_rms(params[path], path in stacked), min_scale)).astype(u.dtype)
                for path, u in updates.items()}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def adafactor(schedule: optax.Schedule, weight_decay: float, decay: Mapping[str, bool],
              stacked: set[str]) -> optax.GradientTransformation:
    """optax.adafactor's defaults made to equal transformers.Adafactor(lr=schedule, eps=(1e-30, 1e-3),
    clip_threshold=1.0, decay_rate=-0.8, beta1=None, weight_decay=..., scale_parameter=True,
    relative_step=False, warmup_init=False) applied to each layer's tensors:

      v = factored EMA of g² + 1e-30 (beta2_t = 1 - t^-0.8); u = g / sqrt(v);
      u /= max(1, RMS(u)); p -= lr · max(1e-3, RMS(p)) · (u + wd · p).

    Two departures from optax.adafactor, both towards transformers: the RMS of the update clipping
    and of the parameter scale is per layer of a stacked [L, ...] param (each layer is one tensor in
    torch), not over the whole stack; and weight decay is scaled like the update (transformers:
    p -= wd · lr · max(1e-3, RMS(p)) · p), where optax.adafactor subtracts wd · p at every step
    whatever the learning rate. The one term that differs: which second moments are factored.
    optax factors a tensor over its two largest dims when the second largest is >= 128 and keeps a
    full second moment otherwise; transformers factors every >= 2-D tensor over its last two dims.
    They agree (tested) on every matrix with both dims >= 128 in models with fewer than 128 layers;
    smaller matrices (e.g. LoRA factors, tiny test models) get the full, unfactored estimate here."""
    parts = [optax.scale_by_factored_rms(),  # decay_rate=0.8, epsilon=1e-30, min_dim_size_to_factor=128
             _clip_by_layer_rms(1.0, stacked)]
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, decay))
    parts += [optax.scale_by_learning_rate(schedule), _scale_by_param_layer_rms(1e-3, stacked)]
    return optax.chain(*parts)


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
        core = adafactor(schedule, cfg.weight_decay, mask, stacked_paths(params, axes))
    else:  # sgd; decay added to the gradient (L2), as torch.optim.SGD's weight_decay does
        core = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask),
                           optax.sgd(schedule, momentum=cfg.momentum or None))
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
    chain = optax.chain(*parts, core)
    frozen_rows = frozen_row_paths(params, axes, frozen_layers)
    # Frozen rows: not in the clip norm, no moments, no update (nor decay).
    return _trainable_rows(chain, frozen_layers, frozen_rows) if frozen_rows else chain


def frozen_by_pattern(paths, patterns: tuple[str, ...]) -> set[str]:
    """Params whose path matches any regex in `patterns` (re.search), e.g. r"embed_tokens"."""
    compiled = [re.compile(p) for p in patterns]
    return {path for path in paths if any(c.search(path) for c in compiled)}
