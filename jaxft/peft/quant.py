"""QLoRA's frozen base: decoder Linear weights stored as int8 or NF4, dequantized inside the matmul.

    model = jaxft.from_pretrained(folder, quantize="nf4")   # quantized layer by layer as it loads
    apply_lora(model, LoraConfig(rank=8, alpha=16))         # float32 adapters on top (jaxft.peft.lora)
    ...train the adapters...
    merge_lora(model); dequantize_model(model); jaxft.save_pretrained(model, "out/", dtype="bfloat16")

A quantized weight replaces a Linear's `weight` Param with a `QuantizedWeight` module; the Linear
calls its `dequantize(compute_dtype)` right before the matmul, so XLA fuses the decode into the
layer and, under `scan_layers`, only one layer's dense weights ever exist. Which Linears: those of
the decoder layers (q/k/v/o, gate/up/down; Phi-3's fused tensors are split on load, so they are
these too). Embeddings and the output head stay as they are.

Formats, for a weight W [.., out, in] (`..` = the stacked layer axis):
  int8  absmax a [.., out] per output row; codes q = round(127·W/a) int8 [.., out, in];
        W ≈ q·a/127, |error| ≤ a/254 per row.
  nf4   blocks of 64 consecutive `in` values; absmax a [.., out, in/64]; each value's code is the
        nearest of the 16 NF4 levels (QLoRA, Appendix E = bitsandbytes' table) to W/a, two codes a
        byte [.., out, in/2] (even column in the low nibble); W ≈ NF4[q]·a,
        |error| ≤ a·(largest gap between adjacent levels)/2 per block.
        Double quantization (QLoRA §3.2; on for "nf4", as in the paper): a is stored as int8 codes of
        a - mean(a) with one float32 scale per 256 of them, which takes the scales from 0.5 to ~0.13
        bit per weight.
Blocks run along `in`, and scale groups along `out`, rather than over the flattened tensor as in
bitsandbytes: every stored array then keeps the weight's two logical axes, so the sharding rules
place codes and scales like the weight itself. The second-level code is linear int8 (bitsandbytes
uses its dynamic 8-bit map); its error is added to the NF4 bound and tested.

Why not google/qwix: it quantizes by intercepting einsums while running the model on sample inputs
and swaps params for its own `WithAux` pytrees, which bypasses jaxft's flat {path: Variable} split,
the logical `axes` the mesh rules need and load-time (per-layer) quantization, and it brings a
second LoRA of its own. The two formats fit in this one module.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.models.layers import Linear

MODES = ("int8", "nf4")
NF4_BLOCK = 64  # weights per absmax along `in` (bitsandbytes' and QLoRA's blocksize)
SCALE_GROUP = 256  # absmax values per second-level scale (QLoRA's double-quantization blocksize)

# The 16 NF4 levels, exactly bitsandbytes' `NF4` table (QLoRA Appendix E): quantiles of N(0, 1)
# normalized to [-1, 1], with an exact zero.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=np.float32)
# A value's nearest level is the count of midpoints below it (ties go to the lower level).
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2


class QuantParam(nnx.Param):
    """Storage of a quantized base weight (codes and scales): frozen, never given optimizer state."""


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"quantization mode {mode!r} is not one of {MODES}")
    return mode


def quantize(weight: jax.Array, mode: str, double_quant: bool = True) -> dict[str, jax.Array]:
    """A weight [.., out, in] → its stored parts, e.g. {"codes": ..., "absmax": ...}."""
    check_mode(mode)
    w = weight.astype(jnp.float32)
    if mode == "int8":
        absmax = jnp.max(jnp.abs(w), axis=-1)  # [.., out]
        step = _safe(absmax)[..., None] / 127.0
        codes = jnp.clip(jnp.round(w / step), -127, 127).astype(jnp.int8)
        return {"codes": codes, "absmax": absmax}
    *lead, out_features, in_features = w.shape
    if in_features % NF4_BLOCK:
        raise ValueError(f"nf4 needs the input size to be a multiple of {NF4_BLOCK}, got a weight of shape "
                         f"{tuple(w.shape)}; use model.quantize=int8 for this model")
    blocks = w.reshape(*lead, out_features, in_features // NF4_BLOCK, NF4_BLOCK)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)  # [.., out, in/64]
    normed = blocks / _safe(absmax)[..., None]
    # Sum of comparisons rather than searchsorted: one fused elementwise pass, no [.., 15] temporary.
    codes = sum((normed > m).astype(jnp.uint8) for m in _NF4_MIDPOINTS)
    codes = codes.reshape(*lead, out_features, in_features // 2, 2)
    parts = {"codes": codes[..., 0] | (codes[..., 1] << 4)}  # [.., out, in/2] uint8
    if not double_quant:
        return {**parts, "absmax": absmax}
    return {**parts, **_quantize_absmax(absmax)}


def dequantize(parts: dict[str, jax.Array], mode: str, dtype) -> jax.Array:
    """The stored parts → the weight [.., out, in] in `dtype` (computed in float32, then cast once,
    so every dtype sees the same rounded values as an export in that dtype)."""
    check_mode(mode)
    codes = parts["codes"]
    absmax = parts["absmax"] if "absmax" in parts else _dequantize_absmax(parts)
    if mode == "int8":
        return (codes.astype(jnp.float32) * (absmax[..., None] / 127.0)).astype(dtype)
    *lead, out_features, half = codes.shape
    unpacked = jnp.stack([codes & 0xF, codes >> 4], axis=-1).reshape(*lead, out_features, 2 * half)
    values = jnp.take(jnp.asarray(NF4_LEVELS), unpacked.astype(jnp.int32), axis=0)
    blocks = values.reshape(*lead, out_features, 2 * half // NF4_BLOCK, NF4_BLOCK) * absmax[..., None]
    return blocks.reshape(*lead, out_features, 2 * half).astype(dtype)


def part_axes(parts: dict[str, jax.Array], axes: tuple) -> dict[str, tuple]:
    """Logical axes of each part: the weight's own, so meshes place them like the weight. A part
    with fewer dims keeps the leading ones (int8's absmax [.., out]; the offset [..], one a layer)."""
    return {name: axes[:value.ndim] for name, value in parts.items()}


def _safe(absmax: jax.Array) -> jax.Array:
    # An all-zero row or block divides by 1 instead (its codes are 0, its absmax stays 0).
    return jnp.where(absmax > 0, absmax, 1.0)


def _scale_group(out_features: int) -> int:
    # Groups run along `out` (see the module docstring); an `out` that 256 does not divide is one group.
    return SCALE_GROUP if out_features % SCALE_GROUP == 0 else out_features


def _quantize_absmax(absmax: jax.Array) -> dict[str, jax.Array]:
    """absmax [.., out, n] → int8 codes of (absmax - mean) [.., out, n], a scale per group of 256
    along out [.., out/256, n] and the mean [..]: W's error grows by at most |NF4 level| · scale/254."""
    *lead, out_features, n = absmax.shape
    group = _scale_group(out_features)
    offset = jnp.mean(absmax, axis=(-2, -1))  # [..]
    centered = (absmax - offset[..., None, None]).reshape(*lead, out_features // group, group, n)
    scale = jnp.max(jnp.abs(centered), axis=-2)  # [.., out/g, n]
    codes = jnp.clip(jnp.round(centered / (_safe(scale)[..., None, :] / 127.0)), -127, 127).astype(jnp.int8)
    return {"absmax_codes": codes.reshape(absmax.shape), "absmax_scale": scale, "absmax_offset": offset}


def _dequantize_absmax(parts: dict[str, jax.Array]) -> jax.Array:
    codes, scale, offset = parts["absmax_codes"], parts["absmax_scale"], parts["absmax_offset"]
    *lead, out_features, n = codes.shape
    groups = scale.shape[-2]
    grouped = codes.astype(jnp.float32).reshape(*lead, groups, out_features // groups, n)
    absmax = grouped * (scale[..., None, :] / 127.0)
    return absmax.reshape(codes.shape) + offset[..., None, None]


class QuantizedWeight(nnx.Module):
    """A frozen weight [.., out, in] kept as quantized parts (QuantParam variables).

    Stands in for a Linear's `weight` Param: `shape`, `axes` and `dtype` describe the dense weight,
    `dequantize(dtype)` (and `[...]`) rebuild it.
    """

    def __init__(self, weight: jax.Array, axes: tuple, mode: str, double_quant: bool = True):
        self.mode = check_mode(mode)
        self.dtype = jnp.dtype(weight.dtype)  # of the dense weight: what merging and export write
        parts = quantize(weight, mode, double_quant)
        self.part_names = tuple(parts)
        for name, part_axis in part_axes(parts, tuple(axes)).items():
            setattr(self, name, QuantParam(parts[name], axes=part_axis))

    def parts(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in self.part_names}

    def dequantize(self, dtype=None) -> jax.Array:
        return dequantize(self.parts(), self.mode, dtype or self.dtype)

    def __getitem__(self, index):
        return self.dequantize()[index]

    @property
    def shape(self) -> tuple[int, ...]:
        # From the arrays, not stored: inside scan_layers the module holds one layer's slice.
        *lead, out_features, stored_in = self.codes.shape
        return (*lead, out_features, stored_in * (2 if self.mode == "nf4" else 1))

    @property
    def axes(self) -> tuple:
        return tuple(self.codes.axes)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(v.shape)) * jnp.dtype(v.dtype).itemsize for v in self.parts().values())


def is_quantized(linear: Linear) -> bool:
    return isinstance(linear.weight, QuantizedWeight)


def base_linears(model: nnx.Module) -> dict[tuple[str, ...], Linear]:
    """The Linears that QLoRA quantizes: those inside the decoder layers (not the output head)."""
    return {tuple(str(p) for p in path): module for path, module in nnx.iter_modules(model)
            if isinstance(module, Linear) and "layers" in tuple(str(p) for p in path)}


def quantize_model(model: nnx.Module, mode: str, double_quant: bool = True) -> nnx.Module:
    """Replaces every decoder-layer Linear's weight by a QuantizedWeight, in place; returns the model.

    On a materialized model this holds the dense and quantized copy of one weight at a time. Under
    `nnx.eval_shape` it gives the quantized model's structure, which `from_pretrained` fills layer by
    layer (see `load_quantized`).
    """
    check_mode(mode)
    for linear in base_linears(model).values():
        if is_quantized(linear):
            continue
        if linear.adapter is not None:
            raise ValueError("quantize the base before attaching adapters (DoRA's magnitudes, the merge order)")
        linear.weight = QuantizedWeight(linear.weight[...], linear.weight.axes, mode, double_quant)
    return model


def dequantize_model(model: nnx.Module, dtype=None) -> nnx.Module:
    """Replaces every QuantizedWeight by a dense Param (in `dtype`, default the weight's original
    dtype), in place: what `save_pretrained` needs. Merge adapters first (`merge_lora` does so itself
    for the Linears it merges)."""
    for linear in base_linears(model).values():
        if is_quantized(linear):
            weight = linear.weight
            linear.weight = nnx.Param(weight.dequantize(dtype or weight.dtype), axes=weight.axes)
    return model


def quantized_bytes(model: nnx.Module) -> tuple[int, int]:
    """(bytes of the quantized weights, bytes the same weights take densely in their original dtype)."""
    stored = dense = 0
    for linear in base_linears(model).values():
        if is_quantized(linear):
            stored += linear.weight.nbytes
            dense += int(np.prod(linear.weight.shape)) * linear.weight.dtype.itemsize
    return stored, dense


# --- load-time quantization (jaxft.pretrained.from_pretrained) ---------------------------------------
def quantized_parts_of(dense_paths, quantized_paths) -> dict[str, list[str]]:
    """Dense weight path → the paths of its quantized parts, for paths the quantization replaced."""
    dense_paths = set(dense_paths)
    out: dict[str, list[str]] = {}
    for path in quantized_paths:
        owner = path.rsplit(".", 1)[0]  # "...q_proj.weight.codes" → "...q_proj.weight"
        if path not in dense_paths and owner in dense_paths:
            out.setdefault(owner, []).append(path)
    return out


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def quantize_layer(weight: jax.Array, mode: str, double_quant: bool, targets: tuple) -> dict[str, jax.Array]:
    """One layer's weight → its parts, each constrained to its (per-layer) sharding.
    targets: ((part name, sharding), ...), hashable so that equal layers share one compile."""
    parts = quantize(weight, mode, double_quant)
    return {name: jax.lax.with_sharding_constraint(parts[name], sharding) for name, sharding in targets}


__all__ = ["MODES", "NF4_LEVELS", "NF4_BLOCK", "QuantParam", "QuantizedWeight", "quantize", "dequantize",
           "quantize_model", "dequantize_model", "quantized_bytes", "is_quantized", "base_linears"]
