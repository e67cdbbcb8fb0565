"""Formats: rows -> token ids + a per-token loss mask (True where the token is a trained target).

- `text`: every token is trained; EOS appended (`data.add_eos`) so the model learns to stop.
- `prompt_completion`: prompt + completion tokenized as one string; the completion's tokens and
    the appended EOS are trained, the prompt's are not.
- `chat`: rendered with the tokenizer's own chat template. Templates rarely mark assistant text
    (stock Llama-3/Qwen/Gemma templates have no `{% generation %}`), so the trained characters of
    assistant turn i are found by rendering prefixes: from the end of
    render(messages[:i], add_generation_prompt=True) to the end of render(messages[:i+1]). Both
    must be prefixes of the whole rendering, or the row is refused ("not prefix-stable", e.g. a
    template that rewrites earlier turns); `data.train_on="last_assistant"` needs only the last
    one. The span includes the template's end-of-turn token, which is how chat models stop.

Characters become tokens through the fast tokenizer's offsets: a token is trained if it overlaps a
trained character span. The whole string is tokenized once, exactly as at inference. So a token
that spans the boundary (the prompt's last characters merged with the completion's first, e.g.
"A: " + "Paris" -> " Paris") is trained; each such row is counted as a data warning
(`boundary_inside_token`), and so is each row whose trained targets include the tokenizer's
unknown token (`unknown_target_tokens`); see jaxft.data.errors.
Over-long rows (more than seq_len + 1 tokens, since inputs/targets are the shifted sequence):
`truncate` cuts the end (chat first drops whole oldest turns, keeping leading system messages);
`drop` drops the row. Either is counted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxft.data import errors
from jaxft.data.errors import DataError, RowError, log

DROPPED = "dropped_overlong"  # what `encode` returns for a row dropped by data.overlong="drop"


class TokenizerInfo:
    """The HF fast tokenizer plus what the data path needs from it, and a fingerprint for caching."""

    def __init__(self, tokenizer: Any, chat_template: str | None = None):
        if isinstance(tokenizer, (str, os.PathLike)):
            import transformers  # pylint: disable=g-import-not-at-top
            tokenizer = transformers.AutoTokenizer.from_pretrained(os.fspath(tokenizer))
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise DataError(f"the data pipeline needs a fast (Rust) tokenizer; got {type(tokenizer).__name__}")
        import tokenizers  # pylint: disable=g-import-not-at-top
        self.hf = tokenizer
        # A private copy: no truncation/padding the user's tokenizer.json may carry, and no
        # post-processor (it adds special tokens and trims offsets; we add BOS/EOS ourselves).
        self.backend = tokenizers.Tokenizer.from_str(backend.to_str())
        self.backend.no_truncation()
        self.backend.no_padding()
        self.backend.post_processor = None
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        # Prepend BOS where the tokenizer itself would (Llama, Gemma), not where it would not (Qwen).
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.add_bos = self.bos_id is not None and probe[:1] == [self.bos_id]
        self.vocab_size = len(tokenizer)
        self.unk_id = getattr(tokenizer, "unk_token_id", None)
        self.unk_token = getattr(tokenizer, "unk_token", None)
        self._chat_template = chat_template
        h = hashlib.sha256(backend.to_str().encode())
        h.update(repr((self.bos_id, self.eos_id, self.add_bos, self.chat_template_or_none())).encode())
        self.fingerprint = h.hexdigest()

    def chat_template_or_none(self) -> str | None:
        if self._chat_template is not None:
            return self._chat_template
        try:
            return self.hf.get_chat_template()
        except ValueError:  # transformers raises ValueError when the tokenizer has no template
            return None


@dataclasses.dataclass
class Encoded:
    tokens: np.ndarray   # int32 [L]
    mask: np.ndarray     # bool [L]: token t is a trained target (mask[0] is never used)
    truncated: bool = False
    # For the data warnings: ((kind, token positions (sorted, into tokens), text, detail), ...): trained
    # targets that are the unknown token, tokens that span a prompt/completion boundary.
    notes: tuple = ()


def _empty_or_not_str(value: Any, where: str) -> None:
    if not isinstance(value, str):
        raise RowError(errors.BAD_TYPE, f"{where} must be a string, got {type(value).__name__}: "
                                      f"{str(value)[:60]!r}")
    if not value.strip():
        raise RowError(errors.EMPTY_CONTENT, f"{where} is empty")


def _get(row: Mapping, field: str, key: str) -> Any:
    if field not in row:
        raise RowError(errors.MISSING_FIELD, f"missing field {field!r} (data.{key}); row has "
                                      f"{sorted(row)[:8]}")
    return row[field]


class Encoder:
    """Validates and tokenizes rows of one format, in batches."""

    def __init__(self, tok: TokenizerInfo, *, fmt: str, fields: Mapping[str, str], roles: Sequence[str],
                              seq_len: int, add_eos: bool, overlong: str, train_on: str):
        self.tok, self.fmt, self.fields, self.roles = tok, fmt, dict(fields), tuple(roles)
        self.max_tokens = seq_len + 1  # a row of L tokens gives L - 1 (input, target) pairs
        self.add_eos, self.overlong, self.train_on = add_eos, overlong, train_on
        self._warned_eos = False
        if add_eos and fmt != "chat" and tok.eos_id is None:
            raise DataError("data.add_eos is true but the tokenizer has no eos_token; set one or "
                                            "set data.add_eos=false")
        if fmt == "chat":
            self.template = tok.chat_template_or_none()
            if not self.template:
                raise DataError("data.format='chat' needs a chat template, and the tokenizer has none: "
                                                "set data.chat_template (a Jinja string or file)")

    def encode(self, rows: Sequence[Any]) -> list:
        """rows (dicts, or RowErrors passed through) -> Encoded | RowError | DROPPED, in order."""
        out: list = [None] * len(rows)
        valid = []
        for i, row in enumerate(rows):
            if isinstance(row, RowError):
                out[i] = row
                continue
            try:
                valid.append((i, self._validate(row)))
            except RowError as e:
                out[i] = e
        if valid:
            positions, values = zip(*valid)
            encode_batch = {"text": self._encode_text, "prompt_completion": self._encode_prompt_completion,
                                            "chat": self._encode_chat}[self.fmt]
            for i, result in zip(positions, encode_batch(list(values))):
                out[i] = result
        return [self._check_mask(r) if isinstance(r, Encoded) else r for r in out]

    def encode_completions(self, pairs: Sequence[tuple[str, str]]) -> list:
        """(prompt, completion) strings, validated by the caller → Encoded | RowError, as the
        prompt_completion format encodes them (jaxft.data.preference)."""
        return [self._check_mask(r) if isinstance(r, Encoded) else r for r in self._encode_prompt_completion(list(pairs))]

    def encode_conversations(self, conversations: Sequence[list[dict]], starts: Sequence[int]) -> list:
        """Validated message lists → Encoded | RowError, as the chat format encodes them, with the
        assistant turns from message `starts[i]` on trained (a preference pair's completion)."""
        out = self._encode_chat_exact(list(conversations), list(starts))
        return [self._check_mask(r) if isinstance(r, Encoded) else r for r in out]

    # ---- validation: a row -> the values the format needs -------------------------------------

    def _validate(self, row: Mapping) -> Any:
        if self.fmt == "text":
            text = _get(row, self.fields["text_field"], "text_field")
            _empty_or_not_str(text, f"field {self.fields['text_field']!r}")
            return text
        if self.fmt == "prompt_completion":
            prompt = _get(row, self.fields["prompt_field"], "prompt_field")
            completion = _get(row, self.fields["completion_field"], "completion_field")
            if not isinstance(prompt, str):
                raise RowError(errors.BAD_TYPE, f"field {self.fields['prompt_field']!r} must be a string, "
                                              f"got {type(prompt).__name__}")
            _empty_or_not_str(completion, f"field {self.fields['completion_field']!r}")
            return prompt, completion
        return self.validate_messages(_get(row, self.fields["messages_field"], "messages_field"))

    def validate_messages(self, messages: Any, name: str | None = None) -> list[dict]:
        """A message list → normalized {"role", "content", ...} dicts; `name`: the field it came from
        (default data.messages_field), named in errors."""
        name = name or self.fields["messages_field"]
        role_key, content_key = self.fields["role_field"], self.fields["content_field"]
        if isinstance(messages, Mapping):  # TFDS Sequence(dict) gives a dict of equal-length lists
            keys = list(messages)
            messages = [dict(zip(keys, values)) for values in zip(*messages.values())]
        if not isinstance(messages, list):
            raise RowError(errors.BAD_TYPE, f"field {name!r} must be a list of messages, got "
                                          f"{type(messages).__name__}")
        if not messages:
            raise RowError(errors.EMPTY_CONTENT, f"field {name!r} has no messages")
        normalized = []
        for j, message in enumerate(messages):
            where = f"{name}[{j}]"
            if not isinstance(message, Mapping):
                raise RowError(errors.BAD_TYPE, f"{where} must be an object with {role_key!r} and "
                                              f"{content_key!r}, got {type(message).__name__}")
            if role_key not in message:
                raise RowError(errors.MISSING_FIELD, f"{where} has no {role_key!r} (data.role_field)")
            role = message[role_key]
            if role not in self.roles:
                raise RowError(errors.UNKNOWN_ROLE, f"{where}.{role_key} is {role!r}, not one of "
                                              f"{', '.join(self.roles)} (data.roles)")
            if content_key not in message:
                raise RowError(errors.MISSING_FIELD, f"{where} has no {content_key!r} (data.content_field)")
            content = message[content_key]
            # An assistant message that only calls tools may have no text.
            if not (role == "assistant" and message.get("tool_calls") and content in (None, "")):
                _empty_or_not_str(content, f"{where}.{content_key}")
            extra = {k: v for k, v in message.items() if k not in (role_key, content_key)}
            normalized.append({**extra, "role": role, "content": content})
        return normalized

    # ---- text and prompt/completion -------------------------------------------------------------

    def _wrap(self, ids: Sequence[int], mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Adds BOS (untrained) and EOS (trained) around one document's ids."""
        head = [self.tok.bos_id] if self.tok.add_bos else []
        tail = [self.tok.eos_id] if self.add_eos else []
        tokens = np.asarray([*head, *ids, *tail], dtype=np.int32)
        full_mask = np.concatenate([np.zeros(len(head), bool), mask, np.ones(len(tail), bool)])
        return tokens, full_mask

    def _encode_text(self, texts: list[str]) -> list:
        encodings = self.tok.backend.encode_batch(texts, add_special_tokens=False)
        out = []
        for text, encoding in zip(texts, encodings):
            tokens, mask = self._wrap(encoding.ids, np.ones(len(encoding.ids), bool))
            notes = () if self.tok.unk_id is None else \
                self._notes(tokens, mask, _offsets(encoding), text, int(self.tok.add_bos), ())
            out.append(self._fit(Encoded(tokens, mask, notes=notes)))
        return out

    def _encode_prompt_completion(self, pairs: list[tuple[str, str]]) -> list:
        texts = [prompt + completion for prompt, completion in pairs]
        encodings = self.tok.backend.encode_batch(texts, add_special_tokens=False)
        out = []
        for (prompt, _), text, encoding in zip(pairs, texts, encodings):
            offsets = _offsets(encoding)
            mask = _mask_from_spans(offsets, [(len(prompt), len(text))])
            tokens, mask = self._wrap(encoding.ids, mask)
            notes = self._notes(tokens, mask, offsets, text, int(self.tok.add_bos), (len(prompt),))
            out.append(self._fit(Encoded(tokens, mask, notes=notes)))
        return out

    def _notes(self, tokens: np.ndarray, mask: np.ndarray, offsets: np.ndarray, text: str, head: int,
               boundaries: Sequence[int]) -> tuple:
        """The data warnings of one row (see `Encoded.notes`). `offsets[j]` are the characters of
        `tokens[head + j]`; tokens outside them (BOS, the appended EOS) came from no text."""
        notes = []
        if self.tok.unk_id is not None:
            hits = np.flatnonzero((tokens == self.tok.unk_id) & mask)
            hits = hits[(hits >= max(head, 1)) & (hits < head + len(offsets))]  # a target, from the text
            # The unknown token's own text (a tokenizer whose unk is also its EOS, as GPT-2's, finds
            # it literally in the data or the chat template) is not unknown text.
            hits = [int(p) for p in hits if text[offsets[p - head, 0]:offsets[p - head, 1]] != self.tok.unk_token]
            if hits:
                a, b = offsets[hits[0] - head]
                snippet = f"{text[max(0, a - 30):a]}[[{text[a:b]}]]{text[b:b + 30]}"
                notes.append((errors.UNKNOWN_TARGET_TOKENS, np.asarray(hits, np.int64), snippet, None))
        for boundary in boundaries:
            inside = np.flatnonzero((offsets[:, 0] < boundary) & (offsets[:, 1] > boundary))
            if len(inside):
                a, b = offsets[inside[0]]
                notes.append((errors.BOUNDARY_INSIDE_TOKEN, inside[:1] + head, text[a:b], int(boundary - a)))
        return tuple(notes)

    def _fit(self, encoded: Encoded) -> Encoded | str:
        if len(encoded.tokens) <= self.max_tokens:
            return encoded
        if self.overlong == "drop":
            return DROPPED
        return Encoded(encoded.tokens[:self.max_tokens], encoded.mask[:self.max_tokens], truncated=True,
                       notes=shift_notes(encoded.notes, 0, self.max_tokens, 0))

    # ---- chat ------------------------------------------------------------------------------------

    def _encode_chat(self, conversations: list[list[dict]]) -> list:
        out = self._encode_chat_exact(conversations)
        for i, result in enumerate(out):
            if isinstance(result, Encoded) and len(result.tokens) > self.max_tokens:
                out[i] = self._shorten_chat(conversations[i], result)
        return out

    def _shorten_chat(self, messages: list[dict], result: Encoded) -> Encoded | RowError | str:
        """Too long: drop whole oldest turns (keeping leading system messages), else cut the end."""
        if self.overlong == "drop":
            return DROPPED
        while True:
            shorter = _drop_oldest_turn(messages)
            if shorter is None:
                break
            messages = shorter
            result = self._encode_chat_exact([messages])[0]
            if not isinstance(result, Encoded) or len(result.tokens) <= self.max_tokens:
                break
        if isinstance(result, Encoded):
            fitted = self._fit(result)
            result = dataclasses.replace(fitted, truncated=True)
        return result

    def _encode_chat_exact(self, conversations: list[list[dict]], starts: list[int] | None = None) -> list:
        """Renders, finds the assistant spans by prefix rendering, tokenizes once with offsets.
        `starts`: per conversation, the first message whose assistant turns are trained (else
        data.train_on decides)."""
        # One render job per (conversation, prefix): whole conversation, then per trained turn i the
        # prompt before it (with the generation prompt) and the conversation through it.
        jobs: dict[tuple[int, int, bool], list[dict]] = {}
        trained_turns = []
        for c, messages in enumerate(conversations):
            jobs[(c, len(messages), False)] = messages
            turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0]
            if starts is not None:
                turns = [i for i in turns if i >= starts[c]]
            elif self.train_on == "last_assistant":
                turns = turns[-1:]
            trained_turns.append(turns)
            for i in turns:
                jobs[(c, i, True)] = messages[:i]
                jobs[(c, i + 1, False)] = messages[:i + 1]
        rendered = {}
        for add_generation_prompt in (False, True):
            keys = [k for k in jobs if k[2] == add_generation_prompt]
            for key, text in zip(keys, self._render([jobs[k] for k in keys], add_generation_prompt)):
                rendered[key] = text

        out: list = [None] * len(conversations)
        texts, spans_of = [], []
        for c, messages in enumerate(conversations):
            try:
                whole = rendered[(c, len(messages), False)]
                spans = []
                for i in trained_turns[c]:
                    start = _prefix_length(rendered[(c, i, True)], whole, i, True)
                    end = _prefix_length(rendered[(c, i + 1, False)], whole, i + 1, False)
                    spans.append((start, max(start, end)))
            except RowError as e:
                out[c] = e
                continue
            texts.append((c, whole))
            spans_of.append(spans)
        if texts:
            encodings = self.tok.backend.encode_batch([t for _, t in texts], add_special_tokens=False)
            for (c, whole), spans, encoding in zip(texts, spans_of, encodings):
                offsets = _offsets(encoding)
                mask = _mask_from_spans(offsets, spans)
                tokens = np.asarray(encoding.ids, np.int32)
                notes = self._notes(tokens, mask, offsets, whole, 0, [a for a, b in spans if b > a])
                out[c] = Encoded(tokens, mask, notes=notes)
                self._warn_if_turns_do_not_end_with_eos(out[c])
        return out

    def _render(self, conversations: list[list[dict]], add_generation_prompt: bool) -> list:
        if not conversations:
            return []
        try:
            return self.tok.hf.apply_chat_template(
                    conversations, chat_template=self.template, tokenize=False,
                    add_generation_prompt=add_generation_prompt)
        except Exception as e:  # Jinja raise_exception, TypeError, ...: find the row(s) at fault.
            if len(conversations) == 1:
                return [RowError(errors.TEMPLATE_ERROR, f"chat template failed: {type(e).__name__}: {e}")]
            return [self._render([c], add_generation_prompt)[0] for c in conversations]

    def _warn_if_turns_do_not_end_with_eos(self, encoded: Encoded) -> None:
        if self._warned_eos or self.tok.eos_id is None or not encoded.mask.any():
            return
        self._warned_eos = True
        if not np.any(encoded.tokens[encoded.mask] == self.tok.eos_id):
            last = self.tok.hf.decode(encoded.tokens[encoded.mask][-3:])
            log.warning("chat template: trained assistant turns end with %r and never contain the "
                                    "tokenizer's EOS %r; make sure generation stops on the end-of-turn token",
                                    last, self.tok.hf.eos_token)

    # ---- checks every format shares ------------------------------------------------------------

    def _check_mask(self, encoded: Encoded) -> Encoded | RowError:
        if not encoded.mask[1:].any():
            why = "no assistant turn to train on" if self.fmt == "chat" else "nothing to train on"
            if encoded.truncated:
                why += f" after truncating to data.seq_len + 1 = {self.max_tokens} tokens"
            return RowError(errors.EMPTY_LOSS_MASK, f"loss mask is empty: {why}")
        return encoded


def _prefix_length(part: Any, whole: Any, count: int, generation_prompt: bool) -> int:
    for text in (part, whole):
        if isinstance(text, RowError):
            raise text
    if not whole.startswith(part):
        k = next((j for j, (a, b) in enumerate(zip(part, whole)) if a != b), min(len(part), len(whole)))
        what = f"messages[:{count}]" + (" + generation prompt" if generation_prompt else "")
        raise RowError(errors.TEMPLATE_NOT_PREFIX_STABLE,
                                      f"chat template is not prefix-stable: rendering {what} is not a prefix of the "
                                      f"whole conversation (char {k}: {part[k:k + 40]!r} vs {whole[k:k + 40]!r}); "
                                      f"set data.train_on='last_assistant' or give data.chat_template")
    return len(part)


def _offsets(encoding) -> np.ndarray:
    return np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)


