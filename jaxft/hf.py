"""Hugging Face folders: finding them, reading config.json and weights, writing them back.

Weights are read lazily from safetensors files: a tensor, or the rows of it that one device needs,
is read with `pread` straight into the buffer that will hold it, never the whole file. (The
safetensors package writes our files; for reading we parse its 8-byte-length + JSON header ourselves,
because its numpy reader always returns a fresh copy, which would double the bytes touched.) PyTorch pickles (`*.bin`, `*.pt`) can run
code when loaded, so they are refused unless the caller opts in, and then read with
`torch.load(weights_only=True)`. `trust_remote_code` does not exist here: every family is ours.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import mmap
import os
import re
import shutil
import struct
from typing import Any, Iterable

import ml_dtypes
import numpy as np

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class _TensorEntry:
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file


def _read_safetensors_header(path: str) -> dict[str, _TensorEntry]:
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", prefix)
        if length > 100 * 2**20:
            raise ValueError(f"{path}: safetensors header claims {length} bytes; the file is corrupt")
        try:
            header = json.loads(f.read(length))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: corrupt safetensors header: {e.msg}") from None
    header.pop("__metadata__", None)
    entries = {}
    for key, info in header.items():
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - start != int(np.prod(shape)) * dtype.itemsize:
            raise ValueError(f"{path}: tensor {key!r} {list(shape)} {info['dtype']} has {end - start} bytes")
        entries[key] = _TensorEntry(os.path.basename(path), dtype, shape, 8 + length + start)
    return entries


class PickleCheckpointError(RuntimeError):
    """Only pickle weights were found and the caller did not allow reading them."""


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model came from: a local folder, and for hub models the repo and exact commit."""

    path: str
    repo_id: str | None = None
    revision: str | None = None  # the resolved commit hash for hub downloads


def resolve(path_or_id: str | os.PathLike, revision: str | None = None) -> ModelSource:
    """A local folder as is; otherwise a hub repo id, downloaded (config, safetensors, tokenizer)
    into the HF cache, or found there when offline (HF_HUB_OFFLINE=1)."""
    path = os.fspath(path_or_id)
    if os.path.isdir(path):
        return ModelSource(path=os.path.abspath(path))
    if path.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"model folder {path!r} does not exist")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path):
        raise FileNotFoundError(f"{path!r} is neither a local folder nor a hub repo id like 'org/name'")
    from huggingface_hub import snapshot_download

    local = snapshot_download(repo_id=path, revision=revision, allow_patterns=_HUB_PATTERNS)
    # Snapshots live in .../snapshots/<commit>: recording it pins exactly what was loaded.
    return ModelSource(path=local, repo_id=path, revision=os.path.basename(os.path.normpath(local)))


def read_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None


class Checkpoint(contextlib.AbstractContextManager):
    """Tensors of an HF folder by key: shapes from headers up front, data read lazily by rows."""

    def __init__(self, folder: str, allow_pickle: bool = False):
        self.folder = folder
        self.files: dict[str, str] = {}  # key → file name
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._entries: dict[str, _TensorEntry] = {}
        self._fds: dict[str, int] = {}
        self._pickled: dict[str, np.ndarray] | None = None
        safetensors_files = self._safetensors_files()
        if safetensors_files:
            for name in safetensors_files:
                for key, entry in _read_safetensors_header(os.path.join(folder, name)).items():
                    if key in self._entries:
                        raise ValueError(f"{folder}: key {key!r} is in both {self.files[key]} and {name}")
                    self._entries[key], self.files[key], self.shapes[key] = entry, name, entry.shape
                self._fds[name] = os.open(os.path.join(folder, name), os.O_RDONLY)
            return
        pickles = sorted({os.path.basename(p) for pat in PICKLE_PATTERNS for p in glob.glob(os.path.join(folder, pat))})
        if not pickles:
            raise FileNotFoundError(f"{folder}: no weights found ({SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} or *.safetensors)")
        if not allow_pickle:
            raise PickleCheckpointError(
                f"{folder}: only PyTorch pickle weights {pickles} were found. Pickles can execute code when "
                "loaded, so they are refused; convert them to safetensors, or pass allow_pickle=True to read "
                "them with torch.load(weights_only=True)")
        self._load_pickles(pickles)

    def _safetensors_files(self) -> list[str]:
        index = os.path.join(self.folder, SAFETENSORS_INDEX)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            missing = sorted({n for n in weight_map.values() if not os.path.exists(os.path.join(self.folder, n))})
            if missing:
                raise FileNotFoundError(f"{index} names file(s) that are not there: {missing}")
            return sorted(set(weight_map.values()))
        if os.path.exists(os.path.join(self.folder, SAFETENSORS_SINGLE)):
            return [SAFETENSORS_SINGLE]
        return sorted(os.path.basename(p) for p in glob.glob(os.path.join(self.folder, "*.safetensors")))

    def _load_pickles(self, names: list[str]) -> None:
        import torch  # only on this explicit opt-in path

        self._pickled = {}
        for name in names:
            state = torch.load(os.path.join(self.folder, name), map_location="cpu", weights_only=True)
            for key, tensor in state.items():
                array = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
                self._pickled[key] = array
                self.files[key] = name
                self.shapes[key] = tuple(array.shape)

    def dtype(self, key: str) -> np.dtype:
        return self._pickled[key].dtype if self._pickled is not None else self._entries[key].dtype

    def read(self, key: str, index: tuple = (), out: np.ndarray | None = None) -> np.ndarray:
        """`tensor[index]` read from disk now: only the rows that `index[0]` selects are read.

        With `out`, the result is written there (converting dtype) and `out` is returned.
        """
        if self._pickled is not None:
            result = self._pickled[key][index]
        else:
            entry = self._entries[key]
            rows = index[0] if index else slice(None)
            first, stop, step = rows.indices(entry.shape[0]) if entry.shape else (0, 1, 1)
            row_shape = entry.shape[1:]
            row_bytes = int(np.prod(row_shape)) * entry.dtype.itemsize
            # Read straight into `out` when nothing is left to slice and no conversion is needed.
            direct = (out is not None and out.dtype == entry.dtype and step == 1 and out.flags.c_contiguous
                      and all(s == slice(None) for s in index[1:]))
            buffer = out if direct else np.empty(((stop - first) if entry.shape else 1, *row_shape), entry.dtype)
            view = memoryview(buffer.reshape(-1).view(np.uint8))
            offset = entry.offset + first * row_bytes
            while view.nbytes:  # pread may return fewer bytes than asked
                n = os.preadv(self._fds[entry.file], [view], offset)
                if n == 0:
                    raise IOError(f"{self.folder}/{entry.file}: unexpected end of file reading {key!r}")
                view, offset = view[n:], offset + n
            if direct:
                return out
            result = buffer[(slice(None, None, step), *index[1:])] if entry.shape else buffer.reshape(())
        if out is None:
            return result
        out[...] = result
        return out

    def __exit__(self, *exc) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._pickled = None


