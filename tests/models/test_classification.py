"""Sequence classifiers match transformers' *ForSequenceClassification (pooled logits, fp32, <= 1e-4)
with left and right padding; HF heads import and export; a causal LM takes a new head."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxft
from jaxft.testing import padded_batch, tiny_hf_model
from jaxft.testing_families import FAMILY_CASES, export_round_trip_diff, tiny_family_model

TOL = 1e-4
PAD = 0


def _tiny_classifier(folder, case: str, num_labels: int = 3):
    build = tiny_family_model if case in FAMILY_CASES else tiny_hf_model
    return build(folder, case, task="classification", num_labels=num_labels, pad_token_id=PAD)


def _padded(vocab: int, length: int = 12):
    """Row 0 left-padded, row 1 right-padded, row 2 full; padding holds the pad id, real tokens never do."""
    ids, mask, positions = padded_batch(vocab, batch=3, length=length)
    ids = np.where(mask == 1, np.maximum(ids, 1), PAD).astype(np.int32)
    return ids, mask, positions


def _torch_classify(torch_model, ids, mask, positions) -> np.ndarray:
    with torch.no_grad():
        return torch_model(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                           position_ids=torch.as_tensor(positions, dtype=torch.long)).logits.numpy()


# One case per family (8): llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3.
EVERY_FAMILY = ["llama3_rope", "mistral_sliding", "qwen2_bias", "qwen3", "gemma", "gemma2_softcap", "gemma3_text",
                "phi3_longrope"]


@pytest.mark.parametrize("case", EVERY_FAMILY)
def test_pooled_logits_match_transformers(tmp_path, case):
    folder, torch_model = _tiny_classifier(tmp_path, case)
    model = jaxft.from_pretrained(folder)
    assert model.labels == ("LABEL_0", "LABEL_1", "LABEL_2") and model.pad_token_id == PAD
    ids, mask, positions = _padded(model.config.vocab_size, length=16)
    got = np.asarray(model.classify(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    expected = _torch_classify(torch_model, ids, mask, positions)
    assert got.shape == expected.shape == (3, 3)
    diff = np.abs(got - expected).max()
    assert diff <= TOL, f"{case}: max |jaxft - transformers| = {diff:.2e}"
    # The per-token logits that training uses agree with the pooled ones at the pooled tokens.
    per_token = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    last = [int(np.flatnonzero(row != PAD)[-1]) for row in ids]
    np.testing.assert_allclose(per_token[np.arange(3), last], got, atol=1e-6)


@pytest.mark.parametrize("case", EVERY_FAMILY)
def test_export_loads_as_a_transformers_classifier(tmp_path, case):
    folder, torch_model = _tiny_classifier(tmp_path / "src", case)
    model = jaxft.from_pretrained(folder)
    diff, changed = export_round_trip_diff(model, torch_model, tmp_path / "out", auto="AutoModelForSequenceClassification")
    assert diff <= 1e-5 and not changed, f"{case}: exported logits differ by {diff:.2e}; changed weights {changed}"


def test_new_head_on_a_causal_lm_exports_as_a_classifier(tmp_path):
    """labels= on a causal checkpoint: its lm_head is left out, `score` starts fresh, and the
    exported folder is a transformers classifier that scores exactly as the jaxft model."""
    import transformers

    folder, _ = tiny_hf_model(tmp_path / "lm", "llama3_rope")
    model = jaxft.from_pretrained(folder, labels=["negative", "positive"], pad_token_id=PAD, seed=3)
    assert model.score.weight.get_value().shape == (2, 64) and not hasattr(model, "lm_head")
    assert 0.01 < float(jnp.std(model.score.weight.get_value())) < 0.03  # N(0, 0.02²), not zeros
    jaxft.save_pretrained(model, tmp_path / "out")
    with open(os.path.join(tmp_path, "out", "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["id2label"] == {"0": "negative", "1": "positive"} and config["pad_token_id"] == PAD
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids, mask, positions = _padded(model.config.vocab_size)
    got = np.asarray(model.classify(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert np.abs(got - _torch_classify(reloaded.eval(), ids, mask, positions)).max() <= TOL


def test_classifier_needs_a_pad_token(tmp_path):
    folder, _ = tiny_hf_model(tmp_path, "llama3_rope")  # its config.json has no pad_token_id
    with pytest.raises(ValueError, match=r"pad_token_id is None; a classifier scores the last token that is not padding"):
        jaxft.from_pretrained(folder, labels=2)
    with pytest.raises(ValueError, match=r"a classifier needs distinct labels \(one for a scalar head\), got \[.yes., .yes.\]"):
        jaxft.from_pretrained(folder, labels=["yes", "yes"], pad_token_id=PAD)
