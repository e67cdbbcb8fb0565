"""Phi-3 specifics: LongRoPE switches tables for the whole batch as transformers does, and the fused
qkv/gate_up tensors are split on import and fused on export (parity itself: test_family_parity.py)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxft
from jaxft.models.keys import CheckpointMismatchError
from jaxft.testing import torch_logits
from jaxft.testing_families import LONG, model_cache


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return model_cache(tmp_path_factory)


def test_longrope_switches_tables_for_the_whole_batch(built):
    """A batch reaching past the original context uses the long factors at every position, so a
    short prefix gets other logits inside a long batch than alone: in transformers and here."""
    _, torch_model, model = built("phi3_longrope")
    ids = np.random.RandomState(3).randint(0, model.config.vocab_size, (1, LONG)).astype(np.int32)
    alone = np.asarray(model(jnp.asarray(ids[:, :12])))[0]
    inside = np.asarray(model(jnp.asarray(ids)))[0, :12]
    assert np.abs(alone - inside).max() > 1e-3
    positions = np.arange(LONG)[None]
    assert np.abs(torch_logits(torch_model, ids[:, :12], np.ones((1, 12)), positions[:, :12])[0]
                  - torch_logits(torch_model, ids, np.ones((1, LONG)), positions)[0, :12]).max() > 1e-3


def test_export_writes_fused_tensors(built, tmp_path):
    _, torch_model, model = built("phi3_4k_partial")
    jaxft.save_pretrained(model, tmp_path)
    saved = load_file(os.path.join(tmp_path, "model.safetensors"))
    assert not any("q_proj" in k or "gate_proj" in k for k in saved)
    for key in ("model.layers.1.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"):
        np.testing.assert_array_equal(saved[key], torch_model.state_dict()[key].numpy(), err_msg=key)


def test_wrong_fused_shape_names_all_its_params(built, tmp_path):
    folder, _, _ = built("phi3_longrope")
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    tensors["model.layers.1.self_attn.qkv_proj.weight"] = tensors["model.layers.1.self_attn.qkv_proj.weight"][:-16]
    os.makedirs(tmp_path / "bad")
    save_file(tensors, tmp_path / "bad" / "model.safetensors", metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json")) as f, open(tmp_path / "bad" / "config.json", "w") as g:
        json.dump(json.load(f), g)
    with pytest.raises(CheckpointMismatchError, match=(
            r"shape mismatch: 'model\.layers\.1\.self_attn\.qkv_proj\.weight' in model\.safetensors is \[112, 64\], "
            r"params model\.layers\.self_attn\.q_proj\.weight, model\.layers\.self_attn\.k_proj\.weight, "
            r"model\.layers\.self_attn\.v_proj\.weight expect \[128, 64\]")):
        jaxft.from_pretrained(tmp_path / "bad")


def test_unsupported_phi3_configs_are_refused():
    from jaxft.models.phi3 import Phi3Config

    base = dict(model_type="phi3", vocab_size=8, hidden_size=32, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=2, original_max_position_embeddings=16, max_position_embeddings=64)
    with pytest.raises(ValueError, match=r"x/config\.json: longrope short_factor has 7 entries; rotary dim 16 needs 8"):
        Phi3Config.from_hf({**base, "rope_scaling": {"type": "su", "short_factor": [1.0] * 7, "long_factor": [1.0] * 8}},
                           "x/config.json")
    with pytest.raises(ValueError, match=r"Phi-3 rope type 'linear' is not supported"):
        Phi3Config.from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2.0}})
    legacy = Phi3Config.from_hf({**base, "rope_scaling": {"type": "su", "short_factor": [1.0] * 8,
                                                          "long_factor": [2.0] * 8}})
    assert legacy.rope.rope_type == "longrope" and legacy.rope.param("original_max_position_embeddings") == 16
