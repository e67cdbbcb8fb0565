"""`task = "classification"` for `jaxft train`: the data side that jaxft.train's one loop drives.

    jaxft train --config configs/classify_demo.py            # rows {"text": ..., "label": ...}

`TrainData(config, tokenizer)` plays the part DataPipeline plays for causal LM: `train_iterator()`
gives batches of the train-step keys (jaxft.tasks.classification.encode) with get_state/set_state
for exact resume, and `evaluate(eval_step, params, frozen, mesh)` scores data.validation by
eval_loss, accuracy and macro-F1. `make_eval_step` is the classifier's eval step (pooled class
logits, replicated so that every host reads all of them).

Classification data are small (thousands of labelled rows), so each host reads and encodes the whole
file once and takes its share of every global batch; nothing is packed (data.packing and
data.format do not apply).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxft import sharding
from jaxft.data.errors import DataError
from jaxft.tasks.classification import STEP_KEYS, _index_batches, encode, read_rows, scores_from_logits


class TrainData:
    """Encoded train (and validation) rows of a classification run."""

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

    def train_iterator(self) -> "BatchIterator":
        return BatchIterator(self)

    def evaluate(self, eval_step, params, frozen, mesh) -> dict[str, float] | None:
        """{"eval_loss", "accuracy", "f1"} over data.validation (None without it)."""
        data = self.validation
        if data is None:
            return None
        count, size = len(data["labels"]), self.batch_size
        per_host = size // self.process_count
        logits = []
        for start in range(0, count, size):
            take = np.minimum(np.arange(start, start + size), count - 1)  # the last batch repeats its last row
            mine = take[self.process_index * per_host:(self.process_index + 1) * per_host]
            batch = {k: data[k][mine] for k in ("input_ids", "attention_mask")}
            out = eval_step(params, frozen, sharding.global_batch(batch, mesh))  # [size, C] on every host
            logits.append(np.asarray(jax.device_get(out))[:min(size, count - start)])
        scores = scores_from_logits(np.concatenate(logits), data["labels"])
        return {k: scores[k] for k in ("eval_loss", "accuracy", "f1")}


class BatchIterator:
    """Endless shuffled batches (this host's rows of each global batch). The state is a batch
    counter: the order is recomputed from train.seed, so a resumed run sees the same batches."""

    STATE_VERSION = 1

    def __init__(self, data: TrainData):
        self._data = data
        self._restart(0)

    def _restart(self, position: int) -> None:
        self._indices = _index_batches(len(self._data.train["labels"]), self._data.batch_size, self._data.seed,
                                       self._data.shuffle)
        for _ in range(position):
            next(self._indices)
        self._position = position

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        take = next(self._indices)
        self._position += 1
        per_host = self._data.batch_size // self._data.process_count
        take = take[self._data.process_index * per_host:(self._data.process_index + 1) * per_host]
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


def make_eval_step(model_def, mesh):
    """(params, frozen, batch) → pooled class logits [B, C], float32, replicated on every device."""

    def eval_step(params, frozen, batch):
        model = model_def.merge(params, frozen)
        return model.classify(batch["input_ids"], attention_mask=batch["attention_mask"]).astype(jnp.float32)

    return jax.jit(eval_step, out_shardings=NamedSharding(mesh, PartitionSpec()))
