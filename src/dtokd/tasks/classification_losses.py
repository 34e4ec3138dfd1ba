"""The classification task's loss types as records: for each type its options with their
defaults, what it needs (the teacher, the teacher's features, integer labels), and the function
that computes it. Adding a loss is a function, a record in :data:`LOSS_TYPES` and its tests; the
task (:class:`~dtokd.tasks.classification.ClassificationTask`) and the trainer read the record,
never the type's name.

Every compute function takes the loss's resolved spec and the step's :class:`LossInputs`:

- ``ce``: cross-entropy with the labels on ``output``, ``label_smoothing`` (soft targets from
  mixup/cutmix carry their smoothing themselves);
- ``kd``: Hinton's KD to the teacher's logits at ``temperature`` in the form ``divergence``
  (:func:`~dtokd.losses.kd.kd_loss`);
- ``dkd``: decoupled KD (``alpha``, ``beta``, ``temperature``), scaled by
  ``min(1, progress / warmup_epochs)`` (integer labels only);
- ``deit``: DeiT's distillation-token loss on ``output`` (``mode`` hard or soft);
- ``feature``: the task's projector for this loss between the student's and the teacher's tapped
  features (VkD's loss with the defaults).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from dtokd.losses.dkd import dkd_loss
from dtokd.losses.kd import KD_DIVERGENCES, cross_entropy, deit_token_loss, kd_loss
from dtokd.tasks.specs import LossType

OUTPUT_NAMES = ("logits", "dist")
"""The student's named outputs a logit loss applies to (``dist``: a DeiT distillation head)."""


@dataclass
class LossInputs:
    """What one step offers a loss: the student's named outputs, the labels (or soft targets), the
    teacher's logits (None without a teacher), the training progress in epochs (None: no warm-up),
    the tapped features by tap name, and the loss's projector (feature losses)."""

    name: str
    outputs: Mapping[str, Tensor]
    labels: Tensor
    teacher_logits: Tensor | None
    progress: float | None
    student_features: Mapping[str, Tensor] = field(default_factory=dict)
    teacher_features: Mapping[str, Tensor] = field(default_factory=dict)
    projector: nn.Module | None = None

    def teacher(self) -> Tensor:
        """The teacher's logits (a loss that needs them is refused without a teacher first)."""
        if self.teacher_logits is None:
            raise RuntimeError(f"loss {self.name!r} needs the teacher's logits, and this step has none")
        return self.teacher_logits


def _cross_entropy(spec: Mapping[str, Any], inputs: LossInputs) -> Tensor:
    return cross_entropy(inputs.outputs[spec["output"]], inputs.labels, spec["label_smoothing"])


def _kd(spec: Mapping[str, Any], inputs: LossInputs) -> Tensor:
    return kd_loss(inputs.outputs[spec["output"]], inputs.teacher(), spec["temperature"], spec["divergence"])


def _dkd(spec: Mapping[str, Any], inputs: LossInputs) -> Tensor:
    if inputs.labels.dim() != 1:
        raise ValueError(
            f"losses.{inputs.name}: dkd needs integer labels, but the batch has soft targets (mixup/cutmix); "
            "turn mixup off or use kd"
        )
    warmup, progress = spec["warmup_epochs"], inputs.progress
    ramp = 1.0 if (progress is None or warmup <= 0) else min(1.0, progress / warmup)
    z = inputs.outputs[spec["output"]]
    return ramp * dkd_loss(z, inputs.teacher(), inputs.labels, spec["alpha"], spec["beta"], spec["temperature"])


def _deit(spec: Mapping[str, Any], inputs: LossInputs) -> Tensor:
    return deit_token_loss(inputs.outputs[spec["output"]], inputs.teacher(), spec["mode"], spec["temperature"])


def _feature(spec: Mapping[str, Any], inputs: LossInputs) -> Tensor:
    if inputs.projector is None:
        raise RuntimeError(f"feature loss {inputs.name!r} has no projector")
    return inputs.projector(inputs.student_features[spec["student_tap"]], inputs.teacher_features[spec["teacher_tap"]])


def _check_divergence(name: str, spec: Mapping[str, Any]) -> None:
    if spec["divergence"] not in KD_DIVERGENCES:
        raise ValueError(
            f"losses.{name}.divergence={spec['divergence']!r} is not allowed; use one of {list(KD_DIVERGENCES)}"
        )


LOSS_TYPES: Mapping[str, LossType[LossInputs, Tensor]] = {
    "ce": LossType({"output": "logits", "label_smoothing": 0.0}, _cross_entropy, needs_teacher=False),
    "kd": LossType(
        {"output": "logits", "temperature": 4.0, "divergence": "forward_kl"},
        _kd,
        teacher_distribution=True,
        check=_check_divergence,
    ),
    "dkd": LossType(
        {"output": "logits", "alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": 20},
        _dkd,
        teacher_distribution=True,
    ),
    "deit": LossType({"output": "dist", "mode": "hard", "temperature": 1.0}, _deit),
    "feature": LossType(
        {
            "student_tap": "features",
            "teacher_tap": "features",
            "orthogonal": True,
            "teacher_norm": "layernorm",
            "distance": "smooth_l1",
        },
        _feature,
        teacher_features=True,
    ),
}
"""Every classification loss type by name."""
