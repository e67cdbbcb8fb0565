"""Gemma specifics: each Gemma 2 switch is really in play in the parity test, and what the family
cannot express is refused by name (parity itself: test_family_parity.py)."""

import dataclasses

import jax.numpy as jnp
import pytest
from flax import nnx

from jaxft.models.gemma import GemmaConfig, GemmaForCausalLM
from jaxft.testing import padded_batch, torch_logits
from jaxft.testing_families import LONG, max_valid_diff, model_cache


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return model_cache(tmp_path_factory)


def test_gemma2_soft_capping_and_windows_are_in_play(built):
    """Turning off any Gemma 2 switch moves the logits far past the 1e-4 tolerance: parity covers
    them, not a model where they happen to be inert."""
    _, torch_model, model = built("gemma2_softcap")
    ids, mask, positions = padded_batch(model.config.vocab_size, batch=3, length=LONG)
    expected = torch_logits(torch_model, ids, mask, positions)
    for change in (dict(attn_logit_softcapping=None), dict(final_logit_softcapping=None),
                   dict(layer_types=("full_attention",) * 3), dict(query_pre_attn_scalar=24)):
        other = GemmaForCausalLM(dataclasses.replace(model.config, **change), rngs=nnx.Rngs(0))
        nnx.update(other, nnx.state(model))
        diff = max_valid_diff(other(jnp.asarray(ids), attention_mask=jnp.asarray(mask)), expected, mask)
        assert diff > 5e-3, f"{change} changes the logits by only {diff:.2e}"


def test_unsupported_gemma_configs_are_refused():
    base = dict(model_type="gemma3_text", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
                num_attention_heads=2)
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        GemmaConfig.from_hf({**base, "use_bidirectional_attention": True})
    with pytest.raises(ValueError, match="layer_types has 1 entries for num_hidden_layers=2"):
        GemmaConfig.from_hf({**base, "layer_types": ["full_attention"]})
    with pytest.raises(ValueError, match="activation 'relu' is not supported"):
        GemmaConfig.from_hf({**base, "hidden_activation": "relu"})
    with pytest.raises(ValueError, match=r"scaled RoPE \('linear'\) on sliding-window layers is not supported"):
        GemmaConfig.from_hf({**base, "rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0},
                                                         "full_attention": {"rope_type": "default"}}})
