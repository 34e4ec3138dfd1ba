"""Tasks: how a batch becomes named losses and how a model is evaluated (the one seam between
the trainer and what is being distilled): classification (:mod:`.classification`),
detection (:mod:`.detection`) and causal language models (:mod:`.causal_lm`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from dtokd.tasks.causal_lm import CausalLMTask, check_lm_representation, evaluate_causal_lm, resolve_lm_specs
from dtokd.tasks.classification import (
    LOSS_OPTIONS,
    ClassificationTask,
    evaluate_classifier,
    has_distillation_head,
    resolve_loss_specs,
)
from dtokd.tasks.detection import DetectionTask, evaluate_detector, resolve_detection_specs
from dtokd.tasks.names import TASKS

Task = ClassificationTask | DetectionTask | CausalLMTask


def check_task_settings(
    kind: str,
    data_name: str,
    model_names: list[tuple[str, str | None]],
    specs: Mapping[str, Mapping[str, Any]],
    representation: str,
    teacher_normalized: bool,
) -> None:
    """The task's checks that need only the settings, run before any data is read or model built:
    the task and the data set belong together (detection data for ``task: detection``, text for
    ``task: causal-lm``), the loss specs are the task's (types, options, values), and for
    language models: the models (``(argument, name)`` pairs) named ``hf-causal-lm:...``, the
    representation ``outputs`` or ``hidden``, no ``teacher.normalize``."""
    from dtokd.data.bundle import DETECTION_DATASETS
    from dtokd.models.causal_lm import PREFIX

    if kind not in TASKS:
        raise ValueError(f"task={kind!r} is not allowed; use one of {list(TASKS)}")
    if kind == "causal-lm" or data_name == "text":
        if data_name != "text" or kind != "causal-lm":
            raise ValueError(
                "task='causal-lm' and data.name='text' go together (token blocks for language models); "
                f"got task={kind!r} with data.name={data_name!r}"
            )
        wrong = [arg for arg, name in model_names if name is not None and not name.startswith(PREFIX)]
        if wrong:
            raise ValueError(f"task='causal-lm' needs language models: {wrong} must name hf-causal-lm:<model_type>")
        check_lm_representation(representation)
        if teacher_normalized:
            raise ValueError("teacher.normalize is for images; a language model's input is token ids")
        resolve_lm_specs(specs)
    elif kind == "detection":
        if data_name not in DETECTION_DATASETS:
            raise ValueError(
                f"task='detection' needs a detection data set (data.name 'coco' or 'synthetic-coco'), not {data_name!r}"
            )
        if representation != "outputs":
            raise ValueError(
                f"balancer.representation={representation!r}: for detection the representation is "
                "the student's FPN levels; leave it at 'outputs'"
            )
        resolve_detection_specs(specs)
    else:
        if data_name in DETECTION_DATASETS:
            raise ValueError(f"data.name={data_name!r} is a detection data set: set task: detection")
        resolve_loss_specs(specs)


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
    (:func:`check_task_settings`, then the models')."""
    from dtokd.models.detection import is_detector

    check_task_settings(kind, data.name, [], specs, representation, teacher_input is not None)
    models = [("student.name", student)] + ([("teacher.name", teacher)] if teacher is not None else [])
    if kind == "causal-lm":
        from dtokd.models.causal_lm import CausalLM

        wrong = [arg for arg, model in models if not isinstance(model, CausalLM)]
        if wrong:
            raise ValueError(f"task='causal-lm' needs language models: {wrong} must name hf-causal-lm:<model_type>")
        assert isinstance(student, CausalLM) and (teacher is None or isinstance(teacher, CausalLM))
        return CausalLMTask(student, teacher, specs, representation)
    if kind == "detection":
        wrong = [arg for arg, model in models if not is_detector(model)]
        if wrong:
            raise ValueError(f"task='detection' needs detectors: {wrong} must name detection:<head>_<backbone>_fpn")
        return DetectionTask(student, teacher, specs)
    wrong = [arg for arg, model in models if is_detector(model)]
    if wrong:
        raise ValueError(f"{wrong} name detectors: set task: detection (and a detection data set)")
    sample = data.train.__getitems__([0, 1])[0]
    return ClassificationTask(student, teacher, specs, sample, teacher_input, representation=representation)


__all__ = [
    "LOSS_OPTIONS",
    "TASKS",
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
