"""Row sources: JSONL, Parquet, HF `datasets`, TFDS. Random access by row index, with origins.

A source is opened once per split; `read(indices)` returns `(origin, row)` pairs where `row` is a
dict, or a `RowError` for a row that cannot even be parsed (malformed JSON). Random access lets
each host parse and tokenize only the rows of its own shard (a JSONL file is still read whole to
find its lines, which is cheap next to parsing and tokenizing; Parquet reads only the needed
columns; TFDS and HF datasets read just the requested records).
"""

from __future__ import annotations

import bisect
import glob
import gzip
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxft.data import errors
from jaxft.data.config import SourceSpec
from jaxft.data.errors import DataError, RowError

Origin = str


class RowSource:
    """`len(source)` rows; `read(indices)` -> [(origin, dict | RowError)]."""

    name: str

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, indices: Sequence[int]) -> list[tuple[Origin, Any]]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Changes when the underlying data changes; keys the tokenized-data cache."""
        raise NotImplementedError


def open_source(spec: SourceSpec, *, key: str, default_split: str,
                                tfds_data_dir: str | None, columns: Sequence[str]) -> RowSource:
    if spec.kind == "jsonl":
        return JsonlSource(_expand(spec.path, key))
    if spec.kind == "parquet":
        return ParquetSource(_expand(spec.path, key), columns)
    options = dict(spec.options)
    split = spec.split or default_split
    if spec.kind == "hf":
        return HFSource(spec.path, split, name=options.get("name"), data_files=options.get("data_files"))
    if spec.kind == "tfds":
        return TfdsSource(spec.path, split, data_dir=options.get("data_dir", tfds_data_dir))
    raise DataError(f"{key}: unknown source kind {spec.kind!r}")


def _expand(patterns: Sequence[str], key: str) -> list[str]:
    files = []
    for pattern in patterns:
        if pattern.startswith("gs://"):
            from etils import epath  # pylint: disable=g-import-not-at-top
            root, _, rest = pattern[len("gs://"):].partition("/")
            matched = sorted(str(p) for p in epath.Path(f"gs://{root}").glob(rest)) if any(
                    c in rest for c in "*?[") else [pattern]
        else:
            matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matched:
            raise DataError(f"{key}: no files match {pattern!r}")
        files.extend(matched)
    return files


def _read_bytes(path: str) -> bytes:
    if path.startswith("gs://"):
        from etils import epath  # pylint: disable=g-import-not-at-top
        data = epath.Path(path).read_bytes()
    else:
        with open(path, "rb") as f:
            data = f.read()
    return gzip.decompress(data) if path.endswith(".gz") else data


def _file_fingerprint(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for path in paths:
        if path.startswith("gs://"):
            from etils import epath  # pylint: disable=g-import-not-at-top
            stat = epath.Path(path).stat()
            h.update(f"{path}|{stat.length}|{stat.mtime}".encode())
        else:
            stat = os.stat(path)
            h.update(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return h.hexdigest()


class _MultiFile:
    """Global row index <-> (file, row within file) over several files."""

    def __init__(self, paths: list[str], counts: list[int]):
        self.paths = paths
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range [0, {len(self)})")
        file = bisect.bisect_right(self.starts, index) - 1
        return file, index - int(self.starts[file])


class JsonlSource(RowSource):
    """JSON Lines files; lines holding only whitespace are not rows; origins are `path:line` (1-based).

    A `.json` file (or `.json.gz`) whose first non-whitespace character is `[` holds one JSON array
    of rows instead; an element's origin is `path:line [index]`, the line where the element starts.
    """

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.name = paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} files)"
        self._data, self._spans, self._arrays = [], [], []
        for path in paths:
            data = _read_bytes(path)
            if _is_json_array(path, data):
                text, spans = _array_spans(path, data)
                self._data.append(text)
                self._spans.append(spans)
                self._arrays.append(True)
                continue
            bytes_ = np.frombuffer(data, np.uint8)
            newlines = np.flatnonzero(bytes_ == ord("\n"))
            starts = np.concatenate([[0], newlines + 1])
            ends = np.concatenate([newlines, [len(data)]])
            line_numbers = np.arange(1, len(starts) + 1)
            self._data.append(data)
            self._spans.append(_nonblank_lines(bytes_, starts, ends, line_numbers))
            self._arrays.append(False)
        self._files = _MultiFile(paths, [len(s[0]) for s in self._spans])

    def __len__(self) -> int:
        return len(self._files)

    def read(self, indices):
        out = []
        for index in indices:
            file, row = self._files.locate(int(index))
            starts, ends, lines = self._spans[file]
            origin = f"{self.paths[file]}:{lines[row]}" + (f" [{row}]" if self._arrays[file] else "")
            line = self._data[file][starts[row]:ends[row]]
            try:
                value = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                detail = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
                out.append((origin, RowError(errors.MALFORMED_JSON, f"malformed JSON: {detail}")))
                continue
            if not isinstance(value, dict):
                what = "array element" if self._arrays[file] else "line"
                out.append((origin, RowError(errors.MALFORMED_JSON,
                                             f"expected a JSON object per {what}, got {type(value).__name__}")))
                continue
            out.append((origin, value))
        return out

    def fingerprint(self) -> str:
        return _file_fingerprint(self.paths)


_JSON_WHITESPACE = np.zeros(256, bool)
_JSON_WHITESPACE[list(b" \t\r\n")] = True


def _nonblank_lines(bytes_: np.ndarray, starts: np.ndarray, ends: np.ndarray, line_numbers: np.ndarray):
    """(starts, ends, line numbers) of the lines holding more than JSON whitespace (' ', \\t, \\r)."""
    nonempty = np.flatnonzero(ends > starts)
    keep = np.zeros(len(starts), bool)
    if len(nonempty):
        # Each segment runs from a non-empty line's start to the next one's: the line itself, then only
        # newlines and empty lines, which are whitespace; so "any non-whitespace byte" is the line's.
        keep[nonempty] = np.logical_or.reduceat(~_JSON_WHITESPACE[bytes_], starts[nonempty])
    return starts[keep], ends[keep], line_numbers[keep]


def _is_json_array(path: str, data: bytes) -> bool:
    name = path[:-3] if path.endswith(".gz") else path
    return name.endswith(".json") and data.removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")[:1] == b"["


_WHITESPACE = re.compile(r"[ \t\r\n]*")


def _array_spans(path: str, data: bytes) -> tuple[str, tuple]:
    """A JSON array's text and (starts, ends, line numbers) of its elements, found by parsing it once.
    A malformed array is an error naming the line: after it, elements cannot be told apart."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e
    decoder = json.JSONDecoder()
    starts, ends, lines = [], [], []
    line, counted = 1, 0

    def fail(message: str, position: int):
        raise DataError(f"{path}:{text.count(chr(10), 0, position) + 1}: malformed JSON array: {message}")

    pos = _WHITESPACE.match(text, _WHITESPACE.match(text).end() + 1).end()  # past the '['
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            try:
                _, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                fail(f"{e.msg} at column {e.colno}", e.pos)
            line += text.count("\n", counted, pos)
            counted = pos
            starts.append(pos)
            ends.append(end)
            lines.append(line)
            pos = _WHITESPACE.match(text, end).end()
            if text.startswith(",", pos):
                pos = _WHITESPACE.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                fail(f"expected ',' or ']' after element {len(starts) - 1}", pos)
    if _WHITESPACE.match(text, pos).end() != len(text):
        fail("extra data after the array's closing ']'", pos)
    return text, (np.asarray(starts, np.int64), np.asarray(ends, np.int64), np.asarray(lines, np.int64))


