"""The detection task's loss types as records (:class:`~dtokd.tasks.specs.LossType`): for each
type its options with their defaults, what it needs, the objectives a spec gives (a detection
loss may give several: one per loss kind, per loss-dict entry or per FPN level) and the function
that computes them from the step's :class:`DetectionLossInputs`, ``{objective: loss}``. Adding a
loss is two functions, a record in :data:`LOSS_TYPES` and its tests; the task
(:class:`~dtokd.tasks.detection.DetectionTask`) reads the record, never the type's name.

- ``detector``: the student's own losses; ``terms``: ``sum`` (one objective, the detector's
  usual total), ``kind`` (one per kind: ``<name>/cls``, ``<name>/box``, ``<name>/obj``), or
  ``each`` (one per loss-dict entry, ``<name>/<key>``);
- ``fpn``: feature imitation at the FPN levels through the loss's per-level projectors;
  ``per_level``: one objective per level (``<name>/<level>``), else their mean as one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from dtokd.losses.feature import TEACHER_NORMS
from dtokd.models.detection import TERM_KINDS
from dtokd.tasks.specs import LossType

TERM_GROUPINGS = ("sum", "kind", "each")


@dataclass
class DetectionLossInputs:
    """What one step (or, for the objectives' names, the built task) offers a loss: the loss's
    name, the student detector's loss-dict keys in order and its loss dict, the student's FPN
    levels and the teacher's by name, and for an ``fpn`` loss its student level -> teacher level
    pairs and its projector per student level."""

    name: str
    term_names: Sequence[str]
    terms: Mapping[str, Tensor] = field(default_factory=dict)
    levels: Mapping[str, Tensor] = field(default_factory=dict)
    teacher_levels: Mapping[str, Tensor] = field(default_factory=dict)
    pairs: Mapping[str, str] = field(default_factory=dict)
    projectors: Mapping[str, nn.Module] = field(default_factory=dict)


def term_groups(spec: Mapping[str, Any], term_names: Sequence[str]) -> dict[str, list[str]]:
    """The loss-dict keys each objective of a ``detector`` loss sums: all in one (``sum``), by
    kind (``kind``: ``cls``, ``box``, ``obj``), or each alone (``each``)."""
    if spec["terms"] == "sum":
        return {"": list(term_names)}
    if spec["terms"] == "each":
        return {term: [term] for term in term_names}
    groups: dict[str, list[str]] = {}
    for term in term_names:
        groups.setdefault(TERM_KINDS[term], []).append(term)
    return groups


def _objective(name: str, part: str) -> str:
    return f"{name}/{part}" if part else name


def _detector_objectives(spec: Mapping[str, Any], inputs: DetectionLossInputs) -> list[str]:
    return [_objective(inputs.name, group) for group in term_groups(spec, inputs.term_names)]


def _detector(spec: Mapping[str, Any], inputs: DetectionLossInputs) -> dict[str, Tensor]:
    groups = term_groups(spec, inputs.term_names)
    return {
        _objective(inputs.name, g): cast(Tensor, sum(inputs.terms[t] for t in members)) for g, members in groups.items()
    }


def _fpn_objectives(spec: Mapping[str, Any], inputs: DetectionLossInputs) -> list[str]:
    return [f"{inputs.name}/{level}" for level in inputs.pairs] if spec["per_level"] else [inputs.name]


def _fpn(spec: Mapping[str, Any], inputs: DetectionLossInputs) -> dict[str, Tensor]:
    per_level = {
        f"{inputs.name}/{s}": inputs.projectors[s](inputs.levels[s], inputs.teacher_levels[t])
        for s, t in inputs.pairs.items()
    }
    return per_level if spec["per_level"] else {inputs.name: torch.stack(list(per_level.values())).mean()}


def _check_detector(name: str, spec: Mapping[str, Any]) -> None:
    if spec["terms"] not in TERM_GROUPINGS:
        raise ValueError(f"losses.{name}.terms={spec['terms']!r} is not allowed; use one of {list(TERM_GROUPINGS)}")


def _check_fpn(name: str, spec: Mapping[str, Any]) -> None:
    if spec["norm"] not in TEACHER_NORMS:
        raise ValueError(f"losses.{name}.norm={spec['norm']!r} is not allowed; use one of {list(TEACHER_NORMS)}")
    if spec["distance"] not in ("mse", "smooth_l1"):
        raise ValueError(f"losses.{name}.distance={spec['distance']!r} is not allowed; use 'mse' or 'smooth_l1'")


LOSS_TYPES: Mapping[str, LossType[DetectionLossInputs, dict[str, Tensor]]] = {
    "detector": LossType(
        {"terms": "sum"}, _detector, needs_teacher=False, check=_check_detector, objectives=_detector_objectives
    ),
    "fpn": LossType(
        {
            "norm": "layernorm",
            "distance": "mse",
            "projector": True,
            "orthogonal": True,
            "per_level": True,
            "levels": None,
        },
        _fpn,
        teacher_features=True,
        check=_check_fpn,
        objectives=_fpn_objectives,
    ),
}
"""Every detection loss type by name."""
