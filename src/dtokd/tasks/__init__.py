"""Tasks: how a batch becomes named losses and how a model is evaluated (the one seam between
the trainer and what is being distilled): classification (:mod:`.classification`),
detection (:mod:`.detection`) and causal language models (:mod:`.causal_lm`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from dtokd.data.bundle import DETECTION_DATASETS
from dtokd.tasks.causal_lm import CausalLMTask, check_lm_representation, evaluate_causal_lm, resolve_lm_specs
from dtokd.tasks.causal_lm_losses import LOSS_TYPES as CAUSAL_LM_LOSS_TYPES
from dtokd.tasks.classification import (
    ClassificationTask,
    evaluate_classifier,
    has_distillation_head,
    resolve_loss_specs,
)
from dtokd.tasks.classification_losses import LOSS_TYPES as CLASSIFICATION_LOSS_TYPES
from dtokd.tasks.detection import DetectionTask, evaluate_detector, resolve_detection_specs
from dtokd.tasks.detection_losses import LOSS_TYPES as DETECTION_LOSS_TYPES
from dtokd.tasks.dry_run import causal_lm_dry_run_data, classification_dry_run_data, detection_dry_run_data
from dtokd.tasks.names import TASKS
from dtokd.tasks.specs import LossType

Task = ClassificationTask | DetectionTask | CausalLMTask


@dataclass(frozen=True)
class TaskKind:
    """A task kind as a record: the data sets it takes, its checks that need only the settings,
    how it is built and a trained model evaluated, its dry-run data, whether the teacher-output
    cache serves it and whether its student may be compiled. Adding a task is a module and a
    record in :data:`TASK_KINDS`; the config (``task``, ``eval.select``:
    :mod:`dtokd.tasks.names`), :func:`check_task_settings`, :func:`build_task`, ``dtokd eval``,
    ``--dry-run``, the teacher cache and the compile check read the records, never a kind's name."""

    name: str
    data_sets: tuple[str, ...] | None
    """The data sets it takes (None: every one that no other kind claims)."""
    data_hint: str
    """What its data are, in words, for the errors."""
    check_settings: Callable[[list[tuple[str, str | None]], Mapping[str, Mapping[str, Any]], str, bool], None]
    """``(model names as (argument, name), loss specs, representation, teacher normalised)``: the
    checks that need only the settings (raise ValueError naming what is wrong)."""
    build: Callable[[nn.Module, nn.Module | None, Mapping[str, Mapping[str, Any]], Any, nn.Module | None, str], Task]
    """``(student, teacher, specs, data, teacher_input, representation) -> task``, with the checks
    that need the built models."""
    evaluate: Callable[[nn.Module, Mapping[str, Mapping[str, Any]], Any, int, torch.device], dict[str, float]]
    """``(model, loss specs, dataset, batch size, device) -> metrics`` of a trained model alone
    (``dtokd eval``), set up as its run trained it (the specs say, e.g., whether two heads are averaged)."""
    dry_run_data: Callable[[Any, Path], tuple[dict[str, Any], int]]
    """``(data settings, scratch folder) -> (changes to the data settings, classes)``: small
    generated data at the config's shapes for ``--dry-run`` (:mod:`dtokd.tasks.dry_run`)."""
    reported_metrics: tuple[str, ...] = ()
    """Test metrics a summary reports beside the one that chooses the epoch (the LM's top-1 and perplexity)."""
    caches_teacher_outputs: bool = False
    """Whether ``teacher.cache_outputs`` serves it (the teacher's logits per training step)."""
    compile_refusal: str | None = None
    """Why ``compile`` is refused for it, or None where the student may be compiled."""
    loss_types: Mapping[str, LossType[Any, Any]] = field(default_factory=dict)
    """Its loss types by name (:class:`~dtokd.tasks.specs.LossType` records)."""
    takes_teacher_outputs: bool = False
    """Whether its teacher may be given as precomputed top-k outputs (``teacher.outputs``,
    :mod:`dtokd.data.offline_teacher`) instead of a model."""


