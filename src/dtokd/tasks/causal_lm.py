"""The causal language-model task: a batch of token blocks becomes named token-level losses, and
a model is evaluated by held-out perplexity and next-token accuracy.

A batch is ``(input_ids, targets)``, both ``(B, L)``: the targets are the next tokens
(:class:`~dtokd.data.text.TokenBlocks`), ``-100`` where a position does not count. The loss
types ``ce``, ``token-kd`` and ``hidden``, their options, defaults and what each needs, are
records in :mod:`dtokd.tasks.causal_lm_losses`; the task reads them, never a type's name.
A ``token-kd`` loss that leaves ``divergence`` out or gives ``auto`` gets the balancing
method's form as the config is read (:func:`dtokd.train.config.resolve_distillation_form`).
A ``hidden`` loss compares the student's hidden state ``student_layer`` with the teacher's
``teacher_layer`` (indices into the ``num_hidden_layers + 1`` hidden states, embeddings first;
-1, the default, is the last, after the final norm) at the counted tokens only, through a
learned projector (:class:`~dtokd.losses.feature.FeatureProjector` over the hidden width):
``loss = distance(P h_s, norm(h_t))`` averaged over counted tokens and the teacher's width;
``distance`` ``mse`` (default) or ``smooth_l1``, ``teacher_norm`` ``layernorm`` (default, over
the width, no parameters), ``standardize`` (per channel over the batch's counted tokens) or
``none``; ``projector: false`` compares the student's state itself (equal widths),
``orthogonal: true`` keeps the projector's rows or columns orthonormal (VkD).

**A teacher given as its offline top-k outputs** (:class:`~dtokd.data.offline_teacher.OfflineTeacher`,
``teacher.outputs``): the token-KD losses compare over the ``k`` stored tokens and the tail
(``token_kd_loss(teacher_topk=...)``), at the temperature the outputs were written at (a loss at
another is refused); a loss that reads the teacher's hidden states is refused.

The balancer's representation (for the ``representation`` engine) is the student's logits
``(B, L, V)`` (``balancer.representation: outputs``), or its last hidden state ``(B, L, H)``
(``hidden``), which the logits and a hidden loss at the last layer both depend on (a hidden
loss at an earlier layer does not: the exact engine serves it). Teacher and student must share
the tokenizer (the same vocabulary size is checked when the teacher is loaded).

**Evaluation** (:func:`evaluate_causal_lm`): ``loss`` (mean next-token cross-entropy in nats
per token over the split's counted tokens), ``ppl`` (``exp(loss)``) and ``top1`` (next-token
accuracy, percent). ``top1`` selects the best epoch (as for classification: higher is better);
the perplexity is reported beside it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dtokd.data import eval_loader, to_device
from dtokd.data.offline_teacher import OfflineTeacher
from dtokd.losses.feature import FeatureProjector
from dtokd.models.causal_lm import CausalLM
from dtokd.tasks.causal_lm_losses import IGNORE_INDEX, LOSS_TYPES, TokenLossInputs
from dtokd.tasks.specs import losses_where, refuse_without_teacher, resolve_specs
from dtokd.tasks.teacher import Teacher

REPRESENTATIONS = ("outputs", "hidden")
"""``balancer.representation`` for causal LMs: the student's logits or its last hidden state."""


