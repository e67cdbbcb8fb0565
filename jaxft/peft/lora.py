"""LoRA, rsLoRA and DoRA on jaxft models, numerically the same as Hugging Face PEFT.

    model = jaxft.from_pretrained(folder)
    apply_lora(model, LoraConfig(rank=8, alpha=16, targets="all-linear", use_dora=True))
    trainable = nnx.state(model, LoRAParam)            # the adapters: all that trains
    frozen = nnx.state(model, nnx.Not(LoRAParam))      # the base model
    ...train...
    merge_lora(model); jaxft.save_pretrained(model, "out/")

An adapter is an `nnx.Module` set in the `adapter` slot of a `jaxft.models.layers.Linear`; the model
code never changes. Every adapter parameter is a `LoRAParam`, so "what trains" is a variable type,
not a list of names. Inside the scanned decoder layers a Linear's weight is stacked [L, out, in];
its adapter is stacked the same way ([L, r, in], [L, out, r], [L, out]) so that `scan_layers`
slices adapter and weight together, one layer at a time.

Per target Linear with base weight W [out, in] (PEFT's formulas, peft/tuners/lora/layer.py, dora.py):
    LoRA:  y = W x + b + s · B A drop(x)                      s = alpha / r  (rsLoRA: alpha / √r)
    DoRA:  y = W x + b + (m/‖W + s·BA‖ - 1) · W drop(x) + (m/‖W + s·BA‖) · s · B A drop(x)
           with the row norm ‖·‖ [out] held constant in the backward pass (DoRA paper §4.3).
Without dropout PEFT's DoRA reuses the base output, W drop(x) = y - b; so do we.
QLoRA: W may be stored quantized (jaxft.peft.quant); everything here reads it through
`Linear.dense_weight`, and merging writes the dense merged weight in place of the quantized one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.models.layers import Linear, dropout_key
from jaxft.peft import expert_lora
from jaxft.peft.params import LORA_AXIS, LoRAParam
from jaxft.peft.quant import QuantParam, is_quantized

log = logging.getLogger("jaxft.lora")

ALL_LINEAR = "all-linear"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OUTPUT_HEAD = "lm_head"  # never adapted by "all-linear", as in PEFT
MOE_ROUTER = "gate"  # a MoE router: nor this (transformers 5's router is no Linear that PEFT adapts); name it to adapt it
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def is_lora_param(path: str, variable: nnx.Variable) -> bool:
    """The `trainable` predicate for `jaxft.step.split_model` in a LoRA run."""
    return isinstance(variable, LoRAParam)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    dropout: float = 0.0  # on the adapter's input only, as PEFT's lora_dropout
    targets: tuple[str, ...] | str = DEFAULT_TARGETS  # Linear attribute names, or "all-linear"
    use_rslora: bool = False  # scaling alpha/√rank instead of alpha/rank
    use_dora: bool = False  # weight-decomposed LoRA: adds a trained magnitude per output row
    adapter_dtype: str = "float32"  # adapter params; the optimizer state follows them
    base_dtype: str | None = None  # None keeps the base params; "bfloat16" casts them (frozen anyway)

    def __post_init__(self):
        if isinstance(self.targets, str) and self.targets != ALL_LINEAR:
            # One name or a comma-separated list (handy from the command line).
            object.__setattr__(self, "targets", tuple(t.strip() for t in self.targets.split(",") if t.strip()))
        elif not isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError(f"lora.targets is empty; name Linear modules (e.g. {DEFAULT_TARGETS}) or {ALL_LINEAR!r}")
        for field, value in (("adapter_dtype", self.adapter_dtype), ("base_dtype", self.base_dtype)):
            if value not in _DTYPES and not (field == "base_dtype" and value is None):
                raise ValueError(f"lora.{field} {value!r} is not one of {sorted(_DTYPES)}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


class LoRA(nnx.Module):
    """The adapter of one Linear (stacked like it): `adapter(x, y, linear)` returns the new output.

    Names mirror PEFT's (lora_A, lora_B, lora_magnitude_vector) so that adapter export is a table.
    """

    def __init__(self, linear: Linear, *, rank: int, scaling: float, dropout: float, use_dora: bool,
                 dtype, salt: str, key: jax.Array):
        *lead, out_features, in_features = linear.weight.shape  # lead = (L,) when stacked
        *lead_axes, out_axis, in_axis = linear.weight.axes
        # torch's nn.Linear init, kaiming_uniform_(a=√5), which PEFT uses for A: gain √(2/(1+a²)) = √(1/3),
        # bound = gain·√(3/fan_in) = 1/√in_features. B starts at zero, so the adapter starts as a no-op.
        bound = 1.0 / math.sqrt(in_features)
        a = jax.random.uniform(key, (*lead, rank, in_features), jnp.float32, -bound, bound)
        self.lora_A = LoRAParam(a.astype(dtype), axes=(*lead_axes, LORA_AXIS, in_axis))  # [L?, r, in]
        self.lora_B = LoRAParam(jnp.zeros((*lead, out_features, rank), dtype), axes=(*lead_axes, out_axis, LORA_AXIS))
        if use_dora:
            # PEFT: m = ‖W + s·BA‖ per output row at init, i.e. ‖W‖ since B = 0.  [L?, out]
            norms = _row_norm(linear.dense_weight(jnp.float32))
            self.lora_magnitude_vector = LoRAParam(norms.astype(dtype), axes=(*lead_axes, out_axis))
        else:
            self.lora_magnitude_vector = None
        self.scaling, self.dropout, self.use_dora, self.salt = scaling, dropout, use_dora, salt

    def __call__(self, x: jnp.ndarray, y: jnp.ndarray, linear: Linear) -> jnp.ndarray:
        dtype = linear.dtype  # the adapter computes in the base layer's compute dtype
        x = x.astype(dtype)
        key = dropout_key(self.salt) if self.dropout > 0 else None  # None: evaluation, no dropout
        dropped = x if key is None else _dropout(x, self.dropout, key)
        a, b = self.lora_A[...].astype(dtype), self.lora_B[...].astype(dtype)
        lora = jnp.einsum("...r,or->...o", jnp.einsum("...i,ri->...r", dropped, a), b)  # [..., out]
        if not self.use_dora:
            return y + self.scaling * lora

        # ‖W + s·BA‖ in float32 whatever the compute dtype (a norm over `in` loses digits in bf16),
        # and constant for the gradient, as in PEFT. A quantized W is its dequantized value (QLoRA).
        merged = linear.dense_weight(jnp.float32) + self.scaling * self.delta_direction()
        norm = jax.lax.stop_gradient(_row_norm(merged))
        scale = (self.lora_magnitude_vector[...].astype(jnp.float32) / norm).astype(dtype)  # [out]
        if key is None:
            base = y if linear.bias is None else y - linear.bias[...].astype(dtype)  # W x
        else:  # PEFT recomputes the base product on the dropped-out input
            base = jnp.einsum("...i,oi->...o", dropped, linear.dense_weight(dtype))
        return y + (scale - 1) * base + scale * (self.scaling * lora)

    def delta_direction(self) -> jnp.ndarray:
        """B A in float32, [L?, out, in] (the weight update is scaling times this)."""
        return jnp.einsum("...or,...ri->...oi", self.lora_B[...].astype(jnp.float32),
                          self.lora_A[...].astype(jnp.float32))


def _row_norm(weight: jnp.ndarray) -> jnp.ndarray:
    """‖W‖ per output row: [..., out, in] → [..., out] (torch.linalg.norm(W, dim=1))."""
    return jnp.sqrt(jnp.sum(jnp.square(weight), axis=-1))


def _dropout(x: jnp.ndarray, rate: float, key: jax.Array) -> jnp.ndarray:
    """torch.nn.Dropout: zero with probability `rate`, scale the kept by 1/(1-rate)."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def linear_modules(model: nnx.Module) -> dict[tuple[str, ...], Linear]:
    """Every Linear of the model by its attribute path, e.g. ('model', 'layers', 'self_attn', 'q_proj')."""
    return {tuple(str(p) for p in path): module for path, module in nnx.iter_modules(model)
            if isinstance(module, Linear)}


