"""The decoder-only transformer that every family configures, in Flax NNX.

    x = embed(ids)                                     (Gemma: × √hidden)
    for each layer (scanned, in groups whose windows repeat: layer_groups.py):
        x = x + attn(norm(x))                          (Gemma 2/3: x + norm(attn(norm(x))))
        x = x + mlp(norm(x))                           (Gemma 2/3: x + norm(mlp(norm(x))))
    logits = lm_head(norm(x))                          (Gemma 2: soft-capped)

Families differ in switches, not in structure: each family's config builds a `DecoderSpec`, and
the modules here read only that spec. Parameter paths mirror HF keys with the layer index folded
into a leading axis: `model.layers.{i}.self_attn.q_proj.weight` [out, in] ↔
`model.layers.self_attn.q_proj.weight` [L, out, in].
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
from flax import nnx

from jaxft.models import attention as attn_lib
from jaxft.models import moe as moe_lib
from jaxft.models import virtual as virtual_lib
from jaxft.models.kv_cache import KVCache, write_layer
from jaxft.models.layer_groups import layer_plan, scan_groups
from jaxft.models.layers import ACTIVATIONS, Axis, Embed, Linear, RMSNorm, adapters_enabled, constrain, stack_layers
from jaxft.models.rope import Rotary, apply_rotary


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    """Everything the shared decoder needs to know about a family's architecture (hashable: static)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    ropes: tuple[Rotary, ...]  # RoPE tables; layer i uses ropes[layer_ropes[i]]
    layer_ropes: tuple[int, ...] = ()  # () = every layer uses ropes[0]
    windows: tuple[int | None, ...] = ()  # per layer: None = global attention, N = the last N tokens
    activation: str = "silu"  # of the gated MLP, a layers.ACTIVATIONS key
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on q and k, before RoPE (qwen3, gemma3)
    norm_plus_one: bool = False  # Gemma: every norm scales by (1 + w)
    sandwich_norms: bool = False  # Gemma 2/3: attention and MLP outputs are normalized too
    embed_scale: float | None = None  # Gemma: embeddings × √hidden
    query_scale: float | None = None  # None: 1/√head_dim; Gemma 2/3: 1/√query_pre_attn_scalar
    attn_softcap: float | None = None  # Gemma 2: tanh soft-capping of attention scores
    final_softcap: float | None = None  # Gemma 2/3: tanh soft-capping of the output logits
    tie_word_embeddings: bool = False
    moe: moe_lib.MoESpec | None = None  # mixture of experts: which layers are sparse, how they route

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not supported (supported: {sorted(ACTIVATIONS)})")
        if not self.windows:
            object.__setattr__(self, "windows", (None,) * self.num_layers)
        if not self.layer_ropes:
            object.__setattr__(self, "layer_ropes", (0,) * self.num_layers)
        for name in ("windows", "layer_ropes"):
            if len(getattr(self, name)) != self.num_layers:
                raise ValueError(f"{len(getattr(self, name))} {name} entries for {self.num_layers} layers")
        if not self.ropes or max(self.layer_ropes) >= len(self.ropes):
            raise ValueError(f"layer_ropes {self.layer_ropes} index past the {len(self.ropes)} RoPE table(s)")

    @classmethod
    def of(cls, cfg, **switches) -> "DecoderSpec":
        """The spec of a family config with HF's field names (vocab_size, ..., rms_norm_eps) plus its switches."""
        return cls(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                   num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
                   num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, norm_eps=cfg.rms_norm_eps,
                   tie_word_embeddings=cfg.tie_word_embeddings, **switches)


