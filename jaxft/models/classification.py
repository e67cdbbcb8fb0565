"""Sequence classification: HF's `*ForSequenceClassification` on any family's decoder.

    model = jaxft.from_pretrained(folder, labels=["negative", "positive"])   # a new head on an LM
    model = jaxft.from_pretrained(classifier_folder)                        # an HF classifier, head included
    class_logits = model.classify(input_ids, attention_mask=mask)           # [B, num_labels]

The model is the family's decoder (`model.` params, as in the causal LM) plus `score` [num_labels,
hidden], no bias, applied to the final hidden state of the last token that is not padding. "Not
padding" follows transformers to the letter: the rightmost token whose id differs from
`pad_token_id`, whatever the attention mask says, so that a head trained here scores the same
token in PyTorch.

Calling the model returns per-token class logits [B, T, num_labels] (HF's `logits` before it
pools them), so the causal-LM train step trains it unchanged: the target is the label at the
pooled token and the loss mask selects that one token per row (see jaxft.tasks.classification).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import jax.numpy as jnp
from flax import nnx

from jaxft.models.decoder import DecoderModel
from jaxft.models.layers import Axis, Linear, constrain

SUFFIX = "ForSequenceClassification"
# Where the HF class name is not the causal-LM name with "ForCausalLM" → "ForSequenceClassification".
_ARCHITECTURES = {"gemma3_text": "Gemma3TextForSequenceClassification"}
HEAD = "score.weight"


def last_token_index(input_ids: jnp.ndarray, pad_token_id: int) -> jnp.ndarray:
    """[B, T] → [B]: the rightmost position whose token is not `pad_token_id` (0 if all are), as
    transformers picks it for left and right padding alike."""
    not_pad = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.argmax(jnp.arange(input_ids.shape[-1], dtype=jnp.int32) * not_pad, axis=-1)


class SequenceClassifier(DecoderModel):
    """`model(input_ids, attention_mask=None, positions=None, segment_ids=None)` → per-token class
    logits [B, T, C]; `model.classify(...)` → the pooled logits [B, C] that HF returns."""

    def __init__(self, cfg, *, labels: Sequence[str], pad_token_id: int, param_dtype=jnp.float32, dtype=None,
                 rngs: nnx.Rngs):
        super().__init__(cfg, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.score = Linear(self.model.spec.hidden_size, len(labels), use_bias=False, axes=(None, Axis.EMBED),
                            param_dtype=param_dtype, dtype=self.dtype, rngs=rngs)
        self.labels = tuple(labels)  # id → name
        self.pad_token_id = int(pad_token_id)

    def logits(self, hidden):
        """Class logits of every token [B, T, C] (the hook jaxft.step's chunked loss calls)."""
        return self.score(hidden)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        hidden = self.hidden_states(input_ids, attention_mask, positions, segment_ids)  # [B, T, D]
        return constrain(self.logits(hidden), (Axis.BATCH, Axis.SEQ, None))

    def classify(self, input_ids, attention_mask=None, positions=None):
        """Class logits [B, C] at each row's last non-pad token."""
        hidden = self.hidden_states(input_ids, attention_mask, positions)  # [B, T, D]
        index = last_token_index(input_ids, self.pad_token_id)
        pooled = jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]  # [B, D]
        return self.score(pooled)

    def to_hf_config(self) -> dict[str, Any]:
        out = self.config.to_hf()
        model_type = out["model_type"]
        out["architectures"] = [_ARCHITECTURES.get(model_type, out["architectures"][0].replace("ForCausalLM", SUFFIX))]
        out["id2label"] = {str(i): name for i, name in enumerate(self.labels)}
        out["label2id"] = {name: i for i, name in enumerate(self.labels)}
        out["pad_token_id"] = self.pad_token_id
        return out


def is_classifier_config(hf_config: dict[str, Any]) -> bool:
    return any(str(a).endswith(SUFFIX) for a in hf_config.get("architectures") or ())


def head_options(hf_config: dict[str, Any], labels: Sequence[str] | int | None = None,
                 pad_token_id: int | None = None, where: str = "config.json") -> dict[str, Any] | None:
    """SequenceClassifier's keyword arguments for a checkpoint, or None for a causal LM.

    labels: names (id order) or a count (named LABEL_0, ... as in HF; 1 is a scalar head, a reward
    model); None keeps the checkpoint's own head and labels when config.json names a
    *ForSequenceClassification architecture.
    """
    if labels is None:
        if not is_classifier_config(hf_config):
            return None
        id2label = hf_config.get("id2label") or {}
        try:
            labels = [id2label[k] for k in sorted(id2label, key=int)]
        except ValueError:
            raise ValueError(f"{where}: id2label keys must be integers, got {sorted(id2label)}") from None
        if [int(k) for k in sorted(id2label, key=int)] != list(range(len(labels))):
            raise ValueError(f"{where}: id2label ids {sorted(id2label, key=int)} are not 0..{len(labels) - 1}")
    elif isinstance(labels, int):
        labels = [f"LABEL_{i}" for i in range(labels)]
    labels = [str(name) for name in labels]
    if not labels or len(set(labels)) != len(labels):  # one label: a scalar head (a reward model)
        raise ValueError(f"{where}: a classifier needs distinct labels (one for a scalar head), got {labels}")
    if pad_token_id is None:
        pad_token_id = hf_config.get("pad_token_id")
    if not isinstance(pad_token_id, int):
        raise ValueError(f"{where}: pad_token_id is {pad_token_id!r}; a classifier scores the last token that is "
                         "not padding, so it needs one (pass pad_token_id=..., e.g. the tokenizer's pad id)")
    return {"labels": tuple(labels), "pad_token_id": pad_token_id}


def head_rules(checkpoint_shapes: dict[str, tuple[int, ...]]) -> tuple[list[str], list[str]]:
    """(params to initialize fresh, extra checkpoint-key regexes to ignore) for a classifier.

    A causal-LM checkpoint has no head: `score` starts fresh (as transformers does) and the
    language-model head it does have is ignored.
    """
    fresh = [] if HEAD in checkpoint_shapes else [HEAD]
    if fresh:
        logging.warning("the checkpoint has no %s: the classification head starts from N(0, 0.02²)", HEAD)
    return fresh, [r"lm_head\.weight"]
