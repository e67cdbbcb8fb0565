"""The sparse MoE block: the dropless grouped-matmul path equals the dense one-hot reference
(forward and gradients, <= 1e-5) with one expert that gets every token and one that gets none; the
router statistics give transformers' load_balancing_loss_func (<= 1e-6) on the same router logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxft.models import moe

SPEC = moe.MoESpec(num_experts=5, top_k=3, expert_size=12, sparse_layers=(True,), normalize_top_k=False,
                   shared_expert_size=8)


def _block(spec=SPEC, hidden=16, seed=0):
    def make():
        return moe.SparseMoeBlock(spec, hidden, "silu", param_dtype=jnp.float32, dtype=jnp.float32, rngs=nnx.Rngs(seed))

    # Random weights from numpy (jax's RNG compiles slowly on a loaded CPU), shapes from the module.
    rng = np.random.RandomState(seed)
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    block = nnx.merge(graphdef, jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.2, a.shape), a.dtype), abstract))
    x = jnp.asarray(rng.normal(size=(2, 7, hidden)), jnp.float32)
    # Every token leans along `d`: expert 0's router row follows d (in every token's top 3), expert 4's
    # opposes it (in none).
    d = jnp.asarray(rng.normal(size=(hidden,)), jnp.float32)
    d = d / jnp.linalg.norm(d)
    x = x - (x @ d)[..., None] * d + 3.0 * d
    gate = block.gate.weight[...]
    block.gate.weight.set_value(gate.at[0].set(5.0 * d).at[4].set(-5.0 * d))
    return block, x


def _run(block, x, implementation):
    moe.set_moe_implementation(block, implementation)
    graphdef, state = nnx.split(block)

    def loss(state, x):
        y, stats = nnx.merge(graphdef, state)(x)
        return jnp.sum(jnp.sin(y)), (y, stats)

    (_, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, x)
    return y, stats, grads


def test_grouped_equals_dense_forward_and_gradients():
    block, x = _block()
    y_grouped, stats, g_grouped = _run(block, x, "grouped")
    y_dense, stats_dense, g_dense = _run(block, x, "dense")
    counts = np.asarray(stats[:5])
    assert counts[0] == 14 and counts[4] == 0, counts  # one expert has all 14 tokens, one has none
    np.testing.assert_allclose(np.asarray(y_grouped), np.asarray(y_dense), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(stats), np.asarray(stats_dense))
    flat_g, flat_d = jax.tree.leaves(g_grouped), jax.tree.leaves(g_dense)
    assert len(flat_g) == len(flat_d) > 5
    for a, b in zip(flat_g, flat_d):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
    # The expert that no token chose gets no gradient on either path.
    expert_grads = g_grouped[0]["experts"]["gate_proj"]["weight"]
    assert float(jnp.abs(expert_grads[...][4]).max()) == 0.0 and float(jnp.abs(expert_grads[...][0]).max()) > 0


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_aux_loss_equals_transformers(model_type):
    import importlib

    import torch

    lbl = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}").load_balancing_loss_func
    rng = np.random.RandomState(0)
    experts, k, layers, batch, length = 5, 3, 3, 2, 6
    logits = rng.randn(layers, batch * length, experts).astype(np.float32) * 2
    mask = np.ones((batch, length), np.int32)
    mask[0, :2] = 0
    for attention_mask in (None, mask):
        expected = float(lbl(tuple(torch.as_tensor(l) for l in logits), experts, k,
                             None if attention_mask is None else torch.as_tensor(attention_mask)))
        valid = jnp.ones(batch * length, bool) if attention_mask is None else jnp.asarray(attention_mask.reshape(-1))

        @jax.jit
        def aux(logits, valid):
            total = 0
            for layer_logits in logits:
                probs, _, chosen = moe.route(layer_logits, k, normalize=True)
                total = total + moe.router_stats(layer_logits, probs, chosen, valid)
            return moe.load_balancing_loss(total, experts)

        got = float(aux(jnp.asarray(logits), valid))
        assert abs(got - expected) <= 1e-6, (attention_mask is not None, got, expected)


def test_router_z_loss_equals_switch_transformers():
    """Unmasked, one layer: transformers' router_z_loss_func (Switch Transformers / ST-MoE)."""
    import torch
    from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func

    logits = np.random.RandomState(1).randn(2, 6, 5).astype(np.float32) * 3
    expected = float(router_z_loss_func(torch.as_tensor(logits)))
    flat = jnp.asarray(logits.reshape(-1, 5))
    probs, _, chosen = moe.route(flat, 2, normalize=False)
    got = float(moe.router_z_loss(moe.router_stats(flat, probs, chosen, jnp.ones(12, bool)), 5))
    assert abs(got - expected) <= 1e-5 * max(1.0, abs(expected)), (got, expected)
