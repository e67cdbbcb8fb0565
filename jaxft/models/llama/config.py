"""Config of the Llama family (llama, mistral, qwen2, qwen3), converted from and to HF config.json.

One decoder covers the four `model_type`s; they differ only in the switches below (biases, q/k
norm, sliding windows, rope scaling). What this decoder cannot express is refused by name rather
than silently approximated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxft.models import hf_config
from jaxft.models.decoder import DecoderSpec
from jaxft.models.rope import RopeConfig, Rotary

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# config.json fields this family reads (beyond hf_config's dimensions and inert fields).
_FIELDS = {
    "tie_word_embeddings", "use_sliding_window", "max_window_layers", "sliding_window", "layer_types",
    "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor", "head_dim",
    "attention_bias", "mlp_bias", "pretraining_tp", "hidden_act", "rms_norm_eps", "max_position_embeddings",
}

# head_dim when config.json gives none, and where hidden_size must divide by the heads regardless:
# as each transformers config does (LlamaConfig.validate_architecture; Qwen3Config's default 128).
_HEAD_DIM = {"llama": dict(divisible_because="transformers' llama config requires it"), "mistral": {},
             "qwen2": {}, "qwen3": dict(default=128)}


@dataclasses.dataclass(frozen=True)
class LlamaConfig(hf_config.Dimensions):
    model_type: str
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # qwen2; llama's `attention_bias` sets this and o_bias
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # qwen3: RMSNorm over head_dim on q and k, before RoPE
    # Per layer: None = global attention, N = attend to the last N tokens (mistral, qwen2/3 windows).
    sliding_windows: tuple[int | None, ...] = ()
    # Kept only to write them back on export.
    token_ids: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):  # config.json's values were checked by from_hf; DecoderSpec checks the heads again
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_hidden_layers)
        if len(self.sliding_windows) != self.num_hidden_layers:
            raise ValueError(f"{len(self.sliding_windows)} sliding-window entries for {self.num_hidden_layers} layers")

    @classmethod
    def from_hf(cls, hf: dict[str, Any], where: str = "config.json") -> "LlamaConfig":
        model_type = hf_config.check(hf, "Llama", MODEL_TYPES, _FIELDS, where)
        f = hf_config.Fields(hf, where)
        hf_config.activation(hf, where, "hidden_act", "silu", ("silu",))
        if f.int("pretraining_tp", 1, null_ok=True) not in (None, 1):
            raise ValueError(f"{where}: pretraining_tp={hf['pretraining_tp']} (sliced projections) is not supported")
        dims = hf_config.dimensions(hf, where)
        common = hf_config.common(hf, where, rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=False)
        attention_bias = f.bool("attention_bias", False)
        return cls(
            model_type=model_type,
            **dims,
            **common,
            head_dim=hf_config.head_dim(hf, where, **_HEAD_DIM[model_type]),
            rope=RopeConfig.from_hf(hf, where, common["max_position_embeddings"]),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=f.bool("mlp_bias", False),
            qk_norm=model_type == "qwen3",
            sliding_windows=_sliding_windows(f, model_type, dims["num_hidden_layers"]),
        )

    def decoder_spec(self) -> DecoderSpec:
        return DecoderSpec.of(
            self, ropes=(Rotary.build(self.rope, self.head_dim, self.max_position_embeddings),),
            windows=self.sliding_windows, qkv_bias=self.qkv_bias, o_bias=self.o_bias, mlp_bias=self.mlp_bias,
            qk_norm=self.qk_norm)

    def to_hf(self) -> dict[str, Any]:
        out = {**hf_config.common_to_hf(self, _ARCHITECTURES[self.model_type]), "head_dim": self.head_dim,
               "hidden_act": "silu", **self.rope.to_hf()}
        if self.model_type in ("llama", "qwen3"):
            out["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            out["mlp_bias"] = self.mlp_bias
        windows = {w for w in self.sliding_windows if w is not None}
        if self.model_type == "mistral":
            out["sliding_window"] = windows.pop() if windows else None
        elif self.model_type in ("qwen2", "qwen3"):
            out["use_sliding_window"] = bool(windows)
            out["sliding_window"] = windows.pop() if windows else None
            out["layer_types"] = ["full_attention" if w is None else "sliding_attention" for w in self.sliding_windows]
            out["max_window_layers"] = next((i for i, w in enumerate(self.sliding_windows) if w), self.num_hidden_layers)
        return out


def _sliding_windows(f: hf_config.Fields, model_type: str, layers: int) -> tuple[int | None, ...]:
    where = f.where
    window = f.int("sliding_window", None, null_ok=True)
    types = f.strings("layer_types", None)
    if model_type == "mistral":
        return (window,) * layers
    if model_type in ("qwen2", "qwen3"):
        start = f.int("max_window_layers", None, minimum=0, null_ok=True)
        start = layers if start is None else start
        if not f.bool("use_sliding_window", False) or window is None:
            return (None,) * layers
        if types is None:  # transformers v4: layers from max_window_layers on use the window
            return tuple(window if i >= start else None for i in range(layers))
        if len(types) != layers:
            raise ValueError(f"{where}: layer_types has {len(types)} entries for num_hidden_layers={layers}")
        unknown = set(types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ValueError(f"{where}: unknown layer_types {sorted(unknown)}")
        return tuple(window if t == "sliding_attention" else None for t in types)
    if window is not None:
        raise ValueError(f"{where}: model_type {model_type!r} with sliding_window={window} is not supported")
    return (None,) * layers
