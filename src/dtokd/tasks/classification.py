"""The classification task: how a batch of images and labels becomes named losses, and how a
classifier is evaluated. The trainer talks to a task only through ``forward`` (a batch -> the
representation for the balancer and ``{name: loss}``) and ``evaluate`` (a model and a split ->
metrics), so a student with one head and a ViT with a distillation token train through the
same loop.

**Student outputs.** A student returns a logits tensor (named ``logits``), or, for a model with
a distillation token (timm's ``deit_*_distilled_*``, switched to distilled training when a loss
uses its second head), the pair (class head, distillation head), named ``logits`` and
``dist``. Every logit loss says which output it applies to (``output``).

**Loss specs** (one per name, ``type`` plus options; the order given is kept, so list the
distillation loss before the task loss to get ``conflict = cos(g_distill, g_task)``): the types
``ce``, ``kd``, ``dkd``, ``deit`` and ``feature``, their options, defaults and what each needs,
are records in :mod:`dtokd.tasks.classification_losses`; the task reads them, never a type's
name.

The projectors are submodules of the task and train with the student. A teacher trained with
another input normalisation than the student's gets ``teacher_input`` (a
:class:`~dtokd.models.foreign.Renormalize`) applied to the batch before it.

**Evaluation** (:func:`evaluate_classifier`): top-1, top-5 and cross-entropy of the prediction;
for a two-head student the prediction is the average of the heads' logits (DeiT's rule), and
each head is also reported (``cls_top1``, ``dist_top1``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dtokd.data import eval_loader, to_device
from dtokd.losses.feature import FeatureProjector, feature_shape
from dtokd.models.taps import FeatureTaps
from dtokd.tasks.classification_losses import LOSS_TYPES, OUTPUT_NAMES, LossInputs
from dtokd.tasks.specs import losses_where, refuse_without_teacher, resolve_specs
from dtokd.tasks.teacher import Teacher


def resolve_loss_specs(specs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Fill in defaults and reject unknown types or options, naming them."""
    resolved = resolve_specs(specs, LOSS_TYPES, "classification", "{task: {type: ce}}")
    for name, spec in resolved.items():
        output = spec.get("output")
        if output is not None and output not in OUTPUT_NAMES:
            raise ValueError(f"losses.{name}.output={output!r} is not allowed; use one of {list(OUTPUT_NAMES)}")
    return resolved


def has_distillation_head(model: nn.Module) -> bool:
    """A model with a distillation token and head (timm's ``VisionTransformerDistilled``)."""
    return hasattr(model, "set_distilled_training") and hasattr(model, "head_dist")


