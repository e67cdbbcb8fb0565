"""Checkpoints of a run with orbax: what is saved, where, which one a run resumes from.

A checkpoint `WORKDIR/checkpoints/<step>/` holds three items:
- `state`: the trainable params (LoRA runs: only the adapters), optimizer state, step and RNG —
  the frozen base is not copied; it is referenced by path and fingerprint in `meta`;
- `data`: the data iterator's position (JSON), so a resumed run sees exactly the batches an
  uninterrupted one would;
- `meta`: the resolved config and the base model's path, revision and fingerprint.

Saves are asynchronous and atomic: orbax writes into a temporary folder and renames it when every
item is complete, so a checkpoint cut short by kill -9 is never listed. `meta` also holds a checksum
of every array, checked on restore. A listed checkpoint that cannot be read, or whose bytes changed
since it was written, is skipped with a warning naming it (and set aside), and the previous one is used.
The base fingerprint covers every byte of the base's weight files (cached; see base_fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

from jaxft import config as config_lib

log = logging.getLogger("jaxft.checkpoint")

# The config keys whose change makes a resume a different run, for every task (override:
# checkpoint.allow_changes); each task adds its own (Task.resume_keys).
RESUME_SENSITIVE_KEYS = ("task", "model.path", "model.quantize", "data.train", "data.seq_len", "train.batch_size",
                         "lora.rank", "lora.targets", "lora.use_dora", "model.add_tokens", "model.add_special_tokens",
                         "model.pad_vocab_multiple", "peft.method", "peft.num_virtual_tokens",
                         "peft.prefix_projection", "peft.encoder_hidden_size")
# Keys added after checkpoints were first written: absent from an older checkpoint means the default.
_ADDED_KEYS = {"task": "causal_lm", "classification.labels": [], "model.add_tokens": [],
               "model.add_special_tokens": [], "model.pad_vocab_multiple": 1, "peft.method": "lora",
               "peft.num_virtual_tokens": 20, "peft.prefix_projection": False}


FINGERPRINT_PREFIX = "sha256:"  # fingerprints of every byte; older checkpoints hold a 16-hex-digit legacy one
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")


def base_fingerprint(folder: str) -> str:
    """Identity of a base model folder: sha256 over config.json and every byte of every weight file.

    Each file's digest is the hub's own where the file is a hub blob (a snapshot symlink into
    blobs/<sha256>), else computed once and cached by (path, size, mtime), so an unchanged base is
    not re-read on resume."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name == "config.json" or name.endswith(_WEIGHT_SUFFIXES):
            digest.update(f"{name}\0{file_sha256(os.path.join(folder, name))}\0".encode())
    return FINGERPRINT_PREFIX + digest.hexdigest()


def same_base(saved: str, folder: str) -> bool:
    """Whether `folder` is the base a checkpoint recorded (its full or, for old checkpoints, legacy fingerprint)."""
    if saved.startswith(FINGERPRINT_PREFIX):
        return base_fingerprint(folder) == saved
    return _legacy_fingerprint(folder) == saved


def _legacy_fingerprint(folder: str) -> str:
    """Before full hashing: config.json and each weight file's first 64 KiB and size (kept to read old checkpoints)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name == "config.json" or name.endswith((".safetensors", ".bin")):
            path = os.path.join(folder, name)
            digest.update(name.encode())
            digest.update(str(os.path.getsize(path)).encode())
            with open(path, "rb") as f:
                digest.update(f.read(1 << 16))
    return digest.hexdigest()[:16]


def file_sha256(path: str) -> str:
    real = os.path.realpath(path)
    blob = os.path.basename(real)
    if os.path.basename(os.path.dirname(real)) == "blobs" and len(blob) == 64 and all(c in "0123456789abcdef" for c in blob):
        return blob  # the hub names LFS blobs by their sha256
    stat = os.stat(real)
    key = f"{real}\0{stat.st_size}\0{stat.st_mtime_ns}"
    cache = _read_hash_cache()
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with open(real, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    cache[key] = digest.hexdigest()
    _write_hash_cache(cache)
    return cache[key]


def _hash_cache_path() -> str:
    root = os.environ.get("JAXFT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxft")
    return os.path.join(root, "file_sha256.json")


def _read_hash_cache() -> dict[str, str]:
    try:
        with open(_hash_cache_path()) as f:
            cache = json.load(f)
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        return {}  # no cache, or a damaged one: hash again


def _write_hash_cache(cache: dict[str, str]) -> None:
    path = _hash_cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f"{path}.{os.getpid()}"
        with open(partial, "w") as f:
            json.dump(dict(list(cache.items())[-4096:]), f)  # bounded: the newest entries
        os.replace(partial, path)  # atomic: concurrent runs never read half a file
    except OSError as e:  # a read-only home: fine, only slower next time
        log.debug("could not write %s: %s", path, e)


# ---- per-array checksums: a checkpoint restored with flipped bytes is refused --------------------
def _checksum_one(x: jax.Array) -> jax.Array:
    """[2] uint32 of an array's bits: their sum and their position-weighted sum (mod 2^32). Any one
    flipped bit changes the first; swapped elements change the second. Computed where the array lives."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32).reshape(-1)  # 8-byte: [..., 2] words
    weights = jnp.arange(1, bits.size + 1, dtype=jnp.uint32)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])


