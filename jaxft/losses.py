"""Token-level loss formulas that objectives share: cross-entropy sums, over the whole sequence or
in chunks that never hold [B, T, V] logits. Objectives (jaxft.tasks.*) compose them; they take
the model and a batch of the data pipeline's keys (see jaxft.data).

    nll, z = cross_entropy_sums(forward(model, batch), batch["targets"], batch["loss_mask"], z_loss=1e-4)
    nll, z = chunked_cross_entropy_sums(model, hidden_states(model, batch), targets, mask, 1e-4, chunk=512)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def forward(model, batch):
    """The model's output for a batch (logits [B, T, V] for a causal LM)."""
    return model(batch["input_ids"], attention_mask=batch.get("attention_mask"), positions=batch.get("positions"),
                 segment_ids=batch.get("segment_ids"))


def hidden_states(model, batch):
    """Final-norm hidden states [B, T, D]: what losses that make their own logits (in chunks) start from."""
    return model.hidden_states(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                               positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))


def cross_entropy_sums(logits, targets, loss_mask, z_loss: float = 0.0):
    """Sums over masked tokens of -log p(target) and of logsumexp² (float32 whatever the logits)."""
    logits = logits.astype(jnp.float32)  # [B, T, V]
    logsumexp = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = loss_mask.astype(jnp.float32)
    nll = (logsumexp - target_logit) * mask
    z = jnp.square(logsumexp) * mask if z_loss else jnp.zeros_like(nll)
    return nll.sum(), z.sum()


def chunked_cross_entropy_sums(model, hidden, targets, loss_mask, z_loss: float, chunk: int):
    """cross_entropy_sums over sequence chunks: each chunk's [B, chunk, V] logits are made, reduced
    and (under remat) recomputed in the backward pass, so full-vocab fp32 logits never coexist."""
    batch, length, _ = hidden.shape
    if length % chunk:
        raise ValueError(f"loss chunk {chunk} does not divide the sequence length {length}")
    split = lambda x: x.reshape(batch, length // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731

    @jax.checkpoint
    def one_chunk(carry, xs):
        h, t, m = xs
        nll, z = cross_entropy_sums(model.logits(h), t, m, z_loss)
        return (carry[0] + nll, carry[1] + z), None

    (nll, z), _ = jax.lax.scan(one_chunk, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)),
                               (split(hidden), split(targets), split(loss_mask)))
    return nll, z


def token_log_probs(logits, targets):
    """log p(target) per token [N, T], in float32 whatever the logits' dtype."""
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return target_logit - jax.nn.logsumexp(logits, axis=-1)


def masked_log_prob_sums(model, batch, masks, chunk: int = 0):
    """Per row, Σ_t mask[t] · log p(targets[t]) for each mask in `masks` ([N, T] each): a tuple of
    [N] sums from one forward pass. With `chunk`, over sequence chunks of that many tokens, so no
    [N, T, V] logits are held (as chunked_cross_entropy_sums)."""
    masks = tuple(m.astype(jnp.float32) for m in masks)
    targets = batch["targets"]
    if not chunk:
        log_probs = token_log_probs(forward(model, batch), targets)  # [N, T]
        return tuple((log_probs * m).sum(-1) for m in masks)
    hidden = hidden_states(model, batch)
    rows, length, _ = hidden.shape
    if length % chunk:
        raise ValueError(f"loss chunk {chunk} does not divide the sequence length {length}")
    split = lambda x: x.reshape(rows, length // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731

    @jax.checkpoint
    def one_chunk(sums, xs):
        h, t, *ms = xs
        log_probs = token_log_probs(model.logits(h), t)
        return tuple(s + (log_probs * m).sum(-1) for s, m in zip(sums, ms)), None

    zeros = tuple(jnp.zeros((rows,), jnp.float32) for _ in masks)
    sums, _ = jax.lax.scan(one_chunk, zeros, (split(hidden), split(targets), *map(split, masks)))
    return sums
