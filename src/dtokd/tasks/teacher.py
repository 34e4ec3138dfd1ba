"""The teacher as every task and both framework integrations hold and run it: one object.

A :class:`Teacher` is held beside the student, never inside it: it is not a submodule, so the
teacher's parameters are never among the student's ``parameters()``, in its ``state_dict()``,
given to its optimizer or wrapped by DDP/FSDP with it. Its **source** answers a batch with the
teacher's outputs:

- the model itself (live): run in eval mode for its forward only (the module's own training
  flags and ``requires_grad`` are left as the caller set them: a student copied from it later
  is not frozen), on the inputs' device (moved there once), floating inputs cast to its
  parameters' dtype;
- its outputs cached on the training steps (:class:`~dtokd.train.teacher_cache.CachedTeacher`),
  or precomputed over a corpus (:class:`~dtokd.data.offline_teacher.OfflineTeacher`): called
  as they are.

Every call runs under ``torch.no_grad()``. A plain callable is called as it is too (no device
move, no cast). :attr:`Teacher.model` is the live model, for what
reads the teacher's internals (tapped features, hidden states, a detector's backbone), and
:meth:`Teacher.replace` swaps the source (the pipeline's cache) while those stay with the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from dtokd.data.offline_teacher import OfflineTeacher
from dtokd.models.norms import eval_mode


class Teacher:
    """The frozen teacher (see the module notes); ``source``: the model, or what answers for it."""

    def __init__(self, source: nn.Module | Callable[..., Any]) -> None:
        if not callable(source):
            raise TypeError(f"teacher must be a torch.nn.Module or a callable, got {type(source).__name__}")
        self.source = source
        live = isinstance(source, nn.Module) and not isinstance(source, OfflineTeacher)
        self.model: nn.Module | None = cast(nn.Module, source) if live else None
        """The live model (None where the teacher was given as its outputs alone)."""
        self.name = type(source).__name__

    def replace(self, source: Callable[..., Any]) -> None:
        """Answer from ``source`` from now on (e.g. the teacher's cached outputs); :attr:`model`
        stays the live model."""
        self.source = source

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The teacher's outputs for these inputs: its source called (see the module notes)."""
        if self.model is not None and self.source is self.model:
            return self.run(self.model, *args, **kwargs)
        with torch.no_grad():
            return self.source(*args, **kwargs)

    def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``function(*args, **kwargs)`` (the live model, a method of it or a part of it: e.g. its
        hidden states, a detector's backbone) as the teacher runs: without gradients, the model
        in eval mode and on the inputs' device, floating inputs cast to its parameters' dtype."""
        if self.model is None:
            raise RuntimeError(f"the teacher was given as its outputs ({self.name}); it has no model to run")
        device = _first_tensor_device(args, kwargs)
        parameter = next(self.model.parameters(), None)
        if parameter is not None and device is not None and parameter.device != device:
            self.model.to(device)
            parameter = next(self.model.parameters())
        dtype = parameter.dtype if parameter is not None else None
        args, kwargs = _cast_floating((args, kwargs), dtype)
        with torch.no_grad(), eval_mode(self.model):
            return function(*args, **kwargs)

    def check_fits(self, student_logits: Tensor, teacher_logits: Tensor) -> None:
        """The teacher's logits must have the student's shape (batch, [positions,] classes or
        vocabulary) and be floating point."""
        if not isinstance(teacher_logits, Tensor) or not teacher_logits.is_floating_point():
            raise TypeError(f"the teacher {self.name} must return floating-point logits, got {teacher_logits!r:.80}")
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"the teacher {self.name} does not fit its student: its logits have shape "
                f"{tuple(teacher_logits.shape)}, the student's {tuple(student_logits.shape)} (the last dimension "
                "is the number of classes, or the vocabulary: teacher and student must predict the same ones)"
            )


def _first_tensor_device(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.device | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value.device
    return None


def _cast_floating(value: Any, dtype: torch.dtype | None) -> Any:
    """``value`` with every floating tensor inside (tuples, lists, dicts) cast to ``dtype``."""
    if dtype is None:
        return value
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floating(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast_floating(v, dtype) for k, v in value.items()}
    return value
