"""Checkpoints of a run with orbax: what is saved, where, which one a run resumes from.

A checkpoint `WORKDIR/checkpoints/<step>/` holds three items:
- `state`: the trainable params (LoRA runs: only the adapters), optimizer state, step and RNG —
  the frozen base is not copied; it is referenced by path and fingerprint in `meta`;
- `data`: the data iterator's position (JSON), so a resumed run sees exactly the batches an
  uninterrupted one would;
- `meta`: the resolved config and the base model's path, revision and fingerprint.

Saves are asynchronous and atomic: orbax writes into a temporary folder and renames it when every
item is complete, so a checkpoint cut short by kill -9 is never listed. A listed checkpoint that
cannot be read is skipped with a warning naming it, and the previous one is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

from jaxft import config as config_lib

log = logging.getLogger("jaxft.checkpoint")

# The config keys whose change makes a resume a different run, for every task (override:
# checkpoint.allow_changes); each task adds its own (Task.resume_keys).
RESUME_SENSITIVE_KEYS = ("task", "model.path", "model.quantize", "data.train", "data.seq_len", "train.batch_size",
                         "lora.rank", "lora.targets", "lora.use_dora")
# Keys added after checkpoints were first written: absent from an older checkpoint means the default.
_ADDED_KEYS = {"task": "causal_lm", "classification.labels": []}


def base_fingerprint(folder: str) -> str:
    """Cheap identity of a base model folder: config.json and each weight file's header and size."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name == "config.json" or name.endswith((".safetensors", ".bin")):
            path = os.path.join(folder, name)
            digest.update(name.encode())
            digest.update(str(os.path.getsize(path)).encode())
            with open(path, "rb") as f:
                digest.update(f.read(1 << 16))
    return digest.hexdigest()[:16]


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
                path = os.path.join(self.directory, str(candidate))
                log.warning("skipping checkpoint %s: it cannot be read (%s: %s)", path, type(e).__name__, str(e)[:300])
                self._set_aside(path)
        raise FileNotFoundError(f"no readable checkpoint in {self.directory} (tried steps {candidates})")

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
