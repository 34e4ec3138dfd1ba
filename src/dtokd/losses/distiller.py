"""A distiller: student + frozen teacher + loss specs -> a dict of named losses per batch.

Loss specs (one per name, ``type`` plus options; the order given is kept, so list the
distillation loss before the task loss to get ``conflict = cos(g_distill, g_task)``):

- ``ce``: cross-entropy with the labels;
- ``kd``: Hinton's KD, option ``temperature`` (default 4);
- ``dkd``: decoupled KD, options ``alpha`` 1, ``beta`` 8, ``temperature`` 4, ``warmup_epochs`` 20
  (the loss is scaled by ``min(1, progress / warmup_epochs)``, ``progress`` counting epochs
  including the current step, a per-step version of the DKD paper's linear warm-up; a
  fractional ``warmup_epochs`` is allowed for short schedules);
- ``feature``: projector feature loss, options ``student_tap`` and ``teacher_tap`` (submodule
  names, or ``"features"`` for the pooled feature before the head), ``orthogonal`` (True),
  ``teacher_norm`` (``"layernorm"``), ``distance`` (``"smooth_l1"``).

The projectors are submodules of the distiller and are trained with the student. A teacher
trained with another input normalisation than the student's gets ``teacher_input`` (a
:class:`~dtokd.models.foreign.Renormalize`) applied to the batch before it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dtokd.losses.dkd import dkd_loss
from dtokd.losses.feature import FeatureProjector, feature_shape
from dtokd.losses.kd import kd_loss
from dtokd.models.taps import FeatureTaps

LOSS_OPTIONS: dict[str, dict[str, Any]] = {
    "ce": {},
    "kd": {"temperature": 4.0},
    "dkd": {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": 20},
    "feature": {"student_tap": "features", "teacher_tap": "features", "orthogonal": True,
                "teacher_norm": "layernorm", "distance": "smooth_l1"},
}


def resolve_loss_specs(specs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Fill in defaults and reject unknown types or options, naming them."""
    if not specs:
        raise ValueError("losses is empty: give at least one loss, e.g. {task: {type: ce}}")
    resolved = {}
    for name, spec in specs.items():
        kind = spec.get("type")
        if kind not in LOSS_OPTIONS:
            raise ValueError(f"losses.{name}.type={kind!r} is not allowed; use one of {sorted(LOSS_OPTIONS)}")
        unknown = sorted(set(spec) - {"type"} - set(LOSS_OPTIONS[kind]))
        if unknown:
            raise ValueError(f"losses.{name}: unknown option(s) {unknown} for type {kind!r}; allowed: {sorted(LOSS_OPTIONS[kind])}")
        resolved[name] = {"type": kind, **LOSS_OPTIONS[kind], **{k: v for k, v in spec.items() if k != "type"}}
    return resolved


class Distiller(nn.Module):
    """``forward(x, y, progress) -> (student logits, {name: loss})``."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, specs: Mapping[str, Mapping[str, Any]],
                 sample: Tensor, teacher_input: nn.Module | None = None) -> None:
        super().__init__()
        self.student = student
        self.teacher = [teacher]  # a list keeps the frozen teacher out of parameters() and state_dict()
        self.teacher_input = teacher_input if teacher_input is not None else nn.Identity()
        self.specs = resolve_loss_specs(specs)
        needs_teacher = [n for n, s in self.specs.items() if s["type"] != "ce"]
        if needs_teacher and teacher is None:
            raise ValueError(f"loss(es) {needs_teacher} need a teacher, but none is configured (teacher.name)")
        self.projectors = nn.ModuleDict()
        student_taps, teacher_taps = [], []
        for name, spec in self.specs.items():
            if spec["type"] != "feature":
                continue
            s_shape = feature_shape(student, spec["student_tap"], sample)
            t_shape = feature_shape(teacher, spec["teacher_tap"], self.teacher_input(sample))
            if s_shape[2:] != t_shape[2:]:
                raise ValueError(f"losses.{name}: student feature {tuple(s_shape)} and teacher feature "
                                 f"{tuple(t_shape)} differ in spatial size; tap layers of equal resolution")
            self.projectors[name] = FeatureProjector(
                s_shape[1], t_shape[1], spatial=len(s_shape) == 4, orthogonal_weight=spec["orthogonal"],
                teacher_norm=spec["teacher_norm"], distance=spec["distance"],
            )
            student_taps.append(spec["student_tap"])
            teacher_taps.append(spec["teacher_tap"])
        self.student_taps = FeatureTaps(student, sorted(set(student_taps)))
        self.teacher_taps = FeatureTaps(teacher, sorted(set(teacher_taps))) if teacher is not None else None

    def forward(self, x: Tensor, y: Tensor, progress: float | None = None, *,
                reuse_teacher: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """``progress``: epochs of training done, counting this step (2.5 = halfway through the
        third epoch); only warm-ups use it, and ``None`` means warm-up is over. ``reuse_teacher=True`` takes the teacher's outputs of
        the previous call (same batch), e.g. to re-evaluate the losses after an optimizer step
        without a second teacher pass."""
        teacher = self.teacher[0]
        if reuse_teacher:
            teacher_logits, teacher_features = self._last_teacher
        else:
            teacher_logits, teacher_features = None, {}
            if teacher is not None and len(self.specs) > sum(s["type"] == "ce" for s in self.specs.values()):
                with torch.no_grad():
                    teacher_logits = teacher(self.teacher_input(x))
                teacher_features = dict(self.teacher_taps.features) if self.teacher_taps is not None else {}
            self._last_teacher = (teacher_logits, teacher_features)
        logits = self.student(x)
        losses: dict[str, Tensor] = {}
        for name, spec in self.specs.items():
            kind = spec["type"]
            if kind == "ce":
                losses[name] = F.cross_entropy(logits, y)
            elif kind == "kd":
                losses[name] = kd_loss(logits, teacher_logits, spec["temperature"])
            elif kind == "dkd":
                warmup = spec["warmup_epochs"]
                ramp = 1.0 if (progress is None or warmup <= 0) else min(1.0, progress / warmup)
                losses[name] = ramp * dkd_loss(logits, teacher_logits, y, spec["alpha"], spec["beta"], spec["temperature"])
            else:
                losses[name] = self.projectors[name](
                    self.student_taps.features[spec["student_tap"]], teacher_features[spec["teacher_tap"]]
                )
        return logits, losses
