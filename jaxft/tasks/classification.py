"""Sequence-classification fine-tuning: rows {"text": ..., "label": ...} → a head on the last
non-pad token, trained by the ordinary train step, evaluated by accuracy and macro-F1.

    model = jaxft.from_pretrained(folder, labels=["negative", "positive"], pad_token_id=tokenizer.pad_token_id)
    train = encode(read_rows("train.jsonl"), tokenizer, model.labels, seq_len=64, pad_token_id=model.pad_token_id)
    apply_lora(model, LoraConfig(rank=8, alpha=16, targets=lora_targets(model)))   # the head stays whole
    model_def, params, frozen = step.split_model(model, with_head(is_lora_param))
    optimizer = optim.make_optimizer(optim_cfg, params, model_def.axes)
    state = step.init_state(params, frozen, optimizer)
    train_step = jax.jit(step.make_train_step(model_def, optimizer, step.StepConfig()), donate_argnums=0)
    for batch in batches(train, batch_size=32, seed=0):
        state, metrics = train_step(state, batch)
    evaluate(model_def.merge(state.params, state.frozen), valid)   # {"accuracy", "f1", "eval_loss", ...}

Why the causal-LM step trains it unchanged: a SequenceClassifier returns class logits for every
token, and `encode` gives each row one target, its label, at the token the head pools (loss_mask
one-hot there); the step's mean token cross-entropy is then the mean over rows of the
classification loss, with micro-batching, remat and meshes as for language modelling.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np
from flax import nnx

from jaxft.data.config import parse_source
from jaxft.data.errors import DataError, RowError
from jaxft.data.sources import open_source
from jaxft.models.classification import last_token_index
from jaxft.peft.lora import OUTPUT_HEAD, linear_modules

HEAD_PREFIX = "score."
STEP_KEYS = ("input_ids", "attention_mask", "targets", "loss_mask")


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
    """Rows → right-padded arrays [N, seq_len] plus `labels` [N].

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
    pooled = np.asarray(last_token_index(ids, pad_token_id))  # the token the head scores, as HF picks it
    loss_mask = np.zeros((len(rows), seq_len), np.float32)
    loss_mask[np.arange(len(rows)), pooled] = 1.0
    return {"input_ids": ids, "attention_mask": (ids != pad_token_id).astype(np.int32),
            "targets": np.repeat(label_ids[:, None], seq_len, axis=1), "loss_mask": loss_mask,
            "labels": label_ids, "truncated": np.int32(truncated)}


def _label_id(label: Any, labels: Sequence[str], origin: str, field: str) -> int:
    if isinstance(label, str) and label in labels:
        return list(labels).index(label)
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool) and 0 <= label < len(labels):
        return int(label)
    raise DataError(f"{origin}: {field} {label!r} is neither one of {list(labels)} nor an id in 0..{len(labels) - 1}")


def batches(data: dict[str, np.ndarray], batch_size: int, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Endless shuffled batches of the train-step keys; each epoch is a new permutation, the
    remainder that does not fill a batch waits for the next one."""
    for take in _index_batches(len(data["labels"]), batch_size, seed):
        yield {k: data[k][take] for k in STEP_KEYS}


def _index_batches(count: int, batch_size: int, seed: int, shuffle: bool = True) -> Iterator[np.ndarray]:
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


def with_head(trainable: Callable[[str, nnx.Variable], bool]) -> Callable[[str, nnx.Variable], bool]:
    """A `split_model` predicate that also trains the classification head (PEFT's modules_to_save)."""
    return lambda path, variable: path.startswith(HEAD_PREFIX) or trainable(path, variable)


def lora_targets(model: nnx.Module) -> tuple[str, ...]:
    """"all-linear" for a classifier: every Linear but the head, which trains whole instead."""
    return tuple(sorted({path[-1] for path in linear_modules(model)} - {"score", OUTPUT_HEAD}))


def evaluate(model: nnx.Module, data: dict[str, np.ndarray], batch_size: int = 64) -> dict[str, float]:
    """Accuracy, macro-F1 and mean cross-entropy of `model.classify` over encoded data."""
    if not hasattr(model, "classify"):
        raise TypeError(f"{type(model).__name__} is not a sequence classifier (build it with labels=...)")
    classify = nnx.jit(lambda m, ids, mask: m.classify(ids, attention_mask=mask))
    count = len(data["labels"])
    logits = []
    for start in range(0, count, batch_size):
        ids, mask = data["input_ids"][start:start + batch_size], data["attention_mask"][start:start + batch_size]
        fill = batch_size - len(ids)  # pad the last batch: one compiled shape
        if fill:
            ids, mask = np.concatenate([ids, ids[:1].repeat(fill, 0)]), np.concatenate([mask, mask[:1].repeat(fill, 0)])
        logits.append(np.asarray(classify(model, ids, mask), np.float32)[:batch_size - fill])
    return scores_from_logits(np.concatenate(logits), data["labels"])


def scores_from_logits(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1, eval_loss (mean cross-entropy) and num_examples of class logits [N, C]."""
    logits = np.asarray(logits, np.float32)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    scores = classification_metrics(logits.argmax(-1), labels, logits.shape[-1])
    scores["eval_loss"] = float(-log_probs[np.arange(len(labels)), labels].mean())
    return scores


def classification_metrics(predicted: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    """accuracy, and macro-F1 over the classes that occur in labels or predictions (as scikit-learn)."""
    f1s = []
    for c in range(num_labels):
        tp = np.sum((predicted == c) & (labels == c))
        wrong = np.sum((predicted == c) != (labels == c))  # false positives + false negatives
        if tp + wrong:
            f1s.append(2 * tp / (2 * tp + wrong))
    return {"accuracy": float(np.mean(predicted == labels)), "f1": float(np.mean(f1s)), "num_examples": float(len(labels))}
