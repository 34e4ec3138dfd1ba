"""DTO-KD's amortized form (the paper's training recipe, after FAMO, Liu et al. NeurIPS 2023).

State: logits ``xi`` (m, start at 0) with their own Adam (lr 0.025, weight decay 0.01). Step::

    pi  = softmax(xi)
    c   = sum_i pi_i / L_i                                    (detached)
    .grad += grad sum_i (pi_i / c) log L_i  = sum_i pi_i / (c L_i) grad L_i   (ONE backward)

and after ``optimizer.step()``, with ``delta_i = log L_i(before) - log L_i(after)``::

    xi <- Adam step with gradient  (d softmax / d xi)^T delta  =  pi * (delta - <pi, delta>)

``update="same-batch"`` (the paper): the caller re-evaluates the losses on the same batch
with the updated student under ``torch.no_grad()`` and calls :meth:`update` (or
``after_step(losses_after)`` with a function that does it); a forgotten call is an error at
the next ``backward``. ``update="next-step"``: the losses of the next ``backward`` (a new batch)
serve as the "after" values, so the method costs nothing beyond one backward; this is noisier,
the batches being different. ``L`` is ``max(L, loss_floor)`` throughout (FAMO adds 1e-8
instead). With ``deferred_checks=True`` the finiteness check of :meth:`update`'s losses is
deferred to the next step as well.

Gradient accumulation: the learner learns once per optimizer step. The balancer tells an
optimizer step from a micro-batch by watching the optimizers that step its parameters
(:class:`~dtokd.balancing.step_watch.StepWatch`: every ``torch.optim.Optimizer``, fused ones
included, and in-place updates of any other kind): several ``backward`` calls with no optimizer
step between them are the micro-batches of one step, weighted alike (the learner has not moved),
and the "before" losses are the last micro-batch's, which same-batch :meth:`update` then
compares with that micro-batch re-evaluated after the step. (A parameter update made by hand
through ``.data`` is not seen, and is taken for a micro-batch.)

Non-finite numbers never reach the learner: a learning step whose loss change is NaN or
infinite (a step refused as non-finite, or its re-evaluation) leaves ``xi`` and Adam's state as
they were (decided on the device, with no host read). A refused step is undone whole (its
"before" losses and any learning it did) when no optimizer step followed it, so that a caller who
catches the error and goes on continues as if it had not been taken; a step refused late, after
an optimizer step applied it (``deferred_checks``), ends the learner's pending comparison, which
starts again at the next step.

The learner's state lives on the device of the losses and its Adam step is written out in
tensor operations (torch.optim.Adam's update, operation for operation), so that a step on a
GPU needs no host read before its update is queued (see :class:`~dtokd.balancing.base.Balancer`);
``state_dict()`` holds CPU copies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import Tensor

from dtokd.balancing import sharded
from dtokd.balancing.base import Balancer
from dtokd.balancing.checks import NonFiniteStepError, check_non_negative, deferred_message
from dtokd.balancing.step_watch import StepWatch
from dtokd.balancing.stepinfo import HostCopy, StepInfo

UpdateMode = Literal["same-batch", "next-step"]

_BETAS = (0.9, 0.999)
_EPS = 1e-8


class AmortizedDTOBalancer(Balancer):
    """FAMO-style amortized DTO: one backward pass per step, weights learned across steps."""

    needs_gram = False
    method = "dto-amortized"
    log_losses_by_default = True
    distillation_form = "forward_ce"  # a KL nearing 0 would take the weight (LM record: +2.46 ppl with forward_kl)
    learned_state = frozenset({"logits", "adam", "before"})
    # the same-batch update needs the losses re-evaluated after the optimizer step
    without_losses_after = MappingProxyType({"update": "next-step"})

    def __init__(
        self,
        engine: Any,
        *,
        lr: float = 0.025,
        weight_decay: float = 0.01,
        update: UpdateMode = "same-batch",
        rescale: str = "none",
        **kwargs: Any,
    ) -> None:
        if not kwargs.get("log_losses", True):
            raise ValueError("dto-amortized balances log losses by construction; log_losses=False is not allowed")
        if rescale != "none":
            raise ValueError("dto-amortized always rescales like FAMO ('unit-sum'); do not pass rescale=")
        super().__init__(engine, rescale="unit-sum", **kwargs)
        if update not in ("same-batch", "next-step"):
            raise ValueError(f"update={update!r} is not allowed; use 'same-batch' or 'next-step'")
        for name, value in (("lr", lr), ("weight_decay", weight_decay)):
            check_non_negative(f"dto-amortized: {name}", value)
        self.lr, self.weight_decay, self.update_mode = float(lr), float(weight_decay), update
        self.logits: Tensor | None = None
        self._exp_avg: Tensor | None = None
        self._exp_avg_sq: Tensor | None = None
        self._adam_steps: Tensor | None = None  # Adam's step count, on the learner's device
        self._before: Tensor | None = None  # log losses of the last step, awaiting their "after"
        self._steps = StepWatch(self.engine.params)  # tells an optimizer step from a micro-batch
        self._before_mark: tuple[int, int] | None = None  # when ``_before`` was taken (None: unknown, a resumed state)
        self._undo: tuple[Any, ...] | None = None  # this backward's learner state before it, to undo a refusal
        self._unchecked_after: HostCopy | None = None  # update()'s losses, while their check is deferred

    def backward(self, losses: Mapping[str, Tensor], **kwargs: Any) -> StepInfo:
        """:meth:`Balancer.backward`; a step refused as non-finite is undone in the learner."""
        self.check_deferred()  # the previous step's refusal, if its checks were deferred, first
        self._undo = None
        try:
            return super().backward(losses, **kwargs)
        except NonFiniteStepError:
            self._undo_refused_step()
            raise

    def _undo_refused_step(self) -> None:
        """The learner as it was before this backward: its "before" losses and, if it learned, its state."""
        if self._undo is None:
            return
        self._before, self._before_mark, saved, self._adam_steps = self._undo
        for state, value in zip(self._learner(), saved):
            state.copy_(value)

    def _weights(self, gram: Tensor | None, loss_values: Tensor) -> Tensor:
        if self._before is None and sharded.partitioned_by_zero3(self.engine.params):
            raise ValueError(
                "dto-amortized cannot see DeepSpeed ZeRO-3's optimizer steps (its optimizer updates flat "
                "partitions, not these parameters), so it would never learn and stay at equal weights: use "
                "dto with engine='representation' under ZeRO-3, or FSDP2 (fully_shard, or dtokd's parallel=fsdp)"
            )
        log_losses = loss_values.clamp_min(self.loss_floor).log()
        self._place(log_losses.device, len(log_losses))
        mark = self._steps.mark()
        steps = None if self._adam_steps is None else self._adam_steps.clone()
        self._undo = (self._before, self._before_mark, [t.clone() for t in self._learner()], steps)
        if self._before is not None and mark != self._before_mark:  # an optimizer stepped since (or a resumed state)
            if self.update_mode == "same-batch":
                raise RuntimeError(
                    "dto-amortized (update='same-batch'): call balancer.update(losses_after) after "
                    "optimizer.step(), with the losses re-evaluated on the same batch under torch.no_grad()"
                )
            self._learn(self._before - log_losses)
        self._before, self._before_mark = log_losses, mark
        return torch.softmax(self._learner()[0], 0)

    def after_step(self, losses_after: Callable[[], Mapping[str, Tensor]] | None = None) -> None:
        """Same-batch: :meth:`update` with ``losses_after()`` (called under ``torch.no_grad()``),
        unless no step awaits its "after" losses (a refused step); next-step: nothing (the next
        ``backward`` learns)."""
        if self.update_mode != "same-batch" or self._before is None:
            return
        if losses_after is None:
            raise ValueError(
                "dto-amortized (update='same-batch'): after_step() needs losses_after, a function returning "
                "the step's losses re-evaluated on the same batch (or build it with update='next-step')"
            )
        with torch.no_grad():
            losses = losses_after()
        self.update(losses)

    def _has_device_rule(self, num_losses: int) -> bool:
        """Always: the learner runs on the losses' device, with no host read."""
        return True

    def update(self, losses_after: Mapping[str, Tensor]) -> None:
        """Give the losses re-evaluated after ``optimizer.step()`` on the same batch."""
        if self.update_mode != "same-batch":
            raise RuntimeError("update() is only used with update='same-batch'; 'next-step' learns by itself")
        if self._before is None:
            raise RuntimeError(
                "update() with no step awaiting it: call it once after each optimizer.step() that followed "
                "a backward() (a step refused as non-finite awaits none)"
            )
        if self.names is None or set(losses_after) != set(self.names):
            raise ValueError(f"update(): losses must have the names {self.names}, got {sorted(losses_after)}")
        before, self._before = self._before, None
        after = torch.stack([losses_after[n].detach().reshape(()) for n in self.names]).to(torch.float64)
        if self.sync.global_mode:
            after = self.sync.mean(after)
        after = after.to(before.device)
        if self.deferred_checks:
            self._unchecked_after = HostCopy(after)
        else:
            self._check_after(after, deferred=False)
        self._learn(before - after.clamp_min(self.loss_floor).log())

    def check_deferred(self) -> None:
        """The deferred checks of the last step, and those of its :meth:`update` losses."""
        after, self._unchecked_after = self._unchecked_after, None
        try:
            super().check_deferred()
        except NonFiniteStepError:
            if self._steps.mark() == self._before_mark:  # refused before any optimizer step: undone whole
                self._undo_refused_step()
            else:  # its update was applied: the next step starts a new comparison
                self._before = None
            raise
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
        """One Adam step (L2 weight decay) on ``xi`` with gradient ``pi * (delta - <pi, delta>)``;
        none (the state kept as it was) where ``delta`` is not finite, decided on the device."""
        xi, exp_avg, exp_avg_sq = self._learner()
        finite = torch.isfinite(delta).all()
        pi = torch.softmax(xi, 0)
        delta = torch.where(finite, delta, 0.0)
        grad = pi * (delta - (pi * delta).sum()) + self.weight_decay * xi
        beta1, beta2 = _BETAS
        if self._adam_steps is None:
            raise RuntimeError("dto-amortized: the learner's state is made by the first backward()")
        steps = self._adam_steps + 1
        new_avg = exp_avg.lerp(grad, 1 - beta1)
        new_avg_sq = torch.addcmul(exp_avg_sq * beta2, grad, grad, value=1 - beta2)
        step_size = self.lr / (1 - beta1**steps)
        denominator = (new_avg_sq.sqrt() / torch.sqrt(1 - beta2**steps)).add_(_EPS)
        new_xi = xi - step_size * (new_avg / denominator)
        for state, new in ((xi, new_xi), (exp_avg, new_avg), (exp_avg_sq, new_avg_sq)):
            state.copy_(torch.where(finite, new, state))
        self._adam_steps = torch.where(finite, steps, self._adam_steps)

    def _place(self, device: torch.device, m: int) -> None:
        """Create the learner's state (zeros) on ``device``, or move it there."""
        if self.logits is None:
            self.logits, self._exp_avg, self._exp_avg_sq = (
                torch.zeros(m, dtype=torch.float64, device=device) for _ in range(3)
            )
            self._adam_steps = torch.zeros((), dtype=torch.float64, device=device)
        elif self.logits.device != device:
            self.logits, self._exp_avg, self._exp_avg_sq = (t.to(device) for t in self._learner())
            self._adam_steps = self._adam_steps.to(device)  # type: ignore[union-attr]
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
                    "steps": int(self._adam_steps),  # type: ignore[arg-type]
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
            self._adam_steps = torch.tensor(float(adam["steps"]), dtype=torch.float64)
            before = state.get("before")
            self._before = None if before is None else before.to(torch.float64).clone()
            self._before_mark = None  # saved between steps: the next backward follows an optimizer step