class Attention(nnx.Module):
    def __init__(self, spec: DecoderSpec, *, param_dtype, dtype, rngs: nnx.Rngs):
        d, h, k, hd = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.q_proj = Linear(d, h * hd, use_bias=spec.qkv_bias, axes=(Axis.HEADS, Axis.EMBED), **kw)
        self.k_proj = Linear(d, k * hd, use_bias=spec.qkv_bias, axes=(Axis.KV_HEADS, Axis.EMBED), **kw)
        self.v_proj = Linear(d, k * hd, use_bias=spec.qkv_bias, axes=(Axis.KV_HEADS, Axis.EMBED), **kw)
        self.o_proj = Linear(h * hd, d, use_bias=spec.o_bias, axes=(Axis.EMBED, Axis.HEADS), **kw)
        if spec.qk_norm:
            self.q_norm = RMSNorm(hd, eps=spec.norm_eps, plus_one=spec.norm_plus_one, **kw)
            self.k_norm = RMSNorm(hd, eps=spec.norm_eps, plus_one=spec.norm_plus_one, **kw)
        self.qk_norm = spec.qk_norm
        self.num_heads, self.num_kv_heads, self.head_dim = h, k, hd
        self.scale = hd**-0.5 if spec.query_scale is None else spec.query_scale
        self.softcap = spec.attn_softcap
        self.implementation = "xla"

    def __call__(self, x, cos, sin, mask: attn_lib.MaskInfo, window, cache=None, prefix=None):
        """x [B, T, D] → [B, T, D]. cache: this layer's (keys, values, index); the new keys and values
        are written at `index` and the queries attend over the whole cache; returns (out, (keys, values)).
        prefix: prefix tuning's (keys, values) [N, K, D], attended before the sequence's own (see virtual.py)."""
        batch, length, _ = x.shape
        q = self.q_proj(x).reshape(batch, length, self.num_heads, self.head_dim)  # [B, T, H, D]
        k = self.k_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)  # [B, T, K, D]
        v = self.v_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            cached_keys, cached_values, index = cache
            k, v = write_layer(cached_keys, cached_values, k, v, index)  # [B, S, K, D]
        if prefix is not None:
            k, v = (jnp.concatenate([jnp.broadcast_to(p[None], (batch, *p.shape)).astype(t.dtype), t], axis=1)
                    for p, t in zip(prefix, (k, v)))  # [B, N + T, K, D]
        out = attn_lib.attention(q, k, v, mask, window, self.scale, self.implementation, softcap=self.softcap)
        out = self.o_proj(out.reshape(batch, length, self.num_heads * self.head_dim))
        return out if cache is None else (out, (k, v))


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU with silu (Llama), GeGLU with gelu (Gemma)."""

    def __init__(self, spec: DecoderSpec, *, param_dtype, dtype, rngs: nnx.Rngs):
        d, f = spec.hidden_size, spec.intermediate_size
        kw = dict(use_bias=spec.mlp_bias, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.gate_proj = Linear(d, f, axes=(Axis.MLP, Axis.EMBED), **kw)
        self.up_proj = Linear(d, f, axes=(Axis.MLP, Axis.EMBED), **kw)
        self.down_proj = Linear(f, d, axes=(Axis.EMBED, Axis.MLP), **kw)
        self.activation = spec.activation

    def __call__(self, x):
        hidden = ACTIVATIONS[self.activation](self.gate_proj(x)) * self.up_proj(x)  # [B, T, F]
        return self.down_proj(constrain(hidden, (Axis.BATCH, Axis.SEQ, Axis.MLP)))


class DecoderLayer(nnx.Module):
    """Pre-norm block; with sandwich norms (Gemma 2/3) each block's output is normalized as well.

    Names follow HF, where `post_attention_layernorm` is the norm *before the MLP* in Llama but the
    norm *of the attention output* in Gemma 2/3 (which add pre/post_feedforward_layernorm).
    """

    def __init__(self, spec: DecoderSpec, *, param_dtype, dtype, rngs: nnx.Rngs, sparse: bool = False):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        norm = dict(eps=spec.norm_eps, plus_one=spec.norm_plus_one, **kw)
        self.input_layernorm = RMSNorm(spec.hidden_size, **norm)
        self.self_attn = Attention(spec, **kw)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, **norm)
        if spec.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(spec.hidden_size, **norm)
            self.post_feedforward_layernorm = RMSNorm(spec.hidden_size, **norm)
        # A sparse layer's mlp is the mixture of experts (jaxft.models.moe), HF's `mlp.gate`/`mlp.experts`.
        self.mlp = moe_lib.SparseMoeBlock(spec.moe, spec.hidden_size, spec.activation, **kw) if sparse else MLP(spec, **kw)
        self.sandwich_norms = spec.sandwich_norms
        self.sparse, self.router_stats = sparse, spec.moe is not None
        self.num_experts = spec.moe.num_experts if spec.moe is not None else 0

    def __call__(self, x, cos, sin, mask, window, cache=None, prefix=None):
        """→ x; with a cache, (x, cache); in a MoE model without a cache, (x, router stats [2E + 2])."""
        attended = self.self_attn(self.input_layernorm(x), cos, sin, mask, window, cache, prefix)
        if cache is not None:
            attended, cache = attended
        stats = jnp.zeros((moe_lib.stats_size(self.num_experts),), jnp.float32)  # a dense layer adds none

        def mlp(h):
            nonlocal stats
            if not self.sparse:
                return self.mlp(h)
            out, stats = self.mlp(h, mask.kv_valid if cache is None else None)
            return out

        if self.sandwich_norms:
            x = x + self.post_attention_layernorm(attended)
            x = x + self.post_feedforward_layernorm(mlp(self.pre_feedforward_layernorm(x)))
        else:
            x = x + attended
            x = x + mlp(self.post_attention_layernorm(x))
        x = constrain(x, (Axis.BATCH, Axis.SEQ, Axis.EMBED))
        if cache is not None:
            return x, cache
        return (x, stats) if self.router_stats else x


class Decoder(nnx.Module):
    """HF's `model.` prefix: embeddings, the stacked layers, the final norm; returns hidden states."""

    def __init__(self, spec: DecoderSpec, *, param_dtype, dtype, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.embed_tokens = Embed(spec.vocab_size, spec.hidden_size, **kw)
        def make_layer(sparse, r):
            return DecoderLayer(spec, param_dtype=param_dtype, dtype=dtype, rngs=r, sparse=sparse)

        kinds = spec.moe.sparse_layers if spec.moe is not None else (False,) * spec.num_layers
        if len(set(kinds)) > 1:  # dense layers between sparse ones: a stack of each kind
            self.layers = moe_lib.MixedLayers(make_layer, kinds, rngs)
        else:
            self.layers = stack_layers(lambda r: make_layer(kinds[0], r), spec.num_layers, rngs)
        self.norm = RMSNorm(spec.hidden_size, eps=spec.norm_eps, plus_one=spec.norm_plus_one, **kw)
        self.spec = spec
        self.dtype = dtype
        self.virtual = nnx.data(None)  # prefix/prompt tuning's virtual tokens (jaxft.peft sets it; see virtual.py)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None, remat: str = "none",
                 cache: KVCache | None = None):
        """input_ids [B, T] → final-norm hidden states [B, T, D]; with a cache, (hidden, updated cache)."""
        batch, length = input_ids.shape
        if cache is None:
            mask = attn_lib.MaskInfo.for_sequence(batch, length, attention_mask, segment_ids)
            default_positions = attn_lib.default_positions(mask) if positions is None else None
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids (packed documents) are not supported with a KV cache; generate each "
                                 "document as its own row")
            write_at = cache.index
            mask, default_positions, cache = cache.step_inputs(batch, length, attention_mask)
        if positions is None:
            positions = default_positions
        x = self.scale_embeddings(self.embed_tokens(input_ids))
        virtual = self.virtual if cache is None and adapters_enabled() else None  # cached: already in the cache
        prefix, prompt_length = None, 0
        if virtual is not None and virtual.kind == "prefix":
            mask, positions = virtual_lib.prefix_inputs(virtual.num_virtual_tokens, mask, positions, segment_ids is not None)
            prefix = virtual.key_values(self.dtype)  # each [L, N, K, D]
        elif virtual is not None:
            prompt_length = virtual.num_virtual_tokens
            mask, positions = virtual_lib.prompt_inputs(prompt_length, mask, positions, segment_ids is not None)
            prompt = jnp.broadcast_to(virtual.embeddings(x.dtype)[None], (batch, prompt_length, x.shape[-1]))
            # [B, N + T, D]. After Gemma's √hidden scale: transformers 5 scales inside the embedding
            # module, so PEFT's prompt (given as inputs_embeds) is not scaled.
            x = jnp.concatenate([prompt, x], axis=1)
        return self._layers(x, mask, positions, remat, cache, prefix)[:, prompt_length:] if cache is None \
            else self._layers(x, mask, positions, remat, cache, prefix, write_at)

    def scale_embeddings(self, x):
        if self.spec.embed_scale is not None:
            # HF casts the scale to the embedding's dtype first (√3072 becomes 55.5 in bf16).
            x = x * jnp.asarray(self.spec.embed_scale, self.embed_tokens.weight.dtype).astype(x.dtype)
        return constrain(x, (Axis.BATCH, Axis.SEQ, Axis.EMBED))

    def _layers(self, x, mask, positions, remat="none", cache=None, prefix=None, write_at=None):
        """The decoder layers and final norm over embedded inputs x [B, T, D]; with a cache, (hidden, cache).
        prefix: prefix tuning's per-layer (keys, values), each [L, N, K, D]."""
        spec = self.spec
        tables = [rope.cos_sin(positions, self.dtype) for rope in spec.ropes]  # each (cos, sin) [B, T, R]
        # Layers are scanned in groups whose (window, RoPE table) pattern repeats (layer_groups.py), so
        # each layer's window reaches the attention kernels as a Python value, as fused kernels need.
        kinds = tuple(zip(spec.windows, spec.layer_ropes))
        if isinstance(self.layers, moe_lib.MixedLayers):  # dense and sparse layers in two stacks
            scan = functools.partial(self.layers.scan, kinds=kinds)
        else:
            scan = functools.partial(scan_groups, self.layers, plan=layer_plan(kinds))
        if cache is None:
            def body(layer, carry, layer_prefix, kind):
                window, table = kind
                if spec.moe is None:
                    return layer(carry, *tables[table], mask, window, prefix=layer_prefix)
                x, total = carry  # MoE: router stats summed over layers, for the load-balancing loss
                x, stats = layer(x, *tables[table], mask, window, prefix=layer_prefix)
                return x, total + stats

            if spec.moe is None:
                return self.norm(scan(x, prefix, body, remat=remat))
            x, stats = scan((x, jnp.zeros((moe_lib.stats_size(spec.moe.num_experts),), jnp.float32)), prefix, body,
                            remat=remat)
            moe_lib.report_router_stats(stats)
            return self.norm(x)

        def cached_body(layer, x, keys_values, kind):  # also carries this layer's cache slice in and out
            window, table = kind
            return layer(x, *tables[table], mask, window, (*keys_values, write_at))

        x, (keys, values) = scan(x, (cache.keys, cache.values), cached_body, with_outputs=True)
        return self.norm(x), cache._replace(keys=keys, values=values)


