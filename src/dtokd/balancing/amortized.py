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
throughout (FAMO adds 1e-8 instead). With ``deferred_checks=True`` the finiteness check of
:meth:`update`'s losses is deferred to the next step as well.

The learner's state lives on the device of the losses and its Adam step is written out in
tensor operations (torch.optim.Adam's update, operation for operation), so that a step on a
GPU needs no host read before its update is queued (see :class:`~dtokd.balancing.base.Balancer`);
``state_dict()`` holds CPU copies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from dtokd.balancing.base import Balancer, NonFiniteStepError, deferred_message
from dtokd.balancing.stepinfo import HostCopy

UpdateMode = Literal["same-batch", "next-step"]

_BETAS = (0.9, 0.999)
_EPS = 1e-8


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
        self._exp_avg: Tensor | None = None
        self._exp_avg_sq: Tensor | None = None
        self._adam_steps = 0
        self._before: Tensor | None = None  # log losses of the last step, awaiting their "after"
        self._unchecked_after: HostCopy | None = None  # update()'s losses, while their check is deferred

    def _weights(self, gram: Tensor | None, loss_values: Tensor) -> Tensor:
        log_losses = loss_values.clamp_min(self.loss_floor).log()
        self._place(log_losses.device, len(log_losses))
        if self._before is not None:
            if self.update_mode == "same-batch":
                raise RuntimeError(
                    "dto-amortized (update='same-batch'): call balancer.update(losses_after) after "
                    "optimizer.step(), with the losses re-evaluated on the same batch under torch.no_grad()"
                )
            self._learn(self._before - log_losses)
        self._before = log_losses
        return torch.softmax(self._learner()[0], 0)

    def _has_device_rule(self, num_losses: int) -> bool:
        """Always: the learner runs on the losses' device, with no host read."""
        return True

    def update(self, losses_after: Mapping[str, Tensor]) -> None:
        """Give the losses re-evaluated after ``optimizer.step()`` on the same batch."""
        if self.update_mode != "same-batch":
            raise RuntimeError("update() is only used with update='same-batch'; 'next-step' learns by itself")
        if self._before is None:
            raise RuntimeError("update() called before backward(): nothing to compare with")
        if self.names is None or set(losses_after) != set(self.names):
            raise ValueError(f"update(): losses must have the names {self.names}, got {sorted(losses_after)}")
        after = torch.stack([losses_after[n].detach().reshape(()) for n in self.names]).to(torch.float64)
        if self.sync.global_mode:
            after = self.sync.mean(after)
        after = after.to(self._before.device)
        if self.deferred_checks:
            self._unchecked_after = HostCopy(after)
        else:
            self._check_after(after, deferred=False)
        self._learn(self._before - after.clamp_min(self.loss_floor).log())
        self._before = None

    def check_deferred(self) -> None:
        """The deferred checks of the last step, and those of its :meth:`update` losses."""
        after, self._unchecked_after = self._unchecked_after, None
        super().check_deferred()
        if after is not None:
            self._check_after(after.tensor, deferred=True)

    def _check_after(self, after: Tensor, deferred: bool) -> None:
        listed = after.tolist()
        if not all(map(math.isfinite, listed)):
            problem = f"update(): non-finite losses after the step {dict(zip(self._names, listed))}"
            raise NonFiniteStepError(deferred_message(problem) if deferred else problem)

    def _learner(self) -> tuple[Tensor, Tensor, Tensor]:
        """The learner's state: the logits ``xi`` and Adam's two moment estimates."""
        xi, exp_avg, exp_avg_sq = self.logits, self._exp_avg, self._exp_avg_sq
        if xi is None or exp_avg is None or exp_avg_sq is None:
            raise RuntimeError("dto-amortized: the learner's state is made by the first backward()")
        return xi, exp_avg, exp_avg_sq

    def _learn(self, delta: Tensor) -> None:
        """One Adam step (L2 weight decay) on ``xi`` with gradient ``pi * (delta - <pi, delta>)``."""
        xi, exp_avg, exp_avg_sq = self._learner()
        pi = torch.softmax(xi, 0)
        grad = pi * (delta - (pi * delta).sum()) + self.weight_decay * xi
        beta1, beta2 = _BETAS
        self._adam_steps += 1
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = self.lr / (1 - beta1**self._adam_steps)
        denominator = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**self._adam_steps)).add_(_EPS)
        xi.addcdiv_(exp_avg, denominator, value=-step_size)

    def _place(self, device: torch.device, m: int) -> None:
        """Create the learner's state (zeros) on ``device``, or move it there."""
        if self.logits is None:
            self.logits, self._exp_avg, self._exp_avg_sq = (
                torch.zeros(m, dtype=torch.float64, device=device) for _ in range(3)
            )
        elif self.logits.device != device:
            self.logits, self._exp_avg, self._exp_avg_sq = (t.to(device) for t in self._learner())
            self._before = None if self._before is None else self._before.to(device)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.logits is not None:
            xi, exp_avg, exp_avg_sq = self._learner()
            state.update(
                logits=xi.cpu().clone(),
                adam={
                    "exp_avg": exp_avg.cpu().clone(),
                    "exp_avg_sq": exp_avg_sq.cpu().clone(),
                    "steps": self._adam_steps,
                },
                before=None if self._before is None else self._before.cpu().clone(),
            )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if "logits" in state:
            if "adam" not in state:
                raise ValueError(
                    "dto-amortized state has no 'adam' entry (a checkpoint from before the learner moved to "
                    f"the losses' device, keys {sorted(state)}); it cannot be resumed by this version"
                )
            adam = state["adam"]
            self.logits = state["logits"].to(torch.float64).clone()
            self._exp_avg = adam["exp_avg"].to(torch.float64).clone()
            self._exp_avg_sq = adam["exp_avg_sq"].to(torch.float64).clone()
            self._adam_steps = int(adam["steps"])
            before = state.get("before")
            self._before = None if before is None else before.to(torch.float64).clone()
