"""Labelled rows {"text": ..., "label": ...} for sequence classification: read, encode, batch, resume.

    rows = read_rows("train.jsonl")                                   # [(origin "file:line", row), ...]
    data = encode(rows, tokenizer, labels=("neg", "pos"), seq_len=64, pad_token_id=tokenizer.pad_token_id)
    for batch in batches(data, batch_size=32, seed=0): ...            # {"input_ids", "attention_mask", "labels"}
    LabelledData(config, tokenizer).train_iterator()                  # what task=classification trains on

Classification data are small (thousands of labelled rows), so each host reads and encodes the whole
file once and takes its share of every global batch; nothing is packed (one row is one example:
data.packing and data.format do not apply). Batching and exact resume: jaxft.data.indexed.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from jaxft.data.config import parse_source
from jaxft.data.errors import DataError, RowError
from jaxft.data.indexed import IndexedIterator, host_share, index_batches
from jaxft.data.sources import open_source

STEP_KEYS = ("input_ids", "attention_mask", "labels")  # what the classification objective reads


def read_rows(spec: Any, *, text_field: str = "text", label_field: str = "label",
              key: str = "data.train") -> list[tuple[str, dict]]:
    """(origin, row) pairs from a JSONL/Parquet pattern, 'hf:name@split' or 'tfds:name@split'."""
    source = open_source(parse_source(spec, key), key=key, default_split="train", tfds_data_dir=None,
                         columns=(text_field, label_field))
    rows = []
    for origin, row in source.read(range(len(source))):
        if isinstance(row, RowError):
            raise DataError(f"{origin}: {row.message}")
        rows.append((origin, row))
    return rows


def encode(rows: Sequence[tuple[str, dict] | dict], tokenizer, labels: Sequence[str], seq_len: int, pad_token_id: int,
           *, text_field: str = "text", label_field: str = "label") -> dict[str, np.ndarray]:
    """Rows → right-padded `input_ids` / `attention_mask` [N, seq_len] and `labels` [N] (ids).

    A label is a name from `labels` or an id into it. Texts longer than seq_len keep their first
    seq_len tokens (transformers' default truncation); `truncated` counts them.
    """
    ids = np.full((len(rows), seq_len), pad_token_id, np.int32)
    label_ids = np.zeros(len(rows), np.int32)
    truncated = 0
    for i, item in enumerate(rows):
        origin, row = item if isinstance(item, tuple) else (f"row {i}", item)
        text, label = row.get(text_field), row.get(label_field)
        if not isinstance(text, str) or not text:
            raise DataError(f"{origin}: field {text_field!r} must be a non-empty string, got {text!r}")
        label_ids[i] = _label_id(label, labels, origin, label_field)
        tokens = list(tokenizer(text)["input_ids"])
        truncated += len(tokens) > seq_len
        ids[i, :min(len(tokens), seq_len)] = tokens[:seq_len]
    return {"input_ids": ids, "attention_mask": (ids != pad_token_id).astype(np.int32), "labels": label_ids,
            "truncated": np.int32(truncated)}


def _label_id(label: Any, labels: Sequence[str], origin: str, field: str) -> int:
    if isinstance(label, str) and label in labels:
        return list(labels).index(label)
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool) and 0 <= label < len(labels):
        return int(label)
    raise DataError(f"{origin}: {field} {label!r} is neither one of {list(labels)} nor an id in 0..{len(labels) - 1}")


def batches(data: dict[str, np.ndarray], batch_size: int, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Endless shuffled batches of STEP_KEYS; each epoch is a new permutation, the remainder that
    does not fill a batch waits for the next one."""
    for take in index_batches(len(data["labels"]), batch_size, seed):
        yield {k: data[k][take] for k in STEP_KEYS}


class LabelledData:
    """Encoded train (and validation) rows of a classification run: config.classification.* names
    the labels and fields, data.train / data.validation the sources, data.seq_len the length."""

    def __init__(self, config: Any, tokenizer: Any, *, process_index: int | None = None,
                 process_count: int | None = None):
        c = config.classification
        self.labels = tuple(c.labels)
        self.pad_token_id = tokenizer.pad_token_id
        if self.pad_token_id is None:
            raise DataError("the tokenizer has no pad token; a classifier pools the last non-pad token, so it needs "
                            "one (add a pad token to the tokenizer files)")
        fields = {"text_field": c.text_field, "label_field": c.label_field}

        def load(spec, key):
            return encode(read_rows(spec, key=key, **fields), tokenizer, self.labels, config.data.seq_len,
                          self.pad_token_id, **fields)

        self.train = load(config.data.train, "data.train")
        self.validation = load(config.data.validation, "data.validation") if config.data.validation else None
        self.batch_size = config.train.batch_size  # global
        self.seed, self.shuffle = config.train.seed, config.data.shuffle
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        # What a saved position is valid for: the same rows in the same order of batches.
        digest = hashlib.sha256(self.train["input_ids"].tobytes() + self.train["labels"].tobytes()).hexdigest()[:16]
        self.fingerprint = {"rows": len(self.train["labels"]), "digest": digest, "labels": list(self.labels),
                            "batch_size": self.batch_size, "seed": self.seed, "shuffle": bool(self.shuffle)}

    def train_iterator(self) -> IndexedIterator:
        return IndexedIterator(len(self.train["labels"]), self.batch_size, self.seed, self.shuffle, self.fingerprint,
                               lambda rows: {k: self.train[k][rows] for k in STEP_KEYS},
                               process_index=self.process_index, process_count=self.process_count,
                               stats=lambda _: {"truncated_rows": int(self.train["truncated"])})

    def host_rows(self, take: np.ndarray) -> np.ndarray:
        """This host's share of a global batch's row indices."""
        return host_share(take, self.process_index, self.process_count)
