"""Config of the mixture-of-experts family (mixtral, qwen2_moe, qwen3_moe), from and to HF config.json.

The three share the Llama-style decoder (jaxft.models.decoder) with a sparse MLP (jaxft.models.moe);
they differ in switches:
- mixtral:   every layer sparse, top-k renormalized, `intermediate_size` is each expert's size.
- qwen2_moe: q/k/v biases, a shared expert with a sigmoid gate, `norm_topk_prob`, dense layers
             (`mlp_only_layers`, `decoder_sparse_step`) of `intermediate_size`, experts of
             `moe_intermediate_size`.
- qwen3_moe: q/k RMSNorm, no shared expert, otherwise as qwen2_moe.
Router jitter noise (a training-time perturbation) is refused rather than ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxft.models import hf_config
from jaxft.models.decoder import DecoderSpec
from jaxft.models.llama.config import _sliding_windows
from jaxft.models.moe import MoESpec
from jaxft.models.rope import RopeConfig, Rotary

MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
_ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
_FIELDS = {
    "tie_word_embeddings", "use_sliding_window", "max_window_layers", "sliding_window", "layer_types",
    "rope_theta", "rope_scaling", "rope_parameters", "head_dim", "attention_bias", "qkv_bias", "hidden_act",
    "rms_norm_eps", "max_position_embeddings", "num_local_experts", "num_experts", "num_experts_per_tok",
    "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
    "mlp_only_layers", "router_aux_loss_coef", "router_jitter_noise", "output_router_logits",
}


@dataclasses.dataclass(frozen=True)
class MoEConfig(hf_config.Dimensions):
    model_type: str
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int  # each expert's size (mixtral: intermediate_size)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False  # qwen3_moe's attention_bias is on o_proj too
    qk_norm: bool = False
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int | None = None
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001  # what transformers adds with output_router_logits (jaxft: train.router_aux_loss_coef)
    sliding_windows: tuple[int | None, ...] = ()
    token_ids: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_hidden_layers)

    @property
    def sparse_layers(self) -> tuple[bool, ...]:
        """Per layer, as Qwen2MoeDecoderLayer picks: not in mlp_only_layers and (i + 1) % step == 0."""
        return tuple(i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0
                     for i in range(self.num_hidden_layers))

    @classmethod
    def from_hf(cls, hf: dict[str, Any], where: str = "config.json") -> "MoEConfig":
        model_type = hf_config.check(hf, "mixture-of-experts", MODEL_TYPES, _FIELDS, where)
        f = hf_config.Fields(hf, where)
        hf_config.activation(hf, where, "hidden_act", "silu", ("silu",))
        dims = hf_config.dimensions(hf, where)
        layers = dims["num_hidden_layers"]
        common = hf_config.common(hf, where, rms_norm_eps=1e-5 if model_type == "mixtral" else 1e-6,
                                  max_position_embeddings=4096, tie_word_embeddings=False)
        if f.number("router_jitter_noise", 0.0, above=None, at_least=0.0):
            raise f.error("router_jitter_noise", "a non-zero router jitter (a training-time input perturbation) "
                                                 "is not supported; set it to 0.0")
        experts_key = "num_local_experts" if "num_local_experts" in hf or model_type == "mixtral" else "num_experts"
        num_experts = f.int(experts_key, 8 if model_type == "mixtral" else None, need="the number of experts")
        top_k = f.int("num_experts_per_tok", 2)
        if top_k > num_experts:
            raise f.error("num_experts_per_tok", f"{top_k} exceeds {experts_key}={num_experts}")
        step = f.int("decoder_sparse_step", 1)
        only = hf.get("mlp_only_layers") or []
        if not isinstance(only, list) or not all(isinstance(i, int) and 0 <= i < layers for i in only):
            raise f.error("mlp_only_layers", f"must be a list of layer indices in [0, {layers}), got {hf_config.shown(only)}")
        window_type = "mistral" if model_type == "mixtral" else "qwen2"
        if model_type != "mixtral" and f.bool("use_sliding_window", False):
            raise f.error("use_sliding_window", f"sliding windows in {model_type} are not supported; set it to false")
        shared = f.int("shared_expert_intermediate_size", None, null_ok=True) if model_type == "qwen2_moe" else None
        return cls(
            model_type=model_type, **dims, **common,
            head_dim=hf_config.head_dim(hf, where),
            rope=RopeConfig.from_hf(hf, where, common["max_position_embeddings"]),
            num_experts=num_experts, num_experts_per_tok=top_k,
            moe_intermediate_size=(dims["intermediate_size"] if model_type == "mixtral"
                                   else f.int("moe_intermediate_size")),
            qkv_bias={"mixtral": False, "qwen2_moe": f.bool("qkv_bias", True),
                      "qwen3_moe": f.bool("attention_bias", False)}[model_type],
            o_bias=model_type == "qwen3_moe" and f.bool("attention_bias", False),
            qk_norm=model_type == "qwen3_moe",
            norm_topk_prob=True if model_type == "mixtral" else f.bool("norm_topk_prob", False),
            shared_expert_intermediate_size=shared,
            decoder_sparse_step=1 if model_type == "mixtral" else step,
            mlp_only_layers=() if model_type == "mixtral" else tuple(sorted(set(only))),
            router_aux_loss_coef=f.number("router_aux_loss_coef", 0.001, above=None, at_least=0.0),
            # qwen*_moe: use_sliding_window is false (checked above), whatever sliding_window says (qwen2_moe writes 0)
            sliding_windows=_sliding_windows(f, window_type, layers) if model_type == "mixtral" else (None,) * layers,
        )

    def moe_spec(self) -> MoESpec:
        return MoESpec(num_experts=self.num_experts, top_k=self.num_experts_per_tok,
                       expert_size=self.moe_intermediate_size, sparse_layers=self.sparse_layers,
                       normalize_top_k=self.norm_topk_prob, shared_expert_size=self.shared_expert_intermediate_size)

    def decoder_spec(self) -> DecoderSpec:
        return DecoderSpec.of(
            self, ropes=(Rotary.build(self.rope, self.head_dim, self.max_position_embeddings),),
            windows=self.sliding_windows, qkv_bias=self.qkv_bias, o_bias=self.o_bias, qk_norm=self.qk_norm, moe=self.moe_spec())

    def to_hf(self) -> dict[str, Any]:
        out = {**hf_config.common_to_hf(self, _ARCHITECTURES[self.model_type]), "head_dim": self.head_dim,
               "hidden_act": "silu", **self.rope.to_hf(), "num_experts_per_tok": self.num_experts_per_tok,
               "router_aux_loss_coef": self.router_aux_loss_coef}
        windows = {w for w in self.sliding_windows if w is not None}
        if self.model_type == "mixtral":
            return {**out, "num_local_experts": self.num_experts, "sliding_window": windows.pop() if windows else None,
                    "router_jitter_noise": 0.0}
        out.update(num_experts=self.num_experts, moe_intermediate_size=self.moe_intermediate_size,
                   norm_topk_prob=self.norm_topk_prob, decoder_sparse_step=self.decoder_sparse_step,
                   mlp_only_layers=list(self.mlp_only_layers), use_sliding_window=bool(windows),
                   sliding_window=windows.pop() if windows else None,
                   layer_types=["full_attention" if w is None else "sliding_attention" for w in self.sliding_windows],
                   max_window_layers=next((i for i, w in enumerate(self.sliding_windows) if w), self.num_hidden_layers))
        if self.model_type == "qwen2_moe":
            out.update(qkv_bias=self.qkv_bias, shared_expert_intermediate_size=self.shared_expert_intermediate_size)
        else:
            out["attention_bias"] = self.qkv_bias
        return out
