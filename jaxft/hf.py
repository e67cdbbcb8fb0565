"""Hugging Face folders: finding them, reading config.json and weights, writing them back.

Weights are read lazily from safetensors files: a tensor, or the rows of it that one device needs,
is read with `pread` straight into the buffer that will hold it, never the whole file. (The
safetensors package writes our files; for reading we parse its 8-byte-length + JSON header ourselves,
because its numpy reader always returns a fresh copy, which would double the bytes touched. The header
is checked at least as strictly as the safetensors library checks it, so that a crafted file is refused
with its file and tensor named instead of loading another tensor's bytes.) PyTorch pickles (`*.bin`, `*.pt`) can run
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
import stat
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
    "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
    "BOOL": np.bool_,
}
# The safetensors library's limits (safetensors/src/tensor.rs): MAX_HEADER_SIZE, and shapes and offsets
# are usize, so a byte count that does not fit 64 bits is an overflow there. numpy allows 64 dimensions.
MAX_HEADER_BYTES = 100_000_000
_USIZE = 2**64
_MAX_NDIM = 64
_TENSOR_FIELDS = {"dtype", "shape", "data_offsets"}


@dataclasses.dataclass(frozen=True)
class _TensorEntry:
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file


def _short(value: Any, limit: int = 80) -> str:
    """repr() cut to one short line: names and values come from a file that may be hostile."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _strict_json(path: str, raw: bytes, what: str) -> Any:
    """JSON as serde_json (the safetensors library's parser) reads it: UTF-8 only (Python's json would
    also take UTF-16/32), no NaN/Infinity, no duplicate keys (Python keeps the last one silently), no
    lone surrogate escapes; nesting too deep for Python's parser is an error, not a RecursionError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: {what} is not UTF-8 (byte {e.start} is {raw[e.start:e.start + 1]!r})") from None

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in items:
            if key in obj:
                raise ValueError(f"key {_short(key)} appears twice")
            for string in (key, value) if isinstance(value, str) else (key,):
                try:
                    string.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(f"string {_short(string)} is not UTF-8 (a lone surrogate escape)") from None
            obj[key] = value
        return obj

    def constant(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: {what} is not valid JSON: {e.msg} (line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{path}: {what} nests too deeply to be read") from None
    except ValueError as e:  # from the hooks above, or an integer with too many digits
        raise ValueError(f"{path}: {what}: {e}") from None


def _pread(fd: int, size: int, offset: int, path: str) -> bytes:
    chunks = []
    while size:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            raise ValueError(f"{path}: the file ended at byte {offset} while its header was read (was it truncated?)")
        chunks.append(chunk)
        size, offset = size - len(chunk), offset + len(chunk)
    return b"".join(chunks)


def _is_uints(value: Any) -> bool:
    # type() rather than isinstance(): JSON true/false are Python bools, which are ints.
    return isinstance(value, list) and all(type(v) is int and 0 <= v < _USIZE for v in value)


def _read_safetensors_header(path: str, fd: int) -> dict[str, _TensorEntry]:
    """The tensors of the safetensors file open at `fd`, refusing every header the safetensors library
    refuses (read_metadata and Metadata::validate in its tensor.rs), and a few more that it accepts: a
    header not starting with '{', duplicate JSON keys, tensor entries with fields besides the three,
    more than 64 dimensions.

    No length or shape from the file is trusted before it is checked against the file's size, so a
    crafted file cannot make this allocate more than its header's bytes (at most MAX_HEADER_BYTES)."""
    size = os.fstat(fd).st_size
    if size < 8:
        raise ValueError(f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte header length)")
    (length,) = struct.unpack("<Q", _pread(fd, 8, 0, path))
    if length > MAX_HEADER_BYTES:
        raise ValueError(f"{path}: header length {length} is over the safetensors limit of {MAX_HEADER_BYTES} bytes")
    if 8 + length > size:
        raise ValueError(f"{path}: header length {length} runs past the end of the file ({size} bytes)")
    raw = _pread(fd, length, 8, path)
    # The library reserves InvalidHeaderStart for this; checking it also makes "the header is an object" plain.
    if not raw.startswith(b"{"):
        raise ValueError(f"{path}: header does not start with '{{' (it starts with {raw[:8]!r})")
    header = _strict_json(path, raw, "header")
    metadata = header.pop("__metadata__", None)  # null is what the library reads as "no metadata"
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise ValueError(f"{path}: '__metadata__' must map strings to strings, got {_short(metadata)}")
    entries, spans = {}, []
    for key, info in header.items():
        entry, begin, end = _tensor_entry(path, key, info, 8 + length)
        entries[key] = entry
        spans.append((begin, end, key))
    _check_layout(path, spans, size - 8 - length, length)
    return entries


