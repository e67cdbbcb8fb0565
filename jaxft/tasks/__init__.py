"""Objectives: one file per objective, each a `jaxft.tasks.base.Task`, found by `config.task`.

    task = jaxft.tasks.get(config.task)   # "causal_lm" | "classification" | "dpo" | "reward" | a plug-in
    jaxft.tasks.register(MyTask())         # a new objective, defined anywhere (see tests/tasks/test_plugin_task.py)

The registry is the only place that maps a name to an objective; train, plan, eval, export and the
CLI ask it and never name one. Importing this package imports no jax: the built-in tasks are
imported when first asked for, so that loading a config stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jaxft.tasks.base import Task

# Built-in objectives: name -> the module whose TASK it is (imported on first use).
_BUILTIN = {"causal_lm": "jaxft.tasks.causal_lm", "classification": "jaxft.tasks.classification",
            "dpo": "jaxft.tasks.dpo", "reward": "jaxft.tasks.reward", "distill": "jaxft.tasks.distill",
            "grpo": "jaxft.tasks.grpo"}
_REGISTERED: dict[str, "Task"] = {}


def names() -> list[str]:
    return list(_BUILTIN) + [name for name in _REGISTERED if name not in _BUILTIN]


def get(name: str) -> "Task":
    """The objective called `name`; an unknown name is an error listing the known ones."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _BUILTIN:
        task = importlib.import_module(_BUILTIN[name]).TASK
        _REGISTERED[name] = task
        return task
    known = names()
    raise ValueError(f"task {name!r} must be {', '.join(known[:-1])} or {known[-1]}")


def register(task: "Task") -> "Task":
    """Adds an objective under `task.name` (its config section, if it has one, becomes known to
    jaxft.config); returns it. A built-in name cannot be taken."""
    if not task.name:
        raise ValueError(f"{type(task).__name__} has no name")
    if task.name in _BUILTIN:
        raise ValueError(f"task {task.name!r} is built in; give the new objective another name")
    _REGISTERED[task.name] = task
    return task


def unregister(name: str) -> None:
    if name in _BUILTIN:
        raise ValueError(f"task {name!r} is built in")
    _REGISTERED.pop(name, None)


def plugin_sections() -> dict[str, object]:
    """{section name: its defaults (a ConfigDict)} of the registered plug-in objectives. Built-in
    objectives keep their sections in jaxft/config.py, beside every other key."""
    sections = {}
    for name, task in _REGISTERED.items():
        if name not in _BUILTIN and task.section:
            defaults = task.defaults()
            if defaults is None:
                raise ValueError(f"task {name!r} names config section {task.section!r} but its defaults() is None")
            sections[task.section] = defaults
    return sections
