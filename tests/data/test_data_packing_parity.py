"""Packed rows give the same logits as their documents run one by one: segments do not attend to
each other and positions restart per document. Tiny random Llama, fp32, CPU."""

import numpy as np

from jaxft.data import DataPipeline

# Two document lengths only (single-digit numbers are one token each): each length is one compile.
CHAT = [{"messages": [{"role": "user", "content": f"What is two plus {i}?" + " please" * (i % 2)},
                                            {"role": "assistant", "content": f"It is {i + 1}."}]} for i in range(8)]


def test_packed_logits_match_documents_run_alone(tmp_path, write_jsonl, make_config,
                                                                                                  chatml_tokenizer):
    import jax.numpy as jnp
    import torch
    import transformers
    from flax import nnx

    import jaxft

    config = transformers.LlamaConfig(
            vocab_size=len(chatml_tokenizer), hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, bos_token_id=None, eos_token_id=chatml_tokenizer.eos_token_id,
            pad_token_id=chatml_tokenizer.pad_token_id)
    torch.manual_seed(0)
    folder = tmp_path / "tiny-llama"
    transformers.LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    model = jaxft.from_pretrained(str(folder), dtype=jnp.float32)

    path = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    data = make_config(train=path, format="chat", seq_len=80, batch_size=2, seed=1)
    batch = next(DataPipeline(data, chatml_tokenizer).train_iterator())
    assert batch["segment_ids"].max() >= 2, "want several documents per row"

    # Jitted: one compile per shape is faster on CPU than running the ops eagerly.
    packed_forward = nnx.jit(lambda m, ids, mask, pos, seg: m(ids, attention_mask=mask, positions=pos,
                                                                                                                        segment_ids=seg))
    plain_forward = nnx.jit(lambda m, ids: m(ids))
    packed = np.asarray(packed_forward(model, *(jnp.asarray(batch[k]) for k in (
            "input_ids", "attention_mask", "positions", "segment_ids"))))
    # The same rows without segment information let documents see each other: the logits of
    # later documents change, which is what the packed path must prevent.
    naive = np.asarray(plain_forward(model, jnp.asarray(batch["input_ids"])))

    checked, lengths = 0, set()
    for row in range(batch["input_ids"].shape[0]):
        segments = batch["segment_ids"][row]
        for segment in range(1, int(segments.max()) + 1):
            where = np.flatnonzero(segments == segment)
            alone = np.asarray(plain_forward(model, jnp.asarray(batch["input_ids"][row, where][None])))[0]
            np.testing.assert_allclose(packed[row, where], alone, atol=1e-5, rtol=0)
            if segment > 1:
                assert np.abs(naive[row, where] - alone).max() > 1e-3
            checked += 1
            lengths.add(len(where))
    assert checked >= 4 and len(lengths) == 2
