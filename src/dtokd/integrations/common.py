"""What the framework integrations share: the default distillation losses."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor

from dtokd.losses.kd import cross_entropy, kd_loss

LossFn = Callable[[Tensor, Tensor, Tensor], Mapping[str, Tensor]]


def default_losses(temperature: float = 4.0) -> LossFn:
    """``{"distill": T^2 KL at temperature T, "task": cross-entropy}`` on ``(B, C)`` logits."""
    def losses(student_logits: Tensor, teacher_logits: Tensor, y: Tensor) -> dict[str, Tensor]:
        return {"distill": kd_loss(student_logits, teacher_logits, temperature), "task": cross_entropy(student_logits, y)}

    return losses
