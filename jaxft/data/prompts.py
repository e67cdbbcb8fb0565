"""Prompts for online RL (task=grpo): rows {"prompt": str | [messages], ...other fields for the rewards}.

    data = PromptData(config, tokenizer, max_prompt_length=256, prompts_per_step=8)
    it = data.train_iterator()                       # batches of row indices, resumable by a counter
    ids = data.prompt_ids[i]; row = data.rows[i]     # the tokens to continue, the row for the reward functions

A standard prompt is tokenized as a document starts (BOS where the tokenizer adds one, no EOS); a
conversational one is rendered with the chat template and its generation prompt (data.chat_template
overrides the tokenizer's). Prompts longer than `max_prompt_length` tokens keep their end (a BOS
stays) and are counted. Every field of the row is kept for the reward functions. Bad rows raise
DataError naming file:line and the field, or with data.on_error="skip" are counted.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Any

import numpy as np

from jaxft.data import errors
from jaxft.data.config import resolve
from jaxft.data.errors import DataError, RowError, log
from jaxft.data.formats import Encoder, TokenizerInfo
from jaxft.data.indexed import IndexedIterator
from jaxft.data.sources import open_source


class PromptData:
    def __init__(self, config: Any, tokenizer: Any, *, max_prompt_length: int, prompts_per_step: int, repeats: int = 1,
                 process_index: int | None = None, process_count: int | None = None):
        self.settings = s = resolve(config, process_index=process_index, process_count=process_count)
        if len(s.stages) != 1 or len(s.stages[0].sources) != 1 or len(s.validation) > 1 or s.validation_fraction:
            raise DataError("task=grpo reads one source each for data.train and data.validation (prompt rows; no "
                            "data.stages, mixtures or data.validation_fraction)")
        self.tokenizer = TokenizerInfo(tokenizer, s.chat_template)
        self.max_prompt_length = max_prompt_length
        self.prompts_per_step, self.repeats = prompts_per_step, repeats
        self.iterator = None  # the last train_iterator(): a rollout reused across repeats rides in its state
        self.prompt_field = dict(s.fields)["prompt_field"]
        template = self.tokenizer.chat_template_or_none()
        self._chat = None if template is None else Encoder(self.tokenizer, fmt="chat", fields=dict(s.fields), roles=s.roles,
                                                           seq_len=1 << 30, add_eos=False, overlong="truncate",
                                                           train_on="all_assistant")
        self.report: dict[str, collections.Counter] = {}
        self.train = self._load(s.stages[0].sources[0], "data.train", "train")
        self.validation = self._load(s.validation[0], "data.validation", "validation") if s.validation else None
        digest = hashlib.sha256(b"".join(np.asarray(p, np.int32).tobytes() for p in self.train["prompt_ids"]))
        self.fingerprint = {"prompts": len(self.train["rows"]), "digest": digest.hexdigest()[:16], "seed": s.seed,
                            "shuffle": bool(s.shuffle)}

    def _load(self, spec, key: str, split: str) -> dict[str, list]:
        s = self.settings
        source = open_source(spec, key=key, default_split=split, tfds_data_dir=s.tfds_data_dir, columns=None)
        counts = self.report.setdefault(split, collections.Counter())
        out: dict[str, list] = {"rows": [], "prompt_ids": [], "origins": []}
        for origin, row in source.read(range(len(source))):
            counts["rows"] += 1
            try:
                if isinstance(row, RowError):
                    raise row
                ids = self._encode(row)
            except RowError as e:
                if s.on_error == "raise":
                    raise DataError(f"{origin}: {e.message}") from None
                counts[f"skipped_{e.reason}"] += 1
                continue
            if len(ids) > self.max_prompt_length:
                head = ids[:1] if self.tokenizer.add_bos and ids[:1] == [self.tokenizer.bos_id] else []
                ids = head + ids[len(ids) - (self.max_prompt_length - len(head)):]
                counts["truncated"] += 1
            out["rows"].append(row)
            out["prompt_ids"].append(ids)
            out["origins"].append(origin)
        counts["prompts"] = len(out["rows"])
        log.info("data %s: %s", split, dict(counts))
        if not out["rows"]:
            raise DataError(f"{key} ({source.name}): no prompts left: {dict(counts)}")
        return out

    def _encode(self, row) -> list[int]:
        if self.prompt_field not in row:
            raise RowError(errors.MISSING_FIELD, f"missing field {self.prompt_field!r} (data.prompt_field); row has "
                                                 f"{sorted(row)[:8]}")
        prompt = row[self.prompt_field]
        if isinstance(prompt, list):
            if self._chat is None:
                raise RowError(errors.TEMPLATE_ERROR, "conversational prompts need a chat template, and the tokenizer "
                                                      "has none (set data.chat_template)")
            messages = self._chat.validate_messages(prompt, self.prompt_field)
            text = self.tokenizer.hf.apply_chat_template(messages, chat_template=self._chat.template, tokenize=False,
                                                         add_generation_prompt=True)
            return list(self.tokenizer.backend.encode(text, add_special_tokens=False).ids)
        if not isinstance(prompt, str) or not prompt.strip():
            raise RowError(errors.BAD_TYPE, f"field {self.prompt_field!r} must be a non-empty string or a list of "
                                            f"messages, got {type(prompt).__name__}: {str(prompt)[:60]!r}")
        ids = list(self.tokenizer.backend.encode(prompt, add_special_tokens=False).ids)
        return ([self.tokenizer.bos_id] if self.tokenizer.add_bos else []) + ids

    def train_iterator(self) -> "RepeatingIterator":
        """Batches of `prompts_per_step` row indices (all hosts' prompts: each host samples for its
        share), each batch handed out `repeats` times in a row (GRPO's num_iterations)."""
        s = self.settings
        inner = IndexedIterator(len(self.train["rows"]), self.prompts_per_step, s.seed, s.shuffle, self.fingerprint,
                                lambda rows: {"rows": rows}, process_index=s.process_index,
                                process_count=s.process_count, stats=lambda _: dict(self.report["train"]))
        self.iterator = RepeatingIterator(inner, self.repeats)
        return self.iterator


class RepeatingIterator:
    """Hands out each batch of `inner` `repeats` times; a rollout made from a batch can ride in its
    state (`attach`), so that a run resumed between the repeats trains on the same rollout."""

    def __init__(self, inner: IndexedIterator, repeats: int):
        self.inner, self.repeats = inner, repeats
        self._current, self._served, self.payload = None, repeats, None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._served == self.repeats:
            self._current, self._served, self.payload = next(self.inner), 0, None
        self._served += 1
        return {**self._current, "repeat": self._served - 1}

    def attach(self, payload: dict) -> None:
        self.payload = payload

    def get_state(self) -> dict:
        state = {"inner": self.inner.get_state(), "served": self._served}
        if self._served < self.repeats and self._current is not None:
            state.update(current=[int(r) for r in self._current["rows"]], payload=self.payload)
        return state

    def set_state(self, state: dict) -> None:
        self.inner.set_state(state["inner"])
        self._served = int(state["served"])
        if "current" in state:
            self._current, self.payload = {"rows": np.asarray(state["current"])}, state.get("payload")
        else:
            self._served, self._current, self.payload = self.repeats, None, None

    def stats(self) -> dict:
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()
