"""The KV cache: prefill + one token at a time gives the logits of a full forward pass, in every
family (sliding windows, soft-capping, per-layer RoPE included); cached generation equals
recomputing the whole sequence at each step."""

import numpy as np
import pytest

import jaxft
from jaxft.generate import generate
from jaxft.testing import tiny_hf_model
from jaxft.testing_families import FAMILY_CASES, tiny_family_model

CASES = ["llama3_rope", "mistral_sliding", "qwen2_yarn_sliding", "qwen3", "gemma2_softcap", "gemma3_text",
         "phi3_4k_partial"]
PROMPT_LENGTHS = (7, 3, 10)  # left-padded to 10; the windows (3 to 6) are shorter than what follows
NEW_TOKENS = 6


def load(tmp_path, case):
    if case in FAMILY_CASES:
        folder, _ = tiny_family_model(tmp_path, case)
    else:
        folder, _ = tiny_hf_model(tmp_path, case)
    return jaxft.from_pretrained(folder)


def left_padded(rows, vocab, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, n).tolist() for n in rows]
    longest = max(rows)
    ids = np.zeros((len(rows), longest), np.int32)
    mask = np.zeros((len(rows), longest), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = prompt
        mask[row, longest - len(prompt):] = 1
    return prompts, ids, mask


@pytest.mark.parametrize("case", CASES)
def test_cached_decoding_gives_the_full_forward_logits(tmp_path, case):
    model = load(tmp_path, case)
    vocab = model.config.vocab_size
    _, prompt_ids, prompt_mask = left_padded(PROMPT_LENGTHS, vocab)
    new_ids = np.random.default_rng(1).integers(3, vocab, (len(PROMPT_LENGTHS), NEW_TOKENS)).astype(np.int32)
    full_ids = np.concatenate([prompt_ids, new_ids], axis=1)
    full_mask = np.concatenate([prompt_mask, np.ones_like(new_ids)], axis=1)
    expected = np.asarray(model(full_ids, attention_mask=full_mask))  # [B, P + N, V]

    cache = model.init_cache(len(PROMPT_LENGTHS), full_ids.shape[1])
    logits, cache = model.decode(prompt_ids, cache, attention_mask=prompt_mask)
    got = [np.asarray(logits)]
    for i in range(NEW_TOKENS):
        logits, cache = model.decode(new_ids[:, i:i + 1], cache)
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    real = full_mask.astype(bool)
    assert np.abs(got - expected)[real].max() <= 1e-5
    assert int(cache.index) == full_ids.shape[1]
    assert np.asarray(cache.seen).tolist() == [n + NEW_TOKENS for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("case", ["llama_tied", "gemma2_softcap"])
def test_cached_generation_equals_recomputation(tmp_path, case):
    model = load(tmp_path, case)
    prompts, _, _ = left_padded(PROMPT_LENGTHS, model.config.vocab_size, seed=2)
    greedy = generate(model, prompts, 12)
    assert greedy == generate(model, prompts, 12, use_cache=False)
    eos = greedy[0][3]  # a token the first row generates: that row stops there, the others go on
    stopped = generate(model, prompts, 12, eos_id=eos)
    assert stopped == generate(model, prompts, 12, eos_id=eos, use_cache=False)
    assert stopped[0] == greedy[0][: greedy[0].index(eos) + 1]
    sampled = dict(temperature=0.9, top_k=20, top_p=0.9, seed=5)
    assert generate(model, prompts, 12, **sampled) == generate(model, prompts, 12, use_cache=False, **sampled)


def test_cache_refuses_packed_segments(tmp_path):
    model = load(tmp_path, "llama3_rope")
    cache = model.init_cache(1, 8)
    with pytest.raises(ValueError, match="segment_ids"):
        model.model(np.ones((1, 4), np.int32), segment_ids=np.ones((1, 4), np.int32), cache=cache)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[5, 6], []], 4)
