"""Gemma, Gemma 2, Gemma 3 (text) and Phi-3 match transformers: logits (fp32, <= 1e-4) on padded
batches shorter and longer than their sliding windows and Phi-3's original context, and a
save_pretrained folder that transformers loads with the same weights and logits (<= 1e-5)."""

import jax.numpy as jnp
import pytest

from jaxft.models import registry
from jaxft.testing import padded_batch, torch_logits
from jaxft.testing_families import FAMILY_CASES, LONG, export_round_trip_diff, max_valid_diff, model_cache

TOL = 1e-4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return model_cache(tmp_path_factory)


@pytest.mark.parametrize("case", sorted(FAMILY_CASES))
@pytest.mark.parametrize("length", [12, LONG])
def test_logits_match_transformers_with_padding(built, case, length):
    _, torch_model, model = built(case)
    ids, mask, positions = padded_batch(model.config.vocab_size, batch=3, length=length)
    got = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    diff = max_valid_diff(got, torch_logits(torch_model, ids, mask, positions), mask)
    assert diff <= TOL, f"{case} (T={length}): max |jaxft - transformers| = {diff:.2e}"


@pytest.mark.parametrize("case", sorted(FAMILY_CASES))
def test_export_round_trip(built, case, tmp_path):
    _, torch_model, model = built(case)
    config_cls = registry.family_for({"model_type": model.config.model_type}).config_cls
    assert config_cls.from_hf(model.config.to_hf()) == model.config
    diff, changed = export_round_trip_diff(model, torch_model, tmp_path / "out")
    assert diff <= 1e-5 and not changed, f"{case}: exported logits differ by {diff:.2e}; changed weights {changed}"
