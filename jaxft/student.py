"""A smaller student from any HF folder: the first N decoder layers, the same tokenizer.

    jaxft make-student --model jaxft/demo/model --layers 2 --out workdir/student
    python -c "import jaxft.student as s; s.first_layers('path/to/model', 2, 'out/')"

The folder's tensors are copied as they are, but for those of decoder layers N and beyond
(`model.layers.{i}.`, the HF layout of every family jaxft loads), one tensor at a time; config.json
gets num_hidden_layers = N and every per-layer list in it (layer_types, ...) cut to N. The result
loads in transformers and in jaxft like the original, and distillation (task=distill) can start
from it: the student keeps the teacher's embeddings, first layers and head.
"""

from __future__ import annotations

import json
import os
import re

from jaxft import hf

LAYER_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.")


def first_layers(folder: str, num_layers: int, out: str) -> str:
    """Writes the first `num_layers` decoder layers of the HF folder `folder` to `out`; returns `out`."""
    config = hf.read_config(folder)
    total = config.get("num_hidden_layers")
    if not isinstance(total, int) or not 1 <= num_layers <= total:
        raise ValueError(f"{folder}/config.json: num_hidden_layers is {total!r}; a student keeps 1..{total} layers, "
                         f"not {num_layers}")
    os.makedirs(out, exist_ok=True)
    with hf.Checkpoint(folder) as checkpoint:
        kept = [key for key in sorted(checkpoint.shapes) if _layer(key) is None or _layer(key) < num_layers]
        entries = [(key, checkpoint.shapes[key], checkpoint.dtype(key),
                    lambda key=key: checkpoint.read(key)) for key in kept]
        hf.write_safetensors(os.path.join(out, hf.SAFETENSORS_SINGLE), entries)
    for key, value in list(config.items()):
        if isinstance(value, list) and len(value) == total:  # per-layer settings (layer_types, ...)
            config[key] = value[:num_layers]
    config["num_hidden_layers"] = num_layers
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    for name in ("generation_config.json",):
        if os.path.exists(os.path.join(folder, name)):
            with open(os.path.join(folder, name)) as src, open(os.path.join(out, name), "w") as dst:
                dst.write(src.read())
    hf.copy_tokenizer_files(folder, out)
    return out


def _layer(key: str) -> int | None:
    match = LAYER_KEY.match(key)
    return int(match.group(1)) if match else None
