"""What the framework integrations share: the default distillation losses, for classifiers and
for causal language models. They are picklable (frozen dataclasses, not closures), so a module
or trainer holding them can be sent to spawned processes (Lightning's ``ddp_spawn``,
``torch.multiprocessing``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from dtokd.losses.kd import cross_entropy, kd_loss
from dtokd.losses.token_kd import DEFAULT_CHUNK_TOKENS, token_kd_loss

LossFn = Callable[[Tensor, Tensor, Tensor], Mapping[str, Tensor]]


@dataclass(frozen=True)
class ClassifierLosses:
    """``{"distill": T^2 KL (or, with ``divergence="forward_ce"``, T^2 cross-entropy) to the
    teacher at temperature T, "task": cross-entropy}`` on ``(B, C)`` logits (see
    :func:`dtokd.losses.kd.kd_loss`)."""

    temperature: float = 4.0
    divergence: str = "forward_kl"

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor, y: Tensor) -> dict[str, Tensor]:
        return {
            "distill": kd_loss(student_logits, teacher_logits, self.temperature, self.divergence),
            "task": cross_entropy(student_logits, y),
        }


@dataclass(frozen=True)
class CausalLMLosses:
    """``{"distill": token_kd_loss, "task": next-token cross-entropy}`` for Hugging Face causal
    LMs, whose ``labels`` are the input ids (``ignore_index`` where a token does not count) and
    are shifted inside: the logits at position ``i`` are scored on the label at ``i + 1``, as
    the model's own loss does. Both are means over the counted tokens (see
    :func:`dtokd.losses.token_kd_loss`)."""

    divergence: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    ignore_index: int = -100

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        logits, targets = student_logits[:, :-1], labels[:, 1:]
        distill = token_kd_loss(
            logits,
            teacher_logits[:, :-1],
            targets,
            divergence=self.divergence,
            beta=self.beta,
            temperature=self.temperature,
            ignore_index=self.ignore_index,
            chunk_tokens=self.chunk_tokens,
        )
        flat = logits.reshape(-1, logits.shape[-1]).float()
        task = F.cross_entropy(flat, targets.reshape(-1), ignore_index=self.ignore_index, reduction="sum")
        return {"distill": distill, "task": task / (targets != self.ignore_index).sum().clamp_min(1)}


def default_losses(temperature: float = 4.0, divergence: str = "forward_kl") -> LossFn:
    """The classifier losses at temperature ``temperature`` (see :class:`ClassifierLosses`)."""
    return ClassifierLosses(temperature, divergence)


def causal_lm_losses(
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ignore_index: int = -100,
) -> LossFn:
    """The causal-LM losses (see :class:`CausalLMLosses`)."""
    return CausalLMLosses(divergence, temperature, beta, chunk_tokens, ignore_index)
