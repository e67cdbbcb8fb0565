"""Evaluation: loss over validation batches, exact match of generated answers, early stopping.

A task file is JSONL with {"prompt": ..., "answer": ...}: the model greedily continues each prompt
and a row counts as exact when the continuation, stripped, equals the answer, stripped; `contains`
counts answers found anywhere in it.
"""

from __future__ import annotations

import json
import math

from jaxft import sharding


def eval_loss(eval_step, params, frozen, batches, mesh) -> float | None:
    """Mean token cross-entropy over all validation batches (None without validation data)."""
    if not batches:
        return None
    nll, targets = 0.0, 0.0
    for batch in batches:
        out = eval_step(params, frozen, sharding.global_batch(batch, mesh))
        nll += float(out["nll_sum"])
        targets += float(out["num_targets"])
    return nll / max(targets, 1.0)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def read_task(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: invalid JSON: {e.msg}") from None
            missing = [k for k in ("prompt", "answer") if not isinstance(row.get(k), str)]
            if missing:
                raise ValueError(f"{path}:{number}: field(s) {missing} missing or not strings")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def task_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int = 16, batch_size: int = 32,
                  samples: int = 8) -> dict:
    """{"exact_match", "contains", "samples": [{"prompt", "answer", "output"}...]} over `rows`."""
    from jaxft.generate import greedy_generate, prompt_ids

    exact = contains = 0
    shown = []
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else -1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts = [prompt_ids(tokenizer, r["prompt"]) for r in chunk]
        outputs = greedy_generate(model, prompts, max_new_tokens, eos_id=eos, pad_id=pad)
        for row, ids in zip(chunk, outputs):
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            answer = row["answer"].strip()
            exact += text == answer
            contains += answer in text
            if len(shown) < samples:
                shown.append({"prompt": row["prompt"], "answer": answer, "output": text})
    return {"exact_match": exact / len(rows), "contains": contains / len(rows), "samples": shown}


class EarlyStopping:
    """Stops when eval loss has not improved by more than `min_delta` for `patience` evaluations."""

    def __init__(self, patience: int, min_delta: float = 0.0):
        self.patience, self.min_delta = patience, min_delta
        self.best = math.inf
        self.bad_evals = 0

    def update(self, loss: float) -> bool:
        """Records an eval loss; returns True when training should stop."""
        if loss < self.best - self.min_delta:
            self.best, self.bad_evals = loss, 0
        else:
            self.bad_evals += 1
        return self.patience > 0 and self.bad_evals >= self.patience
