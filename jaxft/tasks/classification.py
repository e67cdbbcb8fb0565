"""`task = "classification"`: sequence classification, a head on the last non-pad token.

    jaxft train --config configs/classify_demo.py            # rows {"text": ..., "label": ...}

Library use, without the train loop:
    model = jaxft.from_pretrained(folder, labels=["negative", "positive"], pad_token_id=tokenizer.pad_token_id)
    train = encode(read_rows("train.jsonl"), tokenizer, model.labels, seq_len=64, pad_token_id=model.pad_token_id)
    apply_lora(model, LoraConfig(rank=8, alpha=16, targets=lora_targets(model)))   # the head stays whole
    model_def, params, frozen = step.split_model(model, with_head(is_lora_param))
    optimizer = optim.make_optimizer(optim_cfg, params, model_def.axes)
    state = step.init_state(params, frozen, optimizer)
    train_step = jax.jit(step.make_train_step(model_def, optimizer, SequenceCrossEntropy()), donate_argnums=0)
    for batch in batches(train, batch_size=32, seed=0):
        state, metrics = train_step(state, batch)
    evaluate(model_def.merge(state.params, state.frozen), valid)   # {"accuracy", "f1", "eval_loss", ...}

The loss is its own: cross-entropy of the pooled class logits [B, C] (model.classify, as HF's
*ForSequenceClassification computes them) against one label per row, averaged over the rows of
the whole batch. Nothing of the language-model loss applies (train.z_loss and train.loss_chunk
are refused). Eval: eval_loss, accuracy and macro-F1 on data.validation. The head trains whole
beside the adapters and exports as PEFT's modules_to_save with task_type SEQ_CLS.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxft import sharding
from jaxft.data.labelled import LabelledData, batches, encode, read_rows  # noqa: F401  (the library API above)
from jaxft.peft.lora import OUTPUT_HEAD, linear_modules
from jaxft.tasks.base import ExportInfo, Task, need

HEAD = "score"
HEAD_PREFIX = HEAD + "."


class SequenceCrossEntropy:
    """The classification Objective (see jaxft.step.Objective): Σ over rows of -log p(label) of
    the pooled class logits / the batch's row count; `accuracy` likewise."""

    def normalizer(self, batch):
        return jnp.asarray(batch["labels"].shape[0], jnp.float32)

    def loss(self, model, batch, normalizer):
        logits = model.classify(batch["input_ids"], attention_mask=batch["attention_mask"]).astype(jnp.float32)
        labels = batch["labels"].astype(jnp.int32)  # [B]
        log_probs = jax.nn.log_softmax(logits, axis=-1)  # [B, C]
        nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
        correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
        return nll.sum() / normalizer, {"accuracy": correct.sum() / normalizer}


def with_head(trainable: Callable[[str, nnx.Variable], bool]) -> Callable[[str, nnx.Variable], bool]:
    """A `split_model` predicate that also trains the classification head (PEFT's modules_to_save)."""
    return lambda path, variable: path.startswith(HEAD_PREFIX) or trainable(path, variable)


def lora_targets(model: nnx.Module) -> tuple[str, ...]:
    """"all-linear" for a classifier: every Linear but the head, which trains whole instead."""
    return tuple(sorted({path[-1] for path in linear_modules(model)} - {HEAD, OUTPUT_HEAD}))


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


class Classification(Task):
    name = "classification"
    section = "classification"
    resume_keys = ("classification.labels",)

    def validate(self, config) -> None:
        labels = list(config.classification.labels)
        need(len(labels) >= 2 and len(set(labels)) == len(labels) and all(isinstance(x, str) for x in labels),
             f"classification.labels must be >= 2 distinct label names, got {labels}")
        need(bool(config.data.train), "task=classification needs data.train (JSONL/Parquet rows {text, label})")
        need(isinstance(config.data.train, str) and (not config.data.validation or isinstance(config.data.validation, str)),
             "task=classification reads one source each for data.train / data.validation (a path pattern or hf:/tfds: spec)")
        need(not config.data.validation_fraction and not config.data.stages,
             "task=classification takes its validation rows from data.validation; data.validation_fraction and "
             "data.stages are for causal_lm")
        need(not config.eval.task_file,
             "eval.task_file (exact match of generated answers) does not apply to task=classification: a classifier "
             "does not generate; its accuracy and F1 on data.validation are reported instead")
        for key in ("z_loss", "loss_chunk"):  # terms of the language-model loss, which a classifier does not have
            need(not config.train[key], f"train.{key}={config.train[key]} is a term of the language-model loss; "
                                        "task=classification has its own loss over the pooled class logits (set it to 0)")

    def model_options(self, config, pad_token_id):
        # The pad id is the tokenizer's: the head pools the last token that is not it, and the data pad with it.
        return {"labels": tuple(config.classification.labels), "pad_token_id": pad_token_id}

    def lora_targets(self, model, targets):
        return lora_targets(model) if targets == "all-linear" else targets

    def trainable(self, predicate):
        # The head starts random: it trains whole in LoRA runs (PEFT's modules_to_save) and in full FT.
        return with_head(predicate)

    def data(self, config, tokenizer) -> LabelledData:
        return LabelledData(config, tokenizer)

    def batch_spec(self, config, rows: int) -> dict:
        shape = (rows, config.data.seq_len)
        return {"input_ids": jax.ShapeDtypeStruct(shape, jnp.int32),
                "attention_mask": jax.ShapeDtypeStruct(shape, jnp.int32),
                "labels": jax.ShapeDtypeStruct((rows,), jnp.int32)}

    def objective(self, config) -> SequenceCrossEntropy:
        return SequenceCrossEntropy()

    def eval_step(self, model_def, mesh, config):
        """(params, frozen, batch) → pooled class logits [B, C], float32, replicated on every device
        (so that every host reads all of them)."""

        def eval_step(params, frozen, batch):
            model = model_def.merge(params, frozen)
            return model.classify(batch["input_ids"], attention_mask=batch["attention_mask"]).astype(jnp.float32)

        return jax.jit(eval_step, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def evaluate(self, eval_step, params, frozen, data: LabelledData, mesh) -> dict | None:
        """{"eval_loss", "accuracy", "f1"} over data.validation, in global batches of train.batch_size."""
        rows = data.validation
        if rows is None:
            return None
        count, size = len(rows["labels"]), data.batch_size
        logits = []
        for start in range(0, count, size):
            take = np.minimum(np.arange(start, start + size), count - 1)  # the last batch repeats its last row
            mine = data.host_rows(take)
            batch = {k: rows[k][mine] for k in ("input_ids", "attention_mask")}
            out = eval_step(params, frozen, sharding.global_batch(batch, mesh))  # [size, C] on every host
            logits.append(np.asarray(jax.device_get(out))[:min(size, count - start)])
        scores = scores_from_logits(np.concatenate(logits), rows["labels"])
        return {k: scores[k] for k in ("eval_loss", "accuracy", "f1")}

    def export_info(self) -> ExportInfo:
        return ExportInfo(peft_task_type="SEQ_CLS", modules_to_save=(HEAD,))


TASK = Classification()
