"""Context parallelism: attention over a sequence split across devices (the `context` mesh axis).

When the active rules (jaxft.sharding) map the logical `seq` axis onto a mesh axis, every
activation of the decoder holds T / c tokens per device (c = the size of that axis): the norms,
projections, MLPs and the loss are per token and need nothing more. Attention is the one place
where a token needs the others, and it is computed here, exactly, under shard_map:

    each device: q [b, T/c, h, D] (its own queries) and k, v [b, T/c, k, D] (its own keys)
    all-gather k, v and the key side of the mask over the context axis → [b, T, k, D]
    attend its T/c queries to all T keys with the ordinary kernel and the ordinary MaskInfo

Why all-gathered keys/values rather than ring attention (ppermute of K/V blocks with an online
softmax): with grouped-query attention the keys and values are small — Llama-3-8B keeps 8 KV
heads of 128, 4 KiB per token per layer in bf16, so 128 MiB for a whole 32k sequence, against
the 16 GiB of a v5e chip — and an all-gather moves the same bytes a full ring does. In exchange
the mask stays the ordinary one: causality, sliding windows, packed segments and padding are
read off the global token indices and the gathered key ids (no per-step mask bookkeeping, no
hand-written backward: autodiff turns the all-gather into a reduce-scatter of dK, dV), and the
fused kernels run unchanged on a (T/c × T) problem. The Llama 3 paper makes the same choice for
the same reasons (its §3.3.2). Ring attention would win only where K/V are large (multi-head
attention, no GQA) or where the all-gather cannot be overlapped; neither holds for the families
jaxft trains. What is not done: load balancing of causal work (the last shard's queries see the
most keys; Llama 3 splits the sequence into 2c chunks and pairs them) — a fused kernel's skipped
blocks make the shards' compute unequal, the XLA reference computes every block anyway.

Queries stay at their global index (`mask.q_index` arrives sharded, so shard i's first query is
at i·T/c), which is where the causal/window offset across shards comes from; RoPE positions are
made from the global sequence before the decoder's layers, so they are global too. The loss is a
sum over tokens divided by the global batch's token count (jaxft.step), unchanged.

Kernels inside a shard: "xla" (the reference) and "jax" (jax.nn.dot_product_attention with a
dense [T/c, T] mask) run as they are; "splash" runs with its causal / local mask offset by the
shard's first index (one kernel per shard index, picked with lax.switch, because splash masks are
static); "cudnn" cannot take a query offset and falls back to the reference, logged.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxft.models import attention as attn_lib
from jaxft.models import layers
from jaxft.models.attention_kernels import SPLASH_BLOCKS, _splash_segments, full_sequence, static_window


class Layout(NamedTuple):
    """How the active mesh splits attention's inputs: mesh axes of rows, sequence, heads."""

    mesh: jax.sharding.Mesh
    rows: object  # PartitionSpec entry of the batch dimension
    seq: str | tuple[str, ...]  # mesh axis (or axes) the sequence is split over
    heads: object  # PartitionSpec entry of the heads (None unless q and kv heads split alike)

    @property
    def shards(self) -> int:
        names = (self.seq,) if isinstance(self.seq, str) else self.seq
        size = 1
        for name in names:
            size *= self.mesh.shape[name]
        return size


def layout(q, k, mask) -> Layout | None:
    """The context-parallel layout of this attention call, or None when the sequence is not split
    (no mesh active, no context axis, a length it does not divide, or queries against a KV cache)."""
    to_sharding = layers._LOGICAL_TO_SPEC.get()  # set by jaxft.sharding.activate
    if to_sharding is None or not full_sequence(mask, q, k):
        return None
    q_spec = to_sharding((layers.Axis.BATCH, layers.Axis.SEQ, layers.Axis.HEADS, None), q.shape).spec
    k_sharding = to_sharding((layers.Axis.BATCH, layers.Axis.SEQ, layers.Axis.KV_HEADS, None), k.shape)
    k_spec = k_sharding.spec
    if q_spec[1] is None or q_spec[1] != k_spec[1]:
        return None
    heads = q_spec[2] if q_spec[2] == k_spec[2] else None
    return Layout(k_sharding.mesh, q_spec[0], q_spec[1], heads)


