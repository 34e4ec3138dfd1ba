"""The causal language-model task: a batch of token blocks becomes named token-level losses, and
a model is evaluated by held-out perplexity and next-token accuracy.

A batch is ``(input_ids, targets)``, both ``(B, L)``: the targets are the next tokens
(:class:`~dtokd.data.text.TokenBlocks`), ``-100`` where a position does not count. Loss specs:

- ``ce``: next-token cross-entropy, the mean over counted tokens;
- ``token-kd``: :func:`~dtokd.losses.token_kd.token_kd_loss` to the teacher's next-token
  distribution: ``divergence`` (``forward_kl``, ``forward_ce``, ``reverse_kl``, ``jsd``; a config
  that leaves it out or gives ``auto`` gets the balancing method's form as it is read:
  :func:`dtokd.train.config.resolve_distillation_form`),
  ``beta`` (jsd's mix, 0.5), ``temperature`` (1), ``chunk_tokens`` (1024): the mean over
  counted tokens;
- ``hidden``: a hidden-state loss through a learned projector
  (:class:`~dtokd.losses.feature.FeatureProjector` over the hidden width): the student's hidden
  state ``student_layer`` and the teacher's ``teacher_layer`` (indices into the
  ``num_hidden_layers + 1`` hidden states, embeddings first; -1, the default, is the last, after
  the final norm) at the counted tokens only, ``loss = distance(P h_s, norm(h_t))``
  averaged over counted tokens and the teacher's width; ``distance`` ``mse`` (default) or
  ``smooth_l1``, ``teacher_norm`` ``layernorm`` (default, over the width, no parameters),
  ``standardize`` (per channel over the batch's counted tokens) or ``none``;
  ``projector: false`` compares the student's state itself (equal widths), ``orthogonal: true``
  keeps the projector's rows or columns orthonormal (VkD). 0 for a batch without a counted token.

**A teacher given as its offline top-k outputs** (:class:`~dtokd.data.offline_teacher.OfflineTeacher`,
``teacher.outputs``): the token-KD losses compare over the ``k`` stored tokens and the tail
(``token_kd_loss(teacher_topk=...)``), at the temperature the outputs were written at (a loss at
another is refused); a hidden loss needs the teacher's hidden states and is refused.

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
from dtokd.losses.token_kd import DIVERGENCES, token_kd_loss
from dtokd.models.causal_lm import CausalLM
from dtokd.tasks.specs import fill_specs

LOSS_OPTIONS: dict[str, dict[str, Any]] = {
    "ce": {},
    "token-kd": {"divergence": "forward_kl", "beta": 0.5, "temperature": 1.0, "chunk_tokens": 1024},
    "hidden": {
        "student_layer": -1,
        "teacher_layer": -1,
        "distance": "mse",
        "teacher_norm": "layernorm",
        "projector": True,
        "orthogonal": False,
    },
}
HIDDEN_NORMS = ("layernorm", "standardize", "none")
HIDDEN_DISTANCES = ("mse", "smooth_l1")
REPRESENTATIONS = ("outputs", "hidden")
"""``balancer.representation`` for causal LMs: the student's logits or its last hidden state."""
IGNORE_INDEX = -100


