"""Decoupled KD (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022).

With ``p = softmax(z / T)`` and ``t`` the target class::

    TCKD = KL([p_t^T, 1 - p_t^T] || [p_t^S, 1 - p_t^S])                  (target vs rest)
    NCKD = KL(softmax over non-target classes, teacher || student)         (among the rest)
    DKD  = T^2 (alpha TCKD + beta NCKD)

Published defaults: alpha 1, beta 8 (CIFAR-100), T 4; the paper also warms the loss up
linearly over the first 20 epochs, which the trainer applies through ``warmup_epochs``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dkd_parts(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: float = 4.0
) -> tuple[Tensor, Tensor]:
    """``(T^2 TCKD, T^2 NCKD)``, each averaged over the batch."""
    gt = F.one_hot(target, student_logits.shape[1]).bool()
    p_s = F.softmax(student_logits / temperature, 1)
    p_t = F.softmax(teacher_logits / temperature, 1)
    binary_s = torch.stack([(p_s * gt).sum(1), (p_s * ~gt).sum(1)], 1).clamp_min(1e-12)
    binary_t = torch.stack([(p_t * gt).sum(1), (p_t * ~gt).sum(1)], 1).clamp_min(1e-12)
    tckd = F.kl_div(binary_s.log(), binary_t, reduction="batchmean")
    mask = gt * 1000.0  # remove the target class from the non-target softmax
    log_nt_s = F.log_softmax(student_logits / temperature - mask, 1)
    nt_t = F.softmax(teacher_logits / temperature - mask, 1)
    nckd = F.kl_div(log_nt_s, nt_t, reduction="batchmean")
    return tckd * temperature**2, nckd * temperature**2


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> Tensor:
    tckd, nckd = dkd_parts(student_logits, teacher_logits, target, temperature)
    return alpha * tckd + beta * nckd
