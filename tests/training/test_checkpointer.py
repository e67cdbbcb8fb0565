"""Checkpointer policies, and every optimizer of optim.py trains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft import checkpoint, optim, step
from jaxft.testing import train_batch
from jaxft.tasks.causal_lm import NextTokenLoss


def test_keeps_the_latest_k_plus_the_best_by_eval_loss(tmp_path):
    manager = checkpoint.Checkpointer(str(tmp_path), keep=2, keep_best=1, async_save=False)
    state = {"w": jnp.arange(4.0)}
    for step_index, eval_loss in zip(range(1, 6), [5.0, 1.0, 4.0, 3.0, 2.5]):
        manager.save(step_index, {"w": state["w"] + step_index}, {"pos": step_index}, {"step": step_index},
                     eval_loss=eval_loss, force=True)
    manager.wait()
    assert manager.steps() == [2, 4, 5]  # best (eval 1.0) + the two newest
    target = checkpoint.abstract_target(state, {"w": state["w"].sharding})
    found, restored, data_state, meta = manager.restore(target)
    assert found == 5 and data_state == {"pos": 5} and meta == {"step": 5, "checksums": checkpoint.checksums(
        {"w": state["w"] + 5})}  # the saved array's checksum travels in meta
    np.testing.assert_array_equal(restored["w"], np.arange(4.0) + 5)
    manager.close()


def test_resume_sensitive_changes_are_listed():
    saved = {"model": {"path": "a"}, "data": {"seq_len": 64, "train": "x.jsonl"}, "train": {"batch_size": 8}}
    now = {"model": {"path": "a"}, "data": {"seq_len": 128, "train": "x.jsonl"}, "train": {"batch_size": 8}}
    assert checkpoint.config_changes(saved, now) == ["data.seq_len: 64 → 128"]


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_lowers_the_loss(name):
    model = jaxft.init_random({"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2})
    model_def, params, frozen = step.split_model(model)
    # Adafactor scales steps by each parameter's RMS (0.02 at init here), so its rate is relative.
    lr = {"adamw": 1e-2, "lion": 1e-3, "adafactor": 1e-1, "sgd": 0.5}[name]
    cfg = optim.OptimConfig(name=name, learning_rate=lr, schedule="constant", weight_decay=0.01, momentum=0.9)
    optimizer = optim.make_optimizer(cfg, params, model_def.axes)
    state = step.init_state(params, frozen, optimizer)
    train_step = jax.jit(step.make_train_step(model_def, optimizer, NextTokenLoss()))
    batch = {k: jnp.asarray(v) for k, v in train_batch(64, batch=4, seed=3).items()}
    losses = []
    for _ in range(15):
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.8 * losses[0], (name, losses)


def test_decay_mask_spares_norms_and_biases():
    model = jaxft.init_random({"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2})
    model_def, params, _ = step.split_model(model)
    mask = optim.decay_mask(params, model_def.axes)
    assert mask["model.layers.mlp.up_proj.weight"] and mask["model.embed_tokens.weight"]
    assert not mask["model.layers.self_attn.q_proj.bias"]
    assert not mask["model.layers.input_layernorm.weight"] and not mask["model.norm.weight"]
