"""Context parallelism (the `context` mesh axis splits the sequence): the same logits, losses and
gradients as one device, with causal masks, packed documents, padding, sliding windows and
soft-capping; and attention's memory per device falls as the context axis grows.

Every batch here puts document and padding boundaries, and sliding windows, across the shard
boundaries (32 tokens on up to 8 shards: 4 per shard, windows of 5), and gives no positions to
the logits test, so the RoPE positions the model counts itself must be global too.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft import optim, sharding, step
from jaxft.models import context_parallel
from jaxft.tasks.causal_lm import NextTokenLoss

MESHES = [{"context": 8}, {"context": 4, "fsdp": 2}, {"context": 2, "data": 4}]
SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
FAMILIES = {
    "llama": dict(model_type="llama", rope_theta=500000.0),
    "mistral_window": dict(model_type="mistral", sliding_window=5),  # one window for all layers: static
    # Mixed sliding/global layers (a window scanned per layer) and soft-capped scores.
    "gemma2_softcap": dict(model_type="gemma2", head_dim=16, query_pre_attn_scalar=20, sliding_window=5,
                           attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
}
CFG = optim.OptimConfig(name="adamw", learning_rate=1e-3, schedule="constant", total_steps=10, clip_norm=1.0)


def packed_batch(vocab: int, rows: int = 8, length: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of 1-3 packed documents, right- or left-padded, with next-token targets; positions
    restart at each document; no target across a document boundary or on padding."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, (rows, length + 1)).astype(np.int32)
    segments = np.zeros((rows, length), np.int32)
    attention = np.ones((rows, length), np.int32)
    for r in range(rows):
        cuts = np.sort(rng.choice(np.arange(3, length - 3), rng.randint(0, 3), replace=False))
        segments[r] = 1 + np.searchsorted(cuts, np.arange(length), side="right")
        pad = rng.randint(1, 9)
        padding = np.arange(length) >= length - pad if r % 2 else np.arange(length) < pad  # right or left
        attention[r] = ~padding
        # Padding in segment 0, or (half the rows) in its neighbour document's: then only the
        # attention mask keeps it out.
        segments[r, padding] = 0 if r % 4 < 2 else segments[r, ~padding][-1 if r % 2 else 0]
    starts = np.concatenate([np.ones((rows, 1), bool), segments[:, 1:] != segments[:, :-1]], axis=1) | (
        np.concatenate([np.ones((rows, 1), bool), attention[:, 1:] != attention[:, :-1]], axis=1))
    positions = np.zeros_like(segments)
    for r in range(rows):
        for t in range(length):
            positions[r, t] = 0 if starts[r, t] else positions[r, t - 1] + 1
    positions = np.where(attention, positions, 0)
    loss_mask = attention.astype(np.float32)
    loss_mask[:, :-1] *= (segments[:, 1:] == segments[:, :-1]) & (attention[:, 1:] == 1)  # next token: same document
    loss_mask[:, -1] = 0.0
    loss_mask[:, :2] = 0.0
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": loss_mask, "attention_mask": attention,
            "positions": positions.astype(np.int32), "segment_ids": segments}


def build(family: str):
    model = jaxft.init_random({**SMALL, **FAMILIES[family]}, seed=1)
    return step.split_model(model)


def placed(model_def, params, frozen, mesh):
    shape = lambda tree: {p: tuple(x.shape) for p, x in tree.items()}  # noqa: E731
    put = lambda tree: jax.device_put(tree, sharding.param_shardings(model_def.axes, shape(tree), mesh))  # noqa: E731
    return put(params), put(frozen)


def forward_logits(model_def, params, frozen, batch, mesh=None):
    def logits(params, frozen, batch):
        return model_def.merge(params, frozen)(batch["input_ids"], attention_mask=batch["attention_mask"],
                                               segment_ids=batch["segment_ids"])

    if mesh is None:
        return np.asarray(jax.jit(logits)(params, frozen, batch))
    params, frozen = placed(model_def, params, frozen, mesh)
    with sharding.activate(mesh):
        return np.asarray(jax.jit(lambda *a: logits(*a))(params, frozen, sharding.global_batch(batch, mesh)))


@pytest.fixture(scope="module")
def batch():
    return packed_batch(SMALL["vocab_size"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_one_device(family, batch, monkeypatch):
    model_def, params, frozen = build(family)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "segment_ids")}
    expected = forward_logits(model_def, params, frozen, inputs)
    real = batch["attention_mask"].astype(bool)
    calls = []
    original = context_parallel.attention
    monkeypatch.setattr(context_parallel, "attention", lambda *a, **k: calls.append(a[-1].shards) or original(*a, **k))
    for shape in MESHES:
        calls.clear()
        got = forward_logits(model_def, params, frozen, inputs, sharding.make_mesh(shape))
        # The (scanned) layers' attention really ran context-parallel, over the mesh's context shards.
        assert calls and set(calls) == {shape["context"]}, (shape, calls)
        np.testing.assert_allclose(got[real], expected[real], atol=1e-5, err_msg=f"{family} on {shape}")


def train(model_def, params, frozen, batches, mesh=None):
    """(losses of len(batches) AdamW steps, final params, gradients at the initial params), from one
    jitted function per mesh (the step plus the gradient of its loss: one compile)."""
    optimizer = optim.make_optimizer(CFG, params, model_def.axes)
    objective = NextTokenLoss(z_loss=1e-3)
    grad_fn = jax.grad(lambda *a: step.make_loss_fn(model_def, objective)(*a)[0])
    train_step = step.make_train_step(model_def, optimizer, objective)

    def step_and_grads(state, batch):
        grads = grad_fn(state.params, state.frozen, batch, jnp.maximum(objective.normalizer(batch), 1.0), None)
        state, metrics = train_step(state, batch)
        return state, metrics["loss"], grads

    state = step.init_state(params, frozen, optimizer)
    if mesh is None:
        place = lambda b: {k: jnp.asarray(v) for k, v in b.items()}  # noqa: E731
    else:
        state_sh = sharding.state_shardings(state, optimizer, model_def.axes, mesh)
        state = jax.device_put(state, state_sh)
        place = lambda b: sharding.global_batch(b, mesh)  # noqa: E731
    compiled = jax.jit(lambda *a: step_and_grads(*a))  # a new function per mesh: traced under its rules
    losses, gradients = [], None
    with sharding.activate(mesh) if mesh is not None else _nothing():
        for b in batches:
            state, loss, grads = compiled(state, place(b))
            losses.append(float(loss))
            gradients = jax.device_get(grads) if gradients is None else gradients
    return losses, jax.device_get(state.params), gradients


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("family", ["llama", pytest.param("gemma2_softcap", marks=pytest.mark.slow)])
def test_training_losses_and_gradients_match_one_device(family):
    model_def, params, frozen = build(family)
    batches = [packed_batch(SMALL["vocab_size"])] * 2  # the same batch twice: the second loss shows the step
    losses, final, grads = train(model_def, params, frozen, batches)
    assert losses[1] < losses[0]
    for shape in MESHES:
        got_losses, got_final, got_grads = train(model_def, params, frozen, batches, sharding.make_mesh(shape))
        np.testing.assert_allclose(got_losses, losses, atol=1e-5, err_msg=str(shape))
        for path in grads:
            np.testing.assert_allclose(got_grads[path], grads[path], atol=1e-5, err_msg=f"{path} on {shape}")
            # Adam divides by √v: an entry whose gradient is ~0 moves by up to lr on float noise alone.
            np.testing.assert_allclose(got_final[path], final[path], atol=1e-4, err_msg=f"{path} on {shape}")


def attention_memory(context: int, length: int = 1024) -> int:
    """Per-device temp bytes of attention's forward and backward (XLA's compiled count) for one
    [1, length] sequence of 8 query heads over 2 KV heads, split over `context` devices."""
    from jaxft.models import attention as attn_lib
    from jaxft.models import layers

    heads, kv_heads, dim = 8, 2, 64
    q_axes, kv_axes = (layers.Axis.BATCH, layers.Axis.SEQ, layers.Axis.HEADS, None), \
        (layers.Axis.BATCH, layers.Axis.SEQ, layers.Axis.KV_HEADS, None)

    def loss(q, k, v, segments):
        mask = attn_lib.MaskInfo.for_sequence(1, length, segment_ids=segments)
        q, k, v = layers.constrain(q, q_axes), layers.constrain(k, kv_axes), layers.constrain(v, kv_axes)
        return attn_lib.attention(q, k, v, mask, None, dim**-0.5).sum()

    shapes = [jax.ShapeDtypeStruct((1, length, n, dim), jnp.float32) for n in (heads, kv_heads, kv_heads)]
    mesh = sharding.make_mesh({"context": context}, devices=jax.devices()[:context])
    with sharding.activate(mesh):
        grads = jax.jit(lambda *a: jax.grad(loss, argnums=(0, 1, 2))(*a))
        stats = grads.lower(*shapes, jax.ShapeDtypeStruct((1, length), jnp.int32)).compile().memory_analysis()
    return stats.temp_size_in_bytes


def test_attention_memory_per_device_falls_with_the_context_size():
    """Each device holds its T/c queries' [T/c, T] scores (the keys gathered are [T, K, D], small):
    measured on XLA:CPU, MiB for c = 1, 2, 4, 8: 100, 51, 42, 21 at T=1024 (here); 520, 262, 132,
    99 at T=2048. XLA's scheduling keeps some buffers longer than c alone predicts."""
    temp = {c: attention_memory(c) for c in (1, 2, 4, 8)}
    assert temp[1] > temp[2] > temp[4] > temp[8], temp
    assert temp[2] < 0.6 * temp[1] and temp[8] < temp[1] / 4, temp


