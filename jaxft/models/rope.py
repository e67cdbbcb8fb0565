"""Rotary position embeddings, with the scaling variants of HF checkpoints.

Each variant computes `inv_freq` (one frequency per rotated pair) and an `attention_factor` that
scales cos/sin, exactly as `transformers.modeling_rope_utils` does, in float32 on the host, so that
a checkpoint's positions mean the same thing here as in PyTorch. Types that depend on the running
sequence length (`dynamic`) change the model as it generates, so fine-tuning them is refused.
LongRoPE (Phi-3) is the exception we take: it has just two fixed tables, and which one applies is
decided per batch exactly as transformers decides it (see `Rotary`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxft.models.hf_config import Fields


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Normalized RoPE settings; `params` keeps the type's own fields (factor, ...) as in HF."""

    theta: float = 10000.0
    rope_type: str = "default"
    params: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs: hashable, so jit-static
    partial_rotary_factor: float = 1.0

    def param(self, name: str, default: Any = None) -> Any:
        return dict(self.params).get(name, default)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], where: str = "config.json", max_position_embeddings: int | None = None,
                field: str | None = None) -> "RopeConfig":
        """Reads transformers v5 `rope_parameters` or the v4 pair `rope_theta` + `rope_scaling`,
        checked as transformers checks them (`_KEYS`): a type's required keys must be there, with
        values of the right type and range. As in transformers, a missing
        original_max_position_embeddings (llama3, yarn, longrope) is `max_position_embeddings`.
        `field` names the rope object in errors (default: the key it was read from)."""
        top = Fields(hf, where)
        parameters = top.object("rope_parameters")
        if parameters is not None:
            key, raw = "rope_parameters", dict(parameters)
            if raw and all(isinstance(v, dict) for v in raw.values()):
                raise ValueError(f"{where}: per-layer-type rope_parameters {sorted(raw)} are not supported by this family")
        else:
            key, raw = "rope_scaling", dict(top.object("rope_scaling") or {})
        f = Fields(raw, where, prefix=f"{field or key}.")
        rope_type = f.str("rope_type", None, null_ok=True) or f.str("type", None, null_ok=True) or "default"
        # rope_theta and partial_rotary_factor: inside the rope object (v5) or beside it (v4).
        theta = float((f if "rope_theta" in raw else top).number("rope_theta", 10000.0))
        partial = float((f if "partial_rotary_factor" in raw else top).number("partial_rotary_factor", 1.0, at_most=1.0))
        if rope_type not in _INV_FREQ:
            raise ValueError(
                    f"{where}: rope type {rope_type!r} is not supported (supported: {sorted(_INV_FREQ)}); "
                    "'dynamic' rescales with the running length and cannot be fine-tuned faithfully")
        required, optional = _KEYS[rope_type]
        if ("original_max_position_embeddings" in required and raw.get("original_max_position_embeddings") is None
                and max_position_embeddings is not None):
            raw["original_max_position_embeddings"] = max_position_embeddings
        params = {k: v for k, v in raw.items() if k not in ("rope_type", "type", "rope_theta", "partial_rotary_factor")}
        unknown = sorted(set(params) - set(required) - set(optional))
        if unknown:
            logging.warning("%s: ignoring %s%s for rope type %r (transformers ignores them too)", where,
                            f.prefix, unknown, rope_type)
        for name in (*required, *optional):
            if name in required or raw.get(name) is not None:
                params[name] = _check_param(f, rope_type, name, raw)
        # Lists (LongRoPE's factors) become tuples: the config must stay hashable, hence jit-static.
        params = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
        return cls(theta=theta, rope_type=rope_type, params=tuple(sorted(params.items())), partial_rotary_factor=partial)

    def to_hf(self) -> dict[str, Any]:
        """v4 keys (`rope_theta`, `rope_scaling`), which transformers v4 reads and v5 standardizes."""
        out: dict[str, Any] = {"rope_theta": self.theta}
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in self.params}
        out["rope_scaling"] = None if self.rope_type == "default" else {"rope_type": self.rope_type, **params}
        if self.partial_rotary_factor != 1.0:
            out["partial_rotary_factor"] = self.partial_rotary_factor
        return out


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
    return (1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)))).astype(np.float32)


def _default(rope: RopeConfig, dim: int, max_pos: int) -> tuple[np.ndarray, float]:
    return _base_inv_freq(rope.theta, dim), 1.0


def _linear(rope: RopeConfig, dim: int, max_pos: int) -> tuple[np.ndarray, float]:
    return _base_inv_freq(rope.theta, dim) / np.float32(rope.param("factor")), 1.0


def _llama3(rope: RopeConfig, dim: int, max_pos: int) -> tuple[np.ndarray, float]:
    inv_freq = _base_inv_freq(rope.theta, dim)
    factor = rope.param("factor")
    low_freq_factor, high_freq_factor = rope.param("low_freq_factor"), rope.param("high_freq_factor")
    old_context_len = rope.param("original_max_position_embeddings")
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are interpolated by `factor`, short ones kept, the band between blended.
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, blended, scaled).astype(np.float32), 1.0


