"""Logit losses: cross-entropy and Hinton's KD (KL with temperature, T^2 scaling)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """``T^2 KL(softmax(t / T) || softmax(s / T))``, averaged over the batch (Hinton et al. 2015).

    The ``T^2`` keeps the gradient's scale independent of ``T``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2
