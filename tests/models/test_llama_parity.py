"""Llama-family logits match transformers (fp32, max abs diff <= 1e-4) on padded batches."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft.models.llama import LlamaConfig
from jaxft.testing import CASES, padded_batch, tiny_hf_model, torch_logits

TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    folder, torch_model = tiny_hf_model(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, folder, torch_model


def test_logits_match_transformers_with_padding(case):
    name, folder, torch_model = case
    model = jaxft.from_pretrained(folder, dtype="float32")
    # Longer than every sliding window in CASES, so windows actually cut.
    ids, mask, positions = padded_batch(model.config.vocab_size, batch=3, length=12)
    expected = torch_logits(torch_model, ids, mask, positions)
    got = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert got.shape == expected.shape
    valid = mask.astype(bool)  # logits at padding positions are meaningless in both stacks
    diff = np.abs(got - expected)[valid].max()
    assert diff <= TOL, f"{name}: max |jaxft - transformers| = {diff:.2e}"


def test_explicit_positions_are_used(case):
    """Passing the default positions explicitly changes nothing; stretching them changes the logits
    (RoPE is relative, so a uniform shift would not)."""
    _, folder, _ = case
    model = jaxft.from_pretrained(folder)
    ids, mask, positions = padded_batch(model.config.vocab_size)
    default = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    explicit = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), positions=jnp.asarray(positions)))
    stretched = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), positions=jnp.asarray(positions * 2)))
    np.testing.assert_array_equal(default, explicit)
    assert np.abs(stretched - default)[mask.astype(bool)].max() > 1e-3


def test_config_round_trip(case):
    _, folder, torch_model = case
    model = jaxft.from_pretrained(folder)
    again = LlamaConfig.from_hf(model.config.to_hf())
    assert again == model.config


def test_packed_segments_equal_separate_documents(tmp_path):
    """Two documents packed in one row with segment_ids give each document's own logits."""
    folder, _ = tiny_hf_model(tmp_path, "mistral_sliding")
    model = jaxft.from_pretrained(folder)
    rng = np.random.RandomState(1)
    doc_a, doc_b = rng.randint(0, 128, 7), rng.randint(0, 128, 5)
    packed = jnp.asarray(np.concatenate([doc_a, doc_b])[None])
    segments = jnp.asarray(np.array([[1] * 7 + [2] * 5]))
    got = np.asarray(model(packed, segment_ids=segments))[0]
    alone_a = np.asarray(model(jnp.asarray(doc_a[None])))[0]
    alone_b = np.asarray(model(jnp.asarray(doc_b[None])))[0]
    np.testing.assert_allclose(got[:7], alone_a, atol=1e-5)
    np.testing.assert_allclose(got[7:], alone_b, atol=1e-5)
