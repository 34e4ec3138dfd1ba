"""The causal language-model task: a batch of token blocks becomes named token-level losses, and
a model is evaluated by held-out perplexity and next-token accuracy.

A batch is ``(input_ids, targets)``, both ``(B, L)``: the targets are the next tokens
(:class:`~dtokd.data.text.TokenBlocks`), ``-100`` where a position does not count. Loss specs:

- ``ce``: next-token cross-entropy, the mean over counted tokens;
- ``token-kd``: :func:`~dtokd.losses.token_kd.token_kd_loss` to the teacher's next-token
  distribution: ``divergence`` (``forward_kl``, ``reverse_kl``, ``jsd``), ``beta`` (jsd's mix,
  0.5), ``temperature`` (1), ``chunk_tokens`` (1024): the mean over counted tokens.

The balancer's representation (for the ``representation`` engine) is the student's logits
``(B, L, V)``. Teacher and student must share the tokenizer (the same vocabulary size is
checked when the teacher is loaded).

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
from dtokd.losses.token_kd import DIVERGENCES, token_kd_loss
from dtokd.tasks.specs import fill_specs

LOSS_OPTIONS: dict[str, dict[str, Any]] = {
    "ce": {},
    "token-kd": {"divergence": "forward_kl", "beta": 0.5, "temperature": 1.0, "chunk_tokens": 1024},
}
IGNORE_INDEX = -100


def resolve_lm_specs(specs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Fill in defaults and reject unknown types, options or values, naming them."""
    resolved = fill_specs(specs, LOSS_OPTIONS, "causal-lm", "{task: {type: ce}}")
    for name, spec in resolved.items():
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


def next_token_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """The mean over counted tokens (targets not -100) of ``-log softmax(logits)[target]``, in
    float32 (0 for a batch without a counted token)."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    total = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp_min(1)


class CausalLMTask(nn.Module):
    """``forward(input_ids, targets, progress) -> (logits, {name: loss})``."""

    metric = "top1"

    def __init__(self, student: nn.Module, teacher: nn.Module | None, specs: Mapping[str, Mapping[str, Any]]) -> None:
        super().__init__()
        self.student = student
        self.teacher = [teacher]  # a list keeps the frozen teacher out of parameters() and state_dict()
        self.specs = resolve_lm_specs(specs)
        needs_teacher = [n for n, s in self.specs.items() if s["type"] != "ce"]
        if needs_teacher and teacher is None:
            raise ValueError(f"loss(es) {needs_teacher} need a teacher, but none is configured (teacher.name)")
        self.projectors = nn.ModuleDict()  # none: the run folder's state has the same keys for every task
        self._last_teacher: Tensor | None = None

    def use_teacher(self, call: Any) -> None:
        """Take the teacher's logits from ``call(input_ids)`` in training from now on (a
        :class:`~dtokd.train.teacher_cache.CachedTeacher`)."""
        self.teacher[0] = call

    @property
    def loss_names(self) -> list[str]:
        return list(self.specs)

    def forward(
        self, x: Tensor, y: Tensor, progress: float | None = None, *, reuse_teacher: bool = False
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``reuse_teacher=True`` takes the teacher's logits of the previous call (same batch)."""
        if not reuse_teacher:
            self._last_teacher = None
            if any(s["type"] != "ce" for s in self.specs.values()):
                with torch.no_grad():
                    self._last_teacher = self.teacher[0](x)
        logits = self.student(x)
        losses: dict[str, Tensor] = {}
        for name, spec in self.specs.items():
            if spec["type"] == "ce":
                losses[name] = next_token_cross_entropy(logits, y)
            else:
                losses[name] = token_kd_loss(
                    logits,
                    self._last_teacher,
                    y,
                    divergence=spec["divergence"],
                    beta=spec["beta"],
                    temperature=spec["temperature"],
                    ignore_index=IGNORE_INDEX,
                    chunk_tokens=spec["chunk_tokens"],
                )
        return logits, losses

    def evaluate(
        self, model: nn.Module, dataset: Any, batch_size: int, device: torch.device, *, channels_last: bool = False
    ) -> dict[str, float]:
        return evaluate_causal_lm(model, dataset, batch_size, device)


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
