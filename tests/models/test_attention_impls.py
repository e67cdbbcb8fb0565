"""Every attention implementation that runs on CPU matches reference_attention on each mask feature
(causal, left/right padding, packed segments, sliding windows, GQA/MQA, soft-capping, KV-cache
queries), in float32 and bfloat16, gradients included; whole tiny models give the "xla" logits.

"jax" is jax.nn.dot_product_attention's XLA path: it receives the same arguments as "cudnn", so
these tests check the translation cuDNN is given (its kernel itself needs an NVIDIA GPU). "splash"
runs the real Pallas kernel in interpret mode on CPU (slow, hence length 128 and few cases).
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft.models import attention as attn
from jaxft.models import attention_kernels as attn_kernels
from jaxft.testing import padded_batch, tiny_hf_model

CPU_IMPLS = ["jax", "splash"]
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
LENGTH = 128  # splash needs a multiple of 128


def make_case(case: str, batch: int = 2, length: int = LENGTH):
    """(attention_mask, segment_ids) [B, T] for a named mask feature."""
    valid = np.ones((batch, length), np.int32)
    segments = np.zeros((batch, length), np.int32)
    if case == "left_padding":
        valid[0, : length // 4] = 0
        valid[1, :3] = 0
    elif case == "right_padding":
        valid[0, length - length // 3:] = 0
        valid[1, -1] = 0
    elif case == "packed":  # three documents then right padding in row 0; two in row 1
        segments[0] = np.repeat([1, 2, 3, 0], [40, 30, 50, 8])
        valid[0, -8:] = 0
        segments[1] = np.repeat([5, 6], [77, 51])
    return jnp.asarray(valid), jnp.asarray(segments)


def qkv(batch=2, length=LENGTH, heads=4, kv_heads=2, head_dim=16, dtype=jnp.float32, kv_length=None, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (batch, kv_length or length, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (batch, kv_length or length, kv_heads, head_dim), jnp.float32).astype(dtype)
    return q, k, v


def compare(impl, q, k, v, mask, window, softcap=None, tol=1e-5):
    """Kernel vs reference on rows whose query is a real token (padding rows are don't-care)."""
    assert attn.fallback_reason(impl, q, k, v, mask, window, softcap) is None, "the kernel must run, not the reference"
    scale = q.shape[-1] ** -0.5
    got = attn.attention(q, k, v, mask, window, scale, impl, softcap=softcap)
    want = attn.reference_attention(q, k, v, mask, window, scale, softcap=softcap)
    assert got.shape == want.shape and got.dtype == want.dtype
    real = np.asarray(mask.kv_valid if q.shape[1] == k.shape[1] else jnp.ones(q.shape[:2], bool))
    diff = np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32))[real]
    assert np.isfinite(np.asarray(got, np.float32)).all()
    assert diff.max() <= tol, f"{impl}: max |diff| {diff.max():.3g} > {tol}"


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("case", ["causal", "left_padding", "right_padding", "packed"])
@pytest.mark.parametrize("window", [None, 9])
def test_mask_features_match_the_reference_in_float32(impl, case, window):
    valid, segments = make_case(case)
    q, k, v = qkv()
    mask = attn.MaskInfo.for_sequence(2, LENGTH, valid, segments)
    compare(impl, q, k, v, mask, window)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("case", ["left_padding", "packed"])
def test_bfloat16_matches_within_bfloat16_tolerance(impl, case):
    valid, segments = make_case(case)
    q, k, v = qkv(dtype=jnp.bfloat16)
    compare(impl, q, k, v, attn.MaskInfo.for_sequence(2, LENGTH, valid, segments), 17, tol=TOL[jnp.bfloat16])


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 1), (6, 2)])
def test_grouped_and_multi_query_heads(impl, heads, kv_heads):
    valid, segments = make_case("left_padding")
    q, k, v = qkv(heads=heads, kv_heads=kv_heads)
    compare(impl, q, k, v, attn.MaskInfo.for_sequence(2, LENGTH, valid, segments), None)


