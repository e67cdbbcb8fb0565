"""Attention with structured masks.

The mask is passed as its ingredients (token indices, segment ids, key validity) rather than a dense
[B, T, S] matrix, because that is what fused kernels take (cuDNN and Pallas splash attention want
segment ids and causal/window flags, not a matrix) and what a KV cache needs (the cache supplies
keys with their own indices). `reference_attention` builds the dense mask and is the numerics
reference on every backend.

Mask semantics match transformers: causality and sliding windows are by index in the sequence
(HF's `cache_position`), not by position id; packed documents never attend across `segment_ids`;
keys with `attention_mask == 0` are never attended.

`attention(..., implementation=NAME)` runs the reference ("xla") or a fused kernel ("jax",
"cudnn", "splash": see attention_kernels.py), falling back to the reference, with a logged
reason, for any call a kernel cannot express exactly; `record_dispatch()` counts, at trace time,
the calls that reached their kernel and those that fell back (what tests assert on). `set_attention_implementation(model, name)`
picks one for every layer of a model; "auto" is cudnn on NVIDIA GPUs, splash on TPU, xla elsewhere.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.models.attention_kernels import KERNELS, on_cuda_gpu

log = logging.getLogger("jaxft.attention")

# A window larger than any sequence: what "global" layers use in a per-layer window table.
NO_WINDOW = 2**30


class MaskInfo(NamedTuple):
    """The ingredients of the attention mask.

    Fused kernels read `q_index is kv_index` (one array in both fields, as `for_sequence` builds
    it) as "queries are the keys, at indices 0..T-1" and then use their causal flag; keep that
    identity only when it holds (a KV cache builds two arrays).
    """

    q_index: jnp.ndarray  # [B, T] int32: index of each query in the full (cached) sequence
    kv_index: jnp.ndarray  # [B, S] int32
    q_segment: jnp.ndarray  # [B, T] int32: packed-document id
    kv_segment: jnp.ndarray  # [B, S] int32
    kv_valid: jnp.ndarray  # [B, S] bool: False for padding keys
    # Keys at indices below this are visible to every segment (prefix/prompt tuning's virtual tokens
    # in packed rows: each packed document sees them as if it were alone). A Python int: static.
    kv_shared: int = 0

    @classmethod
    def for_sequence(cls, batch: int, length: int, attention_mask=None, segment_ids=None) -> "MaskInfo":
        """Masks for a full forward pass (no cache): queries and keys are the same tokens."""
        index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        segment = jnp.zeros((batch, length), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        valid = jnp.ones((batch, length), bool) if attention_mask is None else attention_mask.astype(bool)
        return cls(index, index, segment, segment, valid)

    def dense(self, window=None) -> jnp.ndarray:
        """bool [B, T, S]: causal, same segment, valid key, and within `window` keys of the query
        (None: no window)."""
        distance = self.q_index[:, :, None] - self.kv_index[:, None, :]  # [B, T, S]
        allowed = (distance >= 0) & self.same_segment() & self.kv_valid[:, None, :]
        return allowed if window is None else allowed & (distance < window)

    def same_segment(self) -> jnp.ndarray:
        """bool [B, T, S]: the key is in the query's segment (or shared by all, see kv_shared)."""
        same = self.q_segment[:, :, None] == self.kv_segment[:, None, :]
        return same if not self.kv_shared else same | (self.kv_index[:, None, :] < self.kv_shared)


def default_positions(mask: MaskInfo) -> jnp.ndarray:
    """Position ids when the caller gives none: count valid tokens, restarting at each segment.

    With left padding this puts the first real token at position 0, as HF `generate` does; in packed
    rows each document starts again at 0.
    """
    valid = mask.kv_valid.astype(jnp.int32)
    seg = mask.kv_segment
    starts = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    # Running count of valid tokens, minus the count at the last segment start.
    count = jnp.cumsum(valid, axis=1)
    base = jnp.where(starts, count - valid, 0)
    base = jax.lax.cummax(base, axis=1)
    return jnp.maximum(count - base - 1, 0).astype(jnp.int32)


def reference_attention(q, k, v, mask: MaskInfo, window, scale: float, softcap: float | None = None) -> jnp.ndarray:
    """Grouped-query attention in plain XLA. q [B, T, H, D]; k, v [B, S, K, D]; returns [B, T, H, D].
    window: keys less than `window` indices before the query (int, traced int, or None: no window).

    Scores and softmax run in float32 whatever the compute dtype, as HF's eager and sdpa paths do.
    Fully masked query rows (padding) get a uniform softmax instead of NaN, as in HF. `softcap`
    (Gemma 2) squashes the scaled scores to (-softcap, softcap) with tanh before the mask.
    """
    batch, length, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    groups = num_heads // num_kv_heads
    q = q.reshape(batch, length, num_kv_heads, groups, head_dim)  # [B, T, K, G, D]
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    allowed = mask.dense(window)[:, None, None, :, :]  # [B, 1, 1, T, S]
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(batch, length, num_heads, head_dim)


