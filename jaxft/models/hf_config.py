"""What every family's config does with an HF config.json: check it, read the decoder's dimensions
and token ids, and write them back. Each family adds the fields that make it what it is.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable

# Fields that no forward pass reads, whatever the family.
INERT = frozenset({
    "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache", "initializer_range",
    "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id", "model_type", "_name_or_path",
    "return_dict", "output_hidden_states", "output_attentions", "id2label", "label2id", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "tokenizer_class", "task_specific_params",
})
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclasses.dataclass(frozen=True)
class Dimensions:
    """The sizes of every family's decoder, under HF's names: the base of each family's config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int


def check(hf: dict[str, Any], family: str, model_types: Iterable[str], fields: Iterable[str], where: str) -> str:
    """Refuses another family's or a pre-quantized config and one missing a dimension; warns about
    fields neither INERT nor in `fields` (the family's own). Returns the model_type."""
    model_type = hf.get("model_type")
    if model_type not in tuple(model_types):
        raise ValueError(f"{where}: model_type {model_type!r} is not in the {family} family {tuple(model_types)}")
    if hf.get("quantization_config"):
        raise ValueError(f"{where}: pre-quantized checkpoints ({hf['quantization_config'].get('quant_method')}) "
                         "are not supported; load the unquantized weights")
    unknown = sorted(set(hf) - INERT - set(REQUIRED) - set(fields) - {"num_key_value_heads", "quantization_config"})
    if unknown:
        logging.warning("%s: ignoring field(s) %s, which do not change the forward pass", where, unknown)
    missing = [k for k in REQUIRED if k not in hf]
    if missing:
        raise ValueError(f"{where}: missing required field(s) {missing}")
    return model_type


def dimensions(hf: dict[str, Any]) -> dict[str, Any]:
    """The decoder's sizes as config fields (num_key_value_heads defaults to num_attention_heads)."""
    return {**{k: hf[k] for k in REQUIRED}, "num_key_value_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"]}


def token_ids(hf: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """bos/eos/pad ids, kept only to write them back on export."""
    return tuple((k, hf[k]) for k in TOKEN_IDS if k in hf)


def common_to_hf(cfg, architecture: str) -> dict[str, Any]:
    """The fields every family writes: architecture, model_type, sizes, norm eps, tying, token ids."""
    return {"architectures": [architecture], "model_type": cfg.model_type,
            **{k: getattr(cfg, k) for k in (*REQUIRED, "num_key_value_heads")},
            "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
            "tie_word_embeddings": cfg.tie_word_embeddings, **dict(cfg.token_ids)}
