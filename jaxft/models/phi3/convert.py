"""HF key table of Phi-3: the Llama-style param paths, with two fused checkpoint tensors per layer.

    self_attn.qkv_proj.weight [(H + 2K)·D, hidden] = rows of q_proj [H·D], k_proj [K·D], v_proj [K·D]
    mlp.gate_up_proj.weight  [2F, hidden]          = rows of gate_proj [F], up_proj [F]

Import reads each param's rows straight from the fused tensor; export concatenates them back.
Keeping q/k/v and gate/up separate inside jaxft lets them share the decoder (and LoRA targets)
with every other family.
"""

from __future__ import annotations

from typing import Iterable

from jaxft.models.keys import LAYER, KeyRule, fused_rules, mirror_rules, unused_keys
from jaxft.models.phi3.config import Phi3Config

_LAYERS = "model.layers."


def key_table(cfg: Phi3Config, param_paths: Iterable[str]) -> list[KeyRule]:
    q_rows, kv_rows = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    fused = {
        "self_attn.qkv_proj.weight": [("self_attn.q_proj.weight", q_rows), ("self_attn.k_proj.weight", kv_rows),
                                      ("self_attn.v_proj.weight", kv_rows)],
        "mlp.gate_up_proj.weight": [("mlp.gate_proj.weight", cfg.intermediate_size),
                                    ("mlp.up_proj.weight", cfg.intermediate_size)],
    }
    rules: list[KeyRule] = []
    for hf_key, parts in fused.items():
        rules += fused_rules(_LAYERS + LAYER + "." + hf_key, [(_LAYERS + path, rows) for path, rows in parts])
    split = {rule.param for rule in rules}
    return rules + mirror_rules([p for p in param_paths if p not in split], stacked_prefix=_LAYERS)


def ignored_keys(cfg: Phi3Config) -> list[str]:
    return unused_keys(cfg.tie_word_embeddings)
