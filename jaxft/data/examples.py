"""Tokenized documents of one source: one flat token array, loaded once, optionally cached.

Loading reads the selected rows of a source in chunks, encodes them with a `formats.Encoder`
(batched through the Rust tokenizer), applies `data.on_error`, and keeps the survivors as
`TokenizedDocs`. Item i of `TokenizedDocs` is a training example already shifted for next-token
prediction: `input_ids = tokens[:-1]`, `targets = tokens[1:]`, `loss_mask = mask[1:]`; shifting
per document means no target ever crosses into the next packed document.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence

import numpy as np

from jaxft.data.errors import DataError, LoadReport, RowError, log, log_warnings
from jaxft.data.formats import DROPPED, Encoded, Encoder
from jaxft.data.sources import RowSource

CACHE_VERSION = 2  # bump when the encoding of rows (or what the cached report holds) changes
CHUNK_ROWS = 512   # rows per tokenizer batch: large enough to amortize, small enough to stream


class TokenizedDocs:
    """Documents as `tokens[offsets[i]:offsets[i+1]]` with per-token loss mask; a grain source."""

    def __init__(self, tokens: np.ndarray, mask: np.ndarray, offsets: np.ndarray):
        self.tokens, self.mask, self.offsets = tokens, mask, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> dict:
        start, end = self.offsets[index], self.offsets[index + 1]
        tokens, mask = self.tokens[start:end], self.mask[start:end]
        return {"input_ids": tokens[:-1], "targets": tokens[1:],
                        "loss_mask": mask[1:].astype(np.float32)}

    def lengths(self) -> np.ndarray:
        """Input length of each example (tokens - 1)."""
        return np.diff(self.offsets) - 1

    @classmethod
    def concatenate(cls, parts: Sequence[Encoded]) -> "TokenizedDocs":
        lengths = [len(p.tokens) for p in parts]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.concatenate([p.tokens for p in parts]) if parts else np.zeros(0, np.int32)
        mask = np.concatenate([p.mask for p in parts]) if parts else np.zeros(0, bool)
        return cls(tokens.astype(np.int32), mask.astype(bool), offsets)


def tokenize_source(source: RowSource, indices: np.ndarray, encoder: Encoder, *, on_error: str,
                                        split: str, cache_dir: str | None = None,
                                        cache_key_parts: Sequence = ()) -> tuple[TokenizedDocs, LoadReport]:
    """Reads rows `indices` of `source`, encodes them, applies on_error; cached if cache_dir."""
    cache_path = None
    if cache_dir:
        key = hashlib.sha256(json.dumps(
                [CACHE_VERSION, source.fingerprint(), hashlib.sha256(np.asarray(indices, np.int64)
                                                                                                                            .tobytes()).hexdigest(),
                  on_error, *map(str, cache_key_parts)]).encode()).hexdigest()[:32]
        cache_path = os.path.join(cache_dir, f"tokenized-{key}.npz")
        if os.path.exists(cache_path):
            with np.load(cache_path) as cached:
                report = LoadReport.from_dict(json.loads(str(cached["report"])))
                log.info("%s: tokenized data from cache %s", source.name, cache_path)
                log_warnings(report.warnings, f"{split} {source.name}", encoder.tok.unk_token)
                return TokenizedDocs(cached["tokens"], cached["mask"], cached["offsets"]), report

    report = LoadReport(split=split)
    kept: list[Encoded] = []
    for start in range(0, len(indices), CHUNK_ROWS):
        chunk = source.read(indices[start:start + CHUNK_ROWS])
        origins = [origin for origin, _ in chunk]
        for origin, result in zip(origins, encoder.encode([row for _, row in chunk])):
            report.rows += 1
            if isinstance(result, RowError):
                if on_error == "raise":
                    raise DataError(f"{origin}: {result.message} [{result.reason}] "
                                                    f"(set data.on_error='skip' to skip and count bad rows)")
                report.record_skip(origin, result)
            elif result == DROPPED:
                report.dropped_overlong += 1
            else:
                kept.append(result)
                report.truncated += int(result.truncated)
                if result.notes:
                    report.record_notes(origin, result.notes)
                    result.notes = ()
    docs = TokenizedDocs.concatenate(kept)
    report.examples = len(docs)
    report.tokens = int(len(docs.tokens))
    report.trained_tokens = int(sum(int(e.mask[1:].sum()) for e in kept))

    log_warnings(report.warnings, f"{split} {source.name}", encoder.tok.unk_token)
    if cache_path:
        os.makedirs(cache_dir, exist_ok=True)
        # Write then rename, so a killed run never leaves a half-written cache entry behind.
        with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".npz", delete=False) as f:
            np.savez(f, tokens=docs.tokens, mask=docs.mask, offsets=docs.offsets,
                              report=np.asarray(json.dumps(report.to_dict())))
        os.replace(f.name, cache_path)
    return docs, report
