"""Config of the Gemma family (gemma, gemma2, gemma3_text), converted from and to HF config.json.

All three are the shared decoder with GeGLU, (1 + w) norms, embeddings scaled by √hidden, tied
output and a head_dim of its own; the generations add switches:

    gemma2:      pre- and post-norms around attention and MLP, query scale 1/√query_pre_attn_scalar,
                 tanh soft-capping of attention scores and final logits, sliding-window layers
                 alternating with global ones
    gemma3_text: gemma2's layout without attention soft-capping, plus q/k norms, one sliding layer
                 pattern (5 local : 1 global by default) and separate RoPE for local and global layers

Fields missing from config.json take transformers' defaults for that model type.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxft.models import hf_config
from jaxft.models.decoder import DecoderSpec
from jaxft.models.layers import ACTIVATIONS
from jaxft.models.rope import RopeConfig, Rotary

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")
_ARCHITECTURES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
SLIDING, FULL = "sliding_attention", "full_attention"
# transformers' defaults where they differ by generation.
_DEFAULTS = {
    "gemma": dict(max_position_embeddings=8192),
    "gemma2": dict(max_position_embeddings=8192, query_pre_attn_scalar=256, sliding_window=4096,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(max_position_embeddings=131072, query_pre_attn_scalar=256, sliding_window=4096,
                        attn_logit_softcapping=None, final_logit_softcapping=None),
}
_GEMMA3_THETA = {FULL: 1_000_000.0, SLIDING: 10_000.0}
# config.json fields this family reads (beyond hf_config's dimensions and inert fields).
_FIELDS = {
    "tie_word_embeddings", "cache_implementation", "head_dim", "hidden_act", "hidden_activation", "rms_norm_eps",
    "max_position_embeddings", "attention_bias", "rope_theta", "rope_scaling", "rope_parameters",
    "rope_local_base_freq", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
    "sliding_window", "layer_types", "sliding_window_pattern", "_sliding_window_pattern",
    "use_bidirectional_attention",
}


@dataclasses.dataclass(frozen=True)
class GemmaConfig(hf_config.Dimensions):
    model_type: str
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    activation: str = "gelu_pytorch_tanh"
    rope: RopeConfig = RopeConfig()  # of global layers (all layers before gemma3)
    local_rope: RopeConfig | None = None  # gemma3: of sliding-window layers
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    query_pre_attn_scalar: float | None = None  # gemma2/3; gemma scales queries by 1/√head_dim
    # gemma3 configs carry one too, but transformers never applies it there; kept for export only.
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # gemma2/3: SLIDING or FULL per layer
    token_ids: tuple[tuple[str, Any], ...] = ()  # kept only to write them back on export

    @classmethod
    def from_hf(cls, hf: dict[str, Any], where: str = "config.json") -> "GemmaConfig":
        model_type = hf_config.check(hf, "Gemma", MODEL_TYPES, _FIELDS, where)
        f = hf_config.Fields(hf, where)
        if f.bool("use_bidirectional_attention", False):
            raise ValueError(f"{where}: use_bidirectional_attention=True (an encoder, not a causal LM) is not supported")
        defaults = _DEFAULTS[model_type]
        # transformers maps the legacy "gelu" of Gemma 1 configs to the tanh approximation.
        activation = hf_config.activation(hf, where, "hidden_act" if model_type == "gemma" else "hidden_activation",
                                          "gelu_pytorch_tanh", ACTIVATIONS,
                                          aliases={"gelu": "gelu_pytorch_tanh"} if model_type == "gemma" else None,
                                          null_ok=True)
        dims = hf_config.dimensions(hf, where)
        common = hf_config.common(hf, where, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                  max_position_embeddings=defaults["max_position_embeddings"])
        rope, local_rope = _ropes(hf, model_type, where, common["max_position_embeddings"])
        later = model_type != "gemma"
        return cls(
            model_type=model_type,
            **dims,
            **common,
            # transformers' default 256, not hidden / heads; gemma2/3 configs refuse heads that do not divide hidden
            head_dim=hf_config.head_dim(hf, where, default=256, divisible_because=(
                f"transformers' {model_type} config requires it" if later else None)),
            activation=activation,
            rope=rope,
            local_rope=local_rope,
            attention_bias=f.bool("attention_bias", False),
            query_pre_attn_scalar=f.number("query_pre_attn_scalar", defaults["query_pre_attn_scalar"]) if later else None,
            attn_logit_softcapping=f.number("attn_logit_softcapping", defaults.get("attn_logit_softcapping"), null_ok=True),
            final_logit_softcapping=f.number("final_logit_softcapping", defaults.get("final_logit_softcapping"),
                                             null_ok=True),
            sliding_window=f.int("sliding_window", defaults.get("sliding_window"), null_ok=True),
            layer_types=_layer_types(f, model_type, dims["num_hidden_layers"]),
        )

    def decoder_spec(self) -> DecoderSpec:
        rope = Rotary.build(self.rope, self.head_dim, self.max_position_embeddings)
        ropes, layer_ropes = (rope,), ()
        if self.local_rope is not None:  # gemma3: table 0 for sliding layers, 1 for global ones
            ropes = (Rotary.build(self.local_rope, self.head_dim, self.max_position_embeddings), rope)
            layer_ropes = tuple(0 if t == SLIDING else 1 for t in self.layer_types)
        later = self.model_type != "gemma"
        return DecoderSpec.of(
            self, ropes=ropes, layer_ropes=layer_ropes,
            windows=tuple(self.sliding_window if t == SLIDING else None for t in self.layer_types),
            activation=self.activation, qkv_bias=self.attention_bias, o_bias=self.attention_bias,
            qk_norm=self.model_type == "gemma3_text", norm_plus_one=True, sandwich_norms=later,
            embed_scale=self.hidden_size**0.5,
            query_scale=self.query_pre_attn_scalar**-0.5 if later else None,
            attn_softcap=self.attn_logit_softcapping if self.model_type == "gemma2" else None,
            final_softcap=self.final_logit_softcapping if later else None)

    def to_hf(self) -> dict[str, Any]:
        out = {**hf_config.common_to_hf(self, _ARCHITECTURES[self.model_type]), "head_dim": self.head_dim,
               "attention_bias": self.attention_bias, **self.rope.to_hf()}
        if self.model_type == "gemma":
            out["hidden_act"] = self.activation
            return out
        out.update(hidden_activation=self.activation, query_pre_attn_scalar=self.query_pre_attn_scalar,
                   attn_logit_softcapping=self.attn_logit_softcapping,
                   final_logit_softcapping=self.final_logit_softcapping, sliding_window=self.sliding_window,
                   layer_types=list(self.layer_types))
        if self.local_rope is not None:
            out["rope_local_base_freq"] = self.local_rope.theta
        return out


def _ropes(hf: dict[str, Any], model_type: str, where: str, max_position_embeddings: int
           ) -> tuple[RopeConfig, RopeConfig | None]:
    """(global RoPE, gemma3's local RoPE): v5 nests rope_parameters by layer type; v4 configs give
    rope_theta + rope_scaling (global) and rope_local_base_freq."""
    if model_type != "gemma3_text":
        return RopeConfig.from_hf(hf, where, max_position_embeddings), None
    f = hf_config.Fields(hf, where)
    nested = f.object("rope_parameters")
    if isinstance(nested, dict) and nested and all(isinstance(v, dict) or v is None for v in nested.values()):
        ropes = {}
        for layer_type, theta in _GEMMA3_THETA.items():
            raw = {"rope_type": "default", "rope_theta": theta, **(nested.get(layer_type) or {})}
            ropes[layer_type] = RopeConfig.from_hf({"rope_parameters": raw}, where, max_position_embeddings,
                                                   field=f"rope_parameters.{layer_type}")
        full, local = ropes[FULL], ropes[SLIDING]
    else:
        full = RopeConfig.from_hf({"rope_theta": f.number("rope_theta", _GEMMA3_THETA[FULL]),
                                   "rope_scaling": f.object("rope_scaling")}, where, max_position_embeddings)
        local = RopeConfig(theta=float(f.number("rope_local_base_freq", _GEMMA3_THETA[SLIDING])))
    if local.rope_type != "default":
        raise ValueError(f"{where}: scaled RoPE ({local.rope_type!r}) on sliding-window layers is not supported")
    return full, local


def _layer_types(f: hf_config.Fields, model_type: str, layers: int) -> tuple[str, ...]:
    where = f.where
    if model_type == "gemma":
        return ()
    types = f.strings("layer_types", None)
    if types is None:  # transformers' defaults: gemma2 alternates from a sliding layer; gemma3 has 5:1
        period = 2 if model_type == "gemma2" else (f.int("sliding_window_pattern", None, null_ok=True)
                                                   or f.int("_sliding_window_pattern", None, null_ok=True) or 6)
        types = tuple(SLIDING if (i + 1) % period else FULL for i in range(layers))
    if len(types) != layers:
        raise ValueError(f"{where}: layer_types has {len(types)} entries for num_hidden_layers={layers}")
    unknown = set(types) - {SLIDING, FULL}
    if unknown:
        raise ValueError(f"{where}: unknown layer_types {sorted(unknown)}")
    if SLIDING in types and not f.int("sliding_window", _DEFAULTS[model_type]["sliding_window"], null_ok=True):
        raise ValueError(f"{where}: sliding_attention layers need a sliding_window")
    return types