def apply_lora(model: nnx.Module, config: LoraConfig, seed: int = 0) -> nnx.Module:
    """Attaches an adapter to every targeted Linear, in place; returns the model.

    A target is a Linear's attribute name (q_proj, ..., down_proj, lm_head) or "all-linear" (every
    Linear but the output head, as PEFT). A name that matches no Linear is an error listing the
    names that exist. Each adapter's A is drawn from `seed` and its path, so adding or removing a
    target does not change the others' init.
    """
    linears = linear_modules(model)
    if not linears:
        raise ValueError(f"{type(model).__name__} has no jaxft Linear module to adapt")
    # Mixture-of-experts projections answer to the same names (gate_proj, ...): targeted alike, per expert.
    names = sorted({path[-1] for path in linears} | {path[-1] for path in expert_lora.expert_modules(model)})
    if config.targets == ALL_LINEAR:
        targets = set(names) - {OUTPUT_HEAD, MOE_ROUTER}
    else:
        unknown = [t for t in config.targets if t not in names]
        if unknown:
            raise ValueError(f"LoRA target(s) {unknown} match no Linear module; this model's Linear modules are "
                             f"{names} (or use {ALL_LINEAR!r})")
        targets = set(config.targets)
    chosen = {path: linear for path, linear in linears.items() if path[-1] in targets}
    taken = [".".join(path) for path, linear in chosen.items() if linear.adapter is not None]
    if taken:  # checked before any change, so a failed call leaves the model as it was
        raise ValueError(f"{taken} already have adapters; merge_lora(model) before applying another")
    root = jax.random.key(seed)
    dtype = _DTYPES[config.adapter_dtype]
    expert_lora.attach(model, targets, config, root, dtype, _stable_hash)

    _warn_rank_above_dimensions(chosen, config.rank)
    for path, linear in chosen.items():
        salt = ".".join(path)  # also keys this site's dropout masks
        linear.adapter = LoRA(linear, rank=config.rank, scaling=config.scaling, dropout=config.dropout,
                              use_dora=config.use_dora, dtype=dtype, salt=salt,
                              key=jax.random.fold_in(root, _stable_hash(salt)))

    if config.base_dtype is not None:  # after the adapters, so DoRA's magnitudes are of the full-precision weights
        cast_base(model, config.base_dtype)
    return model