def test_chunked_loss_takes_a_chunk_of_every_shard():
    """train.loss_chunk under context parallelism: each scan step takes `chunk` tokens of every shard
    (no gather of the sequence), and the loss and gradients are those of the unchunked loss."""
    model_def, params, frozen = build("llama")
    batch = packed_batch(SMALL["vocab_size"], seed=3)
    normalizer = jnp.asarray(batch["loss_mask"].sum())

    def value_and_grad(chunk):
        loss_fn = step.make_loss_fn(model_def, NextTokenLoss(chunk=chunk, z_loss=1e-3))
        return jax.value_and_grad(lambda p, f, b: loss_fn(p, f, b, normalizer, None)[0])

    expected, expected_grads = jax.jit(value_and_grad(0))(params, frozen, {k: jnp.asarray(v) for k, v in batch.items()})
    mesh = sharding.make_mesh({"context": 4, "fsdp": 2})
    placed_params, placed_frozen = placed(model_def, params, frozen, mesh)
    inputs = (placed_params, placed_frozen, sharding.global_batch(batch, mesh))
    with sharding.activate(mesh):
        compiled = jax.jit(lambda *a: value_and_grad(2)(*a)).lower(*inputs).compile()
        loss, grads = compiled(*inputs)
        # No hidden states [.., hidden] are gathered across the shards (chunks of one shard would be;
        # what is gathered is weights (FSDP) and attention's keys/values [.., head_dim]).
        gathered = re.findall(r"= f32\[([\d,]+)\]\S* all-gather\(", compiled.as_text())
        hidden = [shape for shape in gathered if shape.count(",") >= 2 and shape.endswith(f",{SMALL['hidden_size']}")]
        assert gathered and not hidden, hidden
        np.testing.assert_allclose(loss, expected, atol=1e-6)
        for path in grads:
            np.testing.assert_allclose(grads[path], expected_grads[path], atol=1e-5, err_msg=path)
        with pytest.raises(ValueError, match="loss chunk 3 does not divide the 8 tokens of each of the 4 context"):
            jax.jit(lambda *a: value_and_grad(3)(*a))(placed_params, placed_frozen, sharding.global_batch(batch, mesh))