def _check_classification(
    model_names: list[tuple[str, str | None]], specs: Mapping[str, Mapping[str, Any]], representation: str, _: bool
) -> None:
    resolve_loss_specs(specs)


def _check_detection(
    model_names: list[tuple[str, str | None]], specs: Mapping[str, Mapping[str, Any]], representation: str, _: bool
) -> None:
    if representation != "outputs":
        raise ValueError(
            f"balancer.representation={representation!r}: for detection the representation is "
            "the student's FPN levels; leave it at 'outputs'"
        )
    resolve_detection_specs(specs)


def _check_causal_lm(
    model_names: list[tuple[str, str | None]],
    specs: Mapping[str, Mapping[str, Any]],
    representation: str,
    teacher_normalized: bool,
) -> None:
    from dtokd.models.causal_lm import PREFIX

    wrong = [arg for arg, name in model_names if name is not None and not name.startswith(PREFIX)]
    if wrong:
        raise ValueError(f"task='causal-lm' needs language models: {wrong} must name hf-causal-lm:<model_type>")
    check_lm_representation(representation)
    if teacher_normalized:
        raise ValueError("teacher.normalize is for images; a language model's input is token ids")
    resolve_lm_specs(specs)


def _named_models(student: nn.Module, teacher: nn.Module | None) -> list[tuple[str, nn.Module]]:
    return [("student.name", student)] + ([("teacher.name", teacher)] if teacher is not None else [])


def _build_classification(
    student: nn.Module,
    teacher: nn.Module | None,
    specs: Mapping[str, Mapping[str, Any]],
    data: Any,
    teacher_input: nn.Module | None,
    representation: str,
) -> Task:
    from dtokd.models.detection import is_detector

    wrong = [arg for arg, model in _named_models(student, teacher) if is_detector(model)]
    if wrong:
        raise ValueError(f"{wrong} name detectors: set task: detection (and a detection data set)")
    sample = data.train.__getitems__([0, 1])[0]
    return ClassificationTask(student, teacher, specs, sample, teacher_input, representation=representation)


def _build_detection(
    student: nn.Module,
    teacher: nn.Module | None,
    specs: Mapping[str, Mapping[str, Any]],
    data: Any,
    teacher_input: nn.Module | None,
    representation: str,
) -> Task:
    from dtokd.models.detection import is_detector

    wrong = [arg for arg, model in _named_models(student, teacher) if not is_detector(model)]
    if wrong:
        raise ValueError(f"task='detection' needs detectors: {wrong} must name detection:<head>_<backbone>_fpn")
    return DetectionTask(student, teacher, specs)


def _build_causal_lm(
    student: nn.Module,
    teacher: nn.Module | None,
    specs: Mapping[str, Mapping[str, Any]],
    data: Any,
    teacher_input: nn.Module | None,
    representation: str,
) -> Task:
    from dtokd.data.offline_teacher import OfflineTeacher
    from dtokd.models.causal_lm import CausalLM

    wrong = [
        arg
        for arg, model in _named_models(student, teacher)
        if not isinstance(model, CausalLM) and not (arg == "teacher.name" and isinstance(model, OfflineTeacher))
    ]
    if wrong:
        raise ValueError(f"task='causal-lm' needs language models: {wrong} must name hf-causal-lm:<model_type>")
    assert isinstance(student, CausalLM) and (teacher is None or isinstance(teacher, (CausalLM, OfflineTeacher)))
    return CausalLMTask(student, teacher, specs, representation)


def _evaluate_classifier(
    model: nn.Module, specs: Mapping[str, Mapping[str, Any]], dataset: Any, batch_size: int, device: torch.device
) -> dict[str, float]:
    """A classifier's metrics; a distilled ViT whose run used its distillation head in distilled
    training mode, as it trained (its two heads averaged, each reported)."""
    if has_distillation_head(model) and any(s.get("output") == "dist" for s in resolve_loss_specs(specs).values()):
        cast(Any, model).set_distilled_training(True)  # timm's distilled ViTs
    return evaluate_classifier(model, dataset, batch_size, device)


