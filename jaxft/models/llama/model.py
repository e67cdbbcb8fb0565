"""The Llama-family decoder (llama, mistral, qwen2, qwen3): the shared decoder with pre-norms and SwiGLU.

    x = embed(ids)
    for each layer (scanned):   x = x + attn(norm(x));   x = x + mlp(norm(x))
    logits = lm_head(norm(x))

The four model types differ only in switches of `LlamaConfig.decoder_spec()` (biases, q/k norm,
sliding windows, rope scaling); the modules are `jaxft.models.decoder`'s. Parameter paths mirror HF
keys with the layer index folded into a leading axis: `model.layers.{i}.self_attn.q_proj.weight`
[out, in] ↔ `model.layers.self_attn.q_proj.weight` [L, out, in].
"""

from __future__ import annotations

from jaxft.models.decoder import CausalLM


class LlamaForCausalLM(CausalLM):
    """`model(input_ids, attention_mask=None, positions=None, segment_ids=None)` → logits [B, T, V]."""