def _yarn(rope: RopeConfig, dim: int, max_pos: int) -> tuple[np.ndarray, float]:
    original = rope.param("original_max_position_embeddings")
    factor = rope.param("factor") or max_pos / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.param("attention_factor")
    if attention_factor is None:
        m, m_all = rope.param("mscale"), rope.param("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)
    beta_fast, beta_slow = rope.param("beta_fast") or 32, rope.param("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.param("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp
    pos_freqs = np.float32(rope.theta) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq.astype(np.float32), float(attention_factor)


def _longrope(rope: RopeConfig, dim: int, max_pos: int, long: bool = False) -> tuple[np.ndarray, float]:
    """LongRoPE: per-frequency rescaling factors, `short_factor` up to the original context length
    and `long_factor` beyond it; cos/sin scaled by √(1 + ln(factor) / ln(original))."""
    original = rope.param("original_max_position_embeddings")
    if original is None:
        raise ValueError("longrope needs original_max_position_embeddings")
    factor = rope.param("factor") or max_pos / original
    attention_factor = rope.param("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    name = "long_factor" if long else "short_factor"
    ext_factors = np.asarray(rope.param(name), np.float32)
    if ext_factors.shape != (dim // 2,):
        raise ValueError(f"longrope {name} has {ext_factors.size} entries; rotary dim {dim} needs {dim // 2}")
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = 1.0 / (ext_factors * np.float32(rope.theta) ** exponents)
    return inv_freq.astype(np.float32), float(attention_factor)


_INV_FREQ = {"default": _default, "linear": _linear, "llama3": _llama3, "yarn": _yarn, "longrope": _longrope}

# (required, optional) keys of each supported rope type's object besides rope_type, rope_theta and
# partial_rotary_factor: transformers' RotaryEmbeddingConfigMixin._validate_<type>_rope_parameters.
_KEYS = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "yarn": (("factor", "original_max_position_embeddings"),
             ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")),
    "longrope": (("short_factor", "long_factor", "original_max_position_embeddings"), ("attention_factor", "factor")),
    "llama3": (("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"), ()),
}


def _check_param(f: Fields, rope_type: str, name: str, raw: dict[str, Any]) -> Any:
    """One key of a rope object, type- and range-checked; transformers refuses the missing ones and
    warns about the rest, which here would give NaN (a factor of null, high = low frequency factor),
    a crash, or RoPE unlike transformers'."""
    need = lambda what: f"{rope_type} RoPE needs it ({what})"  # noqa: E731
    if name == "factor":
        return f.number(name, at_least=1.0, null_ok=rope_type == "longrope", need=need("a number >= 1"))
    if name == "original_max_position_embeddings":
        return f.int(name, need=need("a positive integer, the pre-training context length"))
    if name == "low_freq_factor":
        return f.number(name, need=need("a number > 0"))
    if name == "high_freq_factor":
        low = raw.get("low_freq_factor")
        high = f.number(name, above=None, need=need("a number > low_freq_factor"))
        if not high > low:
            raise f.error(name, f"must be greater than low_freq_factor={low}, got {high}")
        return high
    if name in ("short_factor", "long_factor"):
        return f.numbers(name, need=need("a list of numbers"))
    if name == "attention_factor":
        return f.number(name, null_ok=True)
    if name in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        value = f.number(name, above=None, null_ok=True)
        if name == "beta_slow" and value is not None and (raw.get("beta_fast") or 32) < value:
            raise f.error(name, f"must be less than beta_fast={raw.get('beta_fast') or 32}, got {value}")
        return value
    if name == "truncate":
        return f.bool(name, True)
    raise AssertionError(name)


def inv_freq_and_scale(rope: RopeConfig, head_dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    rotary_dim = int(head_dim * rope.partial_rotary_factor)
    return _INV_FREQ[rope.rope_type](rope, rotary_dim, max_position_embeddings)


@dataclasses.dataclass(frozen=True)
class Rotary:
    """One RoPE table, fixed when the model is built: static (hashable, part of the graph), never a
    parameter, so training cannot move it.

    LongRoPE keeps a second table: like transformers, the whole batch uses the long one as soon as
    its largest position + 1 exceeds `long_after` (the original context length), the short one
    otherwise.
    """

    inv_freq: tuple[float, ...]  # [R/2]
    attention_factor: float = 1.0
    long_inv_freq: tuple[float, ...] | None = None  # [R/2], LongRoPE only
    long_after: int = 0

    @classmethod
    def build(cls, rope: RopeConfig, head_dim: int, max_position_embeddings: int) -> "Rotary":
        inv_freq, attention_factor = inv_freq_and_scale(rope, head_dim, max_position_embeddings)
        if rope.rope_type != "longrope":
            return cls(tuple(float(f) for f in inv_freq), float(attention_factor))
        long, _ = _longrope(rope, int(head_dim * rope.partial_rotary_factor), max_position_embeddings, long=True)
        return cls(tuple(float(f) for f in inv_freq), float(attention_factor),
                   long_inv_freq=tuple(float(f) for f in long), long_after=int(rope.param("original_max_position_embeddings")))

    def cos_sin(self, positions: jnp.ndarray, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
        """positions [B, T] → cos, sin [B, T, R]."""
        inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
        if self.long_inv_freq is not None:
            longer = jnp.max(positions) + 1 > self.long_after
            inv_freq = jnp.where(longer, jnp.asarray(self.long_inv_freq, jnp.float32), inv_freq)
        return rotary_cos_sin(positions, inv_freq, self.attention_factor, dtype)


def rotary_cos_sin(positions: jnp.ndarray, inv_freq: np.ndarray, attention_factor: float, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
    """positions [B, T] → cos, sin [B, T, rotary_dim], computed in float32 then cast (as HF does)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]  # [B, T, R/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # HF's half-split layout, not interleaved pairs
    return (jnp.cos(emb) * attention_factor).astype(dtype), (jnp.sin(emb) * attention_factor).astype(dtype)


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x [B, T, H, D]; cos/sin [B, T, R] with R <= D (partial rotary leaves the tail untouched)."""
    rotary_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated_half = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = x_rot * cos[:, :, None, :] + rotated_half * sin[:, :, None, :]
    return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out
