"""The training tasks by name: what ``interp train TASK`` and checkpoints refer to."""

from __future__ import annotations

from typing import Any

from interp.errors import InterpError
from interp.train.tasks.base import Task
from interp.train.tasks.domains import Domains
from interp.train.tasks.induction import Induction
from interp.train.tasks.knowledge import Knowledge
from interp.train.tasks.offsets import Offsets
from interp.train.tasks.retrieval import Retrieval
from interp.train.tasks.text import Text

__all__ = ["TASKS", "make_task"]

TASKS: dict[str, type[Task]] = {t.name: t for t in (Induction, Knowledge, Domains, Text,
                                                    Offsets)}
TASKS[Retrieval.name] = Retrieval  # segments through a memory (interp.memory)


def make_task(task: str | Task, **params: Any) -> Task:
    """A task from its name and parameters (a :class:`Task` passes through unchanged)."""
    if isinstance(task, Task):
        if params:
            raise InterpError("Pass task parameters either to the Task or as task_params, "
                              "not both.")
        return task
    if task not in TASKS:
        raise InterpError(f"Unknown task {task!r}; valid tasks: {', '.join(TASKS)}.")
    return TASKS[task](**params)
