"""What a balancer reports about one step, for logging.

Tensors are float64 on the CPU (read by the balancer's one host copy per step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class StepInfo:
    """One balancer step.

    ``weights``: the rule's weights ``pi_i`` on the objective gradients it balanced (for
    DTO these are the gradients of ``log L_i``). ``loss_weights``: the coefficient that was
    actually applied to each raw loss gradient, ``sum_i loss_weights[i] * grad L_i`` being the
    update written to ``.grad`` (for DTO ``pi_i / L_i``): directly comparable with the
    ``alpha`` of fixed-weight KD. ``gram``: the Gram matrix the rule saw; ``raw_gram``: the
    Gram of the raw loss gradients, from which ``norms``, ``cosines``, ``conflict`` and
    ``dominance`` are computed (None when the balancer did not need it and was not asked to
    diagnose). ``conflict`` and ``dominance`` compare the first two losses in the order they
    were given: pass ``{"distill": ..., "task": ...}`` to get ``cos(g_distill, g_task)`` and
    ``||g_distill|| / ||g_task||``.
    """

    names: tuple[str, ...]
    loss_values: Tensor
    weight_values: Tensor
    coefficient_values: Tensor
    gram: Tensor | None = None
    raw_gram: Tensor | None = None
    skipped_reason: str | None = None

    @property
    def skipped(self) -> bool:
        """True when no gradient was written this step (see ``skipped_reason``)."""
        return self.skipped_reason is not None

    @property
    def losses(self) -> dict[str, float]:
        return self._by_name(self.loss_values)

    @property
    def weights(self) -> dict[str, float]:
        return self._by_name(self.weight_values)

    @property
    def loss_weights(self) -> dict[str, float]:
        return self._by_name(self.coefficient_values)

    @property
    def norms(self) -> dict[str, float] | None:
        """``||grad L_i||`` of the raw losses, by name."""
        if self.raw_gram is None:
            return None
        return self._by_name(self.raw_gram.diagonal().clamp_min(0).sqrt())

    @property
    def cosines(self) -> Tensor | None:
        """m x m matrix of ``cos(grad L_i, grad L_j)`` (0 where a gradient is zero)."""
        if self.raw_gram is None:
            return None
        norms = self.raw_gram.diagonal().clamp_min(0).sqrt()
        outer = torch.outer(norms, norms)
        return torch.where(outer > 0, self.raw_gram / outer.clamp_min(torch.finfo(outer.dtype).tiny), 0.0)

    @property
    def conflict(self) -> float | None:
        """``cos(grad L_1, grad L_2)`` of the first two losses; negative means they conflict."""
        cosines = self.cosines
        if cosines is None or len(self.names) < 2:
            return None
        return float(cosines[0, 1])

    @property
    def dominance(self) -> float | None:
        """``||grad L_1|| / ||grad L_2||`` of the first two losses (inf if the second is 0)."""
        norms = self.norms
        if norms is None or len(self.names) < 2:
            return None
        first, second = norms[self.names[0]], norms[self.names[1]]
        return first / second if second > 0 else math.inf

    def as_dict(self) -> dict[str, float]:
        """A flat ``{key: float}`` view for a logger: ``weight/NAME``, ``loss_weight/NAME``,
        ``loss/NAME``, ``grad_norm/NAME``, ``cos/A|B``, ``conflict``, ``dominance``, ``skipped``."""
        row: dict[str, float] = {"skipped": float(self.skipped)}
        for prefix, values in (("loss", self.losses), ("weight", self.weights), ("loss_weight", self.loss_weights)):
            row.update({f"{prefix}/{k}": v for k, v in values.items()})
        norms, cosines = self.norms, self.cosines
        if norms is not None and cosines is not None:
            row.update({f"grad_norm/{k}": v for k, v in norms.items()})
            for i, a in enumerate(self.names):
                for j in range(i + 1, len(self.names)):
                    row[f"cos/{a}|{self.names[j]}"] = float(cosines[i, j])
            if len(self.names) >= 2:
                row["conflict"] = float(self.conflict)  # type: ignore[arg-type]
                row["dominance"] = float(self.dominance)  # type: ignore[arg-type]
        return row

    def _by_name(self, values: Tensor) -> dict[str, float]:
        return dict(zip(self.names, values.detach().to("cpu", torch.float64).tolist()))
