"""The task kinds and what a config may say of them, owned by the tasks layer: the config's
``task`` and ``eval.select`` read them from here (a module without imports, so that reading a
config does not build a task)."""

from typing import Literal, get_args

TaskName = Literal["classification", "detection", "causal-lm"]

TASKS: tuple[str, ...] = get_args(TaskName)

SELECTION_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("top1", "top5"),
    "detection": ("AP", "AP50", "AP75"),
    "causal-lm": ("top1", "ppl", "loss"),
}
"""The validation metrics that may choose ``best.pt`` (``eval.select``), by task; the first is the
task's default. ``ppl`` (perplexity) and ``loss`` (mean next-token cross-entropy) are lower-better
(:data:`LOWER_IS_BETTER`), the accuracies and APs higher-better."""

LOWER_IS_BETTER = frozenset({"ppl", "loss"})
"""The selectable metrics for which a lower value is the better epoch."""
