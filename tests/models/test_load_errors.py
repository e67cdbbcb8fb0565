"""Bad checkpoints fail loudly, naming the key, file and shapes; pickles need an explicit opt-in."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import jaxft
from jaxft import hf
from jaxft.models.keys import CheckpointMismatchError
from jaxft.testing import padded_batch, tiny_hf_model, torch_logits


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return tiny_hf_model(tmp_path_factory.mktemp("src"), "llama3_rope")


def _edited_copy(src: str, dst, edit_tensors=None, edit_config=None) -> str:
    shutil.copytree(src, dst)
    if edit_tensors:
        path = os.path.join(dst, "model.safetensors")
        tensors = load_file(path)
        edit_tensors(tensors)
        save_file(tensors, path, metadata={"format": "pt"})
    if edit_config:
        with open(os.path.join(dst, "config.json")) as f:
            config = json.load(f)
        edit_config(config)
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(config, f)
    return os.fspath(dst)


def test_unknown_key_is_named(source, tmp_path):
    folder = _edited_copy(source[0], tmp_path / "m", edit_tensors=lambda t: t.update(
        {"model.layers.0.mlp.extra_proj.weight": np.zeros((3, 4), np.float32)}))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected: checkpoint key 'model\.layers\.0\.mlp\.extra_proj\.weight' "
                                                      r"in model\.safetensors \[3, 4\]"):
        jaxft.from_pretrained(folder)


def test_missing_key_is_named(source, tmp_path):
    folder = _edited_copy(source[0], tmp_path / "m", edit_tensors=lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointMismatchError, match=r"missing: no checkpoint key 'model\.layers\.1\.self_attn\.k_proj\.weight' "
                                                      r"for param model\.layers\.self_attn\.k_proj\.weight \[32, 64\]"):
        jaxft.from_pretrained(folder)


def test_wrong_shape_names_both_shapes(source, tmp_path):
    # A config that disagrees with its weights: every MLP tensor is reported, with both shapes.
    folder = _edited_copy(source[0], tmp_path / "m", edit_config=lambda c: c.update(intermediate_size=100))
    with pytest.raises(CheckpointMismatchError) as err:
        jaxft.from_pretrained(folder)
    message = str(err.value)
    assert "shape mismatch: 'model.layers.0.mlp.up_proj.weight' in model.safetensors is [96, 64], " \
           "param model.layers.mlp.up_proj.weight expects [100, 64]" in message
    assert "(6 problem(s))" in message  # gate/up/down × 2 layers, all listed at once


def test_pickle_is_refused_unless_allowed(source, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(source[0], folder)
    os.remove(folder / "model.safetensors")
    torch.save(source[1].state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(hf.PickleCheckpointError, match=r"pytorch_model\.bin.*allow_pickle=True"):
        jaxft.from_pretrained(folder)
    model = jaxft.from_pretrained(folder, allow_pickle=True)
    ids, mask, positions = padded_batch(model.config.vocab_size)
    got = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    expected = torch_logits(source[1], ids, mask, positions)
    assert np.abs(got - expected)[mask.astype(bool)].max() <= 1e-4


def test_no_weights_and_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FileNotFoundError, match="no weights found"):
        hf.Checkpoint(os.fspath(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        jaxft.from_pretrained(tmp_path / "nowhere")


def test_unsupported_configs_are_refused(source, tmp_path):
    gelu = _edited_copy(source[0], tmp_path / "gelu", edit_config=lambda c: c.update(hidden_act="gelu"))
    with pytest.raises(ValueError, match=r"config\.json: hidden_act 'gelu' is not supported"):
        jaxft.from_pretrained(gelu)
    dynamic = _edited_copy(source[0], tmp_path / "dyn", edit_config=lambda c: c.update(
        rope_scaling={"rope_type": "dynamic", "factor": 2.0}, rope_parameters=None))
    with pytest.raises(ValueError, match=r"rope type 'dynamic' is not supported"):
        jaxft.from_pretrained(dynamic)
    other = _edited_copy(source[0], tmp_path / "other", edit_config=lambda c: c.update(model_type="gpt2"))
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported; supported: \["):
        jaxft.from_pretrained(other)


def test_hub_id_resolves_through_snapshot_download(source, tmp_path, monkeypatch):
    """Hub ids go through huggingface_hub (no network here: the download is simulated) and the
    snapshot's commit hash is recorded on the model."""
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(source[0], snapshot)
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, tuple(allow_patterns)))
        return os.fspath(snapshot)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = jaxft.from_pretrained("org/tiny", revision="main")
    assert calls and calls[0][:2] == ("org/tiny", "main") and "*.safetensors" in calls[0][2]
    assert model.source.repo_id == "org/tiny" and model.source.revision == "0123abcd"
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a hub repo id"):
        jaxft.from_pretrained("not a/valid/id")
