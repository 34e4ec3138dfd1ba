"""Logit losses: cross-entropy (labels, label smoothing, soft targets), Hinton's KD (KL with
temperature, T^2 scaling), and DeiT's distillation-token loss."""

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


def cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy with integer labels (``label_smoothing`` eps: the target is
    ``(1 - eps) onehot + eps / C``) or with soft targets ``(B, C)`` such as mixup/cutmix give
    (``-sum_c target_c log softmax(z)_c``, averaged over the batch; smoothing is then already
    in the targets)."""
    if target.dim() == 2:
        if target.shape != logits.shape:
            raise ValueError(f"soft targets {tuple(target.shape)} must match the logits {tuple(logits.shape)}")
        return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)


def deit_token_loss(
    dist_logits: Tensor, teacher_logits: Tensor, mode: str = "hard", temperature: float = 1.0
) -> Tensor:
    """The loss on DeiT's distillation token (Touvron et al., ICML 2021).

    ``hard``: ``CE(z_dist, argmax z_teacher)``. ``soft``: ``T^2 KL(softmax(z_t / T) ||
    softmax(z_dist / T))`` summed over batch and classes and divided by their number
    ``B * C`` (DeiT's normalisation: C times smaller than Hinton's batch mean).
    """
    if mode == "hard":
        return F.cross_entropy(dist_logits, teacher_logits.argmax(dim=-1))
    if mode != "soft":
        raise ValueError(f"deit: mode={mode!r} is not allowed; use 'hard' or 'soft'")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    log_student = F.log_softmax(dist_logits / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction="sum", log_target=True) * temperature**2 / dist_logits.numel()
