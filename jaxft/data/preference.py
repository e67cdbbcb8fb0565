"""Preference pairs for task=dpo and task=reward (data.format="preference"), in TRL's two formats:

    standard:        {"prompt": "Q: ...\\nA:", "chosen": " right", "rejected": " wrong"}
    conversational:  {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}], "rejected": [...]}

    data = PreferenceData(config, tokenizer, causal=True, max_prompt_length=256)
    batch = next(data.train_iterator())        # arrays [B, 2, T]: pair axis 0 = chosen, 1 = rejected

Each completion is encoded as the causal-LM formats encode it, so DPO trains on exactly the tokens
SFT would: a standard pair is prompt + completion tokenized as one string (prompt_completion: BOS
where the tokenizer adds one, EOS appended and trained); a conversational pair is prompt + completion
rendered with the chat template, its assistant turns after the prompt trained (chat). Field names:
data.prompt_field, data.chosen_field, data.rejected_field (and the message keys of data.*_field);
data.margin_field names an optional per-pair margin (reward models).

Too long (more than data.seq_len + 1 tokens with causal=True, data.seq_len without): the prompt is
cut first, to `max_prompt_length` tokens keeping its end (a BOS stays), then both completions to
what is left, keeping their start; with data.overlong="drop" the pair is dropped instead. A pair
whose chosen equals its rejected is dropped (it carries no preference). Bad rows raise DataError
naming file:line and the field, or with data.on_error="skip" are counted. Everything is counted in
`report` (the run's report shows it); the data warnings of the training pairs (trained unknown
tokens, a token spanning the prompt/completion boundary: jaxft.data.errors) in `warnings`, a pair
counted once when its chosen or its rejected completion has one.

Batch keys, right-padded to T = data.seq_len:
  causal=True (DPO):  input_ids, targets, loss_mask (the completion's targets), sequence_mask (every
                      real target, prompt included), attention_mask   [B, 2, T]
  causal=False (reward model): input_ids, attention_mask              [B, 2, T]
  weight [B] (1; 0 for the padding rows of a last validation batch), margin [B] with data.margin_field,
  ref_logps [B, 2] once `reference` holds precomputed reference log-probs.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Any, Iterator

import numpy as np

from jaxft.data import errors
from jaxft.data.config import resolve
from jaxft.data.errors import DataError, RowError, log
from jaxft.data.formats import Encoded, Encoder, TokenizerInfo, shift_notes
from jaxft.data.indexed import IndexedIterator, host_share
from jaxft.data.sources import open_source


class PreferenceData:
    """The encoded train (and validation) pairs of a preference run."""

    def __init__(self, config: Any, tokenizer: Any, *, causal: bool, max_prompt_length: int,
                 process_index: int | None = None, process_count: int | None = None):
        self.settings = s = resolve(config, process_index=process_index, process_count=process_count)
        if s.format != "preference":
            raise DataError(f"data.format={s.format!r}: preference tasks read pairs (data.format='preference')")
        self.tokenizer = TokenizerInfo(tokenizer, s.chat_template)
        self.causal = causal
        self.seq_len = s.seq_len
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.max_tokens = s.seq_len + 1 if causal else s.seq_len  # causal rows give L - 1 (input, target) pairs
        self.max_prompt_length = max_prompt_length or s.seq_len // 2
        self.fields = dict(s.fields)
        self.batch_size = s.batch_size
        self.process_index, self.process_count = s.process_index, s.process_count
        # Completions are never cut by the format encoders: a pair is cut as a whole (see _fit).
        common = dict(fields=self.fields, roles=s.roles, seq_len=1 << 30, add_eos=s.add_eos, overlong="truncate",
                      train_on="all_assistant")
        self._standard = Encoder(self.tokenizer, fmt="prompt_completion", **common)
        self._chat = None if self.tokenizer.chat_template_or_none() is None else \
            Encoder(self.tokenizer, fmt="chat", **common)
        self.report: dict[str, collections.Counter] = {}
        self._warnings: dict[str, dict] = {}
        if len(s.stages) != 1 or len(s.stages[0].sources) != 1 or len(s.validation) > 1 or s.validation_fraction:
            raise DataError("data.format='preference' reads one source each for data.train and data.validation "
                            "(no data.stages, mixtures or data.validation_fraction)")
        self.train = self._load(s.stages[0].sources[0], "data.train", "train")
        self.validation = self._load(s.validation[0], "data.validation", "validation") if s.validation else None
        self.warnings = errors.warnings_summary(self._warnings["train"])  # report.json's data_warnings
        self.reference: dict[str, np.ndarray] = {}  # split -> [N, 2] reference log-probs, when precomputed
        tokens = b"".join(t.tobytes() for pair in self.train["tokens"] for t in pair)
        self.fingerprint = {"pairs": len(self), "digest": hashlib.sha256(tokens).hexdigest()[:16],
                            "batch_size": s.batch_size, "seed": s.seed, "shuffle": bool(s.shuffle)}

    def __len__(self) -> int:
        return len(self.train["tokens"])

    # ---- reading and encoding --------------------------------------------------------------------
    def _load(self, spec, key: str, split: str) -> dict[str, list]:
        s = self.settings
        f = self.fields
        columns = [f["prompt_field"], f["chosen_field"], f["rejected_field"]] + ([s.margin_field] if s.margin_field else [])
        source = open_source(spec, key=key, default_split=split, tfds_data_dir=s.tfds_data_dir, columns=columns)
        counts = self.report.setdefault(split, collections.Counter())
        warnings = self._warnings.setdefault(split, {})
        pairs: dict[str, list] = {"tokens": [], "masks": [], "margin": [], "text": []}
        for start in range(0, len(source), 512):
            rows = source.read(range(start, min(start + 512, len(source))))
            counts["rows"] += len(rows)
            for (origin, row), result in zip(rows, self._encode(rows)):
                if isinstance(result, RowError):
                    if s.on_error == "raise":
                        raise DataError(f"{origin}: {result.message}")
                    counts[f"skipped_{result.reason}"] += 1
                    continue
                if isinstance(result, str):  # identical / dropped_overlong
                    counts[result] += 1
                    continue
                (chosen, rejected), truncated, margin, text = result
                counts["truncated"] += truncated
                if chosen.notes or rejected.notes:
                    errors.record_notes(warnings, origin, chosen.notes + rejected.notes)
                pairs["tokens"].append((chosen.tokens, rejected.tokens))
                pairs["masks"].append((chosen.mask, rejected.mask))
                pairs["margin"].append(margin)
                pairs["text"].append(text)
        counts["pairs"] = len(pairs["tokens"])
        log.info("data %s: %s", split, dict(counts))
        errors.log_warnings(warnings, f"{split} {source.name}", self.tokenizer.unk_token)
        if not pairs["tokens"]:
            raise DataError(f"{key} ({source.name}): no preference pairs left: {dict(counts)}")
        return pairs

    def _encode(self, rows: list) -> list:
        """(origin, row | RowError) → per row: RowError | "identical" | "dropped_overlong" |
        ((chosen, rejected) Encoded, truncated, margin, display text)."""
        out: list = [None] * len(rows)
        standard, chat = [], []
        for i, (_, row) in enumerate(rows):
            try:
                if isinstance(row, RowError):
                    raise row
                prompt, chosen, rejected, margin = self._validate(row)
                if chosen == rejected:
                    out[i] = "identical_pair"
                    continue
                (standard if isinstance(prompt, str) else chat).append((i, prompt, chosen, rejected, margin))
            except RowError as e:
                out[i] = e
        if standard:
            encoded = self._standard.encode_completions([(p, c) for _, p, c, _, _ in standard] +
                                                        [(p, r) for _, p, _, r, _ in standard])
            for k, (i, p, c, r, margin) in enumerate(standard):
                out[i] = self._pair(encoded[k], encoded[k + len(standard)], margin, (p, c, r))
        if chat:
            conversations = [p + c for _, p, c, _, _ in chat] + [p + r for _, p, _, r, _ in chat]
            starts = [len(p) for _, p, _, _, _ in chat] * 2
            encoded = self._chat.encode_conversations(conversations, starts)
            for k, (i, p, c, r, margin) in enumerate(chat):
                text = (p[-1]["content"], " ".join(m["content"] or "" for m in c), " ".join(m["content"] or "" for m in r))
                out[i] = self._pair(encoded[k], encoded[k + len(chat)], margin, text)
        return out

    def _validate(self, row) -> tuple:
        f = self.fields
        values = []
        for key in ("prompt_field", "chosen_field", "rejected_field"):
            if f[key] not in row:
                raise RowError(errors.MISSING_FIELD, f"missing field {f[key]!r} (data.{key}); row has {sorted(row)[:8]}")
            values.append(row[f[key]])
        prompt, chosen, rejected = values
        conversational = isinstance(prompt, list)
        if conversational:
            if self._chat is None:
                raise RowError(errors.TEMPLATE_ERROR, "conversational pairs need a chat template, and the tokenizer "
                                                      "has none (set data.chat_template)")
            prompt = self._chat.validate_messages(prompt, f["prompt_field"])
            completions = []
            for key, value in ((f["chosen_field"], chosen), (f["rejected_field"], rejected)):
                if not isinstance(value, list):
                    raise RowError(errors.BAD_TYPE, f"field {key!r} must be a list of messages like the prompt, got "
                                                    f"{type(value).__name__}: {str(value)[:60]!r}")
                messages = self._chat.validate_messages(value, key)
                if messages[-1]["role"] != "assistant":
                    raise RowError(errors.BAD_TYPE, f"field {key!r}: its last message is from "
                                                    f"{messages[-1]['role']!r}, not from the assistant")
                completions.append(messages)
            chosen, rejected = completions
        else:
            if not isinstance(prompt, str):
                raise RowError(errors.BAD_TYPE, f"field {f['prompt_field']!r} must be a string or a list of messages, "
                                                f"got {type(prompt).__name__}")
            for key, value in ((f["chosen_field"], chosen), (f["rejected_field"], rejected)):
                if not isinstance(value, str):
                    raise RowError(errors.BAD_TYPE, f"field {key!r} must be a string, as the prompt is, got "
                                                    f"{type(value).__name__}: {str(value)[:60]!r}")
                if not value.strip():
                    raise RowError(errors.EMPTY_CONTENT, f"field {key!r} is empty")
        margin = 0.0
        if self.settings.margin_field:
            margin = row.get(self.settings.margin_field)
            if not isinstance(margin, (int, float)) or isinstance(margin, bool):
                raise RowError(errors.BAD_TYPE, f"field {self.settings.margin_field!r} (data.margin_field) must be a "
                                                f"number, got {margin!r}")
        return prompt, chosen, rejected, float(margin)

    def _pair(self, chosen, rejected, margin: float, text) -> Any:
        for result in (chosen, rejected):
            if not isinstance(result, Encoded):
                return result  # a RowError (empty completion, template failure)
        fitted = self._fit(chosen, rejected)
        if isinstance(fitted, str):
            return fitted
        return fitted[:2], fitted[2], margin, tuple(str(t)[:300] for t in text)

    def _fit(self, chosen: Encoded, rejected: Encoded):
        """(chosen, rejected, truncated) within max_tokens, or "dropped_overlong"."""
        if max(len(chosen.tokens), len(rejected.tokens)) <= self.max_tokens:
            return chosen, rejected, False
        if self.settings.overlong == "drop":
            return "dropped_overlong"
        prompt = min(_prompt_length(chosen), _prompt_length(rejected))
        head = 1 if self.tokenizer.add_bos and prompt else 0  # a BOS stays in front
        keep = max(min(prompt, self.max_prompt_length) - head, 0)
        room = self.max_tokens - head - keep  # for each completion
        if room < 2:  # nothing trainable would be left of a completion
            return "dropped_overlong"

        def cut(encoded: Encoded) -> Encoded:
            tokens = np.concatenate([encoded.tokens[:head], encoded.tokens[prompt - keep:prompt],
                                     encoded.tokens[prompt:][:room]])
            mask = np.concatenate([encoded.mask[:head], encoded.mask[prompt - keep:prompt], encoded.mask[prompt:][:room]])
            # Notes are on trained tokens, all from `prompt` on: they move to head + keep.
            notes = shift_notes(encoded.notes, prompt, prompt + room, head + keep - prompt)
            return Encoded(tokens, mask, truncated=True, notes=notes)

        return cut(chosen), cut(rejected), True

    # ---- batches -----------------------------------------------------------------------------------
    def batch(self, split: str, rows: np.ndarray, weight: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The batch of pairs `rows` of `split` (see the module docstring for the keys)."""
        pairs = self.train if split == "train" else self.validation
        count, length = len(rows), self.seq_len
        ids = np.full((count, 2, length), self.pad_id, np.int32)
        attention = np.zeros((count, 2, length), np.int32)
        out = {"input_ids": ids, "attention_mask": attention}
        if self.causal:
            out.update(targets=np.full((count, 2, length), self.pad_id, np.int32),
                       loss_mask=np.zeros((count, 2, length), np.float32),
                       sequence_mask=np.zeros((count, 2, length), np.float32))
        for i, row in enumerate(rows):
            for k in range(2):
                tokens, mask = pairs["tokens"][row][k], pairs["masks"][row][k]
                if self.causal:
                    n = len(tokens) - 1
                    ids[i, k, :n], out["targets"][i, k, :n] = tokens[:-1], tokens[1:]
                    out["loss_mask"][i, k, :n], out["sequence_mask"][i, k, :n] = mask[1:], 1.0
                else:
                    n = len(tokens)
                    ids[i, k, :n] = tokens
                attention[i, k, :n] = 1
        out["weight"] = np.ones(count, np.float32) if weight is None else weight.astype(np.float32)
        if self.settings.margin_field:
            out["margin"] = np.asarray([pairs["margin"][row] for row in rows], np.float32)
        if split in self.reference:
            out["ref_logps"] = self.reference[split][rows].astype(np.float32)
        return out

    def train_iterator(self) -> IndexedIterator:
        s = self.settings
        report = self.report["train"]
        return IndexedIterator(len(self), s.batch_size, s.seed, s.shuffle, self.fingerprint,
                               lambda rows: self.batch("train", rows), process_index=s.process_index,
                               process_count=s.process_count, stats=lambda _: dict(report))

    def eval_batches(self, split: str = "validation", batch_size: int | None = None) -> Iterator[dict]:
        """This host's share of global batches covering every pair of `split` once; the last batch is
        filled up with weight-0 repeats, so that every batch has one shape."""
        pairs = self.train if split == "train" else self.validation
        size = batch_size or self.batch_size
        count = len(pairs["tokens"])
        for start in range(0, count, size):
            take = np.arange(start, start + size)
            weight = (take < count).astype(np.float32)
            take = np.minimum(take, count - 1)
            mine = host_share(take, self.process_index, self.process_count)
            yield self.batch(split, mine, host_share(weight, self.process_index, self.process_count))

    def texts(self, split: str, rows) -> list[tuple[str, str, str]]:
        """(prompt, chosen, rejected) as shown in reports (conversational: the last prompt message and
        the completions' contents), cut to 300 characters."""
        pairs = self.train if split == "train" else self.validation
        return [pairs["text"][row] for row in rows]


def _prompt_length(encoded: Encoded) -> int:
    """Tokens before the first trained one (a chat pair's completion starts after its prompt)."""
    trained = np.flatnonzero(encoded.mask)
    return int(trained[0]) if len(trained) else len(encoded.tokens)
