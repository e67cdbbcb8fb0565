"""The data pipeline: config -> tokenized documents -> shuffled, mixed, staged, packed batches.

        pipeline = DataPipeline(config, tokenizer)      # reads, validates, tokenizes (once)
        batches = pipeline.train_iterator()             # infinite unless data.epochs / stages end
        batch = next(batches)                           # dict of numpy [host_batch, seq_len]
        state = batches.get_state()                     # JSON-able; store it with the checkpoint
        batches = pipeline.train_iterator(); batches.set_state(state)   # resume exactly there
        for batch in pipeline.validation_batches(): ... # same count on every host

Order of operations per host: each training source's rows are split into train / held-out
validation (`data.validation_fraction`, by a seeded permutation), the train rows are sharded
across hosts (row i -> host i % hosts) and only this host's rows are read and tokenized. Each
source is shuffled (reseeded every epoch from `train.seed`), sources are concatenated or mixed by
weight, stages follow each other, then documents are packed and batched by grain, whose iterator
state makes resumption exact.

With `data.epochs` (or stages that all end) the iterator stops; since packing gives each host its
own batch count, multi-host runs should stop at `train.steps` (the default, epochs=None, never
stops). Validation batches are built on every host from all validation rows, so counts agree.
"""

from __future__ import annotations

import bisect
import json
import math
import sys
import threading
from typing import Any

import grain
import numpy as np

from jaxft.data import packing
from jaxft.data.config import SourceSpec, resolve
from jaxft.data.errors import DataError, LoadReport, log, warnings_summary
from jaxft.data.examples import TokenizedDocs, tokenize_source
from jaxft.data.formats import Encoder, TokenizerInfo
from jaxft.data.sources import open_source