class ClassificationTask(nn.Module):
    """``forward(x, y, progress) -> (representation, {name: loss})``.

    ``representation``: what the balancer's representation engine differentiates at: the
    student's outputs (``"outputs"``, default: the logits, or both heads), or the output of a
    named student submodule (e.g. ``"norm"``, a ViT's final norm, which every loss of the
    three-objective recipe depends on).
    """

    _last_teacher: tuple[Tensor | None, dict[str, Tensor]]
    """The teacher's logits and features of the last call that computed them."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        specs: Mapping[str, Mapping[str, Any]],
        sample: Tensor,
        teacher_input: nn.Module | None = None,
        representation: str = "outputs",
    ) -> None:
        super().__init__()
        self.student = student
        self.teacher = Teacher(teacher) if teacher is not None else None  # not a submodule (tasks.teacher)
        self.teacher_input = teacher_input if teacher_input is not None else nn.Identity()
        self.specs = resolve_loss_specs(specs)
        refuse_without_teacher(self.specs, LOSS_TYPES, teacher)
        uses_dist = [n for n, s in self.specs.items() if s.get("output") == "dist"]
        self.two_heads = bool(uses_dist)
        if uses_dist:
            if not has_distillation_head(student):
                raise ValueError(
                    f"loss(es) {uses_dist} use the 'dist' output, but student {type(student).__name__} "
                    "has no distillation token (use e.g. timm:deit_tiny_distilled_patch16_224)"
                )
            cast(Any, student).set_distilled_training(True)  # timm's distilled ViTs
        self.projectors = nn.ModuleDict()
        student_taps, teacher_taps = [], []
        for name, spec in self.specs.items():
            if not LOSS_TYPES[spec["type"]].teacher_features:
                continue
            assert teacher is not None  # a feature loss needs the teacher: refused above without one
            s_shape = feature_shape(student, spec["student_tap"], sample)
            t_shape = feature_shape(teacher, spec["teacher_tap"], self.teacher_input(sample))
            if s_shape[2:] != t_shape[2:]:
                raise ValueError(
                    f"losses.{name}: student feature {tuple(s_shape)} and teacher feature "
                    f"{tuple(t_shape)} differ in spatial size; tap layers of equal resolution"
                )
            self.projectors[name] = FeatureProjector(
                s_shape[1],
                t_shape[1],
                spatial=len(s_shape) == 4,
                orthogonal_weight=spec["orthogonal"],
                teacher_norm=spec["teacher_norm"],
                distance=spec["distance"],
            )
            student_taps.append(spec["student_tap"])
            teacher_taps.append(spec["teacher_tap"])
        self.representation = representation
        if representation != "outputs":
            student_taps.append(representation)
        self.student_taps = FeatureTaps(student, sorted(set(student_taps)))
        self.teacher_taps = FeatureTaps(teacher, sorted(set(teacher_taps))) if teacher is not None else None

    @property
    def teacher_feature_losses(self) -> list[str]:
        """The losses that tap the teacher's features (its calls cannot then be replaced by cached logits)."""
        return losses_where(self.specs, LOSS_TYPES, lambda record: record.teacher_features)

    def use_teacher(self, call: Any) -> None:
        """Take the teacher's logits from ``call(x)`` in training from now on (a
        :class:`~dtokd.train.teacher_cache.CachedTeacher`); the task needs no teacher features."""
        if self.teacher_feature_losses:
            raise ValueError("the teacher's features are tapped by a feature loss; its calls cannot be replaced")
        assert self.teacher is not None  # the pipeline caches a teacher it has
        self.teacher.replace(call)

    @property
    def loss_names(self) -> list[str]:
        """The objectives, in order: what the balancer balances."""
        return list(self.specs)

    def outputs(self, x: Tensor) -> dict[str, Tensor]:
        """The student's named outputs for a batch (``logits``, and ``dist`` for two heads)."""
        out = self.student(x)
        if isinstance(out, (tuple, list)):
            return {"logits": out[0], "dist": out[1]}
        return {"logits": out}

    def forward(
        self, x: Tensor, y: Tensor, progress: float | None = None, *, reuse_teacher: bool = False
    ) -> tuple[Tensor | tuple[Tensor, ...], dict[str, Tensor]]:
        """``y``: integer labels, or soft targets ``(B, C)`` (mixup/cutmix). ``progress``:
        epochs of training done, counting this step (2.5 = halfway through the third epoch);
        only warm-ups use it, and ``None`` means warm-up is over. ``reuse_teacher=True`` takes
        the teacher's outputs of the previous call (same batch), e.g. to re-evaluate the
        losses after an optimizer step without a second teacher pass."""
        if reuse_teacher:
            teacher_logits, teacher_features = self._last_teacher
        else:
            teacher_logits, teacher_features = None, {}
            if self.teacher is not None and losses_where(self.specs, LOSS_TYPES, lambda record: record.needs_teacher):
                teacher_logits = self.teacher(self.teacher_input(x))
                teacher_features = dict(self.teacher_taps.features) if self.teacher_taps is not None else {}
            self._last_teacher = (teacher_logits, teacher_features)
        outputs = self.outputs(x)
        losses: dict[str, Tensor] = {}
        for name, spec in self.specs.items():
            inputs = LossInputs(
                name,
                outputs,
                y,
                teacher_logits,
                progress,
                self.student_taps.features,
                teacher_features,
                self.projectors[name] if name in self.projectors else None,
            )
            losses[name] = LOSS_TYPES[spec["type"]].compute(spec, inputs)
        if self.representation != "outputs":
            return self.student_taps.features[self.representation], losses
        return (outputs["logits"], outputs["dist"]) if self.two_heads else outputs["logits"], losses

    def evaluate(
        self, model: nn.Module, dataset: Any, batch_size: int, device: torch.device, *, channels_last: bool = False
    ) -> dict[str, float]:
        """Metrics of ``model`` (the student, or the teacher) on ``dataset``."""
        return evaluate_classifier(model, dataset, batch_size, device, channels_last=channels_last)


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, dataset: Any, batch_size: int, device: torch.device, *, channels_last: bool = False
) -> dict[str, float]:
    """Top-1, top-5 (top-k with k = min(5, classes)) in percent, and mean cross-entropy, of the
    model's prediction; for a model with a distillation head in distilled training, the
    prediction is the mean of its two heads' logits and each head is reported too
    (``cls_top1``, ``dist_top1``, ...). Sums stay on ``device``; one read at the end."""
    if dataset is None or len(dataset) == 0:
        return {}
    was_training = model.training
    model.eval()
    heads = (
        ("", "cls_", "dist_") if has_distillation_head(model) and getattr(model, "distilled_training", False) else ("",)
    )
    sums = torch.zeros(len(heads), 3, dtype=torch.float64, device=device)  # cross-entropy, top-1 hits, top-k hits
    n = 0
    for x, y in eval_loader(dataset, batch_size):
        x, y = to_device(x, device, channels_last), to_device(y, device)
        predictions = _head_logits(model, x) if len(heads) > 1 else [model(x)]
        for k, logits in enumerate(predictions):
            logits = logits.float()
            top = logits.topk(min(5, logits.shape[1]), 1).indices
            sums[k] += torch.stack(
                [F.cross_entropy(logits, y, reduction="sum"), (top[:, 0] == y).sum(), (top == y[:, None]).any(1).sum()]
            ).to(torch.float64)
        n += y.shape[0]
    model.train(was_training)
    result = {}
    for prefix, (loss_sum, correct1, correct5) in zip(heads, sums.tolist()):
        result.update(
            {
                f"{prefix}top1": 100.0 * correct1 / n,
                f"{prefix}top5": 100.0 * correct5 / n,
                f"{prefix}loss": loss_sum / n,
            }
        )
    return result


def _head_logits(model: Any, x: Tensor) -> list[Tensor]:
    """(average, class head, distillation head) logits of a DeiT-style model in eval mode (timm's
    ``forward_features``, ``head``, ``head_dist``): the average is what the model itself predicts there."""
    tokens = model.forward_features(x)
    cls, dist = model.head(tokens[:, 0]), model.head_dist(tokens[:, 1])
    return [(cls + dist) / 2, cls, dist]