def shift_notes(notes: tuple, start: int, stop: int, delta: int) -> tuple:
    """The notes of tokens[start:stop] moved by `delta` (what a cut keeps of them)."""
    out = []
    for kind, positions, text, detail in notes:
        kept = positions[(positions >= start) & (positions < stop)] + delta
        if len(kept):
            out.append((kind, kept, text, detail))
    return tuple(out)


def _mask_from_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Tokens whose characters overlap a trained span [a, b) (zero-width tokens: start in it)."""
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = offsets[:, 0], offsets[:, 1]
    mask = np.zeros(len(offsets), bool)
    for a, b in spans:
        overlaps = (starts < b) & (ends > a)
        zero_width = (starts == ends) & (starts >= a) & (starts < b)
        mask |= overlaps | zero_width
    return mask


def _drop_oldest_turn(messages: list[dict]) -> list[dict] | None:
    """Removes the first user..assistant turn after the leading system messages, if another turn
    with an assistant message would remain."""
    first = 0
    while first < len(messages) and messages[first]["role"] == "system":
        first += 1
    next_user = next((i for i in range(first + 1, len(messages)) if messages[i]["role"] == "user"), None)
    if next_user is None:
        return None
    rest = messages[next_user:]
    if not any(m["role"] == "assistant" for m in rest):
        return None
    return messages[:first] + rest
