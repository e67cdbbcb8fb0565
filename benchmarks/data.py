"""Data pipeline throughput: tokens/s of read + tokenize + chat loss mask + pack, on this machine.

        python benchmarks/data.py                                   # ~2M tokens of chat, both templates
        python benchmarks/data.py --conversations 500 --out benchmarks/results/x.json

Generates synthetic multi-turn chat (seeded; pseudo-words with a Zipf distribution so that a
byte-level BPE splits them like natural text), trains a 16k byte-level BPE on it (no downloads),
writes JSONL, then for a ChatML (Qwen-style) and a Llama-3-style template (stock shapes, no
generation markers) times, in one process each:
    load  = DataPipeline(...): read JSONL, validate, render prefixes, tokenize (batched, Rust),
                    build loss masks
    pack  = one epoch of packed [batch, seq_len] batches through grain
and reports tokens/s for each and end to end, with packing efficiency. Prints one JSON object.
Goal: >= 50k tokens/s end to end, so data never starves a TPU v5e chip (~7k tokens/s, 8B model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHATML = (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = (
        "{% for message in messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}")
SPECIALS = ["<pad>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|im_start|>", "<|im_end|>"]


def synthetic_conversations(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "zi", "pa", "qu", "dre", "st",
                              "ing", "ion", "er", "an", "th", "ou", "gh"]
    words = ["".join(rng.choice(syllables, rng.integers(1, 4))) for _ in range(20000)]
    zipf = 1.0 / np.arange(1, len(words) + 1)
    zipf /= zipf.sum()

    def sentence(lo: int, hi: int) -> str:
        picks = rng.choice(len(words), rng.integers(lo, hi), p=zipf)
        text = " ".join(words[i] for i in picks)
        return text[0].upper() + text[1:] + rng.choice([".", "?", "!", ".\n\n"])

    conversations = []
    for _ in range(n):
        messages = [{"role": "system", "content": sentence(5, 30)}]
        for _ in range(rng.integers(1, 4)):
            messages.append({"role": "user", "content": " ".join(sentence(5, 25) for _ in range(
                    rng.integers(1, 5)))})
            messages.append({"role": "assistant", "content": " ".join(sentence(5, 25) for _ in range(
                    rng.integers(1, 10)))})
        conversations.append({"messages": messages})
    return conversations


def train_tokenizer(conversations: list[dict], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    texts = (m["content"] for c in conversations[:2000] for m in c["messages"])
    backend.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return backend


def run(path: str, backend, template: str, args) -> dict:
    import ml_collections
    from transformers import PreTrainedTokenizerFast

    from jaxft.data import DataPipeline, default_config

    if template == "chatml":
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                                                                pad_token="<pad>")
        tokenizer.chat_template = CHATML
    else:
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|eot_id|>",
                                                                                bos_token="<|begin_of_text|>", pad_token="<pad>")
        tokenizer.chat_template = LLAMA3
    config = ml_collections.ConfigDict({"data": default_config(), "train": {
            "batch_size": args.batch_size, "seed": 0}})
    config.data.update({"train": path, "format": "chat", "seq_len": args.seq_len, "epochs": 1,
                                            "process_index": 0, "process_count": 1})

    start = time.perf_counter()
    pipeline = DataPipeline(config, tokenizer)
    loaded = time.perf_counter()
    iterator = pipeline.train_iterator()
    batches = sum(1 for _ in iterator)
    packed = time.perf_counter()
    stats = iterator.stats()
    report = pipeline.train_report
    return {
            "template": template,
            "conversations": report.examples,
            "tokens": report.tokens,
            "trained_tokens": report.trained_tokens,
            "load_seconds": round(loaded - start, 3),
            "pack_seconds": round(packed - loaded, 3),
            "load_tokens_per_second": round(report.tokens / (loaded - start)),
            "pack_tokens_per_second": round(stats["tokens"] / (packed - loaded)),
            "end_to_end_tokens_per_second": round(report.tokens / (packed - start)),
            "batches": batches,
            "packing_efficiency": round(stats["packing_efficiency"], 4),
            "trained_fraction": round(stats["trained_fraction"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=4000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=16000)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    conversations = synthetic_conversations(args.conversations)
    backend = train_tokenizer(conversations, args.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "chat.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for conversation in conversations:
                f.write(json.dumps(conversation) + "\n")
        results = [run(path, backend, template, args) for template in ("chatml", "llama3")]

    import grain
    import tokenizers
    import transformers
    out = {
            "benchmark": "data",
            "device": "cpu",
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "versions": {"grain": grain.__version__, "tokenizers": tokenizers.__version__,
                                      "transformers": transformers.__version__},
            "config": {"conversations": args.conversations, "seq_len": args.seq_len,
                                  "batch_size": args.batch_size, "vocab_size": args.vocab_size,
                                  "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "default")},
            "goal_tokens_per_second": 50000,
            "results": results,
            "min_end_to_end_tokens_per_second": min(r["end_to_end_tokens_per_second"] for r in results),
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
