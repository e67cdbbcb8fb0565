"""The Gemma family (gemma, gemma2, gemma3_text): the shared decoder, configured by GemmaConfig.

    x = embed(ids) · √hidden
    for each layer (scanned):
        gemma:        x = x + attn(norm(x));         x = x + geglu(norm(x))
        gemma2/3:     x = x + norm(attn(norm(x)));   x = x + norm(geglu(norm(x)))
    logits = embed(norm(x))ᵀ                         (gemma2: cap · tanh(logits / cap))

Every norm scales by (1 + w). Gemma 2 alternates sliding-window and global layers and soft-caps
attention scores; Gemma 3 adds q/k norms and a RoPE base per layer kind (10k local, 1M global).
"""

from __future__ import annotations

from jaxft.models.decoder import CausalLM


class GemmaForCausalLM(CausalLM):
    """`model(input_ids, attention_mask=None, positions=None, segment_ids=None)` → logits [B, T, V]."""
