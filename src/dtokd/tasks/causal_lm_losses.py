"""The causal language-model task's loss types as records (:class:`~dtokd.tasks.specs.LossType`):
for each type its options with their defaults, what it needs (the teacher, the teacher's hidden
states) and the function that computes it from the step's :class:`TokenLossInputs`. Adding a
loss is a function, a record in :data:`LOSS_TYPES` and its tests; the task
(:class:`~dtokd.tasks.causal_lm.CausalLMTask`), the config and the offline-output writer read
the record, never the type's name.

- ``ce``: next-token cross-entropy, the mean over counted tokens (:func:`next_token_cross_entropy`);
- ``token-kd``: :func:`~dtokd.losses.token_kd.token_kd_loss` to the teacher's next-token
  distribution (its logits, or its offline top-k outputs) at ``temperature``, in the form
  ``divergence`` (``beta``: jsd's mix), the mean over counted tokens, ``chunk_tokens`` at a time;
- ``hidden``: the loss's projector between a student and a teacher hidden state at the counted
  tokens (:func:`hidden_state_loss`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from dtokd.losses.token_kd import DIVERGENCES, token_kd_loss
from dtokd.tasks.specs import LossType

IGNORE_INDEX = -100
"""The target of a position that does not count (padding, a masked prompt): PyTorch's and Hugging Face's."""
HIDDEN_NORMS = ("layernorm", "standardize", "none")
HIDDEN_DISTANCES = ("mse", "smooth_l1")


@dataclass
class TokenLossInputs:
    """What one step offers a loss: the student's logits ``(B, L, V)``, the next-token targets
    ``(B, L)`` (:data:`IGNORE_INDEX` where a position does not count), the teacher's outputs
    (its logits, its offline top-k ``(log-probabilities, indices)``, or None without a teacher),
    the student's hidden states (embeddings first) and the teacher's by index, the loss's
    ``(student, teacher)`` hidden-state indices and its projector (hidden losses)."""

    name: str
    logits: Tensor
    targets: Tensor
    teacher_outputs: Tensor | tuple[Tensor, Tensor] | None
    student_hidden: Sequence[Tensor] = ()
    teacher_hidden: Mapping[int, Tensor] = field(default_factory=dict)
    layers: tuple[int, int] | None = None
    projector: nn.Module | None = None


def next_token_cross_entropy(
    logits: Tensor, targets: Tensor, *, ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0
) -> Tensor:
    """The mean over counted tokens (targets not ``ignore_index``) of the cross-entropy of
    ``softmax(logits)`` with the target (against ``(1 - eps) onehot + eps / V`` for
    ``label_smoothing`` ``eps``), in float32 (0 for a batch without a counted token)."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    total = F.cross_entropy(
        flat, targets.reshape(-1), ignore_index=ignore_index, reduction="sum", label_smoothing=label_smoothing
    )
    return total / (targets != ignore_index).sum().clamp_min(1)


def hidden_state_loss(projector: nn.Module, student: Tensor, teacher: Tensor, counted: Tensor) -> Tensor:
    """The projector's loss between the student's and the teacher's hidden states ``(B, L, H)``
    at the counted positions (``counted``: ``(B, L)`` booleans) only: the mean over those
    tokens and the teacher's width (0, in the graph, for a batch without a counted token).
    Selecting the counted tokens reads their number on the host: one device sync per step."""
    if not bool(counted.any()):
        return student.sum() * 0.0
    return projector(student[counted], teacher[counted])


def _cross_entropy(spec: Mapping[str, Any], inputs: TokenLossInputs) -> Tensor:
    return next_token_cross_entropy(inputs.logits, inputs.targets)


def _token_kd(spec: Mapping[str, Any], inputs: TokenLossInputs) -> Tensor:
    teacher = inputs.teacher_outputs
    if teacher is None:
        raise RuntimeError(f"loss {inputs.name!r} needs the teacher's outputs, and this step has none")
    offline = isinstance(teacher, tuple)
    return token_kd_loss(
        inputs.logits,
        None if offline else teacher,  # type: ignore[arg-type]
        inputs.targets,
        divergence=spec["divergence"],
        beta=spec["beta"],
        temperature=spec["temperature"],
        ignore_index=IGNORE_INDEX,
        chunk_tokens=spec["chunk_tokens"],
        teacher_topk=teacher if offline else None,  # type: ignore[arg-type]
    )


def _hidden(spec: Mapping[str, Any], inputs: TokenLossInputs) -> Tensor:
    if inputs.projector is None or inputs.layers is None:
        raise RuntimeError(f"hidden-state loss {inputs.name!r} has no projector or layers")
    student_layer, teacher_layer = inputs.layers
    return hidden_state_loss(
        inputs.projector,
        inputs.student_hidden[student_layer],
        inputs.teacher_hidden[teacher_layer],
        inputs.targets != IGNORE_INDEX,
    )


def _check_token_kd(name: str, spec: Mapping[str, Any]) -> None:
    if spec["divergence"] not in DIVERGENCES:
        raise ValueError(
            f"losses.{name}.divergence={spec['divergence']!r} is not allowed; use one of {list(DIVERGENCES)}"
        )
    if spec["divergence"] == "jsd" and not 0 < spec["beta"] < 1:
        raise ValueError(f"losses.{name}.beta={spec['beta']!r} must lie strictly between 0 and 1 for jsd")
    if not isinstance(spec["chunk_tokens"], int) or spec["chunk_tokens"] < 1:
        raise ValueError(f"losses.{name}.chunk_tokens={spec['chunk_tokens']!r} must be a positive integer")


def _check_hidden(name: str, spec: Mapping[str, Any]) -> None:
    for key in ("student_layer", "teacher_layer"):
        if not isinstance(spec[key], int):  # a number already (fill_specs), and not a flag
            raise ValueError(f"losses.{name}.{key}={spec[key]!r} must be an integer (a hidden state's index)")
    if spec["distance"] not in HIDDEN_DISTANCES:
        raise ValueError(
            f"losses.{name}.distance={spec['distance']!r} is not allowed; use one of {list(HIDDEN_DISTANCES)}"
        )
    if spec["teacher_norm"] not in HIDDEN_NORMS:
        raise ValueError(
            f"losses.{name}.teacher_norm={spec['teacher_norm']!r} is not allowed; use one of {list(HIDDEN_NORMS)}"
        )


LOSS_TYPES: Mapping[str, LossType[TokenLossInputs, Tensor]] = {
    "ce": LossType({}, _cross_entropy, needs_teacher=False),
    "token-kd": LossType(
        {"divergence": "forward_kl", "beta": 0.5, "temperature": 1.0, "chunk_tokens": 1024},
        _token_kd,
        teacher_distribution=True,
        check=_check_token_kd,
        form_option="divergence",
    ),
    "hidden": LossType(
        {
            "student_layer": -1,
            "teacher_layer": -1,
            "distance": "mse",
            "teacher_norm": "layernorm",
            "projector": True,
            "orthogonal": False,
        },
        _hidden,
        teacher_features=True,
        check=_check_hidden,
    ),
}
"""Every causal-LM loss type by name."""
