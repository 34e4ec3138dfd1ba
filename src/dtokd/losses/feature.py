"""Feature distillation through a learned projector (in the style of VkD, Miles et al. CVPR 2024).

The student feature ``f_s`` (B, C_s[, H, W]) is mapped to the teacher's width by a projector:
a linear map over channels (for maps: at every position, a 1x1 convolution);
``orthogonal=True`` constrains its (C_t, C_s) weight to orthonormal rows or columns
(``torch.nn.utils.parametrizations.orthogonal`` with the matrix-exponential map, which stays
orthogonal under any optimizer step, weight decay included), as VkD does. The
teacher feature is normalised without learned parameters (``"layernorm"`` over channels, or
``"standardize"`` per channel over the batch, or ``"none"``). Then
``loss = smooth_l1(P(f_s), norm(f_t))`` (or MSE). ``"pearson"`` (PKD, Cao et al. NeurIPS 2022,
for detector feature maps, as mmrazor computes it) standardises *both* sides per channel over
the batch and the positions (unbiased std, + 1e-6), ``loss = mse(z(P(f_s)), z(f_t)) / 2`` with
``distance="mse"``: ``(n - 1) / n`` times one minus the channels' mean Pearson correlation, n
the batch size times the positions (under ``torchrun``, each rank's own batch, as in PKD).
Spatial sizes must match. ``learned=False`` compares the student's feature itself (no
projector; equal widths), as PKD does.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

TEACHER_NORMS = ("layernorm", "standardize", "pearson", "none")


def _standardize_maps(x: Tensor) -> Tensor:
    """Each channel to zero mean and unit (unbiased) variance over the batch and positions."""
    mean = x.mean((0, 2, 3), keepdim=True)
    std = x.std((0, 2, 3), keepdim=True)
    return (x - mean) / (std + 1e-6)


class FeatureProjector(nn.Module):
    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        *,
        spatial: bool,
        orthogonal_weight: bool = True,
        teacher_norm: Literal["layernorm", "standardize", "pearson", "none"] = "layernorm",
        distance: Literal["smooth_l1", "mse"] = "smooth_l1",
        learned: bool = True,
    ) -> None:
        super().__init__()
        if not learned and student_channels != teacher_channels:
            raise ValueError(
                f"a feature loss without a projector needs equal widths; the student feature has "
                f"{student_channels} channels, the teacher's {teacher_channels}"
            )
        if teacher_norm not in TEACHER_NORMS:
            raise ValueError(f"teacher_norm={teacher_norm!r} is not allowed; use one of {list(TEACHER_NORMS)}")
        if teacher_norm == "pearson" and not spatial:
            raise ValueError(
                "teacher_norm='pearson' standardises feature maps over positions; it needs spatial features"
            )
        if distance not in ("smooth_l1", "mse"):
            raise ValueError(f"distance={distance!r} is not allowed; use 'smooth_l1' or 'mse'")
        self.spatial = spatial
        self.proj: nn.Module = nn.Linear(student_channels, teacher_channels, bias=False)  # over channels, maps too
        if not learned:
            self.proj = nn.Identity()  # the student's feature itself (PKD's setting)
        elif orthogonal_weight:
            # not the default Householder map for non-square weights: it multiplies by the integer part of
            # the parameter's diagonal, so weight decay turns the weight into 0 after one step
            orthogonal(self.proj, "weight", orthogonal_map="matrix_exp")
        self.teacher_norm, self.distance = teacher_norm, distance

    def normalise(self, teacher: Tensor) -> Tensor:
        if self.teacher_norm == "none":
            return teacher
        channel_last = teacher.movedim(1, -1)
        if self.teacher_norm == "layernorm":
            return F.layer_norm(channel_last, channel_last.shape[-1:]).movedim(-1, 1)
        if self.teacher_norm == "pearson":
            return _standardize_maps(teacher)
        dims = [d for d in range(teacher.dim()) if d != 1]
        return (teacher - teacher.mean(dims, keepdim=True)) / teacher.std(dims, keepdim=True).clamp_min(1e-6)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        projected = self.proj(student.movedim(1, -1)).movedim(-1, 1) if self.spatial else self.proj(student)
        if projected.shape != teacher.shape:
            raise ValueError(
                f"projected student feature {tuple(projected.shape)} does not match "
                f"teacher feature {tuple(teacher.shape)}"
            )
        target = self.normalise(teacher.detach())
        if self.teacher_norm == "pearson":
            return (
                F.mse_loss(_standardize_maps(projected), target) / 2
                if self.distance == "mse"
                else F.smooth_l1_loss(_standardize_maps(projected), target)
            )
        if self.distance == "mse":
            return F.mse_loss(projected, target)
        return F.smooth_l1_loss(projected, target)


def feature_shape(model: nn.Module, tap: str, sample: Tensor) -> torch.Size:
    """The shape of the tapped feature for one sample batch (used to size projectors)."""
    from dtokd.models.taps import FeatureTaps

    taps = FeatureTaps(model, [tap])
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(sample)
        model.train(was_training)
        return taps.features[tap].shape
    finally:
        taps.close()
