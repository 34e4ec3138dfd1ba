"""The amortized rule with a usefulness gate (dtokd, beyond the paper; the one-default issue's
second rule design): each distillation objective keeps the amortized rule's share of the step
only as far as its gradient serves the task on batches it has not seen; what the gate takes
goes to the task.

The amortized rule (:mod:`dtokd.balancing.amortized`) gives the raw losses coefficients
``s_i = (pi_i / L_i) / sum_j (pi_j / L_j)`` (shares that sum to one). A share goes as ``1 / L_i``,
so a distillation loss that nears its floor (a KL to a weak teacher the student has matched)
takes the step whether or not following it still helps. The gate measures that help the way
:mod:`dtokd.balancing.cross_batch` does, on a sample of the steps::

    u_i  = cos(g_t, g_i')           (g_i': objective i's gradient at a kept step,
    a_i <- (1 - rho) a_i + rho u_i   g_t: the task's gradient at the next step, another batch)
    gate_i = clamp(a_i / a_t, 0, 1)  for a distillation objective (1 while a_t <= 0: no evidence)
    s_i'   = gate_i s_i,   s_t' = s_t + sum_{i != t} (1 - gate_i) s_i

To first order a step ``-lr g_i'`` changes the task loss on the next batch by
``-lr <g_t, g_i'>``, so ``a_i / a_t`` is how well objective i's direction carries to new data
relative to the labels' own direction: one that carries as well keeps its share, one that
carries half as well keeps half, one that works against the task (``a_i <= 0``) keeps none
and the student learns from the labels. The shares still sum to one, as the amortized rule's;
the learner of ``pi`` is the amortized rule's, unchanged (``update``, ``lr``, ``weight_decay``).
A step's ``StepInfo.weights`` (``weight/NAME`` in a step record) are that learner's ``pi``; its
``loss_weights`` (``loss_weight/NAME``) are the gated shares applied, and :meth:`diagnostics`
gives ``a`` and the gate (``usefulness/NAME``, ``gate/NAME``).

Cost: every ``every``-th accepted backward ("kept", then compared at the next one) the exact
engine's per-objective gradients (m backward passes, m flat copies kept until the next step);
the other steps are the amortized rule's one backward. With the default ``every=10`` and two
objectives about 0.2 backward passes a step more. The gate is learned from the steps that
have gradients only, ``rho = 0.1`` a comparison (about ten comparisons, 100 steps, at the
default); gradient accumulation counts each micro-batch as a step, as the cross-batch rule does.
A step refused as non-finite is not counted and learns nothing. Resume restores ``a``, the kept
gradients and the count. Under DDP (global mode) every rank sees the averaged gradients and
gates alike; under FSDP2 each rank keeps its shards and the cosines are summed across ranks, as
in the cross-batch rule; ``sync="local"`` is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from dtokd.balancing.amortized import AmortizedDTOBalancer
from dtokd.balancing.cross_batch import CrossBatchUsefulness, KeepingEngine, check_rate, task_index
from dtokd.balancing.engines import ExactEngine
from dtokd.balancing.stepinfo import StepInfo


class GatedAmortizedBalancer(AmortizedDTOBalancer):
    """The amortized rule's shares, each distillation objective's gated by its cross-batch
    usefulness relative to the task's (see the module)."""

    method = "dto-amortized-gated"
    learned_state = AmortizedDTOBalancer.learned_state | {"usefulness", "previous", "gradient_steps"}

    def __init__(self, engine: Any, *, task: str = "task", every: int = 10, rho: float = 0.1, **kwargs: Any) -> None:
        if not isinstance(engine, ExactEngine):
            raise ValueError(
                f"{self.method} needs each objective's whole gradient at its sampled steps: engine='exact', "
                f"not {engine.name!r}"
            )
        if not isinstance(task, str):
            raise TypeError(f"{self.method}: task must be the task loss's name, got {task!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"{self.method}: every must be a whole number of steps >= 1, got {every!r}")
        check_rate(f"{self.method}: rho", rho)
        if kwargs.get("deferred_checks") is True:
            raise ValueError(
                f"{self.method}: deferred_checks=True is not allowed: its sampled steps are checked on the host "
                "before their update (the exact engine's); leave it 'auto' or False"
            )
        super().__init__(KeepingEngine(engine, self.method), **kwargs)
        if self.sync.mode == "local":
            raise ValueError(f"{self.method} needs the same gradients on every rank: sync='global' (or one process)")
        self.task, self.every, self.rho = task, every, float(rho)
        self._usefulness = CrossBatchUsefulness(self.rho, self.sync)
        self.gradient_steps = 0
        """Accepted backward calls so far: the schedule of the sampled steps."""
        self._gate: tuple[Tensor, Tensor] | None = None  # the gate and the task's one-hot, on the losses' device

    @property
    def usefulness(self) -> Tensor | None:
        """``a``: each objective's cosine with a later batch's task gradient, averaged (float64)."""
        return self._usefulness.usefulness

    @property
    def _needs_gradients(self) -> bool:
        """The step kept for the next comparison, and the one after it, need each objective's gradient."""
        return self.gradient_steps % self.every in (0, 1)

    def can_defer_checks(self, num_losses: int) -> bool:
        """Never: the sampled steps are checked on the host before their update (the exact engine's)."""
        return False

    def backward(self, losses: Mapping[str, Tensor], **kwargs: Any) -> StepInfo:
        """:meth:`AmortizedDTOBalancer.backward`; an accepted step advances the schedule."""
        info = super().backward(losses, **kwargs)
        if not info.skipped:
            self.gradient_steps += 1
        return info

    def _task(self) -> int:
        """The task loss's position (a single objective is the task, whatever its name)."""
        return 0 if len(self._names) == 1 else task_index(self.method, self.task, self._names)

    def gate(self) -> Tensor:
        """``gate_i`` for each objective (1 for the task; all 1 before the task's own usefulness is positive)."""
        a = self._usefulness.usefulness
        t = self._task()
        if a is None or not a[t] > 0:
            return torch.ones(len(self._names), dtype=torch.float64)
        gate = (a / a[t]).clamp(0.0, 1.0)
        gate[t] = 1.0
        return gate

    def diagnostics(self) -> dict[str, float]:
        """``usefulness/NAME`` (``a_i``) and ``gate/NAME`` (none before the first step)."""
        if self.names is None:
            return {}
        gate = {f"gate/{n}": float(v) for n, v in zip(self.names, self.gate().tolist())}
        return {**self._usefulness.diagnostics(self.names), **gate}

    def _weights(self, gram: Tensor | None, loss_values: Tensor) -> Tensor:
        """The amortized rule's ``pi``; then ``a`` learns from this step's gradients where it has
        them (not where the amortized rule refused the step)."""
        current, self.engine.last = self.engine.last, None
        pi = super()._weights(gram, loss_values)
        if current is not None and self._usefulness.observe(
            current, self._task(), keep=self.gradient_steps % self.every == 0
        ):
            self._gate = None
        return pi

    def _coefficients(self, weights: Tensor, divisors: Tensor, raw_gram: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The amortized rule's shares ``s``, gated: ``s_i' = gate_i s_i``, the rest to the task."""
        pi, shares = super()._coefficients(weights, divisors, raw_gram)
        if self._gate is None or self._gate[0].device != shares.device:  # after a comparison (a host step)
            task = torch.zeros(len(self._names), dtype=torch.float64)
            task[self._task()] = 1.0
            self._gate = (self.gate().to(shares.device), task.to(shares.device))
        gate, task = self._gate
        gated = shares * gate
        return pi, gated + task * (shares - gated).sum()

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        """A refused step's gradients are not kept (nor learned from)."""
        self.engine.last = None
        return super()._refuse(*args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **self._usefulness.state_dict(), "gradient_steps": self.gradient_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if isinstance(state, Mapping) and "names" in state and state.get("method") is None:
            raise ValueError(
                f"this balancer state does not say which method saved it (keys {sorted(map(str, state))}); "
                f"every {self.method} state does: resume with the method that saved it"
            )
        super().load_state_dict(state)
        m = None if self.names is None else len(self.names)
        self._usefulness.load_state_dict(state, m, self.engine.params, self.method)
        self.gradient_steps = int(state.get("gradient_steps", 0))
        self._gate = None
