"""Batches of examples held whole in host memory (labelled rows, preference pairs), by row index.

    order = index_batches(count, batch_size=32, seed=0)        # endless: each epoch a new permutation
    it = IndexedIterator(count, batch_size, seed, shuffle, fingerprint, take=lambda rows: {...})
    batch = next(it); state = it.get_state(); it2.set_state(state)   # exact resume from a counter

Small datasets (thousands to ~100k examples) are read and encoded once on every host; each host
takes its share of every global batch. The order is a pure function of the seed and the batch
count, so a resumed iterator replays its position from the counter alone, and the fingerprint (the
rows and the settings that order them) refuses a position saved for other data.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator

import numpy as np

from jaxft.data.errors import DataError


def index_batches(count: int, batch_size: int, seed: int, shuffle: bool = True) -> Iterator[np.ndarray]:
    """Endless batches of row indices; the remainder that does not fill a batch waits for the next epoch."""
    rng = np.random.RandomState(seed)
    if count < batch_size:
        raise DataError(f"{count} examples cannot fill one batch of {batch_size}")
    order = np.zeros(0, np.int64)
    while True:
        while len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(count) if shuffle else np.arange(count)])
        take, order = order[:batch_size], order[batch_size:]
        yield take


def host_share(take: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """This host's rows of a global batch's row indices."""
    per_host = len(take) // process_count
    return take[process_index * per_host:(process_index + 1) * per_host]


class IndexedIterator:
    """Endless shuffled batches (this host's rows of each global batch); `take(rows)` makes a batch
    from row indices. The state is a batch counter plus the data's fingerprint."""

    STATE_VERSION = 1

    def __init__(self, count: int, batch_size: int, seed: int, shuffle: bool, fingerprint: dict,
                 take: Callable[[np.ndarray], dict], *, process_index: int = 0, process_count: int = 1,
                 stats: Callable[[int], dict] | None = None):
        self._count, self._batch_size, self._seed, self._shuffle = count, batch_size, seed, shuffle
        self._fingerprint, self._take, self._stats = fingerprint, take, stats
        self._process = (process_index, process_count)
        self._restart(0)

    def _restart(self, position: int) -> None:
        self._indices = index_batches(self._count, self._batch_size, self._seed, self._shuffle)
        for _ in range(position):
            next(self._indices)
        self._position = position

    def __iter__(self) -> "IndexedIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = host_share(next(self._indices), *self._process)
        self._position += 1
        return self._take(rows)

    def get_state(self) -> dict:
        return {"version": self.STATE_VERSION, "fingerprint": self._fingerprint, "batches": self._position}

    def set_state(self, state: dict | str | bytes) -> None:
        if isinstance(state, (str, bytes)):
            state = json.loads(state)
        if state.get("version") != self.STATE_VERSION or "batches" not in state:
            raise DataError(f"data state {state!r} is not one this jaxft reads "
                            f"(version {self.STATE_VERSION} with a batch count)")
        saved, current = json.loads(json.dumps(state["fingerprint"])), json.loads(json.dumps(self._fingerprint))
        if saved != current:
            changed = {k: (saved.get(k), current.get(k)) for k in set(saved) | set(current) if saved.get(k) != current.get(k)}
            raise DataError(f"cannot restore the data iterator: the data or config changed since it was saved "
                            f"(key: (saved, now)): {changed}")
        self._restart(int(state["batches"]))

    def stats(self) -> dict:
        seen = self._position * self._batch_size
        out: dict[str, Any] = {"batches": self._position, "examples": seen, "epochs": seen / self._count}
        return {**out, **(self._stats(self._position) if self._stats else {})}

    def close(self) -> None:
        pass  # nothing runs in the background
