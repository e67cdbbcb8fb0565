"""Token-level loss formulas that objectives share: cross-entropy sums, over the whole sequence or
in chunks that never hold [B, T, V] logits. Objectives (jaxft.tasks.*) compose them; they take
the model and a batch of the data pipeline's keys (see jaxft.data).

    nll, z = cross_entropy_sums(forward(model, batch), batch["targets"], batch["loss_mask"], z_loss=1e-4)
    nll, z = chunked_cross_entropy_sums(model, hidden_states(model, batch), targets, mask, 1e-4, chunk=512)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.models import layers


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
    def one_chunk(sums, h, t, m):
        nll, z = cross_entropy_sums(model.logits(h), t, m, z_loss)
        return sums[0] + nll, sums[1] + z

    zero = jnp.zeros((), jnp.float32)
    return over_chunks(one_chunk, (zero, zero), chunk, hidden, targets, loss_mask)


def over_chunks(fn, init, chunk: int, hidden, *arrays):
    """Folds `fn(carry, hidden_chunk, *array_chunks) -> carry` over sequence chunks of `chunk`
    tokens ([N, T, ...] arrays split on T), each chunk rematerialized in the backward pass.

    With the sequence split over c context shards, each step takes `chunk` tokens from every shard
    (a [N, c·chunk] piece, still split c ways) rather than c·chunk tokens of one shard, which would
    gather them onto every device; `fn` must not depend on the tokens' order (sums do not)."""
    rows, length = hidden.shape[:2]
    shards = _sequence_shards(hidden)
    if length % (chunk * shards):
        raise ValueError(f"loss chunk {chunk} does not divide the sequence length {length}" if shards == 1 else
                         f"loss chunk {chunk} does not divide the {length // shards} tokens of each of the "
                         f"{shards} context shards of the sequence length {length}")
    steps = length // (chunk * shards)

    def split(x):  # [N, T, ...] → [steps, N, shards·chunk, ...]: step i takes the i-th chunk of every shard
        x = x.reshape(rows, shards, steps, chunk, *x.shape[2:])
        return jnp.moveaxis(x, 2, 0).reshape(steps, rows, shards * chunk, *x.shape[4:])

    @jax.checkpoint
    def body(carry, xs):
        return fn(carry, *xs), None

    carry, _ = jax.lax.scan(body, init, (split(hidden), *map(split, arrays)))
    return carry


def _sequence_shards(hidden) -> int:
    """How many ways the active mesh splits the sequence of `hidden` [N, T, D] (1: no mesh)."""
    to_sharding = layers._LOGICAL_TO_SPEC.get()
    if to_sharding is None:
        return 1
    sharded = to_sharding((layers.Axis.BATCH, layers.Axis.SEQ, layers.Axis.EMBED), hidden.shape)
    seq = sharded.spec[1]
    names = () if seq is None else (seq,) if isinstance(seq, str) else tuple(seq)
    return int(np.prod([sharded.mesh.shape[n] for n in names])) if names else 1


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

    def one_chunk(sums, h, t, *ms):
        log_probs = token_log_probs(model.logits(h), t)
        return tuple(s + (log_probs * m).sum(-1) for s, m in zip(sums, ms))

    zeros = tuple(jnp.zeros((hidden.shape[0],), jnp.float32) for _ in masks)
    return over_chunks(one_chunk, zeros, chunk, hidden, targets, *masks)
