"""Tiny random Hugging Face models for parity tests (needs the `test` extra: torch, transformers).

    folder, torch_model = tiny_hf_model(tmp_path, "qwen2", num_key_value_heads=1)

Weights are seeded and then perturbed, so that norms are not all 1 and biases not all 0: a port
that forgot a bias or a norm weight would still match an untouched random init.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

# Small enough to run in milliseconds, big enough for GQA (4 query heads over 2 kv heads) and
# for a head_dim that differs from hidden_size / num_heads where the family allows it.
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)

CASES: dict[str, dict[str, Any]] = {
    "llama3_rope": dict(model_type="llama", rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}, rope_theta=500000.0),
    "llama_linear_rope_mqa": dict(model_type="llama", num_key_value_heads=1,
                                  rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama_tied": dict(model_type="llama", tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "mistral_sliding": dict(model_type="mistral", sliding_window=4, head_dim=24),
    "qwen2_bias": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen2_yarn_sliding": dict(model_type="qwen2", use_sliding_window=True, sliding_window=3, max_window_layers=1,
                               rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                             "original_max_position_embeddings": 64}),
    "qwen3": dict(model_type="qwen3", head_dim=32),
}


def tiny_hf_config(case_or_type: str, **overrides):
    import transformers

    spec = dict(BASE)
    spec.update(CASES.get(case_or_type, {"model_type": case_or_type}))
    spec.update(overrides)
    model_type = spec.pop("model_type")
    return transformers.AutoConfig.for_model(model_type, **spec)


def tiny_hf_model(folder: str | os.PathLike, case_or_type: str = "llama3_rope", seed: int = 0,
                  dtype: str = "float32", task: str = "causal_lm", **overrides):
    """Builds, perturbs and saves a random transformers model; returns (folder, torch model in eval mode).

    task: "causal_lm" (AutoModelForCausalLM) or "classification" (AutoModelForSequenceClassification;
    pass num_labels and pad_token_id in overrides).
    """
    import torch
    import transformers

    config = tiny_hf_config(case_or_type, **overrides)
    torch.manual_seed(seed)
    auto = {"causal_lm": transformers.AutoModelForCausalLM,
            "classification": transformers.AutoModelForSequenceClassification}[task]
    model = auto.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model = model.to(getattr(torch, dtype)).eval()
    model.save_pretrained(folder)
    return os.fspath(folder), model


def padded_batch(vocab_size: int, batch: int = 3, length: int = 12, seed: int = 0):
    """input_ids, attention_mask, position_ids: row 0 left-padded, row 1 right-padded, row 2 full."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab_size, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    mask[0, : length // 4] = 0
    if batch > 1:
        mask[1, length - length // 3:] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return ids, mask, positions


def demo_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, mask, positions) of `texts` in the bundled demo tokenizer, right-padded."""
    from transformers import AutoTokenizer

    from jaxft.demo import MODEL_DIR

    enc = AutoTokenizer.from_pretrained(MODEL_DIR)(texts, padding=True, return_tensors="np")
    mask = enc["attention_mask"]
    return enc["input_ids"], mask, np.maximum(np.cumsum(mask, 1) - 1, 0)


def torch_logits(model, ids, mask, positions) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                    position_ids=torch.as_tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()


def train_batch(vocab: int, batch: int = 8, length: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """Right-padded rows with next-token targets and a partial loss mask (prompt tokens untrained)."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, (batch, length + 1)).astype(np.int32)
    lengths = rng.randint(length // 2, length + 1, batch)
    attention = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    loss_mask = attention.astype(np.float32)
    loss_mask[:, :3] = 0.0  # a "prompt" whose targets are not trained
    loss_mask[:, :][np.arange(length)[None] >= (lengths - 1)[:, None]] = 0.0  # no target past the row's end
    positions = np.maximum(np.cumsum(attention, 1) - 1, 0).astype(np.int32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": loss_mask, "attention_mask": attention,
            "positions": positions, "segment_ids": attention.copy()}


def peft_model(torch_model, lora_config, seed: int = 0, randomize: bool = True):
    """A PEFT copy of `torch_model` (a peft.LoraConfig's adapters), randomized when asked (B ≠ 0,
    DoRA magnitudes ≠ row norms) so that the adapters change the model."""
    import copy

    import peft
    import torch

    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(torch_model), lora_config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if randomize and "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
            if randomize and "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=generator))
    return model.eval()


def hf_keys(path, num_layers: int) -> list[str]:
    """HF module names of a jaxft Linear path: one per layer when it is in the stacked layers."""
    name = ".".join(path)
    if "layers" not in path:
        return [name]
    return [name.replace("model.layers.", f"model.layers.{i}.") for i in range(num_layers)]


def copy_adapters(torch_peft, model) -> None:
    """PEFT adapter weights → the jaxft adapters of `model`, stacking per-layer tensors on the layer axis."""
    import jax.numpy as jnp

    from jaxft.peft.lora import linear_modules

    sd = torch_peft.state_dict()
    for path, linear in linear_modules(model).items():
        if linear.adapter is None:
            continue
        for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
            variable = getattr(linear.adapter, name)
            if variable is None:
                continue
            keys = [f"base_model.model.{k}.{name}.default.weight" for k in hf_keys(path, model.config.num_hidden_layers)]
            value = np.stack([sd[k].float().numpy() for k in keys]) if "layers" in path else sd[keys[0]].float().numpy()
            assert value.shape == variable.shape, (path, name, value.shape, variable.shape)
            variable.set_value(jnp.asarray(value))