class ParquetSource(RowSource):
    """Parquet files read with pyarrow (only the columns the format needs); origins `path row i`."""

    def __init__(self, paths: list[str], columns: Sequence[str] | None):
        import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
        self.paths = paths
        self.name = paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} files)"
        self._tables = []
        for path in paths:
            handle = path
            if path.startswith("gs://"):
                import io  # pylint: disable=g-import-not-at-top
                handle = io.BytesIO(_read_bytes(path))
            present = pq.ParquetFile(handle).schema_arrow.names
            if hasattr(handle, "seek"):
                handle.seek(0)
            wanted = present if columns is None else [c for c in columns if c in present]  # None: every column
            # Reading no columns still gives the row count, so every row can report the missing field.
            self._tables.append(pq.read_table(handle, columns=wanted))
        self._files = _MultiFile(paths, [t.num_rows for t in self._tables])

    def __len__(self) -> int:
        return len(self._files)

    def read(self, indices):
        located = [self._files.locate(int(i)) for i in indices]
        out = [None] * len(located)
        by_file: dict[int, list[int]] = {}
        for position, (file, _) in enumerate(located):
            by_file.setdefault(file, []).append(position)
        for file, positions in by_file.items():
            rows = self._tables[file].take([located[p][1] for p in positions]).to_pylist()
            for position, row in zip(positions, rows):
                # Parquet nulls mean "absent": let the format report the missing field.
                row = {k: v for k, v in row.items() if v is not None}
                out[position] = (f"{self.paths[file]} row {located[position][1]}", row)
        return out

    def fingerprint(self) -> str:
        return _file_fingerprint(self.paths)


