"""What the framework integrations share: the default distillation losses, for classifiers and
for causal language models (the teacher as they run it: :class:`dtokd.tasks.teacher.Teacher`). The losses
are picklable (frozen dataclasses, not closures), so a module or trainer holding them can be
sent to spawned processes (Lightning's ``ddp_spawn``, ``torch.multiprocessing``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from dtokd.balancing.balancers import distillation_form
from dtokd.losses.kd import cross_entropy, kd_loss
from dtokd.losses.token_kd import DEFAULT_CHUNK_TOKENS, token_kd_loss
from dtokd.tasks.causal_lm_losses import IGNORE_INDEX, next_token_cross_entropy

LossFn = Callable[[Tensor, Tensor, Tensor], Mapping[str, Tensor]]


@dataclass(frozen=True)
class ClassifierLosses:
    """``{"distill": T^2 KL (or, with ``divergence="forward_ce"``, T^2 cross-entropy) to the
    teacher at temperature T, "task": cross-entropy}`` on ``(B, C)`` logits (see
    :func:`dtokd.losses.kd.kd_loss`)."""

    temperature: float = 4.0
    divergence: str = "forward_kl"
    label_smoothing: float = 0.0
    """The task's cross-entropy against ``(1 - eps) onehot + eps / C``."""

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor, y: Tensor) -> dict[str, Tensor]:
        return {
            "distill": kd_loss(student_logits, teacher_logits, self.temperature, self.divergence),
            "task": cross_entropy(student_logits, y, self.label_smoothing),
        }


@dataclass(frozen=True)
class CausalLMLosses:
    """``{"distill": token_kd_loss, "task": next-token cross-entropy}`` for Hugging Face causal
    LMs, whose ``labels`` are the input ids (``ignore_index`` where a token does not count) and
    are shifted inside: the logits at position ``i`` are scored on the label at ``i + 1``, as
    the model's own loss does. Both are means over the counted tokens (see
    :func:`dtokd.losses.token_kd_loss`). The teacher is given as its logits, or as its offline
    top-k outputs (a pair of tensors, compared over the k tokens and the tail)."""

    divergence: str = "auto"
    """A :func:`~dtokd.losses.token_kd_loss` divergence, or ``auto``: the form the balancing method
    is measured best with (:func:`with_distillation_form`, which the integrations apply)."""
    temperature: float = 1.0
    beta: float = 0.5
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    ignore_index: int = IGNORE_INDEX
    label_smoothing: float = 0.0
    """The next-token cross-entropy against ``(1 - eps) onehot + eps / V`` (as the Hugging Face
    Trainer's ``label_smoothing_factor``)."""

    def __call__(
        self, student_logits: Tensor, teacher_logits: Tensor | tuple[Tensor, Tensor], labels: Tensor
    ) -> dict[str, Tensor]:
        """``teacher_logits``: the teacher's logits, or its offline top-k ``(log_probs, indices)``
        at this temperature, ``(B, L, k)`` each (:mod:`dtokd.data.teacher_outputs`), shifted as
        the logits are."""
        if self.divergence == "auto":
            raise ValueError(
                "causal_lm_losses(divergence='auto') takes the form of its balancing method: "
                "with_distillation_form(losses, method) resolves it (the integrations do); to call the "
                "losses yourself give the divergence (e.g. 'forward_kl')"
            )
        logits, targets = student_logits[:, :-1], labels[:, 1:]
        teacher: Tensor | None = None
        topk: tuple[Tensor, Tensor] | None = None
        if isinstance(teacher_logits, tuple):
            topk = (teacher_logits[0][:, :-1], teacher_logits[1][:, :-1])
        else:
            teacher = teacher_logits[:, :-1]
        distill = token_kd_loss(
            logits,
            teacher,
            targets,
            teacher_topk=topk,
            divergence=self.divergence,
            beta=self.beta,
            temperature=self.temperature,
            ignore_index=self.ignore_index,
            chunk_tokens=self.chunk_tokens,
        )
        task = next_token_cross_entropy(
            logits, targets, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing
        )
        return {"distill": distill, "task": task}


def default_losses(temperature: float = 4.0, divergence: str = "forward_kl", label_smoothing: float = 0.0) -> LossFn:
    """The classifier losses at temperature ``temperature`` (see :class:`ClassifierLosses`)."""
    return ClassifierLosses(temperature, divergence, label_smoothing)


def causal_lm_losses(
    divergence: str = "auto",
    temperature: float = 1.0,
    beta: float = 0.5,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
) -> LossFn:
    """The causal-LM losses (see :class:`CausalLMLosses`)."""
    return CausalLMLosses(divergence, temperature, beta, chunk_tokens, ignore_index, label_smoothing)


def with_distillation_form(losses: LossFn, method: str) -> LossFn:
    """``losses`` with an ``auto`` token-level divergence replaced by the form ``method`` is
    measured best with (:func:`~dtokd.balancing.balancers.distillation_form`: the cross-entropy
    to the teacher for ``dto-amortized``, the forward KL otherwise); other losses unchanged."""
    if isinstance(losses, CausalLMLosses) and losses.divergence == "auto":
        return dataclasses.replace(losses, divergence=distillation_form(method))
    return losses


SMOOTHABLE = (ClassifierLosses, CausalLMLosses)
"""The losses whose task term takes a framework's label smoothing."""


def with_label_smoothing(losses: LossFn, factor: float, setting: str) -> LossFn:
    """``losses`` with its task cross-entropy smoothed by ``factor`` (a framework's own setting,
    named ``setting`` in errors): the default losses take it; a loss function of the user's
    cannot be changed from outside, so a non-zero factor is refused for it, not ignored."""
    if not (isinstance(factor, (int, float)) and 0 <= factor < 1):
        raise ValueError(f"{setting}={factor!r} must lie in [0, 1)")
    if factor == 0:
        return losses
    if not isinstance(losses, SMOOTHABLE):
        raise ValueError(
            f"{setting}={factor} cannot be applied to the losses function {losses!r}: smooth the labels "
            f"inside it and leave {setting} at 0 (or use dtokd's default losses, which take it)"
        )
    if losses.label_smoothing not in (0, factor):
        raise ValueError(
            f"{setting}={factor}, but the losses smooth with label_smoothing={losses.label_smoothing}: give one of them"
        )
    return dataclasses.replace(losses, label_smoothing=float(factor))


def check_balanced_parameters(balancer: Any, params: Any, how: str) -> None:
    """``params`` (the model's, now) are the ones ``balancer`` was built over, by identity and in
    order; else a ValueError saying ``how`` to train instead. A wrapper that replaces them (FSDP's
    ``fully_shard``, applied by accelerate on GPUs or in a Lightning ``configure_model``,
    re-registers them as new tensors) would leave the balancer weighing stale tensors. Compared
    with the balancer's own list, so a module pickled together with it (``ddp_spawn``) passes."""
    if [id(p) for p in params] != [id(p) for p in balancer.engine.params]:
        raise ValueError(
            "the model's parameters were replaced after the balancer was built over them (FSDP sharding "
            f"does this), so it no longer sees them: {how}"
        )