def attention(q, k, v, mask, window, scale: float, implementation: str, softcap: float | None, where: Layout):
    """attention.attention(...) for a sequence split as `where` says: q [B, T, H, D], k, v [B, T, K, D]
    (global shapes, sharded) → [B, T, H, D] sharded like q."""

    traced_window = isinstance(window, jax.core.Tracer)  # a per-layer window scanned by the decoder

    def per_shard(q, k, v, q_index, q_segment, kv_index, kv_segment, kv_valid, *maybe_window):
        layer_window = maybe_window[0] if traced_window else window
        gather = lambda x: jax.lax.all_gather(x, where.seq, axis=1, tiled=True)  # noqa: E731  [b, T/c, ..] → [b, T, ..]
        local = attn_lib.MaskInfo(q_index, gather(kv_index), q_segment, gather(kv_segment), gather(kv_valid))
        k, v = gather(k), gather(v)
        with layers.logical_sharding(None):  # inside shard_map every array is this device's: no constraints
            if implementation == "splash":
                reason = _splash_reason(q, k, layer_window)
                if reason is None:
                    q_valid = kv_valid  # the full sequence: a query is real where its own key is
                    return _splash(q, k, v, local, q_valid, layer_window, scale, softcap,
                                   jax.lax.axis_index(where.seq), where.shards)
                _log_fallback("splash", reason)
                return attn_lib.reference_attention(q, k, v, local, layer_window, scale, softcap=softcap)
            if implementation == "cudnn":  # its causal flag is tile-relative: it cannot offset the queries
                _log_fallback("cudnn", "a context shard's queries start at an offset, which cuDNN's causal mask "
                                       "cannot take")
                return attn_lib.reference_attention(q, k, v, local, layer_window, scale, softcap=softcap)
            return attn_lib.attention(q, k, v, local, layer_window, scale, implementation, softcap=softcap)

    q_spec, ids = P(where.rows, where.seq, where.heads, None), P(where.rows, where.seq)
    args = (q, k, v, mask.q_index, mask.q_segment, mask.kv_index, mask.kv_segment, mask.kv_valid)
    specs = (q_spec, q_spec, q_spec, ids, ids, ids, ids, ids)
    if traced_window:
        args, specs = (*args, window), (*specs, P())
    return jax.shard_map(per_shard, mesh=where.mesh, in_specs=specs, out_specs=q_spec, check_vma=False)(*args)


def _log_fallback(implementation: str, reason: str) -> None:

    if (implementation, reason) not in attn_lib._LOGGED:  # once per reason per process, as attention() does
        attn_lib._LOGGED.add((implementation, reason))
        attn_lib.log.warning("context-parallel attention %r falls back to the xla reference: %s", implementation, reason)


# --- splash attention with a query offset --------------------------------------------------------

def _splash_reason(q, k, window) -> str | None:
    known, _ = static_window(window, k.shape[1])
    if not known:
        return "the sliding window is a traced (per-layer scanned) value; splash masks are static"
    if q.shape[1] % SPLASH_BLOCKS[-1] or k.shape[1] % SPLASH_BLOCKS[-1]:
        return f"splash needs shard lengths that are multiples of 128, got {q.shape[1]} queries, {k.shape[1]} keys"
    return None


def _splash(q, k, v, mask, q_valid, window, scale, softcap, shard, shards: int):
    """Splash attention of this shard's queries (global indices shard·T/c ...) against all keys.

    Splash masks are static, so each shard index has its kernel (offset = its first query index),
    and lax.switch runs this device's; only that branch executes."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    local_length, length = q.shape[1], k.shape[1]
    _, static = static_window(window, length)
    q_block = next(b for b in SPLASH_BLOCKS if local_length % b == 0)
    kv_block = next(b for b in SPLASH_BLOCKS if length % b == 0)
    interpret = jax.default_backend() != "tpu"
    heads = q.shape[2]
    q_ids = _splash_segments(mask._replace(kv_segment=mask.q_segment, kv_valid=q_valid))
    kv_ids = _splash_segments(mask)
    sizes = splash.BlockSizes(block_q=q_block, block_kv=kv_block, block_kv_compute=kv_block, block_q_dkv=q_block,
                              block_kv_dkv=kv_block, block_kv_dkv_compute=kv_block, block_q_dq=q_block,
                              block_kv_dq=kv_block)
    heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    qh, kh, vh = heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k), heads_first(v)

    def branch(index: int):
        def run(qh, kh, vh, q_ids, kv_ids):
            shape, offset = (local_length, length), index * local_length
            head_mask = splash.CausalMask(shape, offset=offset) if static is None else \
                splash.LocalMask(shape, window_size=(static - 1, 0), offset=offset)
            kernel = splash.make_splash_mha(splash.MultiHeadMask([head_mask] * heads), block_sizes=sizes,
                                            head_shards=1, q_seq_shards=1, attn_logits_soft_cap=softcap,
                                            interpret=interpret)
            one_row = lambda q, k, v, qi, ki: kernel(q, k, v, segment_ids=splash.SegmentIds(q=qi, kv=ki))  # noqa: E731
            return jax.vmap(one_row)(qh, kh, vh, q_ids, kv_ids)

        return run

    out = jax.lax.switch(shard, [branch(i) for i in range(shards)], qh, kh, vh, q_ids, kv_ids)
    return heads_first(out)


def _split_attention(*args):
    return attention(*args)  # looked up when called (tests wrap the module's `attention`)


if not attn_lib._CONTEXT_PARALLEL:
    attn_lib._CONTEXT_PARALLEL.append((layout, _split_attention))
