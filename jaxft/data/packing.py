"""Packing (or padding) shifted examples into fixed [seq_len] rows of the batch contract.

Packing uses grain's first-fit packer: documents go, in order, into the first of
`packing_bins` open rows with room; when one fits nowhere, all open rows are emitted. grain
writes per-document `segment_ids` (1..n, 0 = padding) and `positions` (reset to 0 at each
document), and its iterator state replays exactly, so packed batches resume bit-identically.
"""

from __future__ import annotations

import grain
import numpy as np
from grain.experimental import FirstFitPackIterDataset

SEQUENCE_KEYS = ("input_ids", "targets", "loss_mask")
BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions", "attention_mask")


def pack(examples: grain.IterDataset, seq_len: int, num_bins: int) -> grain.IterDataset:
    packed = FirstFitPackIterDataset(
            examples, length_struct={k: seq_len for k in SEQUENCE_KEYS}, num_packing_bins=num_bins,
            shuffle_bins=False)  # examples arrive shuffled already; keep their order
    return packed.map(_from_grain_packed)


def _from_grain_packed(row: dict) -> dict:
    segment_ids = row["input_ids_segment_ids"].astype(np.int32)
    return {
            "input_ids": row["input_ids"].astype(np.int32),
            "targets": row["targets"].astype(np.int32),
            "loss_mask": row["loss_mask"].astype(np.float32),
            "segment_ids": segment_ids,
            "positions": row["input_ids_positions"].astype(np.int32),
            "attention_mask": (segment_ids > 0).astype(np.int32),
    }


def pad(example: dict, seq_len: int) -> dict:
    """One example per row, padded at the end (examples never exceed seq_len: see formats)."""
    n = len(example["input_ids"])
    row = empty_row(seq_len)
    for key in SEQUENCE_KEYS:
        row[key][:n] = example[key]
    row["segment_ids"][:n] = 1
    row["positions"][:n] = np.arange(n, dtype=np.int32)
    row["attention_mask"][:n] = 1
    return row


def empty_row(seq_len: int) -> dict:
    """A row of padding only: it contributes nothing to the loss (used to even out eval batches)."""
    row = {k: np.zeros(seq_len, np.int32) for k in BATCH_KEYS}
    row["loss_mask"] = np.zeros(seq_len, np.float32)
    return row


def stack(rows: list[dict]) -> dict:
    return {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}


class PackingStats:
    """Running counts over emitted batches: how full rows are, and how much of them is trained."""

    def __init__(self, counts: dict | None = None):
        self.counts = dict(counts or {"batches": 0, "slots": 0, "tokens": 0, "trained_tokens": 0,
                                                                    "documents": 0})

    def add(self, batch: dict) -> None:
        self.counts["batches"] += 1
        self.counts["slots"] += int(batch["attention_mask"].size)
        self.counts["tokens"] += int(batch["attention_mask"].sum())
        self.counts["trained_tokens"] += int(batch["loss_mask"].sum())
        # A document starts wherever a real token has position 0.
        self.counts["documents"] += int(((batch["positions"] == 0) & (batch["segment_ids"] > 0)).sum())

    def summary(self) -> dict:
        slots = max(1, self.counts["slots"])
        return {**self.counts, "packing_efficiency": self.counts["tokens"] / slots,
                        "trained_fraction": self.counts["trained_tokens"] / slots}