def test_splash_soft_capping_matches_and_jax_falls_back():
    valid, segments = make_case("packed")
    q, k, v = qkv()
    q = q * 4.0  # scores big enough for the cap to matter
    mask = attn.MaskInfo.for_sequence(2, LENGTH, valid, segments)
    compare("splash", q, k, v, mask, 33, softcap=5.0)
    assert "soft-capping" in attn.fallback_reason("jax", q, k, v, mask, None, 5.0)
    assert "soft-capping" in attn.fallback_reason("cudnn", q, k, v, mask, None, 5.0) or \
        "GPU" in attn.fallback_reason("cudnn", q, k, v, mask, None, 5.0)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_gradients_match_the_reference(impl):
    valid, segments = make_case("packed")
    q, k, v = qkv(heads=4, kv_heads=2)
    mask = attn.MaskInfo.for_sequence(2, LENGTH, valid, segments)
    weight = jnp.asarray(valid, jnp.float32)[:, :, None, None]  # a loss that ignores padding rows

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v) * weight).sum()

    scale = q.shape[-1] ** -0.5
    got = jax.grad(loss(lambda q, k, v: attn.attention(q, k, v, mask, 9, scale, impl)), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(lambda q, k, v: attn.reference_attention(q, k, v, mask, 9, scale)), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        assert np.abs(np.asarray(g) - np.asarray(w)).max() <= 1e-4


def test_traced_window_jax_uses_a_mask_and_splash_falls_back():
    """A caller that scans windows (the decoder no longer does: layer_groups.py) passes a traced one:
    "jax" folds it into its mask, splash (static masks only) says why it cannot and the dispatcher
    runs the reference."""
    valid, segments = make_case("right_padding")
    q, k, v = qkv()
    mask = attn.MaskInfo.for_sequence(2, LENGTH, valid, segments)
    scale = q.shape[-1] ** -0.5
    reasons = {}

    @jax.jit
    def run(window):
        for impl in CPU_IMPLS:
            reasons[impl] = attn.fallback_reason(impl, q, k, v, mask, window)
        return [attn.attention(q, k, v, mask, window, scale, impl) for impl in CPU_IMPLS]

    want = attn.reference_attention(q, k, v, mask, 7, scale)
    real = np.asarray(valid, bool)
    for got in run(jnp.int32(7)):
        assert np.abs(np.asarray(got - want))[real].max() <= 1e-5
    assert reasons["jax"] is None
    assert "traced" in reasons["splash"]


def test_kv_cache_queries_jax_runs_fused_kernels_fall_back():
    """Queries shorter than keys, at their own indices (a cache step): q_index is not kv_index."""
    batch, new, size = 2, 3, 16
    q, k, v = qkv(length=new, kv_length=size)
    valid = jnp.asarray(np.arange(size)[None] < np.array([[12], [9]]))  # slots written so far
    valid = valid.at[0, :2].set(False)  # left padding in row 0
    q_index = jnp.broadcast_to(jnp.arange(6, 6 + new, dtype=jnp.int32), (batch, new))
    kv_index = jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), (batch, size))
    mask = attn.MaskInfo(q_index, kv_index, jnp.zeros((batch, new), jnp.int32), jnp.zeros((batch, size), jnp.int32),
                         valid)
    for window in (None, 4):
        compare("jax", q, k, v, mask, window)
    for impl in ("splash", "cudnn"):
        assert attn.fallback_reason(impl, q, k, v, mask, None) is not None
        got = attn.attention(q, k, v, mask, 4, 0.25, impl)
        np.testing.assert_allclose(got, attn.reference_attention(q, k, v, mask, 4, 0.25), atol=0)


def test_splash_shards_rows_and_heads_under_a_mesh():
    from jaxft import sharding

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    valid, segments = make_case("left_padding", batch=4)
    q, k, v = qkv(batch=4, heads=4, kv_heads=2)
    mask = attn.MaskInfo.for_sequence(4, LENGTH, valid, segments)
    with sharding.activate(mesh):
        got = jax.jit(lambda q, k, v: attn.attention(q, k, v, mask, 9, 0.25, "splash"))(q, k, v)
    want = attn.reference_attention(q, k, v, mask, 9, 0.25)
    assert np.abs(np.asarray(got - want))[np.asarray(valid, bool)].max() <= 1e-5


needs_cuda = pytest.mark.skipif(not attn_kernels.on_cuda_gpu(), reason="cuDNN needs an NVIDIA GPU: run with "
                                "JAX_PLATFORMS=cuda pytest tests/models/test_attention_impls.py -k cudnn")


