"""The Llama-family decoder (llama, mistral, qwen2, qwen3) in Flax NNX.

    x = embed(ids)
    for each layer (scanned):   x = x + attn(norm(x));   x = x + mlp(norm(x))
    logits = lm_head(norm(x))

Parameter paths mirror HF keys with the layer index folded into a leading axis:
`model.layers.{i}.self_attn.q_proj.weight` [out, in] ↔ `model.layers.self_attn.q_proj.weight`
[L, out, in].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.models import attention as attn_lib
from jaxft.models.layers import Axis, Embed, Linear, RMSNorm, constrain, scan_layers, stack_layers
from jaxft.models.llama.config import LlamaConfig
from jaxft.models.rope import apply_rotary, inv_freq_and_scale, rotary_cos_sin


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, param_dtype, dtype, rngs: nnx.Rngs):
        d, h, k, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.q_proj = Linear(d, h * hd, use_bias=cfg.qkv_bias, axes=(Axis.HEADS, Axis.EMBED), **kw)
        self.k_proj = Linear(d, k * hd, use_bias=cfg.qkv_bias, axes=(Axis.KV_HEADS, Axis.EMBED), **kw)
        self.v_proj = Linear(d, k * hd, use_bias=cfg.qkv_bias, axes=(Axis.KV_HEADS, Axis.EMBED), **kw)
        self.o_proj = Linear(h * hd, d, use_bias=cfg.o_bias, axes=(Axis.EMBED, Axis.HEADS), **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, **kw)
            self.k_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, **kw)
        self.qk_norm = cfg.qk_norm
        self.num_heads, self.num_kv_heads, self.head_dim = h, k, hd
        self.implementation = "xla"

    def __call__(self, x, cos, sin, mask: attn_lib.MaskInfo, window):
        batch, length, _ = x.shape
        q = self.q_proj(x).reshape(batch, length, self.num_heads, self.head_dim)  # [B, T, H, D]
        k = self.k_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)  # [B, T, K, D]
        v = self.v_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attn_lib.attention(q, k, v, mask, window, self.head_dim**-0.5, self.implementation)
        return self.o_proj(out.reshape(batch, length, self.num_heads * self.head_dim))


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, param_dtype, dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(use_bias=cfg.mlp_bias, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.gate_proj = Linear(d, f, axes=(Axis.MLP, Axis.EMBED), **kw)
        self.up_proj = Linear(d, f, axes=(Axis.MLP, Axis.EMBED), **kw)
        self.down_proj = Linear(f, d, axes=(Axis.EMBED, Axis.MLP), **kw)

    def __call__(self, x):
        hidden = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)  # [B, T, F]
        return self.down_proj(constrain(hidden, (Axis.BATCH, Axis.SEQ, Axis.MLP)))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, param_dtype, dtype, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, **kw)

    def __call__(self, x, cos, sin, mask, window):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, window)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, (Axis.BATCH, Axis.SEQ, Axis.EMBED))


class Decoder(nnx.Module):
    """HF's `model.` prefix: embeddings, the stacked layers, the final norm."""

    def __init__(self, cfg: LlamaConfig, *, param_dtype, dtype, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.layers = stack_layers(lambda r: DecoderLayer(cfg, param_dtype=param_dtype, dtype=dtype, rngs=r),
                                   cfg.num_hidden_layers, rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)


class LlamaForCausalLM(nnx.Module):
    """`model(input_ids, attention_mask=None, positions=None, segment_ids=None)` → logits [B, T, V].

    attention_mask: 1 for real tokens, 0 for padding (left or right). positions: RoPE position ids;
    by default counted over real tokens and restarted per segment. segment_ids: packed documents;
    a token attends only to earlier tokens of its own segment.
    """

    def __init__(self, cfg: LlamaConfig, *, param_dtype=jnp.float32, dtype=None, rngs: nnx.Rngs):
        dtype = dtype or param_dtype
        self.config = cfg
        self.dtype = dtype
        self.model = Decoder(cfg, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, axes=(Axis.VOCAB, Axis.EMBED),
                                  param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        inv_freq, self.rope_attention_factor = inv_freq_and_scale(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
        self.inv_freq = tuple(float(f) for f in inv_freq)  # static: not a parameter, never trained
        self.windows = tuple(attn_lib.NO_WINDOW if w is None else w for w in cfg.sliding_windows)
        self.remat = "none"  # a layers.REMAT_POLICIES key; training sets it

    def hidden_states(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        """Final-norm hidden states [B, T, D]: what losses that avoid full logits (chunked CE) need."""
        batch, length = input_ids.shape
        mask = attn_lib.MaskInfo.for_sequence(batch, length, attention_mask, segment_ids)
        if positions is None:
            positions = attn_lib.default_positions(mask)
        cos, sin = rotary_cos_sin(positions, jnp.asarray(self.inv_freq, jnp.float32), self.rope_attention_factor, self.dtype)
        x = constrain(self.model.embed_tokens(input_ids), (Axis.BATCH, Axis.SEQ, Axis.EMBED))
        windows = jnp.asarray(self.windows, jnp.int32)  # [L]: scanned alongside the layer params
        x = scan_layers(self.model.layers, x, windows,
                        lambda layer, x, window: layer(x, cos, sin, mask, window), remat=self.remat)
        return self.model.norm(x)

    def logits(self, hidden):
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        hidden = self.hidden_states(input_ids, attention_mask, positions, segment_ids)
        return constrain(self.logits(hidden), (Axis.BATCH, Axis.SEQ, Axis.VOCAB))