def host_buffer(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialized, page-aligned array for weights read from disk.

    Anonymous mmap memory advised to use transparent huge pages where the kernel allows (Linux
    `madvise` mode): first-touching fresh memory page by page costs more than the copy out of the
    page cache, and 2 MiB pages make that 512x rarer (1 GB: 1.5 s instead of 5.7 s on our VMs).
    """
    nbytes = max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 1)
    memory = mmap.mmap(-1, nbytes)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            memory.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # advice only: kernels without THP refuse it
            pass
    return np.frombuffer(memory, np.uint8, count=int(np.prod(shape)) * np.dtype(dtype).itemsize).view(dtype).reshape(shape)


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Groups keys (in order) into files of at most max_shard_bytes (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    filled = 0
    for key, size in sizes:
        if shards[-1] and filled + size > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(key)
        filled += size
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SAFETENSORS_SINGLE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


_DTYPE_NAMES = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}


def write_safetensors(path: str, entries: list[tuple[str, tuple[int, ...], np.dtype, Any]],
                      metadata: dict[str, str] | None = None) -> int:
    """Writes a safetensors file one tensor at a time: host memory peaks at the largest tensor.

    entries: (key, shape, dtype, fetch) with fetch() returning the array when its turn comes. The
    header can be written first because shapes and dtypes are known up front. (The safetensors
    package needs every tensor of a file in memory at once.) Returns the bytes written.
    """
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for key, shape, dtype, _ in entries:
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        header[key] = {"dtype": _DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for key, shape, dtype, fetch in entries:
            array = np.ascontiguousarray(fetch(), dtype=dtype)
            if tuple(array.shape) != tuple(shape):
                raise ValueError(f"{path}: tensor {key!r} is {list(array.shape)}, expected {list(shape)}")
            f.write(array.reshape(-1).view(np.uint8).data)  # bytes view: bf16 has no buffer format
    os.replace(tmp, path)  # a reader never sees a half-written file
    return 8 + len(encoded) + offset


def write_index(folder: str, weight_map: dict[str, str], total_size: int) -> None:
    with open(os.path.join(folder, SAFETENSORS_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=2, sort_keys=True)


def write_json(folder: str, name: str, data: dict[str, Any]) -> None:
    with open(os.path.join(folder, name), "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied


def config_for(path: str, revision: str | None = None) -> dict:
    """config.json of a model without its weights: a local folder, a preset (jaxft.presets: no
    download), or the hub (config.json only)."""
    from jaxft import presets

    if os.path.isdir(path):
        return read_config(path)
    if path in presets.HF_CONFIGS:
        return dict(presets.HF_CONFIGS[path])
    from huggingface_hub import hf_hub_download

    with open(hf_hub_download(path, "config.json", revision=revision)) as f:
        return json.load(f)