class DataPipeline:
    """Loads and tokenizes the data of a run once; hands out batch iterators."""

    def __init__(self, config: Any, tokenizer: Any, *, process_index: int | None = None,
                              process_count: int | None = None):
        self.settings = s = resolve(config, process_index=process_index, process_count=process_count)
        if s.format == "preference":
            raise DataError("data.format='preference' holds pairs for task=dpo or task=reward "
                            "(jaxft.data.preference), not documents for next-token training")
        self.tokenizer = TokenizerInfo(tokenizer, s.chat_template)
        self._encoders: dict = {}
        self.train_report = LoadReport(split="train")
        self.validation_report = LoadReport(split="validation")
        self._stages: list[list[TokenizedDocs]] = []
        validation_docs: list[TokenizedDocs] = []

        for stage_index, stage in enumerate(s.stages):
            stage_docs = []
            for source_index, spec in enumerate(stage.sources):
                key = f"data.stages[{stage_index}].train" if len(s.stages) > 1 else "data.train"
                key += f"[{source_index}]" if len(stage.sources) > 1 else ""
                source = open_source(spec, key=key, default_split="train",
                                                          tfds_data_dir=s.tfds_data_dir, columns=self._columns(spec))
                train_rows, held_out = _hold_out(len(source), s.validation_fraction,
                                                                                  (s.seed, stage_index, source_index), key)
                host_rows = train_rows[s.process_index::s.process_count]
                docs, report = self._tokenize(source, host_rows, spec, "train")
                self.train_report.merge(report)
                if len(docs) == 0:
                    raise DataError(
                            f"{key} ({source.name}): no training examples left on host {s.process_index} of "
                            f"{s.process_count} ({len(train_rows)} rows in all): {report.summary()}")
                stage_docs.append(docs)
                if len(held_out):
                    docs, report = self._tokenize(source, held_out, spec, "validation")
                    self.validation_report.merge(report)
                    validation_docs.append(docs)
            self._stages.append(stage_docs)

        for source_index, spec in enumerate(s.validation):
            key = "data.validation" + (f"[{source_index}]" if len(s.validation) > 1 else "")
            source = open_source(spec, key=key, default_split="validation",
                                                      tfds_data_dir=s.tfds_data_dir, columns=self._columns(spec))
            # Every host reads all validation rows, so every host can build the same batch count.
            docs, report = self._tokenize(source, np.arange(len(source)), spec, "validation")
            self.validation_report.merge(report)
            validation_docs.append(docs)
        if (s.validation or s.validation_fraction) and not sum(len(d) for d in validation_docs):
            raise DataError(f"validation: no examples left after filtering: "
                                            f"{self.validation_report.summary()}")
        self._validation = [d for d in validation_docs if len(d)]
        # {name: its docs} when data.validation names its sources (eval_loss/<name> each).
        self._named_validation = {name: docs for name, docs in zip(s.validation_names, validation_docs[-len(s.validation):])
                                  if len(docs)} if s.validation_names else {}
        self._named_batches: dict[str, list] = {}
        self._validation_batches = None
        # What the training rows trained but probably should not (report.json's data_warnings).
        self.warnings = warnings_summary(self.train_report.warnings)

        log.info("data %s", self.train_report.summary())
        if self._validation:
            log.info("data %s", self.validation_report.summary())
        for report in (self.train_report, self.validation_report):
            if report.skipped:
                log.warning("data: skipped bad rows in %s: %s", report.split, dict(report.skipped))

    # ---- loading ---------------------------------------------------------------------------------

    def _encoder(self, spec: SourceSpec) -> Encoder:
        s = self.settings
        fmt = spec.format or s.format
        fields = tuple((k, s.field(k, spec)) for k, _ in s.fields)
        if (fmt, fields) not in self._encoders:
            self._encoders[(fmt, fields)] = Encoder(
                    self.tokenizer, fmt=fmt, fields=dict(fields), roles=s.roles, seq_len=s.seq_len,
                    add_eos=s.add_eos, overlong=s.overlong, train_on=s.train_on)
        return self._encoders[(fmt, fields)]

    def _columns(self, spec: SourceSpec) -> list[str]:
        s = self.settings
        keys = {"text": ["text_field"], "prompt_completion": ["prompt_field", "completion_field"],
                        "chat": ["messages_field"]}[spec.format or s.format]
        return [s.field(k, spec) for k in keys]

    def _tokenize(self, source, rows: np.ndarray, spec: SourceSpec, split: str):
        s, encoder = self.settings, self._encoder(spec)
        return tokenize_source(
                source, rows, encoder, on_error=s.on_error, split=split, cache_dir=s.cache_dir,
                cache_key_parts=(self.tokenizer.fingerprint, encoder.fmt, sorted(encoder.fields.items()),
                                                  s.roles, s.seq_len, s.add_eos, s.overlong, s.train_on, encoder.template
                                                  if encoder.fmt == "chat" else None))

    # ---- training batches ------------------------------------------------------------------------

    def train_iterator(self) -> "BatchIterator":
        """A fresh iterator from the first batch; `set_state` moves it to a saved position."""
        s = self.settings
        examples = self._train_examples().to_iter_dataset(
                grain.ReadOptions(num_threads=1, prefetch_buffer_size=64))
        if s.packing:
            bins = s.packing_bins or max(16, 2 * s.host_batch_size)
            rows = packing.pack(examples, s.seq_len, bins)
        else:
            rows = examples.map(lambda example: packing.pad(example, s.seq_len))
        batches = rows.batch(s.host_batch_size, drop_remainder=True)
        if s.prefetch:
            batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=s.prefetch)
        return BatchIterator(batches, self._fingerprint())

    def _train_examples(self) -> grain.MapDataset:
        stages = [self._stage_dataset(i) for i in range(len(self._stages))]
        if len(stages) == 1:
            return stages[0]
        return grain.MapDataset.select_from_datasets(stages, _StageSelection([len(d) for d in stages]))

    def _stage_dataset(self, stage_index: int) -> grain.MapDataset:
        s, stage, docs = self.settings, self.settings.stages[stage_index], self._stages[stage_index]
        total = sum(len(d) for d in docs)
        length = stage.examples or (stage.epochs * total if stage.epochs else None)
        if stage.sources[0].weight is None:  # one dataset: concatenated sources, shuffled jointly
            ds = grain.MapDataset.concatenate([grain.MapDataset.source(d) for d in docs]) \
                    if len(docs) > 1 else grain.MapDataset.source(docs[0])
            if s.shuffle:
                ds = EpochShuffle(ds, seed=_seed(s.seed, stage_index))
            ds = ds.repeat(None)
        else:  # weighted mixture: each source shuffled and repeated on its own
            parts = []
            for source_index, d in enumerate(docs):
                part = grain.MapDataset.source(d)
                if s.shuffle:
                    part = EpochShuffle(part, seed=_seed(s.seed, stage_index, source_index))
                parts.append(part.repeat(None))
            ds = grain.MapDataset.mix(parts, weights=[spec.weight for spec in stage.sources])
        return ds if length is None else ds[:length]

    def _fingerprint(self) -> dict:
        """What must not change between saving an iterator state and restoring it."""
        s = self.settings
        return {
                "seq_len": s.seq_len, "packing": s.packing, "shuffle": s.shuffle, "seed": s.seed,
                "host_batch_size": s.host_batch_size, "process_index": s.process_index,
                "process_count": s.process_count, "packing_bins": s.packing_bins,
                "documents": [[len(d) for d in stage] for stage in self._stages],
                "tokens": [[int(len(d.tokens)) for d in stage] for stage in self._stages],
                "stages": [[st.epochs, st.examples, [spec.weight for spec in st.sources]]
                                      for st in s.stages],
        }

    # ---- validation batches ----------------------------------------------------------------------

    def validation_batches(self, name: str | None = None) -> list[dict] | None:
        """All validation data (or the source called `name`), packed in order; every host gets the
        same number of batches (padded with empty rows, loss_mask 0). None without validation data."""
        if not self._validation:
            return None
        if name is not None:
            if name not in self._named_batches:
                self._named_batches[name] = self._batches([self._named_validation[name]])
            return self._named_batches[name]
        if self._validation_batches is None:
            self._validation_batches = self._batches(self._validation)
        return self._validation_batches

    def validation_names(self) -> list[str]:
        """The names of data.validation's sources when it names them ({name: spec}), else []."""
        return list(self._named_validation)

    def _batches(self, docs: list) -> list[dict]:
        s = self.settings
        examples = grain.MapDataset.concatenate([grain.MapDataset.source(d) for d in docs])
        examples = examples.to_iter_dataset(grain.ReadOptions(num_threads=1))
        if s.packing:
            rows = list(packing.pack(examples, s.seq_len, s.packing_bins or 16))
        else:
            rows = [packing.pad(example, s.seq_len) for example in examples]
        per_host = math.ceil(len(rows) / s.process_count)
        mine = rows[s.process_index::s.process_count]
        batch = s.host_batch_size
        num_batches = math.ceil(per_host / batch)
        mine += [packing.empty_row(s.seq_len)] * (num_batches * batch - len(mine))
        return [packing.stack(mine[i:i + batch]) for i in range(0, len(mine), batch)]


