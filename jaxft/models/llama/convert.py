"""HF key table of the Llama family.

Param paths mirror HF keys exactly (see model.py), so the table is the identity with the layer
index folded into the stacked axis. Keys that HF checkpoints may carry but that hold nothing to
load are listed in `ignored_keys`.
"""

from __future__ import annotations

from typing import Iterable

from jaxft.models.keys import KeyRule, mirror_rules, unused_keys
from jaxft.models.llama.config import LlamaConfig


def key_table(cfg: LlamaConfig, param_paths: Iterable[str]) -> list[KeyRule]:
    return mirror_rules(param_paths, stacked_prefix="model.layers.")


def ignored_keys(cfg: LlamaConfig) -> list[str]:
    return unused_keys(cfg.tie_word_embeddings)
