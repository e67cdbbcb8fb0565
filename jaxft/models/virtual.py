"""Virtual tokens before every sequence: where prefix tuning's keys/values and prompt tuning's
embeddings enter the decoder (their parameters live in jaxft.peft.prefix / jaxft.peft.prompt).

N virtual tokens sit at indices 0..N-1 of every row, before the real tokens (indices N..N+T-1), as
in PEFT, where they are a pre-filled KV cache (prefix) or extra input embeddings (prompt):
    prefix:  keys/values [L, N, K, D] of each layer, not rotated; only the real tokens are queries.
    prompt:  N embeddings [N, D] prepended to the input; they run through every layer like tokens,
             and their outputs are dropped, so hidden states stay [B, T, D].
Either way they are always valid keys, every real token attends to them (in packed rows, every
segment: MaskInfo.kv_shared), and the real tokens' position ids start at N (PEFT: prefix tuning adds
num_virtual_tokens to the position ids; prompt tuning's virtual tokens take positions 0..N-1). In
generation the virtual tokens are the KV cache's first N slots (CausalLM.init_cache), so decoding
reads them through the same mask machinery and writes nothing new.

A virtual-token module (set in `Decoder.virtual` by jaxft.peft) has `num_virtual_tokens`, `kind`
("prefix" | "prompt") and `key_values(dtype)` → ([L, N, K, D], [L, N, K, D]) or `embeddings(dtype)`
→ [N, D].
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxft.models.attention import MaskInfo


def _ahead(n: int, batch: int, value, dtype) -> jnp.ndarray:
    return jnp.full((batch, n), value, dtype)


def prefix_inputs(n: int, mask: MaskInfo, positions, packed: bool) -> tuple[MaskInfo, jnp.ndarray]:
    """The mask of T real queries against N prefix keys + their own T keys, and their positions + N."""
    batch = mask.q_index.shape[0]
    kv_index = jnp.concatenate([jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n)), mask.kv_index + n], 1)
    return MaskInfo(mask.q_index + n, kv_index, mask.q_segment,
                    jnp.concatenate([_ahead(n, batch, 0, jnp.int32), mask.kv_segment], 1),
                    jnp.concatenate([_ahead(n, batch, True, bool), mask.kv_valid], 1),
                    kv_shared=n if packed else 0), positions + n


def prompt_inputs(n: int, mask: MaskInfo, positions, packed: bool) -> tuple[MaskInfo, jnp.ndarray]:
    """The mask of N + T queries (virtual then real) over the same keys, and their positions
    (0..N-1, then the real tokens' + N). Queries are the keys (one index array), so fused kernels
    still see a full causal sequence."""
    batch = mask.q_index.shape[0]
    length = mask.q_index.shape[1] + n
    index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    segment = jnp.concatenate([_ahead(n, batch, 0, jnp.int32), mask.kv_segment], 1)
    valid = jnp.concatenate([_ahead(n, batch, True, bool), mask.kv_valid], 1)
    virtual_positions = jnp.broadcast_to(jnp.arange(n, dtype=positions.dtype), (batch, n))
    return (MaskInfo(index, index, segment, segment, valid, kv_shared=n if packed else 0),
            jnp.concatenate([virtual_positions, positions + n], 1))


def write_prefix(cache, keys, values):
    """A fresh KV cache with the prefix [L, N, K, D] in slots 0..N-1 of every row: the next token
    writes at slot N, at position N."""
    n = keys.shape[1]
    batch = cache.keys.shape[1]
    put = lambda buffer, x: buffer.at[:, :, :n].set(  # noqa: E731
        jnp.broadcast_to(x[:, None], (x.shape[0], batch, *x.shape[1:])).astype(buffer.dtype))
    return cache._replace(keys=put(cache.keys, keys), values=put(cache.values, values),
                          valid=cache.valid.at[:, :n].set(True), seen=cache.seen + n, index=cache.index + n)
