"""HF key table of the Gemma family: param paths are HF keys, the layer index folded away.

Gemma ties its output to the embedding, so transformers saves no lm_head; a checkpoint that still
carries one (some conversions do) holds nothing the tied model could load (keys.unused_keys).
"""

from __future__ import annotations

from typing import Iterable

from jaxft.models.gemma.config import GemmaConfig
from jaxft.models.keys import KeyRule, mirror_rules, unused_keys


def key_table(cfg: GemmaConfig, param_paths: Iterable[str]) -> list[KeyRule]:
    return mirror_rules(param_paths, stacked_prefix="model.layers.")


def ignored_keys(cfg: GemmaConfig) -> list[str]:
    return unused_keys(cfg.tie_word_embeddings)
