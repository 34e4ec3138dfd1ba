"""The detection task: a torchvision detector's loss dict and FPN feature distillation as named
objectives, and box AP by the official COCO evaluation.

A batch is a list of images (each ``(3, H, W)`` in [0, 1], sizes may differ) and a list of
targets (see :mod:`dtokd.data.coco`). The student detector in training mode resizes,
normalises and pads them into one tensor, runs its backbone (with FPN) and returns its loss
dict; the teacher's backbone runs on that same padded tensor (re-normalised exactly if the two
detectors normalise differently), so every FPN level of the student has a teacher level of the
same spatial size to imitate.

**Loss specs** (one per name, ``type`` plus options; the objectives the balancer gets are named
from them): the types ``detector`` (the student's own losses, grouped by ``terms``) and ``fpn``,
their options, defaults, objectives and what each needs, are records in
:mod:`dtokd.tasks.detection_losses`; the task reads them, never a type's name. ``fpn`` is
feature imitation at every FPN level through a per-level projector (a linear map over channels,
orthogonal by default, as VkD; see :class:`~dtokd.losses.feature.FeatureProjector`;
``projector: false`` compares the student's levels themselves, as PKD does); ``norm``:
``layernorm`` (VkD's teacher normalisation), ``pearson`` (PKD's standardisation of both sides),
``standardize`` or ``none``; ``distance`` ``mse`` (default) or ``smooth_l1``; ``per_level``
(True: one objective per level, ``<name>/<level>``; False: their mean as one); ``levels``: the
student levels to use (default all). Student levels are paired with the teacher level of the
same spatial size (the first such, by the teacher's order).

Head distillation (teacher logits on proposals or dense predictions) is not implemented.

``representation`` for the balancer's representation engine: the tuple of the student's FPN
levels, which every objective depends on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from dtokd.losses.feature import FeatureProjector
from dtokd.models.detection import loss_terms
from dtokd.models.foreign import Renormalize
from dtokd.tasks.coco_eval import coco_box_ap, detections_to_coco
from dtokd.tasks.detection_losses import LOSS_TYPES, DetectionLossInputs
from dtokd.tasks.specs import losses_where, refuse_without_teacher, resolve_specs
from dtokd.tasks.teacher import Teacher

PROBE_SIZE = 256


def resolve_detection_specs(specs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Fill in defaults and reject unknown types or options, naming them; at least one loss
    must be the student's own (a type that needs no teacher)."""
    resolved = resolve_specs(specs, LOSS_TYPES, "detection", "{det: {type: detector}}")
    if not losses_where(resolved, LOSS_TYPES, lambda record: not record.needs_teacher):
        raise ValueError("task 'detection' needs a loss of type 'detector' (the student's own losses)")
    return resolved


