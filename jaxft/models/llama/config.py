"""Config of the Llama family (llama, mistral, qwen2, qwen3), converted from and to HF config.json.

One decoder covers the four `model_type`s; they differ only in the switches below (biases, q/k
norm, sliding windows, rope scaling). What this decoder cannot express is refused by name rather
than silently approximated.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from jaxft.models.rope import RopeConfig

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# config.json fields this config reads, or that change nothing in a causal-LM forward pass.
_KNOWN = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache", "initializer_range",
    "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id", "model_type", "_name_or_path",
    "return_dict", "output_hidden_states", "output_attentions", "tie_word_embeddings", "id2label",
    "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "tokenizer_class",
    "task_specific_params", "use_sliding_window", "max_window_layers", "sliding_window", "layer_types",
    "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor", "head_dim",
    "attention_bias", "mlp_bias", "pretraining_tp", "hidden_act", "rms_norm_eps", "vocab_size",
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "quantization_config",
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
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

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_hidden_layers)
        if len(self.sliding_windows) != self.num_hidden_layers:
            raise ValueError(f"{len(self.sliding_windows)} sliding-window entries for {self.num_hidden_layers} layers")

    @classmethod
    def from_hf(cls, hf: dict[str, Any], where: str = "config.json") -> "LlamaConfig":
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"{where}: model_type {model_type!r} is not in the Llama family {MODEL_TYPES}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
        if hf.get("pretraining_tp", 1) not in (None, 1):
            raise ValueError(f"{where}: pretraining_tp={hf['pretraining_tp']} (sliced projections) is not supported")
        if hf.get("quantization_config"):
            raise ValueError(f"{where}: pre-quantized checkpoints ({hf['quantization_config'].get('quant_method')}) "
                             "are not supported; load the unquantized weights")
        unknown = sorted(set(hf) - _KNOWN)
        if unknown:
            logging.warning("%s: ignoring field(s) %s, which do not change the forward pass", where, unknown)
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in hf]
        if missing:
            raise ValueError(f"{where}: missing required field(s) {missing}")
        layers, heads = hf["num_hidden_layers"], hf["num_attention_heads"]
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rope=RopeConfig.from_hf(hf, where),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),  # False in all four HF configs
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_windows=_sliding_windows(hf, model_type, layers, where),
            token_ids=tuple((k, hf[k]) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf),
        )

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            **self.rope.to_hf(),
            **dict(self.token_ids),
        }
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


def _sliding_windows(hf: dict[str, Any], model_type: str, layers: int, where: str) -> tuple[int | None, ...]:
    window = hf.get("sliding_window")
    if model_type == "mistral":
        return (window,) * layers
    if model_type in ("qwen2", "qwen3"):
        if not hf.get("use_sliding_window", False) or window is None:
            return (None,) * layers
        types = hf.get("layer_types")
        if types is None:  # transformers v4: layers from max_window_layers on use the window
            start = hf.get("max_window_layers", layers)
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
