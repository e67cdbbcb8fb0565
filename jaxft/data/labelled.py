"""Labelled rows {"text": ..., "label": ...} for sequence classification: read, encode, batch, resume.

    rows = read_rows("train.jsonl")                                   # [(origin "file:line", row), ...]
    data = encode(rows, tokenizer, labels=("neg", "pos"), seq_len=64, pad_token_id=tokenizer.pad_token_id)
    for batch in batches(data, batch_size=32, seed=0): ...            # {"input_ids", "attention_mask", "labels"}
    LabelledData(config, tokenizer).train_iterator()                  # what task=classification trains on

Classification data are small (thousands of labelled rows), so each host reads and encodes the whole
file once and takes its share of every global batch; nothing is packed (one row is one example:
data.packing and data.format do not apply). The batch order is a pure function of train.seed and
the batch count, so a resumed iterator replays its position from a counter.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from jaxft.data.config import parse_source
from jaxft.data.errors import DataError, RowError
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


def index_batches(count: int, batch_size: int, seed: int, shuffle: bool = True) -> Iterator[np.ndarray]:
    # Row indices only, so that a resumed iterator can replay N batches in microseconds (the order
    # is a pure function of the seed and the position: nothing but a counter needs saving).
    rng = np.random.RandomState(seed)
    if count < batch_size:
        raise DataError(f"{count} examples cannot fill one batch of {batch_size}")
    order = np.zeros(0, np.int64)
    while True:
        while len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(count) if shuffle else np.arange(count)])
        take, order = order[:batch_size], order[batch_size:]
        yield take


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

    def train_iterator(self) -> "LabelledIterator":
        return LabelledIterator(self)

    def host_rows(self, take: np.ndarray) -> np.ndarray:
        """This host's share of a global batch's row indices."""
        per_host = len(take) // self.process_count
        return take[self.process_index * per_host:(self.process_index + 1) * per_host]


class LabelledIterator:
    """Endless shuffled batches (this host's rows of each global batch). The state is a batch
    counter: the order is recomputed from train.seed, so a resumed run sees the same batches."""

    STATE_VERSION = 1

    def __init__(self, data: LabelledData):
        self._data = data
        self._restart(0)

    def _restart(self, position: int) -> None:
        self._indices = index_batches(len(self._data.train["labels"]), self._data.batch_size, self._data.seed,
                                      self._data.shuffle)
        for _ in range(position):
            next(self._indices)
        self._position = position

    def __iter__(self) -> "LabelledIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        take = self._data.host_rows(next(self._indices))
        self._position += 1
        return {k: self._data.train[k][take] for k in STEP_KEYS}

    def get_state(self) -> dict:
        return {"version": self.STATE_VERSION, "fingerprint": self._data.fingerprint, "batches": self._position}

    def set_state(self, state: dict | str | bytes) -> None:
        if isinstance(state, (str, bytes)):
            state = json.loads(state)
        if state.get("version") != self.STATE_VERSION or "batches" not in state:
            raise DataError(f"classification data state {state!r} is not one this jaxft reads "
                            f"(version {self.STATE_VERSION} with a batch count)")
        saved, current = json.loads(json.dumps(state["fingerprint"])), json.loads(json.dumps(self._data.fingerprint))
        if saved != current:
            changed = {k: (saved.get(k), current.get(k)) for k in set(saved) | set(current) if saved.get(k) != current.get(k)}
            raise DataError(f"cannot restore the data iterator: the data or config changed since it was saved "
                            f"(key: (saved, now)): {changed}")
        self._restart(int(state["batches"]))

    def stats(self) -> dict:
        rows = len(self._data.train["labels"])
        seen = self._position * self._data.batch_size
        return {"batches": self._position, "examples": seen, "epochs": seen / rows,
                "truncated_rows": int(self._data.train["truncated"])}

    def close(self) -> None:
        pass  # nothing runs in the background