class DetectionTask(nn.Module):
    """``forward(images, targets, progress) -> (FPN levels, {objective: loss})``."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, specs: Mapping[str, Mapping[str, Any]]) -> None:
        super().__init__()
        self.student = student
        self.teacher = Teacher(teacher) if teacher is not None else None  # not a submodule (tasks.teacher)
        self.specs = resolve_detection_specs(specs)
        self.terms = loss_terms(student)
        refuse_without_teacher(self.specs, LOSS_TYPES, teacher)
        self.teacher_input = _renormalize(student, teacher) if teacher is not None else nn.Identity()
        student_shapes = _level_shapes(student)
        teacher_shapes = _level_shapes(teacher) if teacher is not None else {}
        self.projectors = nn.ModuleDict()
        self.pairs: dict[str, dict[str, str]] = {}  # fpn loss -> {student level: teacher level}
        for name in losses_where(self.specs, LOSS_TYPES, lambda record: record.teacher_features):
            spec = self.specs[name]
            levels = spec["levels"] or list(student_shapes)
            unknown = [level for level in levels if level not in student_shapes]
            if unknown:
                raise ValueError(
                    f"losses.{name}.levels: {unknown} are not levels of the student's FPN {list(student_shapes)}"
                )
            self.pairs[name] = {}
            for level in levels:
                size = student_shapes[level][1:]
                match = next((t for t, shape in teacher_shapes.items() if shape[1:] == size), None)
                if match is None:
                    raise ValueError(
                        f"losses.{name}: student FPN level {level!r} (spatial size {size} at "
                        f"{PROBE_SIZE} px) has no teacher level of that size; teacher levels: "
                        f"{ {t: s[1:] for t, s in teacher_shapes.items()} }"
                    )
                self.pairs[name][level] = match
                self.projectors[f"{name}__{level}"] = FeatureProjector(
                    student_shapes[level][0],
                    teacher_shapes[match][0],
                    spatial=True,
                    orthogonal_weight=spec["orthogonal"],
                    teacher_norm=spec["norm"],
                    distance=spec["distance"],
                    learned=spec["projector"],
                )
        self._captured: dict[str, Any] = {}
        captured = self._captured

        def capture(module: nn.Module, inputs: tuple[Tensor, ...], output: dict[str, Tensor]) -> None:
            # a plain function, not a bound method: a deep copy of the student (EMA) shares it
            captured.update(input=inputs[0], levels=output)

        _backbone(student).register_forward_hook(capture)
        self._last_teacher: dict[str, Tensor] = {}

    @property
    def loss_names(self) -> list[str]:
        """The objectives, in order: what the balancer balances."""
        names = []
        for name, spec in self.specs.items():
            record = LOSS_TYPES[spec["type"]]
            names += record.objectives(spec, self._inputs(name)) if record.objectives else [name]
        return names

    def _inputs(self, name: str, **step: Any) -> DetectionLossInputs:
        """What loss ``name`` is given: the task's own facts, and ``step``'s tensors."""
        projectors = {level: self.projectors[f"{name}__{level}"] for level in self.pairs.get(name, {})}
        return DetectionLossInputs(name, self.terms, pairs=self.pairs.get(name, {}), projectors=projectors, **step)

    def forward(
        self,
        images: list[Tensor],
        targets: list[dict[str, Any]],
        progress: float | None = None,
        *,
        reuse_teacher: bool = False,
    ) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
        """``progress`` is unused (no warm-up here); ``reuse_teacher=True`` takes the teacher's
        features of the previous call (same batch)."""
        terms = self.student(images, targets)
        levels: dict[str, Tensor] = self._captured["levels"]
        if not reuse_teacher:
            self._last_teacher = {}
            if self.pairs and self.teacher is not None and self.teacher.model is not None:  # pairs need one
                backbone = _backbone(self.teacher.model)
                self._last_teacher = dict(self.teacher.run(backbone, self.teacher_input(self._captured["input"])))
        losses: dict[str, Tensor] = {}
        for name, spec in self.specs.items():
            inputs = self._inputs(name, terms=terms, levels=levels, teacher_levels=self._last_teacher)
            losses.update(LOSS_TYPES[spec["type"]].compute(spec, inputs))
        return tuple(levels.values()), losses

    def evaluate(
        self, model: nn.Module, dataset: Any, batch_size: int, device: torch.device, *, channels_last: bool = False
    ) -> dict[str, float]:
        """Box AP of ``model`` (the student, or the teacher) on ``dataset``."""
        return evaluate_detector(model, dataset, batch_size, device)


@torch.no_grad()
def evaluate_detector(model: nn.Module, dataset: Any, batch_size: int, device: torch.device) -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl (percent) of the model's detections on ``dataset`` (a
    :class:`~dtokd.data.coco.CocoDetectionSet`), by the official COCO evaluation."""
    if dataset is None or len(dataset) == 0:
        return {}
    was_training = model.training
    model.eval()
    results: list[dict] = []
    for images, targets in dataset.eval_batches(batch_size):
        outputs = model([image.to(device, non_blocking=True) for image in images])
        for output, target in zip(outputs, targets):
            results += detections_to_coco(
                target["image_id"],
                output["boxes"].float().cpu(),
                output["scores"].float().cpu(),
                output["labels"].cpu(),
                dataset.category_ids,
            )
    model.train(was_training)
    return coco_box_ap(dataset.coco, results, dataset.image_ids)


@torch.no_grad()
def _level_shapes(detector: nn.Module) -> dict[str, tuple[int, int, int]]:
    """(channels, height, width) of each FPN level for a square ``PROBE_SIZE`` input."""
    backbone = _backbone(detector)
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    levels = backbone(torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE, device=device))
    backbone.train(was_training)
    return {name: tuple(f.shape[1:]) for name, f in levels.items()}


def _backbone(detector: nn.Module) -> nn.Module:
    """A torchvision detector's feature extractor (its ``backbone``: body and FPN)."""
    return cast(nn.Module, detector.backbone)


def _renormalize(student: Any, teacher: Any) -> nn.Module:
    """The map from the student's input normalisation to the teacher's (identity when equal);
    ``student`` and ``teacher`` are torchvision detectors (``transform.image_mean`` / ``image_std``)."""
    own = (tuple(student.transform.image_mean), tuple(student.transform.image_std))
    theirs = (tuple(teacher.transform.image_mean), tuple(teacher.transform.image_std))
    return nn.Identity() if own == theirs else Renormalize(own, theirs)
