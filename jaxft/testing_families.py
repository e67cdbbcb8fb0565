"""Tiny random Hugging Face models of the families beyond Llama (needs the `test` extra).

    folder, torch_model = tiny_family_model(tmp_path, "gemma2_softcap")

Same recipe as jaxft.testing (seeded, perturbed, saved), with configs that switch on what each
family adds: soft-capping with sequences longer than the sliding window, per-layer RoPE, LongRoPE.
"""

from __future__ import annotations

import os
from typing import Any

from jaxft.testing import tiny_hf_model

# Longer than every sliding window below, and than Phi-3's original context: see LONG.
LONG = 40
_LONGROPE_HALF = 8  # rotary pairs of head_dim 16

FAMILY_CASES: dict[str, dict[str, Any]] = {
    # head_dim 24 ≠ hidden 64 / 4 heads; attention biases on.
    "gemma": dict(model_type="gemma", head_dim=24, attention_bias=True),
    "gemma2_softcap": dict(model_type="gemma2", head_dim=24, query_pre_attn_scalar=20, sliding_window=5,
                           attn_logit_softcapping=2.0, final_logit_softcapping=3.0, num_hidden_layers=3),
    "gemma3_text": dict(model_type="gemma3_text", head_dim=24, query_pre_attn_scalar=32, sliding_window=5,
                        num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                         "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                            "rope_theta": 1000000.0}},
                        final_logit_softcapping=5.0),
    "phi3_longrope": dict(model_type="phi3", pad_token_id=0, eos_token_id=1, bos_token_id=2,
                          original_max_position_embeddings=32, max_position_embeddings=256,
                          rope_scaling={"rope_type": "longrope",
                                        "short_factor": [1.0 + 0.1 * i for i in range(_LONGROPE_HALF)],
                                        "long_factor": [1.5 + 0.5 * i for i in range(_LONGROPE_HALF)]}),
    "phi3_4k_partial": dict(model_type="phi3", pad_token_id=0, eos_token_id=1, bos_token_id=2, sliding_window=6,
                            tie_word_embeddings=True, partial_rotary_factor=0.5),
}


def tiny_family_model(folder: str | os.PathLike, case: str, seed: int = 0, task: str = "causal_lm", **overrides):
    """(folder, torch model) for a FAMILY_CASES entry; task "classification" builds
    AutoModelForSequenceClassification instead of the causal LM."""
    spec = dict(FAMILY_CASES[case])
    spec.update(overrides)
    return tiny_hf_model(folder, spec.pop("model_type"), seed=seed, task=task, **spec)


def word_tokenizer(words: list[str], pad: str = "[PAD]", bos: str = "[BOS]"):
    """A transformers tokenizer over a fixed word list (whitespace split, BOS prepended, pad id 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([pad, bos] + [w for w in words if w not in (pad, bos)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=pad))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=pad, bos_token=bos)


def max_valid_diff(got, expected, mask) -> float:
    """max |got - expected| over real tokens (logits at padding mean nothing in either stack)."""
    import numpy as np

    return float(np.abs(np.asarray(got, np.float32) - expected)[np.asarray(mask).astype(bool)].max())


def export_round_trip_diff(model, torch_model, out_dir, auto: str = "AutoModelForCausalLM", length: int = 12):
    """save_pretrained → transformers `auto` class: (max logit diff to the original torch model on a
    padded batch, names of weights that did not come back bit for bit)."""
    import torch
    import transformers

    from jaxft.pretrained import save_pretrained
    from jaxft.testing import padded_batch

    save_pretrained(model, out_dir)
    reloaded = getattr(transformers, auto).from_pretrained(out_dir, dtype=torch.float32).eval()
    assert type(reloaded) is type(torch_model), (type(reloaded), type(torch_model))
    ids, mask, positions = padded_batch(model.config.vocab_size, length=length)
    with torch.no_grad():
        args = dict(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                    position_ids=torch.as_tensor(positions, dtype=torch.long))
        new, old = reloaded(**args).logits.numpy(), torch_model(**args).logits.numpy()
    diff = max_valid_diff(new, old, mask) if new.ndim == 3 else float(abs(new - old).max())
    original = torch_model.state_dict()
    changed = [k for k, v in reloaded.state_dict().items() if not torch.equal(v, original[k])]
    return diff, changed


def model_cache(tmp_path_factory):
    """For a module-scoped fixture: case name → (folder, torch model, jaxft model), each built once."""
    import jaxft

    cache = {}

    def get(case: str):
        if case not in cache:
            folder, torch_model = tiny_family_model(tmp_path_factory.mktemp(case), case)
            cache[case] = (folder, torch_model, jaxft.from_pretrained(folder))
        return cache[case]

    return get
