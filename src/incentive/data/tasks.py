"""incentive's own procedural tasks, loaded as ``task:<name>`` beside reasoning-gym's: generators registered by
name that need no downloads, each taking ``size``, ``seed`` and its own keyword arguments (a recipe's
``task_args``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from incentive.registry import Registry


@dataclass(frozen=True)
class TaskItem:
    """One generated problem: the prompt, its reference answer, the domain it counts under (None: the task's
    name) and metadata for rewards, judges and worked-solution writers."""

    question: str
    answer: str
    domain: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


class TaskGenerator(Protocol):
    """``size`` items, the same for the same seed and arguments; a bad argument raises TypeError or ValueError."""

    def __call__(self, size: int, seed: int, **task_args: Any) -> list[TaskItem]: ...


TASKS: Registry[TaskGenerator] = Registry("task")