class HFSource(RowSource):
    """An HF `datasets` split: a `save_to_disk` folder, a local data folder, or a hub id."""

    def __init__(self, path: str, split: str, *, name: str | None = None, data_files: Any = None):
        try:
            import datasets  # pylint: disable=g-import-not-at-top
        except ImportError as e:
            raise DataError(f"hf:{path} needs the `datasets` package (pip install datasets)") from e
        self.name = f"hf:{path}[{split}]"
        saved = os.path.isdir(path) and any(
                os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))
        try:
            if saved:
                loaded = datasets.load_from_disk(path)
                if isinstance(loaded, datasets.DatasetDict):
                    if split not in loaded:
                        raise DataError(f"{self.name}: no split {split!r}; splits: {sorted(loaded)}")
                    loaded = loaded[split]
            else:
                loaded = datasets.load_dataset(path, name=name, data_files=data_files, split=split)
        except DataError:
            raise
        except Exception as e:  # datasets raises many types; say which source failed and why.
            raise DataError(f"{self.name}: could not load: {type(e).__name__}: {e}") from e
        self._dataset = loaded

    def __len__(self) -> int:
        return len(self._dataset)

    def read(self, indices):
        indices = [int(i) for i in indices]
        if not indices:
            return []
        columns = self._dataset[indices]
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        return [(f"{self.name} row {i}", {k: v for k, v in row.items() if v is not None})
                        for i, row in zip(indices, rows)]

    def fingerprint(self) -> str:
        return f"{self.name}|{getattr(self._dataset, '_fingerprint', '')}"


class TfdsSource(RowSource):
    """A TFDS split via `tfds.data_source` (array_record; no TensorFlow needed)."""

    def __init__(self, name: str, split: str, *, data_dir: str | None):
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
        self.name = f"tfds:{name}[{split}]"
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir)
        except Exception as e:  # tfds raises many types; say which source failed and why.
            raise DataError(f"{self.name}: could not open (data_dir={data_dir!r}): "
                                            f"{type(e).__name__}: {e}") from e
        self._data_dir = data_dir

    def __len__(self) -> int:
        return len(self._source)

    def read(self, indices):
        indices = [int(i) for i in indices]
        if hasattr(self._source, "__getitems__"):
            records = self._source.__getitems__(indices)
        else:
            records = [self._source[i] for i in indices]
        return [(f"{self.name} row {i}", _to_python(r)) for i, r in zip(indices, records)]

    def fingerprint(self) -> str:
        info = getattr(self._source, "dataset_info", None)
        version = getattr(info, "version", "") if info is not None else ""
        return f"{self.name}|{self._data_dir}|{version}"


def _to_python(value: Any) -> Any:
    """TFDS gives bytes and numpy arrays; rows should hold str, lists and dicts."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_to_python(v) for v in value.tolist()] if value.ndim else _to_python(value.item())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {k: _to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_python(v) for v in value]
    return value
