"""GradNorm (Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing", ICML 2018).

Learned weights ``w`` (start ``1/m``; ours sum to 1 where the paper's sum to m, a global
scale). Each step, from the Gram over the engine's parameters (the paper uses the last
shared layer: ``engine="subset", gram_params=...``)::

    n_i      = w_i ||grad L_i||  = w_i sqrt(G_ii)
    r_i      = (L_i / L_i(0)) / mean_j (L_j / L_j(0))           (relative inverse training rate)
    target_i = mean(n) * r_i ** alpha                           (held constant)
    L_grad   = sum_i |n_i - target_i|,   dL_grad/dw_i = sign(n_i - target_i) sqrt(G_ii)

The update uses the current ``w``; then ``w`` takes an Adam step on ``dL_grad/dw``, is
clipped at 1e-8 from below and renormalised to sum 1. ``L(0)`` is the first step's losses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from dtokd.balancing.base import Balancer
from dtokd.balancing.checks import check_non_negative


class GradNormBalancer(Balancer):
    """GradNorm's learned weights, computed analytically from the Gram (no second-order autograd)."""

    method = "gradnorm"
    learned_state = frozenset({"loss_weights", "initial_losses", "optimizer"})

    def __init__(self, engine: Any, *, alpha: float = 1.5, lr: float = 0.025, **kwargs: Any) -> None:
        super().__init__(engine, **kwargs)
        for name, value in (("alpha", alpha), ("lr", lr)):
            check_non_negative(f"gradnorm: {name}", value)
        self.alpha, self.lr = float(alpha), float(lr)
        self.loss_weights: Tensor | None = None
        self.initial_losses: Tensor | None = None
        self._optimizer: torch.optim.Adam | None = None

    def _weights(self, gram: Tensor | None, loss_values: Tensor) -> Tensor:
        assert gram is not None
        losses = loss_values.to("cpu")
        if self.loss_weights is None:
            self._init(len(losses), losses)
        used = self.loss_weights.detach().clone()  # type: ignore[union-attr]
        grad_norms = gram.detach().to("cpu", torch.float64).diagonal().clamp_min(0).sqrt()
        norms = used * grad_norms
        ratio = losses / self.initial_losses.clamp_min(self.loss_floor)  # type: ignore[union-attr]
        ratio = ratio / ratio.mean()
        target = norms.mean() * ratio**self.alpha
        self.loss_weights.grad = torch.sign(norms - target) * grad_norms  # type: ignore[union-attr]
        self._optimizer.step()  # type: ignore[union-attr]
        with torch.no_grad():
            self.loss_weights.clamp_(min=1e-8)  # type: ignore[union-attr]
            self.loss_weights.div_(self.loss_weights.sum())  # type: ignore[union-attr]
        return used.to(loss_values.device)

    def _init(self, m: int, losses: Tensor) -> None:
        self.loss_weights = torch.full((m,), 1.0 / m, dtype=torch.float64, requires_grad=True)
        self.initial_losses = losses.clone()
        self._optimizer = torch.optim.Adam([self.loss_weights], lr=self.lr)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.loss_weights is not None:
            state.update(
                loss_weights=self.loss_weights.detach().clone(),
                initial_losses=self.initial_losses.clone(),  # type: ignore[union-attr]
                optimizer=self._optimizer.state_dict(),  # type: ignore[union-attr]
            )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if "loss_weights" in state:
            self._init(len(state["loss_weights"]), state["initial_losses"])
            with torch.no_grad():
                self.loss_weights.copy_(state["loss_weights"])  # type: ignore[union-attr]
            self._optimizer.load_state_dict(state["optimizer"])  # type: ignore[union-attr]
