"""The Task protocol: what one objective owns, and all that train, plan, eval and export ask of it.

    class Parity(Task):                       # a whole new objective (tests/tasks/test_plugin_task.py)
        name, section = "parity", "parity"
        def defaults(self): ...               # its config section: config.parity.*
        def data(self, config, tokenizer): ...
        def batch_spec(self, config, rows): ...
        def objective(self, config): ...      # normalizer(batch) and loss(model, batch, normalizer)
        def eval_step(self, model_def, mesh, config): ...
        def evaluate(self, eval_step, params, frozen, data, mesh): ...
    jaxft.tasks.register(Parity())
    jaxft.train.train(config)                 # config.task = "parity"

A Task is stateless: one instance serves every run. Its hooks, in the order a run calls them:
  validate(config)                  its config section and the shared keys it depends on
  model_options(config, pad_id)     from_pretrained's extra arguments (a classification head)
  attach(model, config, ...)        what it adds to the loaded model (a head; for training only: a frozen
                                    reference, a teacher), after the adapters: nothing attached is adapted
  lora_targets(model, targets)      the adapter targets it needs ("all-linear" minus its head)
  trainable(predicate)              params it trains besides the adapters (its head, whole)
  data(config, tokenizer)           train iterator (get_state/set_state for exact resume) + validation
  batch_spec(config, rows)          the shapes of a train batch (for the memory plan and compiling)
  objective(config)                 the loss, see jaxft.step.Objective
  before_training(training, ...)    once the state is built, before the first step (precomputed references)
  step_batch(training, data, ...)   each host batch just before its step (on-policy completions)
  eval_step / evaluate              one validation pass → {"eval_loss", ...its metrics}
  examples(...)                     a few validation examples for the report (before / after training)
  resume_keys                       config keys whose change makes a resume a different run
  export_info()                     what a PEFT export says besides the weights
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import numpy as np


class TrainIterator(Protocol):
    """Endless host-local batches with a JSON-able position (see jaxft.data.BatchIterator)."""

    def __next__(self) -> dict[str, np.ndarray]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...

    def stats(self) -> dict: ...

    def close(self) -> None: ...


class TaskData(Protocol):
    def train_iterator(self) -> TrainIterator: ...


@dataclasses.dataclass(frozen=True)
class ExportInfo:
    """What an adapter export says besides the weights: PEFT's task_type, and the modules that
    train whole beside the adapters (PEFT's modules_to_save, written as they are)."""

    peft_task_type: str = "CAUSAL_LM"
    modules_to_save: tuple[str, ...] = ()


class Task:
    """An objective. Subclasses set `name` (the config.task value) and implement the hooks that
    raise NotImplementedError; the others have the defaults of an objective that adds nothing."""

    name: str = ""
    section: str | None = None  # its config section (config.<section>.*), if it has settings
    resume_keys: tuple[str, ...] = ()  # beyond jaxft.checkpoint.RESUME_SENSITIVE_KEYS

    # ---- config ---------------------------------------------------------------------------------
    def defaults(self):
        """The ConfigDict of its section, for an objective defined outside jaxft (a plug-in).
        Built-in objectives declare theirs in jaxft/config.py, where every key is listed."""
        return None

    def validate(self, config) -> None:
        """Raises ValueError naming the config key when its settings cannot work (before anything loads)."""

    # ---- model ----------------------------------------------------------------------------------
    def model_options(self, config, pad_token_id: int | None) -> dict[str, Any]:
        return {}

    def attach(self, model, config, *, training: bool, mesh=None, abstract: bool = False):
        """`training`: False when a checkpoint is restored for inference (export, eval), which needs
        only what holds trained params. `mesh`: where to place what is loaded; `abstract`: inside
        jax.eval_shape (the memory plan), so build shapes, read nothing."""
        return model

    def lora_targets(self, model, targets):
        return targets

    def trainable(self, predicate: Callable[[str, Any], bool]) -> Callable[[str, Any], bool]:
        return predicate

    # ---- data -----------------------------------------------------------------------------------
    def data(self, config, tokenizer) -> TaskData:
        raise NotImplementedError

    def batch_spec(self, config, rows: int) -> dict[str, Any]:
        """{key: jax.ShapeDtypeStruct} of a train batch of `rows` rows, as data() yields them."""
        raise NotImplementedError

    def extra_memory(self, config, hf_config: dict, sizes: dict[str, int]) -> list[tuple[str, int, str]]:
        """Per-device bytes the objective needs beyond the train step's, as jaxft plan rows
        (what, bytes, detail): e.g. the KV cache of GRPO's rollouts."""
        return []

    def num_tokens(self, batch: dict[str, np.ndarray]) -> int:
        """Tokens in a host batch, for tokens/s and MFU."""
        return int(np.sum(batch["attention_mask"]))

    # ---- training -------------------------------------------------------------------------------
    def objective(self, config):
        """A jaxft.step.Objective: `normalizer(batch)` over the whole batch, and `loss(model,
        micro_batch, normalizer) -> (loss, metrics)`, both additive over micro-batches."""
        raise NotImplementedError

    def before_training(self, training, data, mesh, workdir: str) -> None:
        """Called once the run's state is built (at its initial values, before a checkpoint is
        restored) and before the first step: the place for work a run does once, e.g. reference
        log-probs computed in one pass and kept in the workdir."""

    def step_batch(self, training, data, state, batch: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
        """The host batch that step `step` (1-based) trains on, made from the data's batch with the
        current state (e.g. completions sampled from the model being trained). It must depend only
        on the state, the batch and the step, so that a resumed run repeats it."""
        return batch

    # ---- evaluation -----------------------------------------------------------------------------
    def eval_step(self, model_def, mesh, config) -> Callable:
        """A jitted (params, frozen, global batch) -> outputs that `evaluate` reduces."""
        raise NotImplementedError

    def evaluate(self, eval_step, params, frozen, data, mesh) -> dict[str, float] | None:
        """One pass over the validation data: {"eval_loss", ...}, or None without validation data."""
        raise NotImplementedError

    def examples(self, eval_step, params, frozen, data, mesh, count: int) -> list[dict]:
        """Up to `count` validation examples as flat dicts of short strings and numbers, shown in the
        report before and after training (e.g. a preference pair and the model's log-prob margin)."""
        return []

    # ---- export ---------------------------------------------------------------------------------
    def export_info(self) -> ExportInfo:
        return ExportInfo()


def need(ok: bool, message: str) -> None:
    """validate()'s assertion: a ValueError with the message when `ok` is false."""
    if not ok:
        raise ValueError(message)


def frozen_copy(model):
    """`model` with a frozen copy of itself attached as `reference`, its own arrays (sharded like
    the params by their axes): the reference of full fine-tuning (DPO, GRPO). Tasks exclude
    "reference." from the trained params; a resumed run rebuilds it from the base."""
    import jax.numpy as jnp
    from flax import nnx

    reference = nnx.clone(model)
    for _, variable in nnx.iter_graph(reference):
        if isinstance(variable, nnx.Param):
            variable.set_value(jnp.copy(variable[...]))
    model.reference = reference
    return model