class BatchIterator:
    """Batches of the contract (see jaxft.data); `get_state`/`set_state` resume exactly."""

    STATE_VERSION = 1

    def __init__(self, dataset: grain.IterDataset, fingerprint: dict):
        self._iterator = iter(dataset)
        self._fingerprint = fingerprint
        self._stats = packing.PackingStats()

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict:
        batch = next(self._iterator)
        self._stats.add(batch)
        return batch

    def get_state(self) -> dict:
        """JSON-serializable position: the grain iterator's state plus what it is valid for."""
        return {"version": self.STATE_VERSION, "fingerprint": self._fingerprint,
                        "grain": self._iterator.get_state(), "stats": dict(self._stats.counts)}

    def set_state(self, state: dict) -> None:
        if isinstance(state, (str, bytes)):
            state = json.loads(state)
        if state.get("version") != self.STATE_VERSION:
            raise DataError(f"data iterator state has version {state.get('version')!r}; "
                                            f"this jaxft reads version {self.STATE_VERSION}")
        saved = json.loads(json.dumps(state["fingerprint"]))  # tuples vs lists: compare as JSON
        current = json.loads(json.dumps(self._fingerprint))
        if saved != current:
            changed = {k: (saved.get(k), current.get(k)) for k in set(saved) | set(current)
                                  if saved.get(k) != current.get(k)}
            raise DataError("cannot restore the data iterator: the data or config changed since it "
                                            f"was saved (key: (saved, now)): {changed}")
        self._iterator.set_state(state["grain"])
        self._stats = packing.PackingStats(state.get("stats"))

    def stats(self) -> dict:
        """Batches so far, packing_efficiency (real tokens / slots), trained_fraction."""
        return self._stats.summary()

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close:
            close()


class EpochShuffle(grain.MapDataset):
    """Shuffles with a fresh seeded permutation per epoch (index // len), like grain's `shuffle`.

    grain's `shuffle` computes each index with a cycle-walking cipher whose cost explodes on small
    datasets (~3 ms per element at 10 rows, ~0.3 ms at 100); fine-tuning sets are often that small.
    A cached permutation costs 4 bytes per row and O(1) per element at any size.
    """

    def __init__(self, parent: grain.MapDataset, *, seed: int):
        super().__init__(parent)
        self._seed = seed
        self._permutations: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._parent)

    def _permutation(self, epoch: int) -> np.ndarray:
        with self._lock:  # grain may read elements from several threads
            if epoch not in self._permutations:
                if len(self._permutations) >= 2:  # readers are at most one epoch boundary apart
                    del self._permutations[min(self._permutations)]
                rng = np.random.default_rng([self._seed, epoch])
                self._permutations[epoch] = rng.permutation(len(self._parent)).astype(np.int32)
            return self._permutations[epoch]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, within = divmod(index, len(self._parent))
        # The parent sees the epoch too (index past its length), as with grain's own shuffle.
        return self._parent[int(self._permutation(epoch)[within]) + epoch * len(self._parent)]

    def __str__(self) -> str:
        return f"EpochShuffle(seed={self._seed})"


class _StageSelection(grain.transforms.DatasetSelectionMap):
    """Global example index -> (stage, index within stage); only the last stage may be endless."""

    def __init__(self, lengths: list[int]):
        self._starts = [0]
        for n in lengths[:-1]:
            self._starts.append(self._starts[-1] + n)
        self._length = min(sys.maxsize, self._starts[-1] + lengths[-1])

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> tuple[int, int]:
        stage = bisect.bisect_right(self._starts, index) - 1
        return stage, index - self._starts[stage]


def _seed(*parts: int) -> int:
    """A 32-bit seed derived from train.seed and stage/source ids (grain wants < 2**32)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _hold_out(n: int, fraction: float, seed: tuple, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows), both sorted; the split is the same on every host."""
    rows = np.arange(n)
    if fraction <= 0:
        return rows, rows[:0]
    n_held = max(1, round(fraction * n))
    if n_held >= n:
        raise DataError(f"{key}: data.validation_fraction={fraction} of {n} rows leaves no training rows")
    order = np.random.default_rng(list(seed)).permutation(n)
    return np.sort(order[n_held:]), np.sort(order[:n_held])

