"""Rebuilds the bundled demo model folder: a BPE tokenizer trained on corpus.txt and a tiny Llama.

    python -m jaxft.demo.build

Everything is seeded, so the output is reproducible. The weights are random at this stage of the
project; the fine-tuning issue replaces them with a model pre-trained on the corpus.
"""

from __future__ import annotations

import os
import shutil

from jaxft.demo import CORPUS, MODEL_DIR

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|pad|>", bos_token="<|bos|>",
                                   eos_token="<|eos|>", chat_template=CHATML_TEMPLATE)


def main() -> None:
    import jaxft

    tokenizer = build_tokenizer()
    hf_config = {
        "model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 192,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    model = jaxft.init_random(hf_config, seed=0)
    shutil.rmtree(MODEL_DIR, ignore_errors=True)
    jaxft.save_pretrained(model, MODEL_DIR)
    tokenizer.save_pretrained(MODEL_DIR)
    size = sum(os.path.getsize(os.path.join(MODEL_DIR, f)) for f in os.listdir(MODEL_DIR))
    print(f"wrote {MODEL_DIR} ({size / 1e3:.0f} kB, vocab {len(tokenizer)})")


if __name__ == "__main__":
    main()
