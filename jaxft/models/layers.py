"""Building blocks shared by the model families.

Parameters keep Hugging Face's layout and names (`weight` [out, in], `bias`), so a checkpoint maps
onto a model by name alone and loading is a copy, never a transpose. Each parameter carries
`axes`, its logical axis names; `jaxft.sharding` turns those into a device placement with one
rules table.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import zlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class Axis:
    """Logical axis names used on parameters and activations (mapped to mesh axes by jaxft.sharding)."""

    BATCH, SEQ = "batch", "seq"
    VOCAB, EMBED, MLP, HEADS, KV_HEADS, LAYERS, NORM = "vocab", "embed", "mlp", "heads", "kv_heads", "layers", "norm"
    EXPERT = "expert"  # the expert axis of mixture-of-experts weights [E, ...] (jaxft.models.moe)


Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], dtype, axes: tuple[str | None, ...]) -> nnx.Param:
    assert len(axes) == len(shape), (shape, axes)
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), axes=axes)


class Linear(nnx.Module):
    """y = x Wᵀ + b with W stored [out, in] as in PyTorch; the matmul runs in the compute dtype.

    `adapter` is where parameter-efficient methods plug in (jaxft.peft sets it; models never do):
    called as `adapter(x, y, self)` with the input, the base output and this layer, it returns the
    output to use instead. `weight` may also be replaced by a quantized stand-in (QLoRA,
    jaxft.peft.quant.QuantizedWeight): anything with `dequantize(dtype)`, `shape` and `axes`.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, axes: tuple[str, str],
                 param_dtype, dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.weight = param(rngs, init, (out_features, in_features), param_dtype, axes)
        self.bias = param(rngs, nnx.initializers.zeros_init(), (out_features,), param_dtype, axes[:1]) if use_bias else None
        self.dtype = dtype
        self.adapter = nnx.data(None)  # a data slot: an adapter module may be set here later

    def dense_weight(self, dtype=None) -> jnp.ndarray:
        """The weight [.., out, in] as an array in `dtype` (default: as stored). A quantized weight is
        dequantized here, inside whatever jitted computation reads it, so XLA fuses the decode into
        the matmul and no dense copy of the base is kept between steps."""
        if hasattr(self.weight, "dequantize"):
            return self.weight.dequantize(dtype)
        weight = self.weight[...]
        return weight if dtype is None else weight.astype(dtype)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if hasattr(self.weight, "dequantize"):
            y = _dequantize_matmul(x.astype(self.dtype), self.weight, self.dtype)
        else:
            y = jnp.einsum("...i,oi->...o", x.astype(self.dtype), self.weight[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.adapter is not None and not _ADAPTERS_OFF.get():
            y = self.adapter(x, y, self)
        return y


def _dequantize_matmul(x: jnp.ndarray, weight: nnx.Module, dtype) -> jnp.ndarray:
    """x Wᵀ for a quantized W, decoded right before the matmul. Rematerialized: the backward pass
    decodes W again from its codes, where autodiff would otherwise keep every layer's decoded weight
    as a residual of the scan, as much memory as an unquantized base."""
    graphdef, state = nnx.split(weight)

    @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
    def matmul(x, state):
        return jnp.einsum("...i,oi->...o", x, nnx.merge(graphdef, state).dequantize(dtype))

    return matmul(x, state)


class Embed(nnx.Module):
    """`adapter` (jaxft.peft.token_rows; models never set it) replaces some rows where they are used:
    `adapter.embed(ids, x)` after the lookup, `adapter.project(x, logits)` after the tied projection."""

    def __init__(self, num_embeddings: int, features: int, *, param_dtype, dtype, rngs: nnx.Rngs):
        self.weight = param(rngs, nnx.initializers.normal(0.02), (num_embeddings, features), param_dtype, (Axis.VOCAB, Axis.EMBED))
        self.dtype = dtype
        self.adapter = nnx.data(None)

    def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:
        x = jnp.take(self.weight[...], ids, axis=0).astype(self.dtype)
        if self.adapter is not None and not _ADAPTERS_OFF.get():
            x = self.adapter.embed(ids, x)
        return x

    def attend(self, x: jnp.ndarray) -> jnp.ndarray:
        """Tied output projection: logits against the embedding table."""
        y = jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.weight[...].astype(self.dtype))
        if self.adapter is not None and not _ADAPTERS_OFF.get():
            y = self.adapter.project(x, y)
        return y


class RMSNorm(nnx.Module):
    """HF's RMSNorm: normalize in float32, cast back, then scale (the order matters in bf16).

    plus_one (Gemma): the stored weight w is an offset, the scale is (1 + w), and the product is
    taken in float32 before the cast, as GemmaRMSNorm does; w starts at 0.
    """

    def __init__(self, features: int, *, eps: float, param_dtype, dtype, rngs: nnx.Rngs, plus_one: bool = False):
        init = nnx.initializers.zeros_init() if plus_one else nnx.initializers.ones_init()
        self.weight = param(rngs, init, (features,), param_dtype, (Axis.NORM,))
        self.eps = eps
        self.dtype = dtype
        self.plus_one = plus_one

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (normed * (1.0 + self.weight[...].astype(jnp.float32))).astype(self.dtype)
        return self.weight[...].astype(self.dtype) * normed.astype(self.dtype)


# HF `hidden_act` names → functions (gelu_pytorch_tanh is torch's tanh approximation of GELU).
ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def stack_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """Builds `num_layers` copies of a layer as ONE module whose params have a leading layer axis.

    Running it with `scan_layers` compiles the layer body once, so compile time does not grow with
    depth. The leading axis is named `layers` in each param's `axes`.
    """
    keys = jax.random.split(rngs.params(), num_layers)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: make_layer(nnx.Rngs(params=0))))
    state = jax.vmap(lambda key: nnx.split(make_layer(nnx.Rngs(params=key)))[1])(keys)
    state = jax.tree.map(lambda v: v.replace(axes=(Axis.LAYERS, *v.axes)), state,
                         is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


# What the backward pass may keep from each layer's forward pass (the rest is recomputed).
REMAT_POLICIES = {
    "none": None,  # keep everything: fastest, most memory
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only layer inputs
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls
}


def scan_layers(stacked: nnx.Module, carry, per_layer_inputs, body: Callable, remat: str = "none",
                with_outputs: bool = False):
    """carry = body(layer, carry, per_layer_input) for each layer of `stacked`, under lax.scan.

    with_outputs: body returns (carry, output) and the outputs come back stacked on a leading layer
    axis, as (carry, outputs) — how a KV cache's per-layer keys and values flow through the scan.
    """
    graphdef, state = nnx.split(stacked)
    num_layers = jax.tree.leaves(state)[0].shape[0]

    def step(carry, xs):
        layer_state, layer_input, index = xs
        with _layer_rng(index):  # each layer draws its own dropout masks
            result = body(nnx.merge(graphdef, layer_state), carry, layer_input)
        return result if with_outputs else (result, None)

    if remat != "none":
        step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=False)

    carry, outputs = jax.lax.scan(step, carry, (state, per_layer_inputs, jnp.arange(num_layers)))
    return (carry, outputs) if with_outputs else carry