@needs_cuda
@pytest.mark.parametrize("case", ["causal", "left_padding", "right_padding", "packed"])
@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1)])
def test_cudnn_matches_the_reference_on_a_gpu(case, window, heads, kv_heads):
    valid, segments = make_case(case)
    q, k, v = qkv(heads=heads, kv_heads=kv_heads, head_dim=64, dtype=jnp.bfloat16)
    mask = attn.MaskInfo.for_sequence(2, LENGTH, valid, segments)
    compare("cudnn", q, k, v, mask, window, tol=TOL[jnp.bfloat16])
    # the traced window of the decoder's layer scan, and gradients
    scale = 0.125
    weight = jnp.asarray(valid, jnp.float32)[:, :, None, None]

    def loss(impl):
        return jax.jit(jax.value_and_grad(
            lambda q, k, v, w: (attn.attention(q, k, v, mask, w, scale, impl).astype(jnp.float32) * weight).sum(),
            argnums=(0, 1, 2)))

    w = jnp.int32(window or attn.NO_WINDOW)
    (got_loss, got), (want_loss, want) = loss("cudnn")(q, k, v, w), loss("xla")(q, k, v, w)
    assert abs(float(got_loss) - float(want_loss)) <= 1e-2 * max(1.0, abs(float(want_loss)))
    for g, r in zip(got, want):
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        assert np.abs(g - r).max() <= 5e-2 * max(1.0, np.abs(r).max())


@pytest.mark.skipif(attn_kernels.on_cuda_gpu(), reason="on a GPU cuDNN runs")
def test_cudnn_falls_back_on_cpu_with_a_logged_reason(caplog, monkeypatch):
    monkeypatch.setattr(attn, "_LOGGED", set())
    q, k, v = qkv(length=8)
    mask = attn.MaskInfo.for_sequence(2, 8)
    with caplog.at_level(logging.WARNING, logger="jaxft.attention"):
        got = attn.attention(q, k, v, mask, None, 0.25, "cudnn")
    np.testing.assert_array_equal(got, attn.reference_attention(q, k, v, mask, None, 0.25))
    assert "'cudnn' falls back" in caplog.text and "NVIDIA GPU" in caplog.text


def test_auto_resolves_per_backend_and_unknown_names_list_the_choices():
    assert attn.resolve_implementation("auto") == "xla"  # these tests run on CPU
    assert attn.resolve_implementation("auto", backend="tpu") == "splash"
    assert attn.resolve_implementation("auto", dtype=jnp.float32, backend="cpu") == "xla"
    assert attn.resolve_implementation("splash") == "splash"
    with pytest.raises(ValueError, match=r"'flash'.*auto.*xla.*jax.*cudnn.*splash"):
        attn.resolve_implementation("flash")
    q, k, v = qkv(length=8)
    with pytest.raises(ValueError, match="choose one of"):
        attn.attention(q, k, v, attn.MaskInfo.for_sequence(2, 8), None, 0.25, "flash")


def test_config_key_defaults_to_auto_and_rejects_unknown_names():
    from jaxft import config as config_lib

    config = config_lib.default_config()
    assert config.model.attention == "auto"
    config.model.path = "somewhere"
    config.model.attention = "flash"
    with pytest.raises(ValueError, match="model.attention"):
        config_lib.validate(config)


@pytest.mark.parametrize("case", ["llama3_rope", "mistral_sliding"])
def test_whole_model_logits_match_xla(tmp_path, case, caplog, monkeypatch):
    """A tiny model with each CPU implementation set gives the "xla" logits at every real token,
    with the kernel really running in every layer (mixed windows: test_mixed_windows.py)."""
    folder, _ = tiny_hf_model(tmp_path, case)
    model = jaxft.from_pretrained(folder)
    assert attn.set_attention_implementation(model, "auto") == "xla"
    assert model.model.layers.self_attn.implementation == "xla"
    ids, mask, _ = padded_batch(model.config.vocab_size, batch=3, length=LENGTH)
    want = np.asarray(model(ids, attention_mask=mask))
    real = mask.astype(bool)
    for impl in CPU_IMPLS:
        monkeypatch.setattr(attn, "_LOGGED", set())
        caplog.clear()
        assert attn.set_attention_implementation(model, impl) == impl
        with caplog.at_level(logging.WARNING, logger="jaxft.attention"), attn.record_dispatch() as record:
            got = np.asarray(jax.jit(lambda ids, mask: model(ids, attention_mask=mask))(ids, mask))
        assert np.abs(got - want)[real].max() <= 1e-5, impl
        assert not [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
        assert not record.fallbacks and record.kernels == {impl: 1}, record  # one scanned layer body
    segments = np.repeat([[1, 2]], 3, 0).repeat(LENGTH // 2, 1)  # packed rows, through the "jax" kernel
    attn.set_attention_implementation(model, "xla")
    want = np.asarray(model(ids, segment_ids=segments))
    attn.set_attention_implementation(model, "jax")
    np.testing.assert_allclose(np.asarray(model(ids, segment_ids=segments)), want, atol=1e-5)
