"""Attention with structured masks.

The mask is passed as its ingredients (token indices, segment ids, key validity) rather than a dense
[B, T, S] matrix, because that is what fused kernels take (cuDNN and Pallas splash attention want
segment ids and causal/window flags, not a matrix) and what a KV cache needs (the cache supplies
keys with their own indices). `reference_attention` builds the dense mask and is the numerics
reference on every backend.

Mask semantics match transformers: causality and sliding windows are by index in the sequence
(HF's `cache_position`), not by position id; packed documents never attend across `segment_ids`;
keys with `attention_mask == 0` are never attended.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# A window larger than any sequence: what "global" layers use in a per-layer window table.
NO_WINDOW = 2**30


class MaskInfo(NamedTuple):
    q_index: jnp.ndarray  # [B, T] int32: index of each query in the full (cached) sequence
    kv_index: jnp.ndarray  # [B, S] int32
    q_segment: jnp.ndarray  # [B, T] int32: packed-document id
    kv_segment: jnp.ndarray  # [B, S] int32
    kv_valid: jnp.ndarray  # [B, S] bool: False for padding keys

    @classmethod
    def for_sequence(cls, batch: int, length: int, attention_mask=None, segment_ids=None) -> "MaskInfo":
        """Masks for a full forward pass (no cache): queries and keys are the same tokens."""
        index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        segment = jnp.zeros((batch, length), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        valid = jnp.ones((batch, length), bool) if attention_mask is None else attention_mask.astype(bool)
        return cls(index, index, segment, segment, valid)

    def dense(self, window) -> jnp.ndarray:
        """bool [B, T, S]: causal, same segment, valid key, and within `window` keys of the query."""
        distance = self.q_index[:, :, None] - self.kv_index[:, None, :]  # [B, T, S]
        return ((distance >= 0) & (distance < window)
                & (self.q_segment[:, :, None] == self.kv_segment[:, None, :])
                & self.kv_valid[:, None, :])


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


IMPLEMENTATIONS = {"xla": reference_attention}


def attention(q, k, v, mask: MaskInfo, window, scale: float, implementation: str = "xla",
              softcap: float | None = None) -> jnp.ndarray:
    try:
        fn = IMPLEMENTATIONS[implementation]
    except KeyError:
        raise ValueError(f"unknown attention implementation {implementation!r}; available: {sorted(IMPLEMENTATIONS)}") from None
    if softcap is None:  # implementations without soft-capping keep their original signature
        return fn(q, k, v, mask, window, scale)
    return fn(q, k, v, mask, window, scale, softcap=softcap)
