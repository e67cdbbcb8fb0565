"""The mixture-of-experts decoders (mixtral, qwen2_moe, qwen3_moe): the shared decoder whose MLP is
`jaxft.models.moe.SparseMoeBlock` in its sparse layers.

    x = embed(ids)
    for each layer (scanned):   x = x + attn(norm(x));   x = x + moe(norm(x))   (or the dense MLP)
    logits = lm_head(norm(x))

Parameter paths mirror HF's transformers-5 module names with the layer index folded into a leading
axis: `model.layers.{i}.mlp.experts` → `model.layers.mlp.experts.gate_proj.weight` [L, E, F, D];
the router is `model.layers.mlp.gate.weight` [L, E, D].
"""

from __future__ import annotations

from jaxft.models.decoder import CausalLM


class MoEForCausalLM(CausalLM):
    """`model(input_ids, attention_mask=None, positions=None, segment_ids=None)` → logits [B, T, V]."""
