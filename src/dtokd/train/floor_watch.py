"""The run's warning for the known failure of the rules on log losses: the coefficient such a
rule puts on a raw loss is ``c_i = pi_i / L_i`` (``dtokd.balancing.base``), so a loss that
nears its floor takes the step whatever the learner does, and the other objectives are all
but dropped.

The records show it both ways. A KL to a teacher worse than the labels nears 0 and takes the
step: the student follows the teacher down (Fashion-MNIST's 57 % teacher: 0.99 of the
coefficients on the KL in the last epoch, 22.6 points below the student alone; the language
model with the forward KL: 0.89, +2.5 perplexity against fixed KD). A KD loss whose floor is
far above the task's (the cross-entropy form at T = 4) leaves the step to the task: 0.98 on the
task with Fashion-MNIST's 91 % teacher, which kept +0.49 of the +1.33 the KL form gained. In the
runs that went well the largest share at the smallest loss was 0.81 (CIFAR-10's task in its
last epoch); :data:`SHARE` sits between.

:func:`floor_warning` reads an epoch's metrics row: where the balancer balances log losses and
one objective took at least :data:`SHARE` of the coefficients (``|c_i| / sum_j |c_j|``, the
epoch's mean ``loss_weight/NAME``) while its mean loss was the smallest, it says so; the
training loop warns once a run (:func:`warn_on_floor`) and changes nothing it computes."""

from __future__ import annotations

import math
import warnings
from typing import Any

SHARE = 0.85
"""The share of the coefficients one objective at the smallest loss must reach for the warning."""


class FloorWarning(UserWarning):
    """A loss near its floor took the step of a rule on log losses (see :mod:`dtokd.train.floor_watch`)."""


def floor_warning(row: dict[str, Any], *, log_losses: bool, method: str, epoch: int) -> str | None:
    """The warning for epoch ``epoch`` (0-based) of a run whose metrics row is ``row``, or None."""
    names = [key[len("loss_weight/") :] for key in row if key.startswith("loss_weight/")]
    if not log_losses or len(names) < 2 or any(f"loss/{name}" not in row for name in names):
        return None
    coefficients = {name: abs(float(row[f"loss_weight/{name}"])) for name in names}
    total = sum(coefficients.values())
    if not (math.isfinite(total) and total > 0):
        return None
    name = max(names, key=lambda n: coefficients[n])
    share, losses = coefficients[name] / total, {n: float(row[f"loss/{n}"]) for n in names}
    if share < SHARE or losses[name] > min(losses.values()):
        return None
    others = ", ".join(n for n in names if n != name)
    return (
        f"{name} took {share:.2f} of the coefficients in epoch {epoch + 1} at the smallest loss ({losses[name]:.3g}); "
        f"{others} got {1 - share:.2f}. {method} weights a raw loss as pi / L, so a loss near its floor takes the "
        "step: a KL to a teacher worse than the labels (the student follows it down), or a task loss far below "
        "the KD loss's floor (the teacher is dropped). See docs/methods.md ('Which to pick')."
    )


def warn_on_floor(row: dict[str, Any], balancer: Any, run: str, epoch: int) -> bool:
    """Warn (:class:`FloorWarning`) if :func:`floor_warning` has a warning for this epoch of run
    ``run`` under ``balancer``; returns whether it warned."""
    message = floor_warning(row, log_losses=bool(balancer.log_losses), method=balancer.method, epoch=epoch)
    if message is not None:
        warnings.warn(f"[{run}] {message}", FloorWarning, stacklevel=2)
    return message is not None
