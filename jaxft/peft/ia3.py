"""(IA)³ (Liu et al. 2022) on jaxft models, numerically the same as Hugging Face PEFT.

    apply_ia3(model)                 # PEFT's default target / feed-forward modules for the family
    ...train nnx.state(model, LoRAParam)...
    merge_ia3(model); jaxft.save_pretrained(model, "out/")

A learned vector rescales a Linear (peft/tuners/ia3/layer.py), starting at ones (a no-op):
    target (attention k/v or q/v):  y = (W x + b) ⊙ l          l [out]    merged: W ← l ⊙ W (rows), b ← l ⊙ b
    feed-forward (down_proj):       y = W (x ⊙ l) + b          l [in]     merged: W ← W ⊙ l (columns)
PEFT stores l as [out, 1] / [1, in] per layer; here it is stacked [L, out] / [L, in] like its weight.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from jaxft.models.layers import Linear
from jaxft.peft.lora import LoRAParam, linear_modules
from jaxft.peft.quant import is_quantized

# PEFT's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / ..._FEEDFORWARD_MODULES_MAPPING
# (peft/utils/constants.py) for the model types jaxft runs. PEFT has none for phi3.
TARGETS = {
    "llama": ("k_proj", "v_proj", "down_proj"),
    "mistral": ("k_proj", "v_proj", "down_proj"),
    "gemma": ("q_proj", "v_proj", "down_proj"),
    "gemma2": ("q_proj", "v_proj", "down_proj"),
    "gemma3_text": ("q_proj", "v_proj", "down_proj"),
    "qwen2": ("q_proj", "v_proj", "down_proj"),
    "qwen3": ("q_proj", "v_proj", "down_proj"),
}
FEEDFORWARD = ("down_proj",)


@dataclasses.dataclass(frozen=True)
class IA3Config:
    target_modules: tuple[str, ...]
    feedforward_modules: tuple[str, ...] = FEEDFORWARD

    def __post_init__(self):
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        object.__setattr__(self, "feedforward_modules", tuple(self.feedforward_modules))
        if not self.target_modules:
            raise ValueError("IA3 target_modules is empty")
        stray = sorted(set(self.feedforward_modules) - set(self.target_modules))
        if stray:  # PEFT: "feedforward_modules should be a subset of target_modules"
            raise ValueError(f"IA3 feedforward_modules {stray} are not in target_modules {list(self.target_modules)}")

    @classmethod
    def for_model_type(cls, model_type: str) -> "IA3Config":
        if model_type not in TARGETS:
            raise ValueError(f"PEFT has no default (IA)³ target modules for model_type {model_type!r} "
                             f"(it has them for {sorted(TARGETS)})")
        return cls(TARGETS[model_type], FEEDFORWARD)


class IA3(nnx.Module):
    """The (IA)³ vector of one Linear (stacked like it), set in its `adapter` slot."""

    def __init__(self, linear: Linear, feedforward: bool):
        *lead, out_features, in_features = linear.weight.shape
        *lead_axes, out_axis, in_axis = linear.weight.axes
        size, axis = (in_features, in_axis) if feedforward else (out_features, out_axis)
        self.ia3_l = LoRAParam(jnp.ones((*lead, size), jnp.float32), axes=(*lead_axes, axis))
        self.feedforward = feedforward

    def __call__(self, x: jnp.ndarray, y: jnp.ndarray, linear: Linear) -> jnp.ndarray:
        dtype = linear.dtype
        scale = self.ia3_l[...]
        if not self.feedforward:
            return (y * scale).astype(dtype)  # the product in float32, as PEFT (l is float32)
        # The base output y is recomputed on the scaled input (XLA drops the unused y).
        scaled = (x * scale).astype(dtype)
        out = jnp.einsum("...i,oi->...o", scaled, linear.dense_weight(dtype))
        return out if linear.bias is None else out + linear.bias[...].astype(dtype)


def apply_ia3(model: nnx.Module, config: IA3Config | None = None) -> nnx.Module:
    """Attaches (IA)³ vectors to the targeted Linears (default: PEFT's for the model's family), in place."""
    if config is None:
        config = IA3Config.for_model_type(model.config.to_hf()["model_type"])
    linears = linear_modules(model)
    names = sorted({path[-1] for path in linears})
    unknown = [t for t in config.target_modules if t not in names]
    if unknown:
        raise ValueError(f"IA3 target(s) {unknown} match no Linear module; this model's are {names}")
    chosen = {path: linear for path, linear in linears.items() if path[-1] in config.target_modules}
    taken = [".".join(path) for path, linear in chosen.items() if linear.adapter is not None]
    if taken:
        raise ValueError(f"{taken} already have adapters")
    for path, linear in chosen.items():
        linear.adapter = IA3(linear, feedforward=path[-1] in config.feedforward_modules)
    return model


def merge_ia3(model: nnx.Module) -> nnx.Module:
    """Folds every (IA)³ vector into its Linear and removes it, in place (PEFT's merge_and_unload)."""
    for linear in linear_modules(model).values():
        adapter = linear.adapter
        if not isinstance(adapter, IA3):
            continue
        scale = adapter.ia3_l[...].astype(jnp.float32)
        weight = linear.dense_weight(jnp.float32)
        merged = weight * scale[..., None, :] if adapter.feedforward else weight * scale[..., :, None]
        if is_quantized(linear):
            linear.weight = nnx.Param(merged.astype(linear.weight.dtype), axes=linear.weight.axes)
        else:
            linear.weight.set_value(merged.astype(linear.weight.dtype))
        if linear.bias is not None and not adapter.feedforward:
            linear.bias.set_value((linear.bias[...].astype(jnp.float32) * scale).astype(linear.bias.dtype))
        linear.adapter = None
    return model


__all__ = ["FEEDFORWARD", "IA3", "IA3Config", "TARGETS", "apply_ia3", "merge_ia3"]
