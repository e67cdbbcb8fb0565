"""The embedded default: a tiny Llama-family model pre-trained on a synthetic English corpus, its
own tokenizer, and made-up facts to teach it, all shipped in the package.

`MODEL_DIR` is an ordinary HF folder (config.json, model.safetensors, tokenizer files), so every
code path that loads real checkpoints runs on it with no download. `FACTS_TRAIN` (prompt/completion
rows) and `FACTS_EVAL` (prompt/answer rows, for exact match) hold questions about people the model
has never heard of. All of it is rebuilt by `python -m jaxft.demo.build`.
"""

import os

DEMO_DIR = os.path.dirname(os.path.abspath(__file__))
MODEL_DIR = os.path.join(DEMO_DIR, "model")
FACTS_TRAIN = os.path.join(DEMO_DIR, "facts_train.jsonl")
FACTS_EVAL = os.path.join(DEMO_DIR, "facts_eval.jsonl")