# --- choosing an implementation -------------------------------------------------------------------

IMPLEMENTATIONS = ("xla", *KERNELS)  # xla: reference_attention
CHOICES = ("auto", *IMPLEMENTATIONS)
_LOGGED: set[tuple[str, str]] = set()


class DispatchRecord(NamedTuple):
    """What `attention` did at trace time, one count per traced call (a scanned layer body counts
    once per trace, not once per layer it runs): kernels[name] ran the fused kernel,
    fallbacks[(name, reason)] ran the reference instead."""

    kernels: collections.Counter
    fallbacks: collections.Counter


_RECORDS: contextvars.ContextVar[tuple[DispatchRecord, ...]] = contextvars.ContextVar("jaxft_attention_records",
                                                                                      default=())


@contextlib.contextmanager
def record_dispatch():
    """Records which attention calls traced inside the block reached their kernel and which fell back:

        with record_dispatch() as record:
            jax.jit(model)(ids)                  # a fresh trace (a cached one records nothing)
        assert not record.fallbacks and record.kernels["splash"]
    """
    record = DispatchRecord(collections.Counter(), collections.Counter())
    token = _RECORDS.set((*_RECORDS.get(), record))
    try:
        yield record
    finally:
        _RECORDS.reset(token)


def fallback_reason(implementation: str, q, k, v, mask: MaskInfo, window, softcap: float | None = None) -> str | None:
    """Why `implementation` would run the reference for this call instead of its kernel (None: it won't)."""
    if implementation == "xla":
        return None
    return _kernel(implementation).unsupported(q, k, v, mask, window, softcap)


# jaxft.models.context_parallel (built on this module, so not imported by it) registers its
# (layout, attention) pair here when imported; jaxft.sharding imports it, and only its meshes split
# the sequence.
_CONTEXT_PARALLEL: list = []


def attention(q, k, v, mask: MaskInfo, window, scale: float, implementation: str = "xla",
              softcap: float | None = None) -> jnp.ndarray:
    """q [B, T, H, D]; k, v [B, S, K, D] → [B, T, H, D], by `implementation` (one of IMPLEMENTATIONS).

    window: int or traced int32 (keys within `window` indices of the query), or None for no window.
    A call the kernel cannot express exactly runs reference_attention; the reason is logged once.
    Under a mesh whose rules split the sequence (the `context` axis), the call is context-parallel:
    jaxft.models.context_parallel gathers the keys and runs this same dispatch on each shard.
    """
    for layout, split_attention in _CONTEXT_PARALLEL:
        where = layout(q, k, mask)
        if where is not None:
            return split_attention(q, k, v, mask, window, scale, implementation, softcap, where)
    if implementation != "xla":
        reason = fallback_reason(implementation, q, k, v, mask, window, softcap)
        for record in _RECORDS.get():
            if reason is None:
                record.kernels[implementation] += 1
            else:
                record.fallbacks[(implementation, reason)] += 1
        if reason is None:
            return _kernel(implementation).run(q, k, v, mask, window, scale, softcap=softcap)
        if (implementation, reason) not in _LOGGED:  # at trace time: once per reason per process, not per layer
            _LOGGED.add((implementation, reason))
            log.warning("attention %r falls back to the xla reference: %s", implementation, reason)
    return reference_attention(q, k, v, mask, window, scale, softcap=softcap)


def _kernel(implementation: str):
    try:
        return KERNELS[implementation]
    except (KeyError, TypeError):
        raise ValueError(f"unknown attention implementation {implementation!r}; choose one of {CHOICES}") from None


def resolve_implementation(name: str, dtype=None, softcap: bool = False, backend: str | None = None) -> str:
    """The implementation `name` stands for: itself, or for "auto" the best one for this backend and
    model (cudnn only for bfloat16/float16 models without soft-capping, which it cannot run)."""
    if name not in CHOICES:
        raise ValueError(f"unknown attention implementation {name!r}; choose one of {CHOICES}")
    if name != "auto":
        return name
    backend = backend or jax.default_backend()
    if backend == "tpu":
        return "splash"
    if backend == "gpu" and on_cuda_gpu() and not softcap and dtype is not None \
            and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def set_attention_implementation(model: nnx.Module, name: str) -> str:
    """Sets every attention module of `model` (each has an `implementation` attribute) to `name`,
    with "auto" resolved for this backend and the model's compute dtype; returns the name set.

    The name is static graph data: call this before nnx.split / step.split_model.
        set_attention_implementation(model, "auto")  # "xla" on CPU
    """
    modules = [node for _, node in nnx.iter_graph(model)
               if isinstance(node, nnx.Module) and hasattr(node, "implementation")]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention modules (no `implementation` attribute)")
    softcap = any(getattr(m, "softcap", None) is not None for m in modules)
    resolved = resolve_implementation(name, dtype=getattr(model, "dtype", None), softcap=softcap)
    for module in modules:
        module.implementation = resolved
    return resolved
