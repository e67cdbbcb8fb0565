"""Batched text generation with a KV cache: one prefill of the prompts, then one token per step.

    generate(model, [ids, ...], max_new_tokens=32)                          # greedy
    generate(model, prompts, 32, temperature=0.7, top_p=0.9, seed=0)        # sampling

Prompts of different lengths are batched left-padded, so every row writes the same cache slot at
each step; position ids count each row's real tokens, so padding changes nothing. Rows stop after
EOS. The whole loop is one jitted `fori_loop` (one compile per batch shape). `use_cache=False`
recomputes the full sequence at every step instead: the reference the cache is tested against.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample_logits(logits, key, temperature: float, top_k: int, top_p: float):
    """Next tokens [B] from last-position logits [B, V]: greedy at temperature 0, else sampled
    after top-k and nucleus (top-p) filtering."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop_sorted = (cumulative - jax.nn.softmax(sorted_logits, axis=-1)) >= top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


@partial(nnx.jit, static_argnames=("max_new_tokens", "temperature", "top_k", "top_p"))
def _generate_cached(model, tokens, mask, key, eos_id, max_new_tokens: int, temperature: float, top_k: int,
                     top_p: float):
    # tokens, mask [B, P]: left-padded prompts. Returns the new tokens [B, max_new_tokens] and how many
    # of them each row keeps (up to and including its EOS).
    batch, prompt_length = tokens.shape
    cache = model.init_cache(batch, prompt_length + max_new_tokens)
    logits, cache = model.decode(tokens, cache, attention_mask=mask, last_only=True)
    first = sample_logits(logits[:, 0], jax.random.fold_in(key, 0), temperature, top_k, top_p).astype(tokens.dtype)
    out = jnp.zeros((batch, max_new_tokens), tokens.dtype).at[:, 0].set(first)

    def step(i, state):  # feeds token i-1, samples token i
        out, cache, done, kept = state
        logits, cache = model.decode(jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1), cache)
        next_token = sample_logits(logits[:, 0], jax.random.fold_in(key, i), temperature, top_k, top_p)
        out = out.at[:, i].set(next_token.astype(out.dtype))
        kept = kept + (~done).astype(kept.dtype)
        return out, cache, done | (next_token == eos_id), kept

    done = first == eos_id
    kept = jnp.ones((batch,), jnp.int32)
    out, _, _, kept = jax.lax.fori_loop(1, max_new_tokens, step, (out, cache, done, kept))
    return out, kept


@partial(nnx.jit, static_argnames=("max_new_tokens", "temperature", "top_k", "top_p"))
def _generate_recomputed(model, tokens, lengths, key, eos_id, max_new_tokens: int, temperature: float, top_k: int, top_p: float):
    # tokens [B, N] right-padded; lengths [B]: how many are filled.
    batch, size = tokens.shape
    positions = jnp.arange(size)[None, :]

    def step(i, state):
        tokens, lengths, done = state
        mask = (positions < lengths[:, None]).astype(jnp.int32)
        logits = model(tokens, attention_mask=mask)  # [B, N, V]
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, V]
        next_token = sample_logits(last, jax.random.fold_in(key, i), temperature, top_k, top_p).astype(tokens.dtype)
        write = ~done
        tokens = jnp.where((positions == lengths[:, None]) & write[:, None], next_token[:, None], tokens)
        done = done | (next_token == eos_id)
        return tokens, lengths + write.astype(lengths.dtype), done

    done = jnp.zeros((batch,), bool)
    tokens, lengths, _ = jax.lax.fori_loop(0, max_new_tokens, step, (tokens, lengths, done))
    return tokens, lengths


def generate(model, prompts: list[list[int]], max_new_tokens: int, *, eos_id: int = -1, pad_id: int = 0,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             use_cache: bool = True, pad_to: int = 0) -> list[list[int]]:
    """Each prompt's continuation (without the prompt), ending at `eos_id` (included) if it comes.
    pad_to: left-pad the prompts to at least this many tokens (so that batches of different prompt
    lengths share one compiled shape)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (an empty prompt has nothing to continue)")
    if max_new_tokens < 1:
        return [[] for _ in prompts]
    sampling = (float(temperature), int(top_k), float(top_p))
    if use_cache:
        longest = max(pad_to, *(len(p) for p in prompts))
        tokens = np.full((len(prompts), longest), pad_id, np.int32)
        mask = np.zeros((len(prompts), longest), np.int32)
        for row, prompt in enumerate(prompts):
            tokens[row, longest - len(prompt):] = prompt
            mask[row, longest - len(prompt):] = 1
        out, kept = _generate_cached(model, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(seed),
                                     jnp.int32(eos_id), max_new_tokens, *sampling)
        out, kept = np.asarray(out), np.asarray(kept)
        return [out[row, : kept[row]].tolist() for row in range(len(prompts))]
    size = max(len(p) for p in prompts) + max_new_tokens
    tokens = np.full((len(prompts), size), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    lengths = np.array([len(p) for p in prompts], np.int32)
    out, new_lengths = _generate_recomputed(model, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(seed),
                                            jnp.int32(eos_id), max_new_tokens, *sampling)
    out, new_lengths = np.asarray(out), np.asarray(new_lengths)
    return [out[row, len(p): new_lengths[row]].tolist() for row, p in enumerate(prompts)]


def greedy_generate(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int = -1, pad_id: int = 0) -> list[list[int]]:
    return generate(model, prompts, max_new_tokens, eos_id=eos_id, pad_id=pad_id)


def prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a plain-text prompt as training saw the start of a document: with BOS first when
    the tokenizer adds one (Llama, Gemma), and nothing else the tokenizer might append (EOS)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]:
        return [bos, *ids]
    return ids


def chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation rendered with the tokenizer's own chat template, ready for the
    assistant's reply."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template already holds BOS if any
