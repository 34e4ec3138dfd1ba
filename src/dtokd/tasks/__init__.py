"""Tasks: how a batch becomes named losses and how a model is evaluated (the one seam between
the trainer and what is being distilled)."""

from dtokd.tasks.classification import (
    LOSS_OPTIONS,
    ClassificationTask,
    evaluate_classifier,
    has_distillation_head,
    resolve_loss_specs,
)

__all__ = ["LOSS_OPTIONS", "ClassificationTask", "evaluate_classifier", "has_distillation_head", "resolve_loss_specs"]
