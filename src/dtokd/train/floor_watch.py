"""The run's warning for the known failure of the rules on log losses: the coefficient such a
rule puts on a raw loss is ``c_i = pi_i / L_i`` (``dtokd.balancing.base``), so a distillation
loss that nears its floor takes the step whatever the learner does, and the other objectives
are all but dropped.

From the records (an epoch's share of the coefficients, ``|c_i| / sum_j |c_j|``, of a
distillation objective at the smallest loss): with Fashion-MNIST's 57 % teacher the KL took
0.99 in the last epoch under the amortized rule and under the loss-size baseline (22.5 and 21.5
points below the student alone), with the language model's forward KL 0.89 (+2.5 perplexity
against fixed KD); on the synthetic detection set the coarsest FPN level, at a loss below
0.006, took 0.86-0.94 from a good teacher (0.91 AP behind hand-set FPN weights). In the
runs that went well it stayed at or below 0.66 (the ViT's token loss, the language model's
DTO); `anchored` on the language model reached 0.77 (0.57 perplexity behind fixed KD), and the
paper's exact rule with the weak teacher 0.73 while it followed the teacher down (82.1 against
84.9 alone): the warning does not catch that one. A label loss (the task's own, no teacher)
taking the step is not warned about: that drops the teacher, the safe side with a weak one.

:func:`floor_warning` reads an epoch's metrics row: where the balancer balances log losses and
a distillation objective took at least :data:`SHARE` of the coefficients while its mean loss was
the smallest, it says so; the training loop warns once a run (:func:`warn_on_floor`, a resumed
run counting the epochs it restored) and changes nothing it computes."""

from __future__ import annotations

import math
import warnings
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from dtokd.tasks import task_kind
from dtokd.tasks.specs import losses_where

SHARE = 0.85
"""The share a distillation objective at the smallest loss must reach for the warning."""


class FloorWarning(UserWarning):
    """A distillation loss near its floor took the step of a rule on log losses (see the module)."""


def label_losses(specs: Mapping[str, Mapping[str, Any]], kind: str) -> list[str]:
    """The names of the losses of task ``kind`` among ``specs`` (resolved) that need no teacher."""
    return losses_where(specs, task_kind(kind).loss_types, lambda record: not record.needs_teacher)


def floor_warning(
    row: Mapping[str, Any], *, log_losses: bool, method: str, epoch: int, labels: Collection[str]
) -> str | None:
    """The warning for epoch ``epoch`` (0-based) of a run whose metrics row is ``row``, or None;
    ``labels``: the label losses' names (an objective ``NAME`` or ``NAME/part`` of one is theirs)."""
    names = [key[len("loss_weight/") :] for key in row if key.startswith("loss_weight/")]
    if not log_losses or any(f"loss/{name}" not in row for name in names):
        return None
    is_label = {name: name.split("/")[0] in labels for name in names}
    if all(is_label.values()) or not any(is_label.values()):
        return None
    coefficients = {name: abs(float(row[f"loss_weight/{name}"])) for name in names}
    total = sum(coefficients.values())
    if not (math.isfinite(total) and total > 0):
        return None
    name = max(names, key=lambda n: coefficients[n])
    share, losses = coefficients[name] / total, {n: float(row[f"loss/{n}"]) for n in names}
    if is_label[name] or share < SHARE or losses[name] > min(losses.values()):
        return None
    others = ", ".join(n for n in names if n != name)
    return (
        f"{name} took {share:.2f} of the coefficients in epoch {epoch + 1} at the smallest loss ({losses[name]:.3g}); "
        f"{others} got {1 - share:.2f}. {method} weights a raw loss as pi / L, so a distillation loss near its "
        "floor takes the step and the other objectives are all but dropped: the failure of the weak-teacher, "
        "forward-KL and detection records (docs/methods.md, 'Which to pick')."
    )


def _message(row: Mapping[str, Any], balancer: Any, epoch: int, labels: Collection[str]) -> str | None:
    return floor_warning(row, log_losses=bool(balancer.log_losses), method=balancer.method, epoch=epoch, labels=labels)


def warned_before(rows: Sequence[Mapping[str, Any]], balancer: Any, labels: Collection[str]) -> bool:
    """Whether one of ``rows`` (a resumed run's restored epochs, in order) had a warning."""
    return any(_message(row, balancer, epoch, labels) is not None for epoch, row in enumerate(rows))


def warn_on_floor(row: Mapping[str, Any], balancer: Any, run: str, epoch: int, labels: Collection[str]) -> bool:
    """Warn (:class:`FloorWarning`) if :func:`floor_warning` has a warning for this epoch of run
    ``run`` under ``balancer``; returns whether it did."""
    message = _message(row, balancer, epoch, labels)
    if message is not None:
        warnings.warn(f"[{run}] {message}", FloorWarning, stacklevel=2)
    return message is not None
