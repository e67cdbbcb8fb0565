"""Config of Phi-3 (model_type phi3), converted from and to HF config.json.

Phi-3 is the Llama layout (pre-norms, SwiGLU, no biases) with two differences that live elsewhere:
fused projections in the checkpoint (convert.py splits them) and LongRoPE for the long-context
variants, whose factors switch from `short_factor` to `long_factor` once a batch runs past
`original_max_position_embeddings` (jaxft.models.rope.Rotary). The 4k models use plain RoPE and a
sliding window; Phi-4-mini adds partial rotary and tied embeddings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxft.models import hf_config
from jaxft.models.decoder import DecoderSpec
from jaxft.models.layers import ACTIVATIONS
from jaxft.models.rope import RopeConfig, Rotary

MODEL_TYPES = ("phi3",)
# config.json fields Phi-3 reads, beyond hf_config's dimensions and inert fields (its dropouts act
# only in PyTorch training mode; auto_map names the remote code that transformers no longer needs).
_FIELDS = {
    "resid_pdrop", "embd_pdrop", "auto_map", "tie_word_embeddings", "hidden_act", "rms_norm_eps",
    "max_position_embeddings", "original_max_position_embeddings", "rope_theta", "rope_scaling",
    "rope_parameters", "partial_rotary_factor", "sliding_window",
}


@dataclasses.dataclass(frozen=True)
class Phi3Config(hf_config.Dimensions):
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    hidden_act: str = "silu"
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # every layer, when set
    token_ids: tuple[tuple[str, Any], ...] = ()  # kept only to write them back on export
    model_type: str = "phi3"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any], where: str = "config.json") -> "Phi3Config":
        hf_config.check(hf, "Phi-3", MODEL_TYPES, _FIELDS, where)
        f = hf_config.Fields(hf, where)
        dims = hf_config.dimensions(hf, where)
        hf_config.heads_divide_hidden(hf, where, "Phi-3's head_dim is their ratio")
        head_dim = dims["hidden_size"] // dims["num_attention_heads"]
        act = hf_config.activation(hf, where, "hidden_act", "silu", ACTIVATIONS)
        common = hf_config.common(hf, where, rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=False)
        original = f.int("original_max_position_embeddings", 4096)
        return cls(
            **dims,
            **common,
            original_max_position_embeddings=original,
            hidden_act=act,
            rope=_rope(hf, original, head_dim, common["max_position_embeddings"], where),
            sliding_window=f.int("sliding_window", None, null_ok=True),
        )

    def decoder_spec(self) -> DecoderSpec:
        return DecoderSpec.of(
            self, ropes=(Rotary.build(self.rope, self.head_dim, self.max_position_embeddings),),
            windows=(self.sliding_window,) * self.num_hidden_layers, activation=self.hidden_act)

    def to_hf(self) -> dict[str, Any]:
        """config.json that transformers 4.x and 5.x both load: 4.x's Phi3Config wants `rope_scaling`
        None or exactly {type: "longrope", short_factor, long_factor} (no `rope_type`, no other key),
        with rope_theta and original_max_position_embeddings at the top level; 5.x reads that form
        as rope_type longrope. LongRoPE settings 4.x cannot hold (an attention_factor) keep 5.x's form."""
        rope = self.rope.to_hf()
        scaling = rope.get("rope_scaling")
        if scaling and scaling.get("rope_type") == "longrope" and {
                k: v for k, v in scaling.items() if k not in ("rope_type", "short_factor", "long_factor")
        } in ({}, {"original_max_position_embeddings": self.original_max_position_embeddings}):
            rope["rope_scaling"] = {"type": "longrope", "short_factor": scaling["short_factor"],
                                    "long_factor": scaling["long_factor"]}
        return {**hf_config.common_to_hf(self, "Phi3ForCausalLM"), "hidden_act": self.hidden_act,
                "original_max_position_embeddings": self.original_max_position_embeddings,
                "sliding_window": self.sliding_window, **rope}


def _rope(hf: dict[str, Any], original: int, head_dim: int, max_position_embeddings: int, where: str) -> RopeConfig:
    """RoPE as transformers reads Phi-3: legacy types "su" and "yarn" mean longrope, and the top-level
    original_max_position_embeddings overrides the one in the rope dict."""
    hf = dict(hf)
    f = hf_config.Fields(hf, where)
    key = "rope_parameters" if f.object("rope_parameters") is not None else "rope_scaling"
    raw = dict(f.object(key) or {})
    kind = raw.pop("type", None) or raw.get("rope_type")
    if kind in ("su", "yarn", "longrope"):
        raw.update(rope_type="longrope", original_max_position_embeddings=original)
    elif kind is not None:
        raw["rope_type"] = kind
    hf[key] = raw or None
    rope = RopeConfig.from_hf(hf, where, max_position_embeddings)
    if rope.rope_type not in ("default", "longrope"):
        raise ValueError(f"{where}: Phi-3 rope type {rope.rope_type!r} is not supported (transformers accepts "
                         "only 'default' and 'longrope')")
    try:  # build the tables now: factors that do not fit head_dim fail here, naming the file
        Rotary.build(rope, head_dim, max_position_embeddings)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None
    return rope
