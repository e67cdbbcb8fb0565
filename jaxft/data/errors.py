"""Errors and the load report: how the data pipeline says what is wrong, and where.

Every problem with one row becomes a `RowError(reason, message)` while the row is read or
tokenized; the loader attaches the row's origin (`file.jsonl:17`, `file.parquet row 3`,
`tfds:name[train] row 8`). With `data.on_error = "raise"` the first one stops loading as a
`DataError`; with `"skip"` the row is dropped and counted in `LoadReport.skipped[reason]`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging

log = logging.getLogger("jaxft.data")

# Stable reason keys: tests, logs and the skip counts use them.
MALFORMED_JSON = "malformed_json"
MISSING_FIELD = "missing_field"
BAD_TYPE = "bad_type"
EMPTY_CONTENT = "empty_content"
UNKNOWN_ROLE = "unknown_role"
EMPTY_LOSS_MASK = "empty_loss_mask"
TEMPLATE_ERROR = "template_error"
TEMPLATE_NOT_PREFIX_STABLE = "template_not_prefix_stable"


class DataError(ValueError):
    """Bad data or a bad data config. The message names the place (file:line, row, key)."""


class RowError(Exception):
    """One row cannot be used; `reason` is one of the keys above."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclasses.dataclass
class LoadReport:
    """What loading one split did: rows read, examples kept, what was skipped and why."""

    split: str = "train"
    rows: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    # A few origins per reason, so a summary can point at real rows.
    skipped_examples: dict = dataclasses.field(default_factory=dict)

    def record_skip(self, origin: str, error: RowError) -> None:
        self.skipped[error.reason] += 1
        examples = self.skipped_examples.setdefault(error.reason, [])
        if len(examples) < 3:
            examples.append(f"{origin}: {error.message}")

    def merge(self, other: "LoadReport") -> None:
        for name in ("rows", "examples", "tokens", "trained_tokens", "truncated", "dropped_overlong"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.skipped.update(other.skipped)
        for reason, examples in other.skipped_examples.items():
            mine = self.skipped_examples.setdefault(reason, [])
            mine.extend(examples[: max(0, 3 - len(mine))])

    def to_dict(self) -> dict:
        return {
                "split": self.split,
                "rows": self.rows,
                "examples": self.examples,
                "tokens": self.tokens,
                "trained_tokens": self.trained_tokens,
                "truncated": self.truncated,
                "dropped_overlong": self.dropped_overlong,
                "skipped": dict(self.skipped),
                "skipped_examples": self.skipped_examples,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "LoadReport":
        d = dict(d)
        d["skipped"] = collections.Counter(d.get("skipped", {}))
        return cls(**d)

    def summary(self) -> str:
        text = (
                f"{self.split}: {self.rows} rows -> {self.examples} examples, {self.tokens} tokens "
                f"({self.trained_tokens} trained); truncated {self.truncated}, "
                f"dropped as too long {self.dropped_overlong}"
        )
        if self.skipped:
            counts = ", ".join(f"{reason}={n}" for reason, n in sorted(self.skipped.items()))
            firsts = "; ".join(e for examples in self.skipped_examples.values() for e in examples[:1])
            text += f"; skipped {sum(self.skipped.values())} bad rows ({counts}); e.g. {firsts}"
        return text
