"""Hugging Face folders: finding them, reading config.json and weights, writing them back.

Weights are read with safetensors' lazy reader: a tensor (or the slice of it that one device
needs) is read when asked for, never the whole file. PyTorch pickles (`*.bin`, `*.pt`) can run
code when loaded, so they are refused unless the caller opts in, and then read with
`torch.load(weights_only=True)`. `trust_remote_code` does not exist here: every family is ours.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import re
import shutil
from typing import Any, Iterable

import numpy as np
from safetensors import safe_open

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]


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
    """Tensors of an HF folder by key: shapes from headers up front, data read lazily by slice."""

    def __init__(self, folder: str, allow_pickle: bool = False):
        self.folder = folder
        self.files: dict[str, str] = {}  # key → file name
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, Any] = {}
        self._pickled: dict[str, np.ndarray] | None = None
        safetensors_files = self._safetensors_files()
        if safetensors_files:
            for name in safetensors_files:
                handle = self._stack.enter_context(safe_open(os.path.join(folder, name), framework="numpy"))
                self._handles[name] = handle
                for key in handle.keys():
                    if key in self.files:
                        raise ValueError(f"{folder}: key {key!r} is in both {self.files[key]} and {name}")
                    self.files[key] = name
                    self.shapes[key] = tuple(handle.get_slice(key).get_shape())
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

    def read(self, key: str, index: tuple = ()) -> np.ndarray:
        """The tensor `key`, or only `tensor[index]`, read from disk now."""
        if self._pickled is not None:
            return self._pickled[key][index]
        tensor_slice = self._handles[self.files[key]].get_slice(key)
        return tensor_slice[index] if index else tensor_slice[:]

    def dtype(self, key: str) -> str:
        if self._pickled is not None:
            return str(self._pickled[key].dtype)
        return self._handles[self.files[key]].get_slice(key).get_dtype()

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._handles.clear()
        self._pickled = None


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