def resolve_lm_specs(specs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Fill in defaults and reject unknown types, options or values, naming them."""
    resolved = fill_specs(specs, LOSS_OPTIONS, "causal-lm", "{task: {type: ce}}")
    for name, spec in resolved.items():
        if spec["type"] == "hidden":
            _check_hidden_spec(name, spec)
        if spec["type"] != "token-kd":
            continue
        if spec["divergence"] not in DIVERGENCES:
            raise ValueError(
                f"losses.{name}.divergence={spec['divergence']!r} is not allowed; use one of {list(DIVERGENCES)}"
            )
        if spec["divergence"] == "jsd" and not 0 < spec["beta"] < 1:
            raise ValueError(f"losses.{name}.beta={spec['beta']!r} must lie strictly between 0 and 1 for jsd")
        if not isinstance(spec["chunk_tokens"], int) or spec["chunk_tokens"] < 1:
            raise ValueError(f"losses.{name}.chunk_tokens={spec['chunk_tokens']!r} must be a positive integer")
    return resolved


def check_lm_representation(representation: str) -> None:
    """``balancer.representation`` is one of :data:`REPRESENTATIONS`, or a ValueError naming it."""
    if representation not in REPRESENTATIONS:
        raise ValueError(
            f"balancer.representation={representation!r}: for causal-lm the representation is the student's "
            f"logits ('outputs') or its last hidden state ('hidden'); use one of {list(REPRESENTATIONS)}"
        )


def _check_hidden_spec(name: str, spec: Mapping[str, Any]) -> None:
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


def _layer(model: CausalLM, index: int, where: str) -> int:
    """``index`` into the model's hidden states as a non-negative index; out of range is an error."""
    count = model.hidden_shape[0]
    if not -count <= index < count:
        raise ValueError(
            f"{where}={index} is out of range: the model has {count} hidden states "
            f"(embeddings and {count - 1} layers), so use {-count} to {count - 1}"
        )
    return index % count


def next_token_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """The mean over counted tokens (targets not -100) of ``-log softmax(logits)[target]``, in
    float32 (0 for a batch without a counted token)."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    total = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp_min(1)


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
        self.teacher = [teacher]  # a list keeps the frozen teacher out of parameters() and state_dict()
        self.specs = resolve_lm_specs(specs)
        self.representation = representation
        needs_teacher = [n for n, s in self.specs.items() if s["type"] != "ce"]
        if needs_teacher and teacher is None:
            raise ValueError(f"loss(es) {needs_teacher} need a teacher, but none is configured (teacher.name)")
        if isinstance(teacher, OfflineTeacher):
            _check_offline_specs(self.specs, teacher)
        self.projectors = nn.ModuleDict()  # one per hidden loss (the run folder's state holds them)
        self.layers: dict[str, tuple[int, int]] = {}
        """Each hidden loss's (student, teacher) hidden-state indices, non-negative."""
        for name, spec in self.specs.items():
            if spec["type"] != "hidden":
                continue
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
            teacher = self.teacher[0]
            if teacher is not None and any(s["type"] != "ce" for s in self.specs.values()):
                with torch.no_grad():
                    if isinstance(teacher, OfflineTeacher):
                        self._last_teacher = teacher(x)
                    elif teacher_layers:
                        self._last_teacher, hidden = teacher.forward_hidden(x)
                        self._last_teacher_hidden = {t: hidden[t] for t in teacher_layers}
                    else:
                        self._last_teacher = teacher(x)
        if self.layers or self.representation == "hidden":
            logits, student_hidden = self.student.forward_hidden(x)
        else:
            logits, student_hidden = self.student(x), ()
        counted = y != IGNORE_INDEX
        losses: dict[str, Tensor] = {}
        for name, spec in self.specs.items():
            if spec["type"] == "ce":
                losses[name] = next_token_cross_entropy(logits, y)
            elif spec["type"] == "hidden":
                s, t = self.layers[name]
                losses[name] = hidden_state_loss(
                    self.projectors[name], student_hidden[s], self._last_teacher_hidden[t], counted
                )
            else:
                offline = isinstance(self._last_teacher, tuple)
                losses[name] = token_kd_loss(
                    logits,
                    None if offline else self._last_teacher,  # type: ignore[arg-type]
                    y,
                    divergence=spec["divergence"],
                    beta=spec["beta"],
                    temperature=spec["temperature"],
                    ignore_index=IGNORE_INDEX,
                    chunk_tokens=spec["chunk_tokens"],
                    teacher_topk=self._last_teacher if offline else None,  # type: ignore[arg-type]
                )
        return (student_hidden[-1] if self.representation == "hidden" else logits), losses

    def evaluate(
        self, model: nn.Module, dataset: Any, batch_size: int, device: torch.device, *, channels_last: bool = False
    ) -> dict[str, float]:
        return evaluate_causal_lm(model, dataset, batch_size, device)


def _check_offline_specs(specs: Mapping[str, Mapping[str, Any]], teacher: OfflineTeacher) -> None:
    """A teacher given as top-k outputs serves token-KD losses at the outputs' temperature only."""
    hidden = [name for name, spec in specs.items() if spec["type"] == "hidden"]
    if hidden:
        raise ValueError(
            f"loss(es) {hidden} need the teacher's hidden states; a teacher given as its top-k outputs "
            "(teacher.outputs) has none: give the teacher itself"
        )
    written = teacher.manifest.temperature
    for name, spec in specs.items():
        if spec["type"] == "token-kd" and float(spec["temperature"]) != written:
            raise ValueError(
                f"losses.{name}.temperature={spec['temperature']!r}, but the teacher outputs in "
                f"{teacher.outputs.folder} were written at temperature {written!r}: use it, or write them again"
            )


def hidden_state_loss(projector: nn.Module, student: Tensor, teacher: Tensor, counted: Tensor) -> Tensor:
    """The projector's loss between the student's and the teacher's hidden states ``(B, L, H)``
    at the counted positions (``counted``: ``(B, L)`` booleans) only: the mean over those
    tokens and the teacher's width (0, in the graph, for a batch without a counted token).
    Selecting the counted tokens reads their number on the host: one device sync per step."""
    if not bool(counted.any()):
        return student.sum() * 0.0
    return projector(student[counted], teacher[counted])


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