def _warn_rank_above_dimensions(chosen: dict[tuple[str, ...], Linear], rank: int) -> None:
    """A rank above min(in, out) of a layer adds parameters but no expressiveness there (the update
    B·A cannot exceed that rank): legal, as in PEFT, but rarely meant."""
    small = {path[-1]: min(linear.weight.shape[-2:]) for path, linear in chosen.items()
             if rank > min(linear.weight.shape[-2:])}
    if small:
        log.warning("lora.rank=%d exceeds the smallest dimension of %s; their updates cannot have rank above it",
                    rank, ", ".join(f"{name} ({size})" for name, size in sorted(small.items())))


def cast_base(model: nnx.Module, dtype: str) -> nnx.Module:
    """Casts every floating base param (not the adapters, not quantized storage, whose float32
    scales are part of an exact format) to `dtype`, in place. Cast after apply_lora: DoRA measures
    its magnitudes on the weights as they are when it is applied."""
    target = _DTYPES[dtype]
    for _, variable in nnx.iter_graph(model):
        if (isinstance(variable, nnx.Param) and not isinstance(variable, (LoRAParam, QuantParam))
                and jnp.issubdtype(variable.dtype, jnp.floating)):
            variable.set_value(variable[...].astype(target))
    return model


def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Folds every adapter into its base weight and removes it, in place; returns the model.

    LoRA: W ← W + s·BA.  DoRA: W ← (m / ‖W + s·BA‖) · (W + s·BA), as PEFT's merge_and_unload.
    The sum is formed in float32 and stored in the base weight's dtype. A quantized base weight
    (QLoRA) is dequantized for the sum and replaced by the dense merged Param, in its original dtype.

    `jaxft.save_pretrained` and the HF key tables cover *all* params of a model, so a model with
    adapters attached must be merged before it is saved as a Hugging Face folder.
    """
    expert_lora.merge(model)
    for linear in linear_modules(model).values():
        adapter = linear.adapter
        if not isinstance(adapter, LoRA):
            continue
        merged = linear.dense_weight(jnp.float32) + adapter.scaling * adapter.delta_direction()  # [L?, out, in]
        if adapter.use_dora:
            magnitude = adapter.lora_magnitude_vector[...].astype(jnp.float32)
            merged = (magnitude / _row_norm(merged))[..., None] * merged
        if is_quantized(linear):
            linear.weight = nnx.Param(merged.astype(linear.weight.dtype), axes=linear.weight.axes)
        else:
            linear.weight.set_value(merged.astype(linear.weight.dtype))
        linear.adapter = None
    return model


def lora_params(model: nnx.Module) -> dict[str, jax.Array]:
    """The adapter params as a flat {'.'-joined path: array} dict (the trainable half of a LoRA run)."""
    return {".".join(str(p) for p in path): v.get_value()
            for path, v in nnx.to_flat_state(nnx.state(model, LoRAParam))}


__all__ = ["LoRAParam", "LoraConfig", "LoRA", "apply_lora", "cast_base", "merge_lora", "is_lora_param", "lora_params",
           "linear_modules", "ALL_LINEAR", "DEFAULT_TARGETS"]
