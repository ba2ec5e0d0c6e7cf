"""Tasks the training loop runs, by name: `get_task("classification")`. A task is a `Task` subclass registered
with `@register_task`; `cvt.engine.fit` trains whichever a recipe's `task:` names (by default the data's)."""

from __future__ import annotations

from .base import DistInfo, Evaluation, Task, autocast

_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    if cls.name in _TASKS:
        raise ValueError(f"task {cls.name!r} is registered twice")
    _TASKS[cls.name] = cls
    return cls


def task_names() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> type[Task]:
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
    return _TASKS[name]


# Each task module registers itself with register_task, so it is imported after it.
from . import classification, detection, segmentation  # noqa: E402, F401

__all__ = ["DistInfo", "Evaluation", "Task", "autocast", "get_task", "register_task", "task_names"]
