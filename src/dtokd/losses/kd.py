"""Logit losses: cross-entropy (labels, label smoothing, soft targets), Hinton's KD (KL or
cross-entropy to the teacher with temperature, T^2 scaling), and DeiT's distillation-token loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

KD_DIVERGENCES = ("forward_kl", "forward_ce")
"""What :func:`kd_loss` measures between the teacher's and the student's softened distributions."""


def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0, divergence: str = "forward_kl"
) -> Tensor:
    """Hinton's KD (Hinton et al. 2015), averaged over the batch, with ``q = softmax(t / T)`` and
    ``p = softmax(s / T)``:

    - ``forward_kl``: ``T^2 KL(q || p)``, 0 when the student matches its teacher;
    - ``forward_ce``: ``T^2 H(q, p) = T^2 (KL(q || p) + H(q))``, the cross-entropy to the
      teacher: the same gradient, but a floor at the teacher's entropy instead of 0, as the
      task's cross-entropy has one at the labels' (what the amortized rule, which weighs log
      losses, needs: :mod:`dtokd.balancing.amortized`; the min-norm ``dto`` is better served by
      ``forward_kl``, see docs/methods.md, "Which to pick").

    The ``T^2`` keeps the gradient's scale independent of ``T``. Both are ``>= 0``: a rounding
    error below 0 (a student at its teacher) is returned as 0, with the gradient unchanged.
    """
    _check_temperature(temperature)
    if divergence not in KD_DIVERGENCES:
        raise ValueError(f"divergence={divergence!r} is not allowed; use one of {list(KD_DIVERGENCES)}")
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    if divergence == "forward_ce":
        return at_least_zero(-(log_teacher.exp() * log_student).sum(1).mean() * temperature**2)
    return at_least_zero(F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2)


def at_least_zero(loss: Tensor) -> Tensor:
    """``max(loss, 0)`` in value with ``loss``'s gradient: for a loss that is ``>= 0`` in exact
    arithmetic, whose rounding error may fall below 0 (a log-loss balancer refuses a negative
    loss). NaN stays NaN."""
    return loss + (loss.detach().clamp_min(0.0) - loss.detach())


def _check_temperature(temperature: float) -> None:
    """A positive finite number (a NumPy or one-element tensor scalar too); not a bool or a string."""
    try:
        value = math.nan if isinstance(temperature, (bool, str)) else float(temperature)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature={temperature!r} is not allowed; it must be a positive finite number")


def _teacher_checked(loss: Tensor, teacher_logits: Tensor) -> Tensor:
    """``loss``, or NaN where a teacher logit is NaN or +inf (a teacher run in half precision that
    overflowed): a loss whose target does not exist must not look finite. Decided on the device."""
    broken = torch.isnan(teacher_logits).any() | torch.isposinf(teacher_logits).any()
    return torch.where(broken, torch.full_like(loss, math.nan), loss)


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
    if mode == "hard":  # argmax would hide a NaN teacher logit
        return _teacher_checked(F.cross_entropy(dist_logits, teacher_logits.argmax(dim=-1)), teacher_logits)
    if mode != "soft":
        raise ValueError(f"deit: mode={mode!r} is not allowed; use 'hard' or 'soft'")
    _check_temperature(temperature)
    log_student = F.log_softmax(dist_logits / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, reduction="sum", log_target=True)
    return at_least_zero(kl * temperature**2 / dist_logits.numel())
