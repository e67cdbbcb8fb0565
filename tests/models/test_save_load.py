"""save_pretrained → transformers, sharded folders, bf16, and the 8-device mesh."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxft
from jaxft import sharding
from jaxft.testing import padded_batch, tiny_hf_model, torch_logits


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_hf_model(tmp_path_factory.mktemp("llama"), "llama3_rope")


@pytest.mark.parametrize("case", ["llama3_rope", "llama_tied", "qwen2_yarn_sliding", "qwen3", "mistral_sliding"])
def test_save_pretrained_loads_in_transformers(tmp_path, case):
    folder, torch_model = tiny_hf_model(tmp_path / "src", case)
    model = jaxft.from_pretrained(folder)
    jaxft.save_pretrained(model, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(reloaded) is type(torch_model)
    ids, mask, positions = padded_batch(model.config.vocab_size)
    valid = mask.astype(bool)
    diff = np.abs(torch_logits(reloaded, ids, mask, positions) - torch_logits(torch_model, ids, mask, positions))[valid].max()
    assert diff <= 1e-5, f"{case}: exported model differs from the original by {diff:.2e}"
    # The weights themselves came back bit for bit.
    original = torch_model.state_dict()
    for key, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, original[key], rtol=0, atol=0, msg=key)


def test_sharded_save_writes_an_index_and_round_trips(tmp_path, llama):
    folder, torch_model = llama
    model = jaxft.from_pretrained(folder)
    files = jaxft.save_pretrained(model, tmp_path / "out", max_shard_size=40_000)
    assert len(files) > 2 and all(os.path.exists(tmp_path / "out" / f) for f in files)
    with open(tmp_path / "out" / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == set(files)
    assert len(index["weight_map"]) == len(torch_model.state_dict())
    again = jaxft.from_pretrained(tmp_path / "out")
    ids, mask, _ = padded_batch(model.config.vocab_size)
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(ids), attention_mask=jnp.asarray(mask))),
                                  np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    for key, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, torch_model.state_dict()[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 8}, {"tensor": 4, "data": 2}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_mesh_sharded_load_gives_single_device_logits(llama, mesh_shape):
    assert jax.device_count() == 8, "tests/conftest.py sets 8 CPU devices"
    folder, _ = llama
    single = jaxft.from_pretrained(folder)
    mesh = sharding.make_mesh(mesh_shape)
    sharded = jaxft.from_pretrained(folder, mesh=mesh)
    # Parameters really are split, not replicated: the MLP weight is spread over all its axes.
    up = sharded.model.layers.mlp.up_proj.weight.get_value()
    assert len(up.sharding.device_set) == 8
    shard_shape = up.addressable_shards[0].data.shape
    split = mesh_shape.get("fsdp", 1) * mesh_shape.get("tensor", 1)
    assert np.prod(shard_shape) * split == np.prod(up.shape), (shard_shape, up.shape, mesh_shape)
    ids, mask, _ = padded_batch(single.config.vocab_size, batch=4, length=12)
    batch_sharding = sharding.named_sharding(("batch", "seq"), ids.shape, mesh)
    with sharding.activate(mesh):
        got = jax.jit(lambda m, i, a: m(i, attention_mask=a))(
            sharded, jax.device_put(ids, batch_sharding), jax.device_put(mask, batch_sharding))
    expected = single(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


def test_bf16_load_stays_close(llama, capsys):
    folder, torch_model = llama
    model = jaxft.from_pretrained(folder, dtype="bfloat16")
    assert model.model.embed_tokens.weight.get_value().dtype == jnp.bfloat16
    ids, mask, positions = padded_batch(model.config.vocab_size)
    expected = torch_logits(torch_model, ids, mask, positions)
    got = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).astype(jnp.float32))
    valid = mask.astype(bool)
    diff = np.abs(got - expected)[valid]
    scale = np.abs(expected[valid]).max()
    with capsys.disabled():
        print(f"\n[bf16 vs fp32 transformers] max abs {diff.max():.4f}, mean abs {diff.mean():.5f}, "
              f"logit scale {scale:.2f}")
    # bf16 keeps 8 bits of mantissa: a few percent of the logit scale after 2 layers.
    assert diff.max() <= 0.05 * scale
    # ...and bf16 params with an fp32 compute dtype are closer still than all-bf16.
    mixed = jaxft.from_pretrained(folder, dtype="bfloat16", compute_dtype="float32")
    mixed_diff = np.abs(np.asarray(mixed(jnp.asarray(ids), attention_mask=jnp.asarray(mask))) - expected)[valid]
    assert mixed_diff.max() < diff.max()


def test_bf16_save_loads_in_transformers_as_bf16(tmp_path, llama):
    folder, torch_model = llama
    model = jaxft.from_pretrained(folder)
    jaxft.save_pretrained(model, tmp_path / "bf16", dtype="bfloat16")
    with open(tmp_path / "bf16" / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    for key, tensor in reloaded.state_dict().items():
        assert tensor.dtype == torch.bfloat16, key
        torch.testing.assert_close(tensor, torch_model.state_dict()[key].to(torch.bfloat16), rtol=0, atol=0, msg=key)