def _tensor_entry(path: str, key: str, info: Any, data_start: int) -> tuple[_TensorEntry, int, int]:
    where = f"{path}: tensor {_short(key)}"
    # Exactly these fields: the library ignores others, but a misspelt field is a broken writer.
    if not isinstance(info, dict) or set(info) != _TENSOR_FIELDS:
        fields = sorted(info) if isinstance(info, dict) else type(info).__name__
        raise ValueError(f"{where}: expected the fields {sorted(_TENSOR_FIELDS)}, got {_short(fields)}")
    dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in _SAFETENSORS_DTYPES:
        raise ValueError(f"{where}: unsupported dtype {_short(dtype_name)} "
                         f"(jaxft reads {', '.join(_SAFETENSORS_DTYPES)})")
    if not _is_uints(shape):
        raise ValueError(f"{where}: shape must be a list of non-negative integers, got {_short(shape)}")
    if len(shape) > _MAX_NDIM:
        raise ValueError(f"{where}: shape has {len(shape)} dimensions; at most {_MAX_NDIM} are supported")
    if not (_is_uints(offsets) and len(offsets) == 2):
        raise ValueError(f"{where}: data_offsets must be [begin, end], two non-negative integers, "
                         f"got {_short(offsets)}")
    begin, end = offsets
    if begin > end:
        raise ValueError(f"{where}: data_offsets [{begin}, {end}] end before they begin")
    dtype = np.dtype(_SAFETENSORS_DTYPES[dtype_name])
    nbytes = dtype.itemsize
    for dim in shape:  # bounded at each step, as the library's checked_mul is
        nbytes *= dim
        if nbytes >= _USIZE:
            raise ValueError(f"{where}: shape {_short(shape)} {dtype_name} overflows a 64-bit byte count")
    if end - begin != nbytes:
        raise ValueError(f"{where}: shape {shape} {dtype_name} is {nbytes} bytes, but data_offsets "
                         f"[{begin}, {end}] hold {end - begin}")
    return _TensorEntry(os.path.basename(path), dtype, tuple(shape), data_start + begin), begin, end


def _check_layout(path: str, spans: list[tuple[int, int, str]], data_size: int, header_length: int) -> None:
    """The library's rule: sorted by offsets, the tensors tile the data region exactly, each beginning
    where the previous one ends and the last ending at the end of the file. So no two tensors share
    bytes (one would read the other's weights), and no byte is unaccounted for."""
    covered, previous = 0, None
    for begin, end, key in sorted(spans):
        if end > data_size:
            raise ValueError(f"{path}: tensor {_short(key)} data_offsets [{begin}, {end}] run past the data region of "
                             f"{data_size} bytes (file size - 8 - header length {header_length})")
        if begin < covered:
            raise ValueError(f"{path}: tensor {_short(key)} data_offsets [{begin}, {end}] overlap tensor "
                             f"{_short(previous[0])} [{previous[1]}, {previous[2]}]")
        if begin > covered:
            raise ValueError(f"{path}: bytes [{covered}, {begin}) of the data region belong to no tensor "
                             f"(the next is tensor {_short(key)} at [{begin}, {end}])")
        covered, previous = end, (key, begin, end)
    if covered != data_size:
        raise ValueError(f"{path}: the data region is {data_size} bytes but the tensors cover [0, {covered}): "
                         f"the last {data_size - covered} bytes belong to no tensor")


def _open_regular_file(path: str) -> int:
    # O_NONBLOCK: a FIFO planted under a weights name must not hang the open (it is ignored for files).
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{path}: not a regular file")
    return fd


