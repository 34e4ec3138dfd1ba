"""DTO-KD's amortized form (the paper's training recipe, after FAMO, Liu et al. NeurIPS 2023).

State: logits ``xi`` (m, start at 0) with their own Adam (lr 0.025, weight decay 0.01). Step::

    pi  = softmax(xi)
    c   = sum_i pi_i / L_i                                    (detached)
    .grad += grad sum_i (pi_i / c) log L_i  = sum_i pi_i / (c L_i) grad L_i   (ONE backward)

and after ``optimizer.step()``, with ``delta_i = log L_i(before) - log L_i(after)``::

    xi <- Adam step with gradient  (d softmax / d xi)^T delta  =  pi * (delta - <pi, delta>)

``update="same-batch"`` (the paper): the caller re-evaluates the losses on the same batch
with the updated student under ``torch.no_grad()`` and calls :meth:`update`; a forgotten
call is an error at the next ``backward``. ``update="next-step"``: the losses of the next
``backward`` (a new batch) serve as the "after" values, so the method costs nothing beyond
one backward; this is noisier, the batches being different. ``L`` is ``max(L, loss_floor)``
throughout (FAMO adds 1e-8 instead).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from dtokd.balancing.base import Balancer

UpdateMode = Literal["same-batch", "next-step"]


class AmortizedDTOBalancer(Balancer):
    """FAMO-style amortized DTO: one backward pass per step, weights learned across steps."""

    needs_gram = False

    def __init__(
        self,
        engine: Any,
        *,
        lr: float = 0.025,
        weight_decay: float = 0.01,
        update: UpdateMode = "same-batch",
        **kwargs: Any,
    ) -> None:
        if not kwargs.get("log_losses", True):
            raise ValueError("dto-amortized balances log losses by construction; log_losses=False is not allowed")
        super().__init__(engine, rescale="unit-sum", **kwargs)
        if update not in ("same-batch", "next-step"):
            raise ValueError(f"update={update!r} is not allowed; use 'same-batch' or 'next-step'")
        for name, value in (("lr", lr), ("weight_decay", weight_decay)):
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        self.lr, self.weight_decay, self.update_mode = float(lr), float(weight_decay), update
        self.logits: Tensor | None = None
        self._optimizer: torch.optim.Adam | None = None
        self._before: Tensor | None = None  # log losses of the last step, awaiting their "after"

    def _weights(self, gram: Tensor | None, loss_values: Tensor) -> Tensor:
        log_losses = self._divisors(loss_values).to("cpu").log()
        if self._before is not None:
            if self.update_mode == "same-batch":
                raise RuntimeError(
                    "dto-amortized (update='same-batch'): call balancer.update(losses_after) after "
                    "optimizer.step(), with the losses re-evaluated on the same batch under torch.no_grad()"
                )
            self._learn(self._before - log_losses)
        self._ensure_logits(len(log_losses))
        self._before = log_losses
        return torch.softmax(self.logits.detach(), 0).to(loss_values.device)  # type: ignore[union-attr]

    def update(self, losses_after: Mapping[str, Tensor]) -> None:
        """Give the losses re-evaluated after ``optimizer.step()`` on the same batch."""
        if self.update_mode != "same-batch":
            raise RuntimeError("update() is only used with update='same-batch'; 'next-step' learns by itself")
        if self._before is None:
            raise RuntimeError("update() called before backward(): nothing to compare with")
        if self.names is None or set(losses_after) != set(self.names):
            raise ValueError(f"update(): losses must have the names {self.names}, got {sorted(losses_after)}")
        after = torch.stack([losses_after[n].detach().reshape(()).to(torch.float64) for n in self.names])
        if self.sync.global_mode:
            after = self.sync.mean(after)
        after = after.to("cpu")
        if not torch.isfinite(after).all():
            raise ValueError(f"update(): non-finite losses after the step {dict(zip(self.names, after.tolist()))}")
        self._learn(self._before - self._divisors(after).log())
        self._before = None

    def _learn(self, delta: Tensor) -> None:
        pi = torch.softmax(self.logits.detach(), 0)  # type: ignore[union-attr]
        self.logits.grad = pi * (delta - (pi * delta).sum())  # type: ignore[union-attr]
        self._optimizer.step()  # type: ignore[union-attr]

    def _ensure_logits(self, m: int) -> None:
        if self.logits is None:
            self.logits = torch.zeros(m, dtype=torch.float64, requires_grad=True)
            self._optimizer = torch.optim.Adam([self.logits], lr=self.lr, weight_decay=self.weight_decay)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.logits is not None:
            state.update(
                logits=self.logits.detach().clone(),
                optimizer=self._optimizer.state_dict(),  # type: ignore[union-attr]
                before=None if self._before is None else self._before.clone(),
            )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if "logits" in state:
            self.logits = None
            self._ensure_logits(len(state["logits"]))
            with torch.no_grad():
                self.logits.copy_(state["logits"])  # type: ignore[union-attr]
            self._optimizer.load_state_dict(state["optimizer"])  # type: ignore[union-attr]
            before = state.get("before")
            self._before = None if before is None else before.clone()