_checksums = jax.jit(lambda tree: jax.tree.map(_checksum_one, tree))


def checksums(tree: Any) -> dict[str, list[int]]:
    """{key path: [sum, weighted sum]} of every array in a pytree (the train state, or its params)."""
    leaves = jax.tree_util.tree_flatten_with_path(_checksums(tree))[0]
    return {jax.tree_util.keystr(path): [int(v) for v in jax.device_get(value)] for path, value in leaves}


def check_checksums(restored: Any, saved: dict[str, list[int]] | None, where: str) -> None:
    """Raises when a restored array's checksum differs from the one saved with it (`restored` may be
    part of the saved tree, under the same paths: {"params": ...})."""
    if not saved:
        return  # a checkpoint written before checksums
    for path, value in checksums(restored).items():
        expected = saved.get(path)
        if expected is not None and expected != value:
            raise ValueError(f"{where}: array {path} does not match the checksum saved with it "
                             f"({value} != {expected}): the checkpoint's bytes changed since it was written")


class Checkpointer:
    """orbax CheckpointManager over WORKDIR/checkpoints with jaxft's items and policies."""

    def __init__(self, directory: str, *, keep: int = 2, keep_best: int = 1, async_save: bool = True,
                 read_only: bool = False):
        self.directory = os.path.abspath(directory)
        policies = [preservation_policy.LatestN(keep)]
        if keep_best:
            policies.append(preservation_policy.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True,
                                                      n=keep_best, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation_policy.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only, read_only=read_only,
            create=not read_only)
        self.read_only = read_only
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def steps(self) -> list[int]:
        self.manager.reload()  # another process (or a killed one) may have written since
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict | None, meta: dict, eval_loss: float | None = None,
             force: bool = False) -> bool:
        metrics = {"eval_loss": float(eval_loss)} if eval_loss is not None else None
        meta = {**meta, "checksums": checksums(state)}
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}),
            meta=ocp.args.JsonSave(meta)), metrics=metrics, force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, target: Any, step: int | None = None) -> tuple[int, Any, dict, dict]:
        """(step, state, data_state, meta) of `step`, or of the newest readable checkpoint.

        target: the state's structure with jax.ShapeDtypeStruct leaves carrying the shardings to
        restore onto — any mesh, not only the one that saved.
        """
        def read(candidate):
            restored = self.manager.restore(candidate, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
            check_checksums(restored["state"], restored["meta"].get("checksums"), self._path(candidate))
            return restored["state"], restored["data"], restored["meta"]

        found, (state, data, meta) = self._newest_readable(read, step)
        return found, state, data, meta

    def restore_params(self, target: dict[str, Any], step: int | None = None) -> tuple[int, dict[str, Any]]:
        """(step, the trainable params) of `step` or of the newest readable checkpoint, onto
        `target`'s shardings. Only `state.params` is read: the optimizer state is neither read nor
        allocated (export, eval)."""
        restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target)

        def read(candidate):
            restored = self.manager.restore(candidate, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item={"params": target}, restore_args={"params": restore_args}, partial_restore=True)))
            check_checksums({"params": restored["state"]["params"]}, self.read_meta(candidate).get("checksums"),
                            self._path(candidate))
            return restored["state"]["params"]

        return self._newest_readable(read, step)

    def _newest_readable(self, read, step: int | None):
        candidates = [step] if step is not None else sorted(self.steps(), reverse=True)
        if not candidates:
            raise FileNotFoundError(f"no checkpoints in {self.directory}")
        for candidate in candidates:
            try:
                return candidate, read(candidate)
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped, loudly
                if step is not None:
                    raise
                path = self._path(candidate)
                log.warning("skipping checkpoint %s: it cannot be read (%s: %s)", path, type(e).__name__, str(e)[:300])
                self._set_aside(path)
        raise FileNotFoundError(f"no readable checkpoint in {self.directory} (tried steps {candidates})")

    def _path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _set_aside(self, path: str) -> None:
        """Renames an unreadable checkpoint out of the way (kept for inspection, never deleted), so
        the resumed run can save that step again."""
        if self.read_only or jax.process_index() != 0:
            return
        aside = f"{path}.unreadable-{int(time.time())}"
        os.rename(path, aside)
        log.warning("moved it to %s", aside)
        self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_target(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with target shardings: what orbax restores onto."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def config_changes(saved: dict, current: dict, keys=RESUME_SENSITIVE_KEYS) -> list[str]:
    """Human-readable differences in `keys` between two plain configs."""
    changes = []
    for key in keys:
        old, new = config_lib.get(saved, key, None), config_lib.get(current, key, None)
        if key in _ADDED_KEYS:
            old, new = (_ADDED_KEYS[key] if v is None else v for v in (old, new))
        if json.dumps(old, sort_keys=True) != json.dumps(new, sort_keys=True):
            changes.append(f"{key}: {old!r} → {new!r}")
    return changes
