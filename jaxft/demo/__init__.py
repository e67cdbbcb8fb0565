"""The embedded default: a tiny Llama-family model with its own tokenizer, shipped in the package.

`MODEL_DIR` is an ordinary HF folder (config.json, model.safetensors, tokenizer files), so every
code path that loads real checkpoints runs on it with no download. It is rebuilt by
`python -m jaxft.demo.build`.
"""

import os

MODEL_DIR = os.path.join(os.path.dirname(__file__), "model")
CORPUS = os.path.join(os.path.dirname(__file__), "corpus.txt")
