"""train.freeze_first_layers costs what the trainable layers need and no more: the frozen prefix
runs outside autodiff (no weight gradients; nothing at all when the embeddings are frozen too) and
keeps no optimizer moments, while the loss and every trainable gradient equal the path that
differentiates all layers and masks the frozen rows afterwards (the previous implementation)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxft
from jaxft import metrics, optim, step
from jaxft.tasks.causal_lm import NextTokenLoss
from jaxft.testing import tiny_hf_model, train_batch

LAYERS, FROZEN = 4, 2


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    folder, _ = tiny_hf_model(tmp_path_factory.mktemp("freeze"), "llama3_rope", num_hidden_layers=LAYERS)
    return folder


def split(folder, trainable=lambda path, v: True):
    return step.split_model(jaxft.from_pretrained(folder), trainable)


def batch(vocab, seed=0):
    return {k: jnp.asarray(v) for k, v in train_batch(vocab, seed=seed).items()}


def grads(model_def, params, frozen, b, freeze):
    objective = NextTokenLoss()
    loss_fn = step.make_loss_fn(model_def, objective, freeze)
    normalizer = jnp.maximum(objective.normalizer(b), 1.0)
    return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, frozen, b, normalizer, jax.random.key(0))[0]))(params)


def test_loss_and_trainable_gradients_equal_the_all_layers_path(four_layers):
    model_def, params, frozen = split(four_layers)
    b = batch(128)
    loss_all, grads_all = grads(model_def, params, frozen, b, 0)
    loss, got = grads(model_def, params, frozen, b, FROZEN)
    assert float(loss) == pytest.approx(float(loss_all), abs=1e-6)
    stacked = [p for p in params if p.startswith("model.layers.")]
    assert stacked
    for path, g in got.items():
        g, want = np.asarray(g), np.asarray(grads_all[path])
        if path in stacked:
            assert not g[:FROZEN].any(), f"{path}: a frozen layer got a gradient"
            assert np.abs(want[:FROZEN]).max() > 0  # the all-layers path does compute one
            np.testing.assert_allclose(g[FROZEN:], want[FROZEN:], atol=1e-6, err_msg=path)
        else:  # embeddings get their gradient through the frozen layers, as with requires_grad=False
            np.testing.assert_allclose(g, want, atol=1e-6, err_msg=path)


def test_frozen_rows_stay_bit_for_bit_and_keep_no_moments(four_layers):
    model_def, params, frozen = split(four_layers)
    before = jax.device_get(params)
    cfg = optim.OptimConfig(learning_rate=1e-2, schedule="constant", weight_decay=0.1)
    optimizer = optim.make_optimizer(cfg, params, model_def.axes, frozen_layers=FROZEN)
    state = step.init_state(params, frozen, optimizer)
    train_step = jax.jit(step.make_train_step(model_def, optimizer, NextTokenLoss(),
                                              step.StepConfig(freeze_first_layers=FROZEN)))
    for seed in range(2):
        state, metrics = train_step(state, batch(128, seed))
    after = jax.device_get(state.params)
    adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)][0]
    for path, value in after.items():
        if path.startswith("model.layers."):
            np.testing.assert_array_equal(value[:FROZEN], before[path][:FROZEN], err_msg=path)
            assert not np.array_equal(value[FROZEN:], before[path][FROZEN:]), path
            assert adam.mu[path].shape == (LAYERS - FROZEN, *value.shape[1:]), path
        else:
            assert adam.mu[path].shape == value.shape
    assert np.isfinite(float(metrics["grad_norm"]))


def gradient_flops(folder, freeze, trainable=lambda path, v: True) -> float:
    model_def, params, frozen = split(folder, trainable)
    loss_fn = step.make_loss_fn(model_def, NextTokenLoss(), freeze)
    b = batch(128)
    grad = jax.grad(lambda p: loss_fn(p, frozen, b, jnp.float32(1.0), jax.random.key(0))[0])
    return metrics.matmul_flops(jax.make_jaxpr(grad)(params).jaxpr)


def test_the_frozen_prefix_computes_less(four_layers):
    """Matmul FLOPs of the gradient: per layer, the all-layers path does forward + input gradient +
    weight gradient (3 matmuls a weight); a frozen layer skips the weight gradient, and when the
    embeddings are frozen too, nothing flows back into the prefix at all (forward only)."""
    no_embed = lambda path, v: "embed_tokens" not in path  # noqa: E731
    every_layer, prefix_frozen = gradient_flops(four_layers, 0), gradient_flops(four_layers, FROZEN)
    every_layer_no_embed, prefix_and_embed_frozen = gradient_flops(four_layers, 0, no_embed), \
        gradient_flops(four_layers, FROZEN, no_embed)
    # 4 layers × 3 passes; freezing 2 saves 2 weight-gradient passes of their matmuls, 2 more without embeddings.
    layer = (every_layer - prefix_frozen) / FROZEN  # one layer's weight-gradient matmuls
    assert layer > 0.15 * every_layer / LAYERS, (every_layer, prefix_frozen)
    assert every_layer_no_embed - prefix_and_embed_frozen == pytest.approx(2 * FROZEN * layer, rel=0.1)


def test_moments_of_the_trainable_rows_are_placed_like_their_params(four_layers):
    from jaxft import sharding

    model_def, params, frozen = split(four_layers)
    optimizer = optim.make_optimizer(optim.OptimConfig(), params, model_def.axes, frozen_layers=FROZEN)
    state = jax.eval_shape(lambda: step.init_state(params, frozen, optimizer))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    placed = sharding.state_shardings(state, optimizer, model_def.axes, mesh)
    adam = [s for s in jax.tree.leaves(placed.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)][0]
    path = "model.layers.mlp.gate_proj.weight"
    assert adam.mu[path].spec == adam.nu[path].spec == placed.params[path].spec != jax.sharding.PartitionSpec()
