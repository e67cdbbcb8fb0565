"""Fused attention kernels behind `attention.attention(..., implementation=NAME)`.

    jax     jax.nn.dot_product_attention, XLA path: any backend; the CPU-testable twin of `cudnn`
            (same argument translation, so CPU parity tests check what cuDNN is asked to do)
    cudnn   jax.nn.dot_product_attention(implementation="cudnn"): NVIDIA GPUs, bfloat16/float16
    splash  Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention): TPU; off TPU
            it runs in Pallas interpret mode, slowly, which is how CPU tests check it

Each kernel first says, at trace time, whether it can express a call exactly: `unsupported(...)`
returns the reason it cannot (or None), and the dispatcher then runs the reference and logs the
reason once. No kernel is ever asked to approximate a mask.

How MaskInfo maps onto each kernel:

    feature               jax / cudnn                               splash
    causal by index       is_causal (full sequence only)            CausalMask (full sequence only)
    KV cache (T != S)     jax: in the boolean mask; cudnn: falls back  falls back
    padding (kv_valid)    boolean mask [B, 1, T, S]                 segment ids (see _splash_segments)
    packed segments       boolean mask                              SegmentIds
    window (static int)   local_window_size                         LocalMask
    window (traced)       boolean mask                              falls back (masks are static)
    GQA (K < H heads)     native                                    native
    softcap (Gemma 2)     falls back                                attn_logits_soft_cap

"Full sequence" is the forward pass without a cache, recognised by `q_index is kv_index`: the one
array MaskInfo.for_sequence puts in both fields (indices 0..T-1). A cache builds two arrays, so its
calls never take the causal shortcut, whose tile-relative diagonal would be wrong there.

The decoder scans its layers in groups whose windows repeat (layer_groups.py), so every layer's
window arrives here as a Python int or None and takes the static `local_window_size` / LocalMask
paths; a traced window (a caller that scans windows itself) gets the "jax" boolean mask, and
splash falls back.

Rows whose query is padding are "don't care": the fused kernels return finite values there that
differ from the reference's (uniform attention); training masks those rows out of the loss.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxft.models import layers


class Kernel(NamedTuple):
    unsupported: Callable[..., str | None]  # (q, k, v, mask, window, softcap) -> why not, or None
    run: Callable[..., jnp.ndarray]  # (q, k, v, mask, window, scale, softcap) -> [B, T, H, D]


def full_sequence(mask, q, k) -> bool:
    """Queries are the keys, at indices 0..T-1 (a forward pass without a KV cache)."""
    return mask.q_index is mask.kv_index and q.shape[1] == k.shape[1]


def static_window(window, length: int) -> tuple[bool, int | None]:
    """(known at trace time, window as a Python int or None = unlimited)."""
    if window is None:
        return True, None
    if isinstance(window, jax.core.Tracer):
        return False, None
    window = int(window)
    return True, (None if window >= length else window)


def on_cuda_gpu() -> bool:
    if jax.default_backend() != "gpu":
        return False
    try:
        return "cuda" in jax.devices()[0].client.platform_version.lower()
    except AttributeError:  # older jaxlib without Device.client: assume the common case
        return True


# --- jax.nn.dot_product_attention: "jax" (XLA) and "cudnn" -----------------------------------------

def _nn_unsupported(implementation: str):
    def unsupported(q, k, v, mask, window, softcap):
        if softcap is not None:
            return "attention soft-capping (Gemma 2) is not in jax.nn.dot_product_attention"
        if implementation != "cudnn":
            return None
        if not on_cuda_gpu():
            return f"cuDNN attention needs an NVIDIA GPU (backend: {jax.default_backend()})"
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            return f"cuDNN attention needs bfloat16 or float16 inputs, got {q.dtype}"
        if not full_sequence(mask, q, k):
            return "queries against a KV cache (q_index is not kv_index)"
        head_dim = q.shape[-1]
        capability = getattr(jax.devices()[0], "compute_capability", "9.0")
        limit = 256 if tuple(int(x) for x in capability.split(".")) >= (9, 0) else 128  # Hopper+ : older
        if head_dim % 8 or head_dim > limit:
            return f"cuDNN attention needs head_dim <= {limit} and a multiple of 8 on this GPU, got {head_dim}"
        if q.shape[1] % 2:  # cuDNN's backward with a bias/mask needs even lengths
            return f"cuDNN attention with a mask needs an even sequence length, got {q.shape[1]}"
        return None

    return unsupported


def _nn_run(implementation: str):
    def run(q, k, v, mask, window, scale, softcap=None):
        causal = full_sequence(mask, q, k)
        known, static = static_window(window, k.shape[1])
        # Only what the flags cannot say goes into the dense mask, so that on CPU the "jax" parity
        # tests check the flags' meaning (is_causal, local_window_size), not just a mask we built.
        allowed = mask.same_segment() & mask.kv_valid[:, None, :]  # [B, T, S]
        distance = mask.q_index[:, :, None] - mask.kv_index[:, None, :]
        if not causal:
            allowed &= distance >= 0
        use_local = causal and known and static is not None
        if not known:
            allowed &= distance < window
        elif static is not None and not use_local:
            allowed &= distance < static
        return jax.nn.dot_product_attention(
            q, k, v, mask=allowed[:, None], scale=scale, is_causal=causal,
            # jax.nn's window is inclusive (left, right); ours counts the query itself: distance < window.
            local_window_size=(static - 1, 0) if use_local else None, implementation=implementation)

    return run


# --- Pallas splash attention ------------------------------------------------------------------------

SPLASH_BLOCKS = (512, 256, 128)  # largest that divides the length; kv blocks must be multiples of 128


def _splash_unsupported(q, k, v, mask, window, softcap):
    if not full_sequence(mask, q, k):
        return "queries against a KV cache (q_index is not kv_index)"
    if mask.kv_shared:
        return "virtual tokens shared by packed segments (prompt tuning with packing)"
    known, _ = static_window(window, q.shape[1])
    if not known:
        return "the sliding window is a traced (per-layer scanned) value; splash masks are static"
    if q.shape[1] % SPLASH_BLOCKS[-1]:
        return f"splash attention needs a sequence length that is a multiple of 128, got {q.shape[1]}"
    return None


def _splash_segments(mask) -> jnp.ndarray:
    """[B, T] ids that fold padding into segments: real tokens of segment s get 2s, padding 2s + 1.

    A real query then sees only real keys of its own document; a padding query sees padding keys
    (itself at least), so no row is empty, which splash requires (its softmax would divide by 0).
    """
    segment = mask.kv_segment.astype(jnp.int32)
    return jnp.where(mask.kv_valid, 2 * segment, 2 * segment + 1)


def _splash_run(q, k, v, mask, window, scale, softcap=None):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    length = q.shape[1]
    _, static = static_window(window, length)
    block = next(b for b in SPLASH_BLOCKS if length % b == 0)
    interpret = jax.default_backend() != "tpu"

    def per_shard(q, k, v, segments):  # q [b, T, h, D], k/v [b, T, k, D], segments [b, T]
        heads = q.shape[2]
        if static is None:
            head_mask = splash.CausalMask((length, length))
        else:
            head_mask = splash.LocalMask((length, length), window_size=(static - 1, 0), offset=0)
        sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                  block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
        # Built per trace: the kernel holds its mask tables as arrays of the trace that made it.
        kernel = splash.make_splash_mha(splash.MultiHeadMask([head_mask] * heads), block_sizes=sizes, head_shards=1,
                                        q_seq_shards=1, attn_logits_soft_cap=softcap, interpret=interpret)

        def one_row(q, k, v, ids):  # the kernel is per sequence: q [h, T, D], k/v [k, T, D]
            return kernel(q, k, v, segment_ids=splash.SegmentIds(q=ids, kv=ids))

        heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
        out = jax.vmap(one_row)(heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k), heads_first(v), segments)
        return heads_first(out)

    return _per_device(per_shard, q, k, v, _splash_segments(mask))


def _per_device(fn, q, k, v, segments):
    """Runs `fn` on each device's slice under the active jaxft mesh (shard_map), else directly.

    A Pallas kernel is opaque to XLA's partitioner, which would gather its inputs onto every
    device; under shard_map each device runs it on its own rows (and heads, when both q and kv
    heads split evenly, keeping GQA groups whole on a device).
    """
    to_sharding = layers._LOGICAL_TO_SPEC.get()  # set by jaxft.sharding.activate
    if to_sharding is None:
        return fn(q, k, v, segments)
    from jax.sharding import PartitionSpec as P

    q_sharding = to_sharding((layers.Axis.BATCH, layers.Axis.SEQ, layers.Axis.HEADS, None), q.shape)
    k_sharding = to_sharding((layers.Axis.BATCH, layers.Axis.SEQ, layers.Axis.KV_HEADS, None), k.shape)
    rows = q_sharding.spec[0]
    heads = q_sharding.spec[2] if q_sharding.spec[2] == k_sharding.spec[2] else None
    q_spec, kv_spec = P(rows, None, heads, None), P(rows, None, heads, None)
    return jax.shard_map(fn, mesh=q_sharding.mesh, in_specs=(q_spec, kv_spec, kv_spec, P(rows, None)),
                         out_specs=q_spec, check_vma=False)(q, k, v, segments)


KERNELS: dict[str, Kernel] = {
    "jax": Kernel(_nn_unsupported("xla"), _nn_run("xla")),
    "cudnn": Kernel(_nn_unsupported("cudnn"), _nn_run("cudnn")),
    "splash": Kernel(_splash_unsupported, _splash_run),
}