def test_splash_runs_per_shard_with_its_query_offset(monkeypatch):
    """Splash attention (Pallas interpret mode on CPU) inside context parallelism: each shard's
    kernel has its causal/local mask offset by its first query index; packed segments, padding, a
    sliding window across the shard boundary and soft-capping as in the XLA reference on one device
    (forward and gradients, over real query rows: padding rows are "don't care" for fused kernels)."""
    from jaxft.models import attention as attn_lib
    from jaxft.models import layers

    rows, length, dim = 2, 256, 16  # 128 queries per shard: splash's smallest block
    rng = np.random.RandomState(0)
    q, k, v = (jnp.asarray(rng.randn(rows, length, n, dim).astype(np.float32)) for n in (4, 2, 2))
    segments = np.ones((rows, length), np.int32)
    segments[0, 100:], segments[1, 150:] = 2, 2
    valid = np.ones((rows, length), np.int32)
    valid[1, -20:] = 0

    def loss(q, k, v, segments, valid, implementation):
        mask = attn_lib.MaskInfo.for_sequence(rows, length, valid, segments)
        axes = lambda heads: (layers.Axis.BATCH, layers.Axis.SEQ, heads, None)  # noqa: E731
        q = layers.constrain(q, axes(layers.Axis.HEADS))
        k, v = layers.constrain(k, axes(layers.Axis.KV_HEADS)), layers.constrain(v, axes(layers.Axis.KV_HEADS))
        out = attn_lib.attention(q, k, v, mask, 100, dim**-0.5, implementation, softcap=2.0)
        return (out * valid[:, :, None, None]).sum(), out

    grad = lambda implementation: jax.value_and_grad(  # noqa: E731
        lambda *a: loss(*a, implementation), argnums=(0, 1, 2), has_aux=True)
    (_, expected), expected_grads = grad("xla")(q, k, v, segments, valid)
    offsets = []
    original = context_parallel._splash
    monkeypatch.setattr(context_parallel, "_splash", lambda *a, **kw: offsets.append(a[-1]) or original(*a, **kw))
    mesh = sharding.make_mesh({"context": 2, "data": 4})
    with sharding.activate(mesh):
        (_, out), grads = jax.jit(grad("splash"))(q, k, v, segments, valid)
    assert offsets == [2]  # the splash path ran (no fallback to the reference), over 2 shards
    real = valid.astype(bool)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(expected)[real], atol=1e-5)
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got, want, atol=2e-5)
