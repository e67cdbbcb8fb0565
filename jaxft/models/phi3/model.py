"""Phi-3: the shared decoder with Llama's layout (pre-norms, SwiGLU, no biases), configured by Phi3Config.

    x = embed(ids)
    for each layer (scanned):   x = x + attn(norm(x));   x = x + mlp(norm(x))
    logits = lm_head(norm(x))

RoPE is LongRoPE in the 128k models; the fused qkv/gate_up checkpoint tensors are split on import
(convert.py), so the modules are exactly `jaxft.models.decoder`'s.
"""

from __future__ import annotations

from jaxft.models.decoder import CausalLM


class Phi3ForCausalLM(CausalLM):
    """`model(input_ids, attention_mask=None, positions=None, segment_ids=None)` → logits [B, T, V]."""