def _evaluate_detector(
    model: nn.Module, specs: Mapping[str, Mapping[str, Any]], dataset: Any, batch_size: int, device: torch.device
) -> dict[str, float]:
    return evaluate_detector(model, dataset, batch_size, device)


def _evaluate_causal_lm(
    model: nn.Module, specs: Mapping[str, Mapping[str, Any]], dataset: Any, batch_size: int, device: torch.device
) -> dict[str, float]:
    return evaluate_causal_lm(model, dataset, batch_size, device)


TASK_KINDS: Mapping[str, TaskKind] = {
    "classification": TaskKind(
        "classification",
        None,
        "an image data set",
        _check_classification,
        _build_classification,
        _evaluate_classifier,
        classification_dry_run_data,
        caches_teacher_outputs=True,
        loss_types=CLASSIFICATION_LOSS_TYPES,
    ),
    "detection": TaskKind(
        "detection",
        DETECTION_DATASETS,
        "a detection data set",
        _check_detection,
        _build_detection,
        _evaluate_detector,
        detection_dry_run_data,
        loss_types=DETECTION_LOSS_TYPES,
        compile_refusal="torch.compile of torchvision's detectors (data-dependent proposal and box shapes) "
        "is not verified here",
    ),
    "causal-lm": TaskKind(
        "causal-lm",
        ("text",),
        "a text corpus",
        _check_causal_lm,
        _build_causal_lm,
        _evaluate_causal_lm,
        causal_lm_dry_run_data,
        reported_metrics=("top1", "ppl"),
        loss_types=CAUSAL_LM_LOSS_TYPES,
        takes_teacher_outputs=True,
    ),
}
"""Every task kind by name (the names are :data:`dtokd.tasks.names.TASKS`)."""


def task_kind(kind: str) -> TaskKind:
    """The record of task ``kind``; a ValueError listing the kinds for an unknown name."""
    if kind not in TASK_KINDS:
        raise ValueError(f"task={kind!r} is not allowed; use one of {list(TASKS)}")
    return TASK_KINDS[kind]


def check_task_settings(
    kind: str,
    data_name: str,
    model_names: list[tuple[str, str | None]],
    specs: Mapping[str, Mapping[str, Any]],
    representation: str,
    teacher_normalized: bool,
) -> None:
    """The task's checks that need only the settings, run before any data is read or model built:
    the task and the data set belong together (a data set that another kind claims is refused
    naming that kind), then the kind's own checks (:attr:`TaskKind.check_settings`: loss specs,
    models, representation)."""
    record = task_kind(kind)
    owner = next((r for r in TASK_KINDS.values() if r.data_sets and data_name in r.data_sets), None)
    if owner is not None and owner is not record:
        raise ValueError(f"data.name={data_name!r} is {owner.data_hint}: set task: {owner.name}")
    if record.data_sets is not None and data_name not in record.data_sets:
        raise ValueError(
            f"task={kind!r} needs {record.data_hint} (data.name one of {list(record.data_sets)}), not {data_name!r}"
        )
    record.check_settings(model_names, specs, representation, teacher_normalized)


def build_task(
    kind: str,
    student: nn.Module,
    teacher: nn.Module | None,
    specs: Mapping[str, Mapping[str, Any]],
    data: Any,
    teacher_input: nn.Module | None = None,
    representation: str = "outputs",
) -> Task:
    """The task ``kind`` for these models and data, with the checks that they belong to it
    (:func:`check_task_settings`, then the models': :attr:`TaskKind.build`)."""
    check_task_settings(kind, data.name, [], specs, representation, teacher_input is not None)
    return task_kind(kind).build(student, teacher, specs, data, teacher_input, representation)


__all__ = [
    "TASKS",
    "TASK_KINDS",
    "TaskKind",
    "task_kind",
    "CausalLMTask",
    "check_task_settings",
    "ClassificationTask",
    "DetectionTask",
    "Task",
    "build_task",
    "evaluate_causal_lm",
    "evaluate_classifier",
    "evaluate_detector",
    "has_distillation_head",
    "resolve_loss_specs",
]