# --- frozen first layers (train.freeze_first_layers) ---------------------------------------------
# The train step opens `frozen_prefix(n)` around the loss: every layer_groups.scan_groups inside it
# runs layers [0, n) as separate scans whose params take no gradient (the optimizer keeps no state for those
# rows either: jaxft.optim). Outside the block (evaluation, generation) nothing changes.
_FROZEN_PREFIX: contextvars.ContextVar[int] = contextvars.ContextVar("jaxft_frozen_prefix", default=0)


@contextlib.contextmanager
def frozen_prefix(num_layers: int):
    token = _FROZEN_PREFIX.set(int(num_layers))
    try:
        yield
    finally:
        _FROZEN_PREFIX.reset(token)


# --- dropout randomness --------------------------------------------------------------------------
# Training code opens `dropout_rng(key)` around the forward pass; modules that drop out (LoRA
# dropout) call `dropout_key(salt)`, which is None outside that block (evaluation: no dropout).
_DROPOUT_KEY: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar("jaxft_dropout_key", default=None)


@contextlib.contextmanager
def dropout_rng(key: jax.Array | None):
    token = _DROPOUT_KEY.set(key)
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)


@contextlib.contextmanager
def _layer_rng(index):
    key = _DROPOUT_KEY.get()
    with dropout_rng(None if key is None else jax.random.fold_in(key, index)):
        yield


def dropout_key(salt: str) -> jax.Array | None:
    """A key for one dropout site: distinct per layer (inside scan_layers) and per `salt` (e.g. the
    module path), and None when no dropout_rng block is open."""
    key = _DROPOUT_KEY.get()
    if key is None:
        return None
    return jax.random.fold_in(key, zlib.crc32(salt.encode()) & 0x7FFFFFFF)


# --- the base model without its adapters ----------------------------------------------------------
# Objectives whose reference is the base model (DPO with LoRA) trace its forward inside
# `adapters_disabled()`: the same arrays, the adapters skipped, no copy of anything.
_ADAPTERS_OFF: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxft_adapters_off", default=False)


@contextlib.contextmanager
def adapters_disabled():
    token = _ADAPTERS_OFF.set(True)
    try:
        yield
    finally:
        _ADAPTERS_OFF.reset(token)


def adapters_enabled() -> bool:
    """False inside adapters_disabled() (what non-Linear adapters, e.g. prefix tuning's virtual tokens, check)."""
    return not _ADAPTERS_OFF.get()


# --- activation sharding -------------------------------------------------------------------------
# `jaxft.sharding.activate(mesh, rules)` sets this; models stay free of training and mesh code.
_LOGICAL_TO_SPEC: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("jaxft_logical_to_spec", default=None)


@contextlib.contextmanager
def logical_sharding(to_sharding: Callable[[tuple[str | None, ...], tuple[int, ...]], jax.sharding.Sharding]):
    token = _LOGICAL_TO_SPEC.set(to_sharding)
    try:
        yield
    finally:
        _LOGICAL_TO_SPEC.reset(token)


def constrain(x: jnp.ndarray, axes: tuple[str | None, ...]) -> jnp.ndarray:
    """Pins an activation's sharding by logical axis names when a mesh is active; no-op otherwise."""
    to_sharding = _LOGICAL_TO_SPEC.get()
    if to_sharding is None:
        return x
    return jax.lax.with_sharding_constraint(x, to_sharding(axes, x.shape))
