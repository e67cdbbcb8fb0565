"""The key/value cache for generation: every layer's keys and values of the tokens seen so far.

    cache = KVCache.create(spec, batch, size, dtype)        # size: prompt + new tokens
    hidden, cache = decoder(prompt_ids, attention_mask=left_padded_mask, cache=cache)   # prefill
    hidden, cache = decoder(next_ids[:, None], cache=cache)                              # one step

All rows write at the same index (prompts are left-padded), so a step is one dynamic_update_slice
per layer. The cache keeps the whole sequence rather than a ring buffer: sliding windows are masks
by index (as in the attention's MaskInfo), so windowed layers read the same cache. Keys and values
are stored after RoPE, so a cached key never needs its position again.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxft.models.attention import MaskInfo


class KVCache(NamedTuple):
    keys: jnp.ndarray  # [L, B, S, K, D]: layer, row, cache slot, kv head, head dim
    values: jnp.ndarray  # [L, B, S, K, D]
    valid: jnp.ndarray  # [B, S] bool: slot holds a real (not padding) token
    seen: jnp.ndarray  # [B] int32: real tokens so far, i.e. the next token's position id
    index: jnp.ndarray  # [] int32: the next slot to write (the same for every row)

    @classmethod
    def create(cls, spec, batch: int, size: int, dtype) -> "KVCache":
        shape = (spec.num_layers, batch, size, spec.num_kv_heads, spec.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, size), bool),
                   jnp.zeros((batch,), jnp.int32), jnp.zeros((), jnp.int32))

    @property
    def size(self) -> int:
        return self.keys.shape[2]

    def step_inputs(self, batch: int, length: int, attention_mask=None) -> tuple[MaskInfo, jnp.ndarray, "KVCache"]:
        """For `length` new tokens: their MaskInfo against the cache, their default position ids, and
        the cache with their slots marked (keys and values are written layer by layer afterwards)."""
        new_mask = jnp.ones((batch, length), bool) if attention_mask is None else attention_mask.astype(bool)
        # Position ids continue each row's count of real tokens; padding gets 0, as without a cache.
        counted = self.seen[:, None] + jnp.cumsum(new_mask.astype(jnp.int32), axis=1)  # [B, T]
        positions = jnp.maximum(counted - 1, 0).astype(jnp.int32)
        valid = _write(self.valid, new_mask, self.index, axis=1)
        q_index = jnp.broadcast_to(self.index + jnp.arange(length, dtype=jnp.int32), (batch, length))
        kv_index = jnp.broadcast_to(jnp.arange(self.size, dtype=jnp.int32), (batch, self.size))
        mask = MaskInfo(q_index, kv_index, jnp.zeros((batch, length), jnp.int32),
                        jnp.zeros((batch, self.size), jnp.int32), valid)
        advanced = self._replace(valid=valid, seen=counted[:, -1], index=self.index + length)
        return mask, positions, advanced


def write_layer(cache_keys, cache_values, keys, values, index):
    """One layer's cache [B, S, K, D] with `keys`/`values` [B, T, K, D] written at slot `index`."""
    return _write(cache_keys, keys, index, axis=1), _write(cache_values, values, index, axis=1)


def _write(buffer, update, index, axis: int):
    start = [jnp.zeros((), jnp.int32)] * buffer.ndim
    start[axis] = index
    return jax.lax.dynamic_update_slice(buffer, update.astype(buffer.dtype), start)
