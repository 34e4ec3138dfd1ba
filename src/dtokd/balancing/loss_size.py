"""The loss-size baseline: each distillation loss rescaled to the task loss's size, as language-
model distillers run it (NVIDIA ModelOpt's Megatron loss balancer, MaxText's KD recipes).

For the task loss ``L_t`` and distillation losses ``L_d``, with ``s`` the distillation scale::

    .grad += grad L_t + sum_d s * (L_t / L_d) * grad L_d          (L_t / L_d detached)

so every distillation term carries the task loss's value, whatever its own scale (a KL that
nears 0, a feature loss in other units). In dtokd's terms: log losses (``c_i = pi_i / L_i``)
with ``pi_d = s L_t`` and ``pi_t = L_t``, that is the task's gradient plus ``s L_t`` times
the distillation losses' log-gradients. No Gram, no state, one backward, no host read.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from dtokd.balancing.base import Balancer


class LossSizeBalancer(Balancer):
    """Distillation losses rescaled by the detached ratio of the task loss to them."""

    needs_gram = False
    method = "loss-size"
    log_losses_by_default = True

    def __init__(
        self, engine: Any, *, task: str = "task", scale: float = 1.0, rescale: str = "none", **kwargs: Any
    ) -> None:
        if not kwargs.get("log_losses", True):
            raise ValueError("loss-size divides by the losses' values (log losses by construction); log_losses=False")
        if rescale != "none":
            raise ValueError(f"loss-size takes no rescale (the task's coefficient is 1), got rescale={rescale!r}")
        super().__init__(engine, **kwargs)
        if not isinstance(task, str):
            raise TypeError(f"loss-size: task must be the task loss's name, got {task!r}")
        if isinstance(scale, bool) or not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"loss-size: scale must be a positive finite number, got {scale!r}")
        self.task, self.scale = task, float(scale)

    def _task_index(self) -> int:
        if self.task not in self._names:
            raise ValueError(f"loss-size: task={self.task!r} is not one of the losses {list(self._names)}")
        return self._names.index(self.task)

    def _weights(self, gram: Tensor | None, loss_values: Tensor) -> Tensor:
        """``pi_i = s L_t`` for the distillation losses, ``L_t`` for the task (``L_t`` at least
        the loss floor, as every log-loss divisor)."""
        k = self._task_index()
        task = loss_values[k].clamp_min(self.loss_floor)
        scales = torch.full_like(loss_values, self.scale)
        scales[k] = 1.0
        return scales * task

    def _has_device_rule(self, num_losses: int) -> bool:
        return True
