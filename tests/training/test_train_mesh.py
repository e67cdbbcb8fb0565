"""The same steps agree on 1 device and on sharded meshes; accumulation equals a big batch;
frozen parameters do not move."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft import optim, sharding, step
from jaxft.tasks.causal_lm import NextTokenLoss
from jaxft.testing import train_batch

CFG = optim.OptimConfig(name="adamw", learning_rate=1e-3, schedule="cosine", warmup_steps=1, total_steps=10,
                        weight_decay=0.01, clip_norm=1.0)


def run(folder, batches, mesh_shape=None, grad_accum=1, trainable=lambda p, v: True, frozen_layers=0, cfg=CFG):
    mesh = sharding.make_mesh(mesh_shape) if mesh_shape else None
    model = jaxft.from_pretrained(folder, mesh=mesh)
    model_def, params, frozen = step.split_model(model, trainable)
    optimizer = optim.make_optimizer(cfg, params, model_def.axes, frozen_layers=frozen_layers)
    state = step.init_state(params, frozen, optimizer)
    train_step = step.make_train_step(model_def, optimizer, NextTokenLoss(), step.StepConfig(grad_accum=grad_accum))
    if mesh is None:
        compiled = jax.jit(train_step, donate_argnums=0)
        place = lambda b: {k: jnp.asarray(v) for k, v in b.items()}  # noqa: E731
    else:
        sharding.check_batch(batches[0]["input_ids"].shape[0], grad_accum, mesh)
        compiled, state_sh = step.compile_train_step(train_step, state, optimizer, model_def, mesh)
        state = jax.device_put(state, state_sh)
        place = lambda b: sharding.global_batch(b, mesh)  # noqa: E731
    losses = []
    for batch in batches:
        with sharding.activate(mesh) if mesh else _nullcontext():
            state, metrics = compiled(state, place(batch))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), state


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.fixture(scope="module")
def batches(tiny_llama):
    return [train_batch(tiny_llama[1].config.vocab_size, batch=8, seed=s) for s in range(3)]


@pytest.fixture(scope="module")
def single_device(tiny_llama, batches):
    return run(tiny_llama[0], batches)


@pytest.mark.parametrize("mesh_shape", [{"data": 8}, {"fsdp": 4, "tensor": 2}])
def test_meshes_give_the_same_losses(tiny_llama, batches, single_device, mesh_shape):
    losses, params, state = run(tiny_llama[0], batches, mesh_shape)
    np.testing.assert_allclose(losses, single_device[0], atol=1e-5)
    assert losses[-1] < losses[0]
    for path, value in params.items():
        np.testing.assert_allclose(value, single_device[1][path], atol=1e-5, err_msg=path)
    if "fsdp" in mesh_shape:  # parameters and Adam moments really are split 8 ways
        up = state.params["model.layers.mlp.up_proj.weight"]
        assert up.addressable_shards[0].data.size * 8 == up.size


def test_adafactor_factored_moments_shard_like_their_params():
    """Adafactor's row/column statistics ([L, out] and [L, in] of an [L, out, in] weight) are not
    param-shaped: they take the param's sharding without the factored-out dimension (before: every
    FSDP run with Adafactor failed to place its state)."""
    from jaxft.demo import MODEL_DIR  # hidden 128: its matrices are large enough to be factored

    cfg = optim.OptimConfig(name="adafactor", learning_rate=1e-2, schedule="constant", total_steps=10)
    demo_batches = [train_batch(1024, batch=8, seed=s) for s in range(2)]
    alone = run(MODEL_DIR, demo_batches, cfg=cfg)
    losses, params, state = run(MODEL_DIR, demo_batches, {"fsdp": 4, "data": 2}, cfg=cfg)
    np.testing.assert_allclose(losses, alone[0], atol=1e-5)
    for path, value in params.items():
        np.testing.assert_allclose(value, alone[1][path], atol=1e-5, err_msg=path)
    factored = [x for x in jax.tree.leaves(state.opt_state) if x.ndim == 2 and x.shape[-1] in (128, 384)]
    assert factored and any(not x.sharding.is_fully_replicated for x in factored)


def test_gradient_accumulation_equals_one_big_batch(tiny_llama):
    batch = [train_batch(tiny_llama[1].config.vocab_size, batch=8, seed=7)]
    big = run(tiny_llama[0], batch)
    accumulated = run(tiny_llama[0], batch, grad_accum=4)  # 4 micro-batches of 2
    np.testing.assert_allclose(accumulated[0], big[0], atol=1e-6)
    for path, value in accumulated[1].items():
        np.testing.assert_allclose(value, big[1][path], atol=1e-6, err_msg=path)
    on_mesh = run(tiny_llama[0], batch, mesh_shape={"data": 2, "fsdp": 2, "tensor": 2}, grad_accum=2)
    np.testing.assert_allclose(on_mesh[0], big[0], atol=1e-5)


def test_frozen_parameters_are_bitwise_unchanged(tiny_llama, batches):
    model = jaxft.from_pretrained(tiny_llama[0])
    _, before, _ = step.split_model(model)
    not_embeddings = lambda path, v: "embed_tokens" not in path  # noqa: E731
    _, params, state = run(tiny_llama[0], batches, trainable=not_embeddings, frozen_layers=1)
    # Whole frozen params: no optimizer state at all, and the same bits.
    assert "model.embed_tokens.weight" not in params
    np.testing.assert_array_equal(np.asarray(state.frozen["model.embed_tokens.weight"]),
                                  np.asarray(before["model.embed_tokens.weight"]))
    opt_paths = {p for leaf in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, dict))
                 if isinstance(leaf, dict) for p in leaf}
    assert "model.embed_tokens.weight" not in opt_paths
    # The first layer of every stacked param stays bit for bit; the second layer trains.
    for path, value in params.items():
        if path.startswith("model.layers."):
            np.testing.assert_array_equal(value[0], np.asarray(before[path])[0], err_msg=path)
            assert not np.array_equal(value[1], np.asarray(before[path])[1]), path


def test_batch_errors_name_the_numbers():
    mesh = sharding.make_mesh({"data": 4, "tensor": 2})
    with pytest.raises(ValueError, match=r"micro-batch of 6 sequences .* not divisible by the data-parallel size 4"):
        sharding.check_batch(12, 2, mesh)
    with pytest.raises(ValueError, match=r"train.batch_size=10 is not divisible by train.grad_accum=4"):
        sharding.check_batch(10, 4, mesh)
    with pytest.raises(ValueError, match=r"has 16 devices, but 8 are available"):
        sharding.make_mesh({"data": 4, "fsdp": 4})


def test_train_step_program_does_not_grow_with_depth():
    """Layers are scanned: the compiled program for 16 layers is the size of the one for 2."""
    from jaxft.testing import train_batch as batch_of

    sizes = {}
    for layers in (2, 16):
        model = jaxft.init_random({"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 48,
                                   "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2})
        model_def, params, frozen = step.split_model(model, remat="full")
        optimizer = optim.make_optimizer(CFG, params, model_def.axes)
        state = step.init_state(params, frozen, optimizer)
        data = {k: jnp.asarray(v) for k, v in batch_of(128, batch=2).items()}
        text = jax.jit(step.make_train_step(model_def, optimizer, NextTokenLoss(), step.StepConfig(remat="full"))).lower(state, data).as_text()
        sizes[layers] = text.count("\n")  # one op per line
    assert sizes[16] == sizes[2], sizes


def test_chunked_loss_equals_the_full_loss(tiny_llama):
    """The chunked cross-entropy (no [B, T, V] logits held) gives the same loss and gradients."""
    model = jaxft.from_pretrained(tiny_llama[0])
    model_def, params, frozen = step.split_model(model)
    batch = {k: jnp.asarray(v) for k, v in train_batch(128, batch=4, length=12, seed=2).items()}
    num = batch["loss_mask"].sum()
    results = {}
    for chunk in (0, 4):
        loss_fn = step.make_loss_fn(model_def, NextTokenLoss(chunk=chunk, z_loss=1e-3))
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, batch, num, None)
        results[chunk] = (loss, grads)
    np.testing.assert_allclose(results[4][0], results[0][0], rtol=1e-6)
    for path in params:
        np.testing.assert_allclose(results[4][1][path], results[0][1][path], atol=1e-6, err_msg=path)
    with pytest.raises(ValueError, match="loss chunk 5 does not divide the sequence length 12"):
        step.make_loss_fn(model_def, NextTokenLoss(chunk=5))(params, frozen, batch, num, None)
