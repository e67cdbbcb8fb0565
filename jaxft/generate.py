"""Greedy decoding over a fixed-size buffer (one compile for any prompt up to the buffer length).

Each step re-runs the whole buffer: simple and exact, and fine for demos and tests. A KV cache
(the attention's MaskInfo already takes separate query and key indices) comes with the generation
issue.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@nnx.jit(static_argnames=("max_new_tokens",))
def _greedy(model, tokens, lengths, max_new_tokens: int, eos_id):
    # tokens [B, N] right-padded; lengths [B]: how many are filled.
    batch, size = tokens.shape
    positions = jnp.arange(size)[None, :]

    def step(i, state):
        tokens, lengths, done = state
        mask = (positions < lengths[:, None]).astype(jnp.int32)
        logits = model(tokens, attention_mask=mask)  # [B, N, V]
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
        next_token = jnp.argmax(last, axis=-1).astype(tokens.dtype)
        write = ~done
        tokens = jnp.where((positions == lengths[:, None]) & write[:, None], next_token[:, None], tokens)
        done = done | (next_token == eos_id)
        return tokens, lengths + write.astype(lengths.dtype), done

    done = jnp.zeros((batch,), bool)
    tokens, lengths, _ = jax.lax.fori_loop(0, max_new_tokens, step, (tokens, lengths, done))
    return tokens, lengths


def greedy_generate(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int = -1, pad_id: int = 0) -> list[list[int]]:
    """Returns each prompt's continuation (without the prompt), stopping after `eos_id`."""
    size = max(len(p) for p in prompts) + max_new_tokens
    tokens = np.full((len(prompts), size), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    lengths = np.array([len(p) for p in prompts], np.int32)
    out, new_lengths = _greedy(model, jnp.asarray(tokens), jnp.asarray(lengths), max_new_tokens, eos_id)
    out, new_lengths = np.asarray(out), np.asarray(new_lengths)
    return [out[row, len(p): new_lengths[row]].tolist() for row, p in enumerate(prompts)]
