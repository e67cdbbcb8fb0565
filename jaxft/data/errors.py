"""Errors and the load report: how the data pipeline says what is wrong, and where.

Every problem with one row becomes a `RowError(reason, message)` while the row is read or
tokenized; the loader attaches the row's origin (`file.jsonl:17`, `file.parquet row 3`,
`tfds:name[train] row 8`). With `data.on_error = "raise"` the first one stops loading as a
`DataError`; with `"skip"` the row is dropped and counted in `LoadReport.skipped[reason]`.

Rows that train but probably not as meant are warnings, counted in `LoadReport.warnings[kind]`
({"rows", "tokens", "example": origin, "text"}) and logged once per source:
    unknown_target_tokens   a trained target token is the tokenizer's unknown token (the text had
                            characters or words the vocabulary lacks; the model learns to emit unk)
    boundary_inside_token   one token spans the prompt's end and the completion's start (or an
                            assistant turn's start): the model learns a token it never sees at
                            inference, where the prompt is tokenized on its own
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

# Warning kinds (rows still train): report.json's data_warnings keys.
UNKNOWN_TARGET_TOKENS = "unknown_target_tokens"
BOUNDARY_INSIDE_TOKEN = "boundary_inside_token"
WARNINGS = (UNKNOWN_TARGET_TOKENS, BOUNDARY_INSIDE_TOKEN)
BOUNDARY_HINT = ("a missing space between prompt and completion is the usual cause; the model then learns tokens "
                 "it never sees at inference")


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
    # kind -> {"rows", "tokens", "example": origin of the first row, "text"} (see the module docstring)
    warnings: dict = dataclasses.field(default_factory=dict)

    def record_skip(self, origin: str, error: RowError) -> None:
        self.skipped[error.reason] += 1
        examples = self.skipped_examples.setdefault(error.reason, [])
        if len(examples) < 3:
            examples.append(f"{origin}: {error.message}")

    def record_notes(self, origin: str, notes: tuple) -> None:
        record_notes(self.warnings, origin, notes)

    def merge(self, other: "LoadReport") -> None:
        for name in ("rows", "examples", "tokens", "trained_tokens", "truncated", "dropped_overlong"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.skipped.update(other.skipped)
        for reason, examples in other.skipped_examples.items():
            mine = self.skipped_examples.setdefault(reason, [])
            mine.extend(examples[: max(0, 3 - len(mine))])
        merge_warnings(self.warnings, other.warnings)

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
                "warnings": self.warnings,
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


def record_notes(warnings: dict, origin: str, notes: tuple) -> None:
    """Counts one row's notes ((kind, token positions, text, detail), ... from formats.Encoded) into
    `warnings` (kind -> entry); the first row of each kind is the example."""
    for kind in dict.fromkeys(kind for kind, *_ in notes):
        mine = [note for note in notes if note[0] == kind]
        entry = warnings.setdefault(kind, {"rows": 0, "tokens": 0, "example": origin, "text": mine[0][2]})
        if kind == BOUNDARY_INSIDE_TOKEN:
            entry.setdefault("prompt_chars", mine[0][3])
        entry["rows"] += 1
        entry["tokens"] += sum(len(positions) for _, positions, *_ in mine)


def merge_warnings(into: dict, other: dict) -> None:
    for kind, entry in other.items():
        if kind in into:
            into[kind]["rows"] += entry["rows"]
            into[kind]["tokens"] += entry["tokens"]
        else:
            into[kind] = dict(entry)


def warnings_summary(warnings: dict) -> dict:
    """Every warning kind, zero where nothing was found: what report.json's data_warnings holds."""
    empty = {"rows": 0, "tokens": 0, "example": None, "text": None}
    return {kind: dict(warnings.get(kind, empty)) for kind in WARNINGS}


def log_warnings(warnings: dict, where: str, unk_token: str | None = None) -> None:
    """One warning per kind found in `where` (a split and source name), with its first example."""
    unknown = warnings.get(UNKNOWN_TARGET_TOKENS)
    if unknown:
        tokens = unknown["tokens"]
        log.warning("data %s: the tokenizer's unknown token %r is a trained target in %s (%d trained target token%s): "
                    "the model learns to emit it for text the vocabulary lacks (the rows still train); e.g. %s: %r",
                    where, unk_token, _rows(unknown["rows"]), tokens, "" if tokens == 1 else "s", unknown["example"],
                    unknown["text"])
    boundary = warnings.get(BOUNDARY_INSIDE_TOKEN)
    if boundary:
        text, k = boundary["text"], boundary.get("prompt_chars", 0)
        extra = (" (here the prompt ends with whitespace that the tokenizer joins to the completion's first word: "
                 "move it to the start of the completion)") if text[:k].isspace() else ""
        log.warning("data %s: %s with a token spanning the prompt/completion boundary (it is trained); e.g. "
                    "%s: token %r = the prompt's last %r + the completion's first %r: %s%s", where, _rows(boundary["rows"]),
                    boundary["example"], text, text[:k], text[k:], BOUNDARY_HINT, extra)


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"
