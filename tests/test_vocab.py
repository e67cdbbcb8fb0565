"""jaxft.vocab: the new rows drawn as transformers' resize_token_embeddings(mean_resizing=True) draws
them, the grown size (model.pad_vocab_multiple), the vocabulary error, and what jaxft plan counts."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxft import config as config_lib
from jaxft import plan as plan_lib
from jaxft import run as run_lib
from jaxft import vocab
from jaxft.demo import MODEL_DIR
from jaxft.demo.config import get_config

NEW = ("<|user|>", "<|assistant|>", "<|end|>")


def resized_by_transformers(vocab_size, hidden, added, seed=0):
    """(old embedding, transformers' new rows) of a random Llama with a skewed, correlated embedding."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.3 * torch.randn(vocab_size, hidden) @ torch.randn(hidden, hidden) / 8
                                             + 0.1)
    old = model.model.embed_tokens.weight.detach().numpy().copy()
    model.resize_token_embeddings(vocab_size + added)  # mean_resizing=True is the default
    return old, model.model.embed_tokens.weight.detach().numpy()[vocab_size:]


def test_rows_equal_transformers_where_covariance_is_singular():
    # 16 rows in 64 dimensions: the covariance has rank 15, so transformers (and jaxft) use the mean itself.
    old, expected = resized_by_transformers(16, 64, 3)
    ours = np.asarray(vocab.mean_resized_rows(jnp.asarray(old), 3, jax.random.key(0)))
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-7)
    np.testing.assert_allclose(ours, np.broadcast_to(old.mean(0), ours.shape), rtol=0, atol=1e-7)


def test_rows_follow_the_mean_and_scaled_covariance_of_transformers():
    # 1024 rows in 128 dimensions: a positive definite covariance; rows ~ N(μ, 1e-9 Σ). Whitened by
    # the Cholesky factor of 1e-9 Σ, jaxft's deviations from μ are standard normal, as transformers' are.
    old, expected = resized_by_transformers(1024, 128, 3)
    ours = np.asarray(vocab.mean_resized_rows(jnp.asarray(old), 3, jax.random.key(0)))
    mean = old.astype(np.float64).mean(0)
    centered = old.astype(np.float64) - mean
    factor = np.linalg.cholesky(1e-9 * centered.T @ centered / len(old))
    spread = np.sqrt(np.diag(factor @ factor.T)).max()
    for rows in (expected, ours):
        z = np.linalg.solve(factor, (rows - mean).T)  # [128, 3]: 384 standard normal draws
        assert abs((z ** 2).mean() - 1) < 0.3 and abs(z.mean()) < 0.3
    assert np.abs(ours - expected).max() < 10 * spread  # both at μ, ~3e-5 standard deviations of the old rows
    assert not np.allclose(ours, np.broadcast_to(mean, ours.shape), atol=1e-3 * spread)  # drawn, not the mean


def demo_config(**model):
    config = get_config("smoke")
    for key, value in model.items():
        config.model[key] = value
    return config


def demo_tokenizer(config):
    return vocab.load_tokenizer(config, MODEL_DIR)


@pytest.mark.parametrize("multiple, size", [(1, 1027), (8, 1032), (64, 1088)])
def test_pad_vocab_multiple_rounds_the_grown_vocabulary(multiple, size):
    config = demo_config(add_special_tokens=NEW, pad_vocab_multiple=multiple)
    tokenizer = demo_tokenizer(config)
    assert len(tokenizer) == 1027 and tokenizer.convert_tokens_to_ids(list(NEW)) == [1024, 1025, 1026]
    new = vocab.plan(config, tokenizer, 1024, MODEL_DIR)
    assert (new.old_size, new.size, new.rows) == (1024, size, tuple(range(1024, size)))


def test_a_vocabulary_that_already_has_room_does_not_grow():
    # A model padded beyond its tokenizer (as Qwen's): the new tokens take rows it has; they train.
    config = demo_config(add_tokens=("hello_world",), add_special_tokens=("<|eos|>",), pad_vocab_multiple=64)
    new = vocab.plan(config, demo_tokenizer(config), 1100, MODEL_DIR)
    assert (new.size, new.rows) == (1100, (2, 1024))  # the listed special token the tokenizer had keeps id 2


def test_tokenizer_larger_than_the_model_names_both_sizes_and_the_option():
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    tokenizer.add_tokens(["<a>", "<b>"])
    with pytest.raises(ValueError) as err:
        vocab.plan(get_config("smoke"), tokenizer, 1024, "base/")
    message = str(err.value)
    assert re.search(r"tokenizer has 1026 tokens but the model's vocab_size is 1024", message), message
    assert "model.add_tokens" in message and "\n" not in message


def test_config_checks():
    config = demo_config(add_tokens=("<a>",))
    config.lora.targets = ("q_proj", "lm_head")
    with pytest.raises(ValueError, match="lora.targets includes lm_head"):
        config_lib.validate(config)
    with pytest.raises(ValueError, match="model.pad_vocab_multiple must be an integer >= 1"):
        config_lib.validate(demo_config(pad_vocab_multiple=0))
    with pytest.raises(ValueError, match="in both model.add_tokens and model.add_special_tokens"):
        config_lib.validate(demo_config(add_tokens=("<a>",), add_special_tokens=("<a>",)))


def test_plan_counts_the_new_rows():
    hf_config = plan_lib.hf_config_for(MODEL_DIR)
    config = demo_config(add_special_tokens=NEW, pad_vocab_multiple=8)
    parts = run_lib.abstract_training(config, hf_config)
    params, frozen = parts.state.params, parts.state.frozen
    assert params["model.embed_tokens.adapter.rows"].shape == (8, 128)  # tied: one table
    assert frozen["model.embed_tokens.weight"].shape == (1032, 128)
    sizes = plan_lib.mesh_sizes({"data": 1}, 1)
    plain = plan_lib.estimate(demo_config(), hf_config, sizes)
    grown = plan_lib.estimate(config, hf_config, sizes)
    assert grown.get("trainable") - plain.get("trainable") == 8 * 128 * 4  # float32 rows
    assert grown.get("frozen") - plain.get("frozen") == 8 * 128 * 4
    assert grown.get("logits") > plain.get("logits")  # [B, T, 1032]
    assert any("vocabulary 1024 → 1032 (8 new token rows trained)" in detail for _, _, detail in grown.rows)

    config.train.new_token_rows = False  # grown, but the rows stay as drawn
    parts = run_lib.abstract_training(config, hf_config)
    assert "model.embed_tokens.adapter.rows" in parts.state.frozen
    assert not any("rows" in p for p in parts.state.params)

    full = demo_config(add_special_tokens=NEW)
    full.lora.rank = 0  # full fine-tuning: the grown table trains whole, no adapter
    parts = run_lib.abstract_training(full, hf_config)
    assert parts.state.params["model.embed_tokens.weight"].shape == (1027, 128)


def test_chat_template_from_a_file_is_installed(tmp_path):
    template = "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
    (tmp_path / "t.jinja").write_text(template)
    config = demo_config(add_special_tokens=NEW)
    config.data.chat_template = str(tmp_path / "t.jinja")
    tokenizer = demo_tokenizer(config)
    assert tokenizer.chat_template == template
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True, return_dict=False)[0] == 1024
    config.data.chat_template = str(tmp_path / "missing.jinja")
    with pytest.raises(ValueError, match="no such template file"):
        demo_tokenizer(config)