def softcap(x, cap: float | None):
    """cap · tanh(x / cap): smoothly bounds x to (-cap, cap); identity when cap is None."""
    return x if cap is None else jnp.tanh(x / cap) * cap


class DecoderModel(nnx.Module):
    """A family's decoder under HF's `model.` prefix, built from its config (anything with
    `decoder_spec()` and `to_hf()`); CausalLM and classification.SequenceClassifier add a head."""

    def __init__(self, cfg, *, param_dtype=jnp.float32, dtype=None, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype or param_dtype
        self.model = Decoder(cfg.decoder_spec(), param_dtype=param_dtype, dtype=self.dtype, rngs=rngs)
        self.remat = "none"  # a layers.REMAT_POLICIES key; training sets it

    def hidden_states(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        """Final-norm hidden states [B, T, D]: what losses that avoid full logits (chunked CE) need."""
        return self.model(input_ids, attention_mask, positions, segment_ids, remat=self.remat)


class CausalLM(DecoderModel):
    """`model(input_ids, attention_mask=None, positions=None, segment_ids=None)` → logits [B, T, V].

    attention_mask: 1 for real tokens, 0 for padding (left or right). positions: RoPE position ids;
    by default counted over real tokens and restarted per segment. segment_ids: packed documents;
    a token attends only to earlier tokens of its own segment.
    """

    def __init__(self, cfg, *, param_dtype=jnp.float32, dtype=None, rngs: nnx.Rngs):
        super().__init__(cfg, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        spec = self.model.spec
        if not spec.tie_word_embeddings:
            self.lm_head = Linear(spec.hidden_size, spec.vocab_size, use_bias=False, axes=(Axis.VOCAB, Axis.EMBED),
                                  param_dtype=param_dtype, dtype=self.dtype, rngs=rngs)

    def logits(self, hidden):
        if self.model.spec.tie_word_embeddings:
            logits = self.model.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return softcap(logits, self.model.spec.final_softcap)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        hidden = self.hidden_states(input_ids, attention_mask, positions, segment_ids)
        return constrain(self.logits(hidden), (Axis.BATCH, Axis.SEQ, Axis.VOCAB))

    def init_cache(self, batch: int, size: int) -> KVCache:
        """A KV cache for `batch` rows of up to `size` tokens, in the compute dtype: empty, or with
        prefix/prompt tuning's N virtual tokens already in its first N slots (size + N in all)."""
        virtual = self.model.virtual if adapters_enabled() else None
        if virtual is None:
            return KVCache.create(self.model.spec, batch, size, self.dtype)
        n = virtual.num_virtual_tokens
        cache = KVCache.create(self.model.spec, batch, size + n, self.dtype)
        if virtual.kind == "prefix":
            return virtual_lib.write_prefix(cache, *virtual.key_values(self.dtype))
        # Prompt tuning: run the virtual tokens through the layers once, as a prefill would.
        write_at = cache.index
        mask, positions, cache = cache.step_inputs(batch, n)
        prompt = jnp.broadcast_to(virtual.embeddings(self.dtype)[None], (batch, n, self.model.spec.hidden_size))
        return self.model._layers(prompt, mask, positions, cache=cache, write_at=write_at)[1]

    def decode(self, input_ids, cache: KVCache, attention_mask=None, last_only: bool = False):
        """Logits of new tokens [B, T] given the cache of the tokens before them → (logits, cache).

        Prefill with the (left-padded) prompts and their attention_mask, then one token per step.
        last_only: logits of the last position only ([B, 1, V]), all a sampler needs.
        """
        hidden, cache = self.model(input_ids, attention_mask, cache=cache)
        return self.logits(hidden[:, -1:] if last_only else hidden), cache

    def to_hf_config(self) -> dict:
        """The config.json that `save_pretrained` writes."""
        return self.config.to_hf()
