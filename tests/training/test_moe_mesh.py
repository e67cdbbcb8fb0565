"""A mixture-of-experts model gives the same logits and training losses (router aux loss included)
on one device and on meshes with an `expert` axis: expert=4, expert=2 × fsdp=2, expert=2 × data=4;
the expert weights really are split along their expert dimension."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft import optim, sharding, step
from jaxft.tasks.causal_lm import NextTokenLoss
from jaxft.testing import padded_batch, tiny_hf_model, train_batch

CFG = optim.OptimConfig(name="adamw", learning_rate=1e-3, schedule="constant", total_steps=10, clip_norm=1.0)
LOSS = NextTokenLoss(router_aux_loss_coef=0.01, router_z_loss_coef=0.001)
EXPERTS = "model.layers.mlp.experts.gate_proj.weight"


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    folder, _ = tiny_hf_model(tmp_path_factory.mktemp("qwen3_moe"), "qwen3_moe", num_experts=8, num_experts_per_tok=2,
                              moe_intermediate_size=24, norm_topk_prob=True)
    return folder


def run(folder, batches, mesh_shape=None):
    mesh = None
    if mesh_shape:
        mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:math.prod(mesh_shape.values())])
    model = jaxft.from_pretrained(folder, mesh=mesh)
    ids, mask, _ = padded_batch(model.config.vocab_size, batch=8, length=12)
    with sharding.activate(mesh) if mesh else _null():
        logits = np.asarray(jax.jit(lambda m, i, a: m(i, attention_mask=a))(model, jnp.asarray(ids), jnp.asarray(mask)))
    model_def, params, frozen = step.split_model(model)
    optimizer = optim.make_optimizer(CFG, params, model_def.axes)
    state = step.init_state(params, frozen, optimizer)
    train_step = step.make_train_step(model_def, optimizer, LOSS)
    if mesh is None:
        compiled, place = jax.jit(train_step, donate_argnums=0), lambda b: {k: jnp.asarray(v) for k, v in b.items()}
    else:
        compiled, state_sh = step.compile_train_step(train_step, state, optimizer, model_def, mesh)
        state, place = jax.device_put(state, state_sh), lambda b: sharding.global_batch(b, mesh)
    losses, aux = [], []
    for batch in batches:
        with sharding.activate(mesh) if mesh else _null():
            state, metrics = compiled(state, place(batch))
        losses.append(float(metrics["loss"]))
        aux.append(float(metrics["router_aux_loss"]))
    return logits, losses, aux, state


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.fixture(scope="module")
def one_device(moe_model):
    batches = [train_batch(128, batch=8, seed=s) for s in range(2)]
    return batches, run(moe_model, batches)


@pytest.mark.parametrize("mesh_shape", [{"expert": 4}, {"expert": 2, "fsdp": 2}, {"expert": 2, "data": 4}])
def test_expert_meshes_match_one_device(moe_model, one_device, mesh_shape):
    batches, (logits, losses, aux, _) = one_device
    got_logits, got_losses, got_aux, state = run(moe_model, batches, mesh_shape)
    np.testing.assert_allclose(got_logits, logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_losses, losses, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_aux, aux, atol=1e-6, rtol=0)
    assert all(a > 0 for a in aux)
    experts = state.params[EXPERTS]  # [L, E, F, D]
    shard = experts.addressable_shards[0].data.shape
    assert shard[1] * mesh_shape["expert"] == experts.shape[1], (shard, experts.shape)
