"""Tasks: one module per family, and `TASKS`, the one map from an objective name
to its task (see `fmjax.tasks.base` for the protocol).

    task = task_for(config)   # == TASKS[config.objective.name].from_config(config)
"""

from __future__ import annotations

from fmjax.config import ConfigError
from fmjax.tasks.base import EvalContext, SplitEvaluator, Task
from fmjax.tasks.classify import ClassifyTask
from fmjax.tasks.image_text import ImageTextTask
from fmjax.tasks.ssl import DinoTask, SimclrTask
from fmjax.tasks.text import TextTask
from fmjax.tasks.vision import ImageClassifyTask, MaeTask

TASKS: dict[str, type[Task]] = {
    "mlm": TextTask,
    "causal": TextTask,
    "classify": ClassifyTask,
    "image_classify": ImageClassifyTask,
    "mae": MaeTask,
    "simclr": SimclrTask,
    "dino": DinoTask,
    "clip": ImageTextTask,
}


def task_for(config, *, with_data: bool = True) -> Task:
    """The task of `config.objective.name`, validated and resolved (the caller's
    config is not changed). `with_data=False`: shapes only, no data read."""
    name = config.objective.name
    if name not in TASKS:
        raise ConfigError(f"objective.name={name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name].from_config(config, with_data=with_data)


__all__ = ["TASKS", "EvalContext", "SplitEvaluator", "Task", "task_for"]