def resolve_lm_specs(specs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Fill in defaults and reject unknown types, options or values, naming them."""
    return resolve_specs(specs, LOSS_TYPES, "causal-lm", "{task: {type: ce}}")


def check_lm_representation(representation: str) -> None:
    """``balancer.representation`` is one of :data:`REPRESENTATIONS`, or a ValueError naming it."""
    if representation not in REPRESENTATIONS:
        raise ValueError(
            f"balancer.representation={representation!r}: for causal-lm the representation is the student's "
            f"logits ('outputs') or its last hidden state ('hidden'); use one of {list(REPRESENTATIONS)}"
        )


def _layer(model: CausalLM, index: int, where: str) -> int:
    """``index`` into the model's hidden states as a non-negative index; out of range is an error."""
    count = model.hidden_shape[0]
    if not -count <= index < count:
        raise ValueError(
            f"{where}={index} is out of range: the model has {count} hidden states "
            f"(embeddings and {count - 1} layers), so use {-count} to {count - 1}"
        )
    return index % count


class CausalLMTask(nn.Module):
    """``forward(input_ids, targets, progress) -> (logits, {name: loss})``."""

    def __init__(
        self,
        student: CausalLM,
        teacher: CausalLM | OfflineTeacher | None,
        specs: Mapping[str, Mapping[str, Any]],
        representation: str = "outputs",
    ) -> None:
        super().__init__()
        check_lm_representation(representation)
        self.student = student
        self.teacher = Teacher(teacher) if teacher is not None else None  # not a submodule (tasks.teacher)
        self.specs = resolve_lm_specs(specs)
        self.representation = representation
        refuse_without_teacher(self.specs, LOSS_TYPES, teacher)
        if isinstance(teacher, OfflineTeacher):
            _check_offline_specs(self.specs, teacher)
        self.projectors = nn.ModuleDict()  # one per hidden loss (the run folder's state holds them)
        self.layers: dict[str, tuple[int, int]] = {}
        """Each hidden loss's (student, teacher) hidden-state indices, non-negative."""
        for name in losses_where(self.specs, LOSS_TYPES, lambda record: record.teacher_features):
            spec = self.specs[name]
            assert isinstance(teacher, CausalLM)  # refused above without one, or with offline outputs
            self.layers[name] = (
                _layer(student, spec["student_layer"], f"losses.{name}.student_layer"),
                _layer(teacher, spec["teacher_layer"], f"losses.{name}.teacher_layer"),
            )
            self.projectors[name] = FeatureProjector(
                student.hidden_shape[1],
                teacher.hidden_shape[1],
                spatial=False,
                orthogonal_weight=spec["orthogonal"],
                teacher_norm=spec["teacher_norm"],
                distance=spec["distance"],
                learned=spec["projector"],
            )
        self._last_teacher: Tensor | tuple[Tensor, Tensor] | None = None
        self._last_teacher_hidden: dict[int, Tensor] = {}

    @property
    def loss_names(self) -> list[str]:
        return list(self.specs)

    def forward(
        self, x: Tensor, y: Tensor, progress: float | None = None, *, reuse_teacher: bool = False
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``reuse_teacher=True`` takes the teacher's outputs of the previous call (same batch).
        The first returned value is the balancer's representation (see the module notes)."""
        teacher_layers = sorted({t for _, t in self.layers.values()})
        if not reuse_teacher:
            self._last_teacher, self._last_teacher_hidden = None, {}
            if self.teacher is not None and losses_where(self.specs, LOSS_TYPES, lambda record: record.needs_teacher):
                if teacher_layers:
                    assert isinstance(self.teacher.model, CausalLM)  # hidden losses refuse offline outputs
                    self._last_teacher, hidden = self.teacher.run(self.teacher.model.forward_hidden, x)
                    self._last_teacher_hidden = {t: hidden[t] for t in teacher_layers}
                else:
                    self._last_teacher = self.teacher(x)
        if self.layers or self.representation == "hidden":
            logits, student_hidden = self.student.forward_hidden(x)
        else:
            logits, student_hidden = self.student(x), ()
        losses: dict[str, Tensor] = {}
        for name, spec in self.specs.items():
            inputs = TokenLossInputs(
                name,
                logits,
                y,
                self._last_teacher,
                student_hidden,
                self._last_teacher_hidden,
                self.layers.get(name),
                self.projectors[name] if name in self.projectors else None,
            )
            losses[name] = LOSS_TYPES[spec["type"]].compute(spec, inputs)
        return (student_hidden[-1] if self.representation == "hidden" else logits), losses

    def evaluate(
        self, model: nn.Module, dataset: Any, batch_size: int, device: torch.device, *, channels_last: bool = False
    ) -> dict[str, float]:
        return evaluate_causal_lm(model, dataset, batch_size, device)


def _check_offline_specs(specs: Mapping[str, Mapping[str, Any]], teacher: OfflineTeacher) -> None:
    """A teacher given as top-k outputs serves losses of its output distribution at the outputs'
    temperature only, and no loss that reads its hidden states."""
    hidden = losses_where(specs, LOSS_TYPES, lambda record: record.teacher_features)
    if hidden:
        raise ValueError(
            f"loss(es) {hidden} need the teacher's hidden states; a teacher given as its top-k outputs "
            "(teacher.outputs) has none: give the teacher itself"
        )
    written = teacher.manifest.temperature
    for name in losses_where(specs, LOSS_TYPES, lambda record: record.teacher_distribution):
        if float(specs[name]["temperature"]) != written:
            raise ValueError(
                f"losses.{name}.temperature={specs[name]['temperature']!r}, but the teacher outputs in "
                f"{teacher.outputs.folder} were written at temperature {written!r}: use it, or write them again"
            )


@torch.no_grad()
def evaluate_causal_lm(model: nn.Module, dataset: Any, batch_size: int, device: torch.device) -> dict[str, float]:
    """``loss`` (nats per counted token), ``ppl`` = ``exp(loss)`` and ``top1`` (next-token
    accuracy, percent) over the split; sums stay on ``device``, one read at the end."""
    if dataset is None or len(dataset) == 0:
        return {}
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # cross-entropy, hits, counted tokens
    for x, y in eval_loader(dataset, batch_size):
        x, y = to_device(x, device), to_device(y, device)
        logits = model(x).float()
        counted = y != IGNORE_INDEX
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        hits = ((logits.argmax(-1) == y) & counted).sum()
        sums += torch.stack([ce.double(), hits.double(), counted.sum().double()])
    model.train(was_training)
    ce, hits, tokens = sums.tolist()
    loss = ce / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "top1": 100.0 * hits / max(tokens, 1)}
