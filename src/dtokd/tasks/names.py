"""The task kinds, owned by the tasks layer: the config's ``task`` reads them from here."""

from typing import Literal, get_args

TaskName = Literal["classification", "detection", "causal-lm"]

TASKS: tuple[str, ...] = get_args(TaskName)