def _is_plain_file_name(name: str) -> bool:
    return (name not in ("", ".", "..") and "\0" not in name and "\\" not in name
            and os.path.basename(name) == name)


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
        weight_map = self._read_index()
        safetensors_files = (sorted(set(weight_map.values())) if weight_map is not None
                             else self._unindexed_safetensors_files())
        if safetensors_files:
            try:
                for name in safetensors_files:
                    path = os.path.join(folder, name)
                    self._fds[name] = fd = _open_regular_file(path)
                    for key, entry in _read_safetensors_header(path, fd).items():
                        if key in self._entries:
                            raise ValueError(f"{folder}: key {_short(key)} is in both {self.files[key]} and {name}")
                        self._entries[key], self.files[key], self.shapes[key] = entry, name, entry.shape
                if weight_map is not None:
                    self._check_index(weight_map)
            except BaseException:
                self.__exit__(None, None, None)  # a refused shard must not leak the descriptors opened before it
                raise
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

    def _read_index(self) -> dict[str, str] | None:
        """model.safetensors.index.json's weight_map (tensor -> shard), None without an index.

        Shards must be plain file names in this folder: a name like '../x' or '/x' would read weights
        from anywhere on the machine."""
        path = os.path.join(self.folder, SAFETENSORS_INDEX)
        if not os.path.exists(path):
            return None
        fd = _open_regular_file(path)
        try:
            size = os.fstat(fd).st_size
            if size > MAX_HEADER_BYTES:  # a real index is a few hundred KB
                raise ValueError(f"{path}: {size} bytes, over the {MAX_HEADER_BYTES}-byte limit for an index")
            index = _strict_json(path, _pread(fd, size, 0, path), "index")
        finally:
            os.close(fd)
        if not isinstance(index, dict) or "weight_map" not in index:
            raise ValueError(f"{path}: expected an object with a 'weight_map' (tensor -> shard file), "
                             f"got {_short(index)}")
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{path}: 'weight_map' must be a non-empty object (tensor -> shard file), "
                             f"got {_short(weight_map)}")
        for key, name in weight_map.items():
            if not isinstance(name, str) or not _is_plain_file_name(name):
                raise ValueError(f"{path}: tensor {_short(key)} is mapped to {_short(name)}, which is not a plain file "
                                 "name in this folder")
            if not os.path.isfile(os.path.join(self.folder, name)):
                raise ValueError(f"{path}: tensor {_short(key)} is mapped to {_short(name)}, "
                                 f"which is not in {self.folder}")
        return weight_map

    def _check_index(self, weight_map: dict[str, str]) -> None:
        # A tensor the index puts in a shard must be in that shard: transformers reads the index, so
        # any disagreement means one of the two loaders would read something else.
        for key, name in weight_map.items():
            if self.files.get(key) != name:
                where = f"it is in {self.files[key]}" if key in self.files else "no shard has it"
                raise ValueError(f"{os.path.join(self.folder, SAFETENSORS_INDEX)}: tensor {_short(key)} is mapped to "
                                 f"{name}, but that shard's header does not have it ({where})")

    def _unindexed_safetensors_files(self) -> list[str]:
        if os.path.lexists(os.path.join(self.folder, SAFETENSORS_SINGLE)):
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


# tokenizer_class names that transformers 5 writes and 4.x (and llama.cpp's converters, which load the
# tokenizer with 4.x) do not know. A tokenizer.json is what 4.x's PreTrainedTokenizerFast reads, and 5.x
# reads "PreTrainedTokenizerFast" as its TokenizersBackend.
_V5_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    """Copies the tokenizer files (and generation_config.json) from `src` into `dst`; a v5-only
    `tokenizer_class` in tokenizer_config.json is written as the class transformers 4.x knows for the
    same files (the source is left as it is)."""
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, name)):
            if name != "tokenizer_config.json" or not _copy_tokenizer_config(src, dst):
                shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied


def _copy_tokenizer_config(src: str, dst: str) -> bool:
    """Writes dst's tokenizer_config.json with a 4.x tokenizer_class when src's names a v5-only one
    that has a 4.x equivalent for these files; False (copy it as it is) otherwise."""
    try:
        with open(os.path.join(src, "tokenizer_config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    renamed = _V5_TOKENIZER_CLASSES.get(config.get("tokenizer_class")) if isinstance(config, dict) else None
    if renamed is None or not os.path.exists(os.path.join(src, "tokenizer.json")):
        return False
    config["tokenizer_class"] = renamed
    with open(os.path.join(dst, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return True


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
