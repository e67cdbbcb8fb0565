"""Prefix tuning (Li & Liang 2021) on jaxft models, numerically the same as Hugging Face PEFT.

    apply_prefix_tuning(model, PrefixConfig(num_virtual_tokens=20))        # or prefix_projection=True
    trainable = nnx.state(model, LoRAParam)                                # the prefix: all that trains

N trained key/value vectors per layer and kv head are attended before every sequence
(jaxft.models.virtual: same mask machinery as the KV cache, positions of real tokens + N). The
parameters are PEFT's PrefixEncoder's (peft/tuners/prefix_tuning/model.py), with its layout:
    no projection:  embedding [N, L·2·K·D]                                        (the prefix itself)
    projection:     embedding [N, K·D] → Linear(K·D, E) → tanh → Linear(E, L·2·K·D)
where K·D (kv heads × head dim) is PEFT's token_dim for GQA models and E = encoder_hidden_size
(default token_dim, as PEFT). The L·2·K·D axis is [layer, key|value, kv head, head dim], as PEFT's
get_prompt views it. An export holds the computed prefix [N, L·2·K·D] (PEFT's `prompt_embeddings`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.peft.lora import LoRAParam


@dataclasses.dataclass(frozen=True)
class PrefixConfig:
    num_virtual_tokens: int
    prefix_projection: bool = False  # PEFT's reparameterization MLP (trains better; exported as its output)
    encoder_hidden_size: int | None = None  # the MLP's hidden size; None: token_dim (kv heads × head dim)

    def __post_init__(self):
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.encoder_hidden_size is not None and (not isinstance(self.encoder_hidden_size, int)
                                                     or self.encoder_hidden_size < 1):
            raise ValueError(f"encoder_hidden_size must be a positive integer or None, got {self.encoder_hidden_size!r}")


def _torch_linear(key, out_features: int, in_features: int):
    """torch.nn.Linear's init: weight and bias uniform in ±1/√in."""
    bound = 1.0 / math.sqrt(in_features)
    kw, kb = jax.random.split(key)
    return (jax.random.uniform(kw, (out_features, in_features), jnp.float32, -bound, bound),
            jax.random.uniform(kb, (out_features,), jnp.float32, -bound, bound))


class PrefixEncoder(nnx.Module):
    """The trained prefix; `key_values(dtype)` gives each layer's keys and values [L, N, K, D]."""

    kind = "prefix"

    def __init__(self, spec, config: PrefixConfig, key: jax.Array):
        self.num_layers, self.num_kv_heads, self.head_dim = spec.num_layers, spec.num_kv_heads, spec.head_dim
        self.num_virtual_tokens = config.num_virtual_tokens
        self.prefix_projection = config.prefix_projection
        token_dim = spec.num_kv_heads * spec.head_dim
        out_dim = spec.num_layers * 2 * token_dim
        k_embed, k_in, k_out = jax.random.split(key, 3)
        n = config.num_virtual_tokens
        if config.prefix_projection:
            hidden = config.encoder_hidden_size or token_dim
            # torch.nn.Embedding's init, N(0, 1), as PEFT's (init_weights=None).
            self.embedding = LoRAParam(jax.random.normal(k_embed, (n, token_dim)), axes=(None, None))
            w0, b0 = _torch_linear(k_in, hidden, token_dim)
            w2, b2 = _torch_linear(k_out, out_dim, hidden)
            self.transform_0_weight = LoRAParam(w0, axes=(None, None))  # PEFT's transform.0 [E, K·D]
            self.transform_0_bias = LoRAParam(b0, axes=(None,))
            self.transform_2_weight = LoRAParam(w2, axes=(None, None))  # PEFT's transform.2 [L·2·K·D, E]
            self.transform_2_bias = LoRAParam(b2, axes=(None,))
        else:
            self.embedding = LoRAParam(jax.random.normal(k_embed, (n, out_dim)), axes=(None, None))

    def flat(self) -> jnp.ndarray:
        """The prefix [N, L·2·K·D] in the parameters' dtype (what PEFT's get_prompt computes and saves)."""
        embedding = self.embedding[...]
        if not self.prefix_projection:
            return embedding
        hidden = jnp.tanh(embedding @ self.transform_0_weight[...].T + self.transform_0_bias[...])
        return hidden @ self.transform_2_weight[...].T + self.transform_2_bias[...]

    def key_values(self, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
        n = self.num_virtual_tokens
        # PEFT casts the encoder output to the base model's dtype, then views it per layer.
        prefix = self.flat().astype(dtype).reshape(n, self.num_layers, 2, self.num_kv_heads, self.head_dim)
        prefix = prefix.transpose(2, 1, 0, 3, 4)  # [2, L, N, K, D]
        return prefix[0], prefix[1]


def apply_prefix_tuning(model: nnx.Module, config: PrefixConfig, seed: int = 0) -> nnx.Module:
    """Sets a trained prefix on `model`'s decoder (any jaxft DecoderModel), in place; returns the model."""
    decoder = model.model
    if decoder.virtual is not None:
        raise ValueError(f"the model already has virtual tokens ({type(decoder.virtual).__name__})")
    decoder.virtual = PrefixEncoder(decoder.spec, config, jax.random.key(seed))
    return model


def prefix_param_count(spec, config: PrefixConfig) -> int:
    """Trained parameters of a prefix on a model of DecoderSpec `spec` (what jaxft plan counts)."""
    token_dim = spec.num_kv_heads * spec.head_dim
    out_dim = spec.num_layers * 2 * token_dim
    if not config.prefix_projection:
        return config.num_virtual_tokens * out_dim
    hidden = config.encoder_hidden_size or token_dim
    return config.num_virtual_tokens * token_dim + hidden * (token_dim + 1) + out_dim * (hidden + 1)


__all__ = ["PrefixConfig", "PrefixEncoder", "apply_prefix_tuning", "prefix_param_count"]
