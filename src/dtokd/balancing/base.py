"""The balancer contract: ``backward(losses) -> StepInfo``.

One step, for losses ``L_i`` (a mapping name -> scalar tensor)::

    objective_i = log L_i   (log_losses=True, DTO's choice)   or   L_i
    d_i         = grad objective_i = grad L_i / max(L_i, loss_floor)   (or grad L_i)
    G[i, j]     = <d_i, d_j>            (from the engine; only if the rule needs it)
    pi          = rule(G)               (subclass)
    c_i         = pi_i / max(L_i, loss_floor)   (or pi_i);   rescale="unit-sum": c /= sum_i |c_i|
    rescale="norm": c *= ||sum_i r_i grad L_i|| / ||sum_i c_i grad L_i||   (r: ``reference``)
    .grad      += sum_i c_i grad L_i

``rescale="norm"`` keeps the rule's direction and gives the update the length of the
``reference`` combination of the raw loss gradients (default: their mean, ``r_i = 1/m``; give
the weights of the fixed KD a learning rate was tuned for, e.g. ``{"distill": 0.9, "task":
0.1}``, to take that step's length). Both norms come from the Gram of the raw gradients,
``||sum_i c_i grad L_i||^2 = c^T G_raw c``, so the rescale needs the Gram whatever the rule,
and the lengths are those where the engine measures it (over every parameter for ``exact``;
at the representation or over the subset for the others, whose ratio then scales the update);
an update below ``1e-6`` of the reference length (gradients that cancel) is left as it is.
A ``reference`` given with another ``rescale`` is only reported: ``StepInfo.update_ratio``.

The losses' structure is checked before anything is computed: a non-empty mapping of string names to
floating scalar tensors in the autograd graph, all on one device, with the same names on
every call (the first call fixes them and their order). A NaN or infinite loss raises a
:class:`NonFiniteStepError` (a ``ValueError``) naming it (``on_nonfinite="skip"`` instead writes no gradient and reports
``StepInfo.skipped``). With ``log_losses=True`` a negative loss is an error (its log is
undefined) and a loss below ``loss_floor`` (zero included) is taken as ``loss_floor``.

Host synchronisation: a step reads the device once (loss values, Gram, loss scale in one
copy), and the value checks above use that read. Two paths, chosen in one place
(:meth:`Balancer._runs_on_device`), checked by one helper (:meth:`Balancer._problem`):

- on the host (rules with no device form, the exact engine's Gram, ``on_nonfinite="skip"``):
  read, check, run the rule in float64 on the CPU, then write the update; a failed check
  writes nothing;
- on the device (rules with a device form, :data:`~dtokd.balancing.rules.RULE_RECORDS`: DTO
  with m <= 2, anchored, mean, fixed; and amortized DTO; ``on_nonfinite="raise"``; no Gram
  from an engine that ``checks_before_writing``): the weights and the update are queued on the
  device first and the read follows, so the CPU never waits for the forward pass; a failed
  check then raises with ``.grad`` already written.

``deferred_checks=True`` takes the device path one step further: the step's numbers are
copied to the host asynchronously and checked at the start of the next ``backward`` (or by
:meth:`Balancer.check_deferred`), so that a step makes no host synchronisation at all, like a
plain ``loss.backward()``, and the CPU can queue the next step while the device finishes this
one. The price: a non-finite or negative loss is reported one step late, after
``optimizer.step()`` has applied that step's non-finite update (call ``check_deferred()``
before saving a checkpoint). Every step must then take the device path (else a
``ValueError``); only a ``diagnose=True`` step of a Gram-free balancer with the exact engine
runs on the host, and is checked at once. ``deferred_checks="auto"`` defers wherever every
step allows it (decided at the first step from the number of losses), else checks at once.

StepInfo's numbers are read from the device on first access (see :class:`StepInfo`).

Mixed precision: under ``torch.autocast`` nothing changes (the Gram's dot products run in
float32 at least and are summed in float64). With ``torch.amp.GradScaler`` pass ``scaler=``
to :meth:`Balancer.backward` instead of scaling the losses yourself: gradients are computed
from the scaled losses (so fp16 does not underflow), the Gram is unscaled before the rule
sees it, and ``.grad`` receives the scaled combination that ``scaler.step`` expects. If the
scaled gradients overflow, ``.grad`` is filled with NaN so that ``scaler.step`` skips the step
and lowers the scale, and the step is reported as skipped.

Data parallelism: see :mod:`dtokd.balancing.distributed` (``sync=``); losses and Gram are
those of the global batch by default.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from dtokd.balancing.distributed import Sync
from dtokd.balancing.engines import ObjectiveGradients, weighted_sum_backward
from dtokd.balancing.rules import ZERO_GRADIENT, check_weight_vector
from dtokd.balancing.stepinfo import OVERFLOW, StepInfo

Rescale = Literal["none", "unit-sum", "norm"]
RESCALES = ("none", "unit-sum", "norm")
NEGLIGIBLE_UPDATE = 1e-12  # (update length / reference length)^2 below which rescale="norm" leaves the update
NonFinitePolicy = Literal["raise", "skip"]


class NonFiniteStepError(ValueError):
    """A step's losses or gradients were NaN or infinite (with ``on_nonfinite="raise"``): what a
    diverged run raises, told apart by its type from every other error."""


class Problem(NamedTuple):
    """What is wrong with a step (see :meth:`Balancer._problem`)."""

    kind: Literal["non-finite loss", "negative loss", "non-finite gradient"]
    message: str


class Balancer:
    """Base class: validation, log transform, engine call, rescale, write-back, StepInfo."""

    needs_gram: bool = True
    """Whether the weights depend on the Gram matrix (if not, one plain backward suffices)."""

    method: str = ""
    """The method's name as :func:`~dtokd.balancing.make_balancer` takes it; saved in
    :meth:`state_dict`, which refuses a state saved by another method."""

    log_losses_by_default: bool = False
    """Whether :func:`~dtokd.balancing.make_balancer` gives this class ``log_losses=True`` unless
    told otherwise (a rule's own default is in its record)."""

    distillation_form: str = "forward_kl"
    """The form of a token-level KD loss this method is measured best with, where the user leaves
    it to the library (``divergence: auto``): ``forward_kl`` (floor 0), or ``forward_ce`` (the
    cross-entropy to the teacher, floor at its entropy) for a method whose coefficient on a raw
    loss goes as ``1 / L`` with weights learned across steps (docs/methods.md, "Which to pick")."""

    learned_state: frozenset[str] = frozenset()
    """The :meth:`state_dict` entries that hold what the method learned (none for a stateless
    rule): what a state saved before ``"method"`` was recorded is recognised by."""

    def __init__(
        self,
        engine: Any,
        *,
        log_losses: bool,
        loss_floor: float = 1e-8,
        rescale: Rescale = "none",
        reference: Mapping[str, float] | Sequence[float] | None = None,
        on_nonfinite: NonFinitePolicy = "raise",
        deferred_checks: bool | Literal["auto"] = False,
        sync: Sync | None = None,
    ) -> None:
        if not (isinstance(loss_floor, (int, float)) and math.isfinite(loss_floor) and loss_floor > 0):
            raise ValueError(f"loss_floor must be a positive finite number, got {loss_floor!r}")
        if rescale not in RESCALES:
            raise ValueError(f"rescale={rescale!r} is not allowed; use one of {list(RESCALES)}")
        _check_reference(reference)
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite={on_nonfinite!r} is not allowed; use 'raise' or 'skip'")
        if not isinstance(deferred_checks, bool) and deferred_checks != "auto":
            raise TypeError(f"deferred_checks must be True, False or 'auto', got {deferred_checks!r}")
        if deferred_checks is True and on_nonfinite == "skip":
            raise ValueError(
                "deferred_checks=True cannot be combined with on_nonfinite='skip': skipping a step needs its "
                "loss values on the host before the update is written"
            )
        if not isinstance(log_losses, bool):
            raise TypeError(f"log_losses must be True or False, got {log_losses!r}")
        self.engine = engine
        self.log_losses = log_losses
        self.loss_floor = float(loss_floor)
        self.rescale = rescale
        self.reference = reference
        self._reference_vector: Tensor | None = None
        self.on_nonfinite = on_nonfinite
        self.deferred_checks: bool | Literal["auto"] = deferred_checks
        """Whether this balancer's checks are deferred; ``"auto"`` until :meth:`decide_deferred_checks`
        (called by the first step at the latest) turns it into True or False."""
        self.sync = sync if sync is not None else Sync("global")
        self.names: tuple[str, ...] | None = None
        self._unchecked: StepInfo | None = None  # the last step, while its checks are deferred
        self._combined: Tensor | None = None  # combine(): the step's balanced loss instead of a write
        self._combining = False
        self.last_info: StepInfo | None = None
        """The StepInfo of the last :meth:`combine` call."""
        self._zero_gradient_warned: set[str] = set()
        self._reach_checked = False  # whether the losses were seen to reach the parameters (first step)

    # -- to be provided by subclasses -------------------------------------------------------
    def _weights(self, gram: Tensor | None, loss_values: Tensor) -> Tensor:
        """Weights ``pi`` (m, float64) from the Gram of the objective gradients (None if not
        ``needs_gram``) and the detached float64 loss values of this step."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The balancer's state: its method, the losses' names and, for learned weights, their
        parameters (tensors, numbers and strings only: loadable with ``weights_only=True``)."""
        return {"method": self.method, "names": self.names}

    @property
    def _names(self) -> tuple[str, ...]:
        """The losses' names in their order, fixed by the first step."""
        if self.names is None:
            raise RuntimeError(f"{type(self).__name__}: no step yet; the first backward() fixes the losses' names")
        return self.names

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s state; a state saved by another method is refused (its
        learned weights would be dropped, or this method's learner restarted, silently)."""
        if not isinstance(state, Mapping) or "names" not in state:
            raise ValueError(f"{type(self).__name__}.load_state_dict: not a balancer state: {_describe(state)}")
        saved = state.get("method")
        if saved is None:  # saved before the method was recorded: recognised by its learned entries
            learned = set(state) & _learned_entries()
            if state.get("names") is not None and not (learned & self.learned_state or learned == self.learned_state):
                saved = f"a method whose state holds {sorted(learned) or 'no learned weights'}"
        if saved is not None and saved != self.method:
            raise ValueError(
                f"this balancer state was saved by method {saved!r}, but it is loaded into {self.method!r}: "
                "resume with the method that saved it (or start this method afresh, without the state)"
            )
        names = state.get("names")
        self.names = None if names is None else tuple(names)

    def after_step(self, losses_after: Callable[[], Mapping[str, Tensor]] | None = None) -> None:
        """What the method does after each ``optimizer.step()``; every driver calls it, whatever
        the method. A no-op here; the amortized DTO learns its weights there
        (:class:`~dtokd.balancing.amortized.AmortizedDTOBalancer`), calling ``losses_after`` (a
        function returning the step's losses re-evaluated on the same batch, called under
        ``torch.no_grad()``) only when it needs them."""

    def update(self, losses_after: Mapping[str, Tensor]) -> None:
        """The amortized DTO's same-batch learning step; no other method has one."""
        raise TypeError(
            f"update() is the same-batch learning step of method 'dto-amortized'; method {self.method!r} "
            "learns nothing after the optimizer step (call after_step(), a no-op here, in generic code)"
        )

    # -- the step ---------------------------------------------------------------------------
    def backward(
        self,
        losses: Mapping[str, Tensor],
        *,
        representation: Tensor | Sequence[Tensor] | None = None,
        scaler: torch.amp.GradScaler | None = None,
        diagnose: bool = False,
    ) -> StepInfo:
        """Write the balanced gradient of ``losses`` into ``.grad`` and report the step.

        ``representation``: the shared tensor for ``engine="representation"``.
        ``scaler``: a ``torch.amp.GradScaler`` in use (see the module notes).
        ``diagnose``: also compute the Gram for balancers that do not need it (fixed,
        mean, amortized DTO), at the engine's extra cost, so that StepInfo has norms and
        cosines.
        """
        self.check_deferred()
        ordered = self._checked(losses)
        if not self._reach_checked:
            _check_reach(ordered, self.engine.params, type(self).__name__)
            self._reach_checked = True
        values = torch.stack([v.detach().reshape(()) for v in ordered.values()]).to(torch.float64)
        device = values.device
        if self.sync.global_mode:
            values = self.sync.mean(values)  # the objective is log of the global mean loss
        scaling = scaler if scaler is not None and scaler.is_enabled() else None  # the scaler in use, if any
        scaled = {n: scaling.scale(v) for n, v in ordered.items()} if scaling is not None else dict(ordered)
        gradients: ObjectiveGradients | None = None
        if self._needs_gradients or diagnose:
            gradients = self.engine.gradients(scaled, representation, self.sync, keep_graph=self._combining)
        m, unscale_by = len(ordered), scaling
        deferred = self.decide_deferred_checks(m)
        if self._runs_on_device(m, gradients is not None):
            return self._device_step(values, gradients, scaled, unscale_by)
        if deferred and (self._needs_gradients or not diagnose):  # only a diagnostic Gram may be read at once
            raise ValueError(
                f"deferred_checks=True, but this step of {type(self).__name__} (engine {self.engine.name!r}, "
                f"{m} losses) needs a host read before its update: deferred checks need a step that "
                "runs on the device (dto with the affine constraint and at most 2 losses, mean, fixed, "
                "anchored or dto-amortized; engine 'representation' or 'subset' for the rules that need a Gram)"
            )
        return self._host_step(values, gradients, scaled, unscale_by, device)

    def combine(
        self,
        losses: Mapping[str, Tensor],
        *,
        representation: Tensor | Sequence[Tensor] | None = None,
        diagnose: bool = False,
    ) -> Tensor:
        """The balanced loss ``sum_i c_i L_i`` with this step's coefficients ``c`` detached, for a
        framework that back-propagates one loss itself (Lightning's automatic optimization,
        ``accelerate``, DeepSpeed, FSDP): its gradient is the update :meth:`backward` would add to
        ``.grad``. Nothing is written to ``.grad``; the step's StepInfo is :attr:`last_info`.

        What the weights cost before the framework's own backward: nothing for ``fixed``,
        ``mean`` and ``dto-amortized`` (call :meth:`update` after the optimizer step as usual);
        with ``engine="representation"`` the gradients at the representation (about the loss
        heads' cost); with ``"subset"`` one backward per loss to the subset; with ``"exact"``
        one full backward per loss (m extra backward passes: prefer the representation engine
        or the amortized rule inside a framework). Mixed precision: under autocast as is; give
        the framework the loss to scale (``scaler=`` is :meth:`backward`'s only). A step that
        ``on_nonfinite="skip"`` skips returns a zero loss (zero gradients) in the graph.
        """
        self._combining = True
        try:
            info = self.backward(losses, representation=representation, diagnose=diagnose)
        finally:
            self._combining = False
        combined, self._combined = self._combined, None
        self.last_info = info
        if combined is None:  # a skipped step: nothing to apply
            combined = torch.stack([v.reshape(()) for v in losses.values()]).sum() * 0.0
        return combined

    def _weights_on_device(self, gram: Tensor | None, loss_values: Tensor) -> Tensor:
        """The weights ``pi`` as a float64 tensor on the losses' device, computed without any
        host synchronisation; called only where :meth:`_has_device_rule` says the rule has
        such a form (by default, :meth:`_weights` itself)."""
        return self._weights(gram, loss_values)

    def _has_device_rule(self, num_losses: int) -> bool:
        """Whether :meth:`_weights_on_device` gives the weights for ``num_losses`` objectives."""
        return False

    def _runs_on_device(self, num_losses: int, with_gram: bool) -> bool:
        """THE choice of a step's path: on the device (weights and update queued before the one
        host read, checked after it, or at the next step when deferred) or on the host (read,
        checked, then written). The device path needs a rule with a device form, errors that
        raise (skipping a step needs its values first), and, when the step has a Gram, an engine
        that does not check its Gram before writing
        (:attr:`~dtokd.balancing.engines.ExactEngine.checks_before_writing`)."""
        return (
            self.on_nonfinite == "raise"
            and self._has_device_rule(num_losses)
            and not (with_gram and self.engine.checks_before_writing)
        )

    def can_defer_checks(self, num_losses: int) -> bool:
        """Whether every step of this balancer over ``num_losses`` objectives, diagnostic steps
        included, can run with ``deferred_checks=True`` (no host read before the update)."""
        return self._runs_on_device(num_losses, with_gram=self._needs_gradients)

    def decide_deferred_checks(self, num_losses: int) -> bool:
        """Whether this balancer defers its checks, ``deferred_checks="auto"`` becoming True
        wherever every step over ``num_losses`` objectives allows it (:meth:`can_defer_checks`),
        else False. The first step calls it; a caller that knows the losses may call it before."""
        if self.deferred_checks == "auto":
            self.deferred_checks = self.can_defer_checks(num_losses)
        return bool(self.deferred_checks)

    @property
    def _needs_gradients(self) -> bool:
        """Whether every step needs the objective gradients' Gram (the rule's, or the rescale's)."""
        return self.needs_gram or self.rescale == "norm"

    def _host_step(
        self,
        values: Tensor,
        gradients: ObjectiveGradients | None,
        scaled: dict[str, Tensor],
        scaler: torch.amp.GradScaler | None,
        device: torch.device,
    ) -> StepInfo:
        """The step on the host: one read (losses, Gram, loss scale), the checks, the rule in
        float64 on the CPU, then the update; a failed check writes nothing (except a GradScaler
        overflow: NaN, so that ``scaler.step`` skips) and raises or, with
        ``on_nonfinite="skip"``, returns a skipped StepInfo."""
        values, scaled_gram, scale = _to_host(values, gradients, scaler)
        raw_gram = None if scaled_gram is None else scaled_gram / scale**2
        problem = self._problem(values, raw_gram)
        if problem is not None:
            return self._refuse(problem, values, gradients, scaler is not None, device)
        divisors = self._divisors(values)
        gram = None if raw_gram is None else raw_gram / torch.outer(divisors, divisors)
        pi, coefficients = self._coefficients(
            self._weights(gram if self.needs_gram else None, values), divisors, raw_gram
        )
        self._write(gradients, scaled, coefficients)
        if raw_gram is not None:
            self._warn_zero_gradients(raw_gram, pi)
        return StepInfo(
            self._names,
            values,
            pi,
            coefficients,
            gram,
            raw_gram,
            device=device,
            reference=self._reference(values),
        )

    def _device_step(
        self,
        values: Tensor,
        gradients: ObjectiveGradients | None,
        scaled: dict[str, Tensor],
        scaler: torch.amp.GradScaler | None,
    ) -> StepInfo:
        """The step with no host synchronisation before the update is written: the weights, the
        coefficients and the update are queued on the device, and the one host read (losses,
        Gram, weights) follows them, so that the CPU keeps queueing work while the GPU runs the
        forward pass. The checks are :meth:`_problem`'s, run on that read after the update was
        written (``.grad`` then holds the step's gradient when one fails), or at the next step
        with ``deferred_checks``. Under a GradScaler an overflow makes the whole update NaN."""
        divisors = self._divisors(values)
        raw_gram = gram = None
        if gradients is not None:
            raw_gram = gradients.gram.to(values.device)
            if scaler is not None:
                raw_gram = raw_gram / scaler.scale(torch.ones((), device=values.device)).to(torch.float64) ** 2
            gram = raw_gram / torch.outer(divisors, divisors)
        weights = self._weights_on_device(gram if self.needs_gram else None, values)
        pi, coefficients = self._coefficients(weights, divisors, raw_gram)
        if raw_gram is not None and scaler is not None:
            finite = torch.isfinite(raw_gram).all()
            pi, coefficients = torch.where(finite, pi, math.nan), torch.where(finite, coefficients, math.nan)
        self._write(gradients, scaled, coefficients)
        info = StepInfo(
            self._names,
            values,
            pi,
            coefficients,
            gram,
            raw_gram,
            overflow_skips=scaler is not None,
            reference=self._reference(values),
        )
        if self.deferred_checks:
            self._unchecked = info
        else:
            self._check(info, deferred=False)
        return info

    def check_deferred(self) -> None:
        """With ``deferred_checks=True``: run the checks of the last step now (waiting for its
        numbers only) and raise a ``ValueError`` if its losses or gradients were invalid.
        Called by every ``backward``; call it before saving a checkpoint and after the last
        step. Nothing to do otherwise."""
        info, self._unchecked = self._unchecked, None
        if info is not None:
            self._check(info, deferred=True)

    def _check(self, info: StepInfo, deferred: bool) -> None:
        """The device path's checks (:meth:`_problem`) on the step's host copy; a GradScaler
        overflow (a skipped step) is not a problem."""
        raw_gram = None if info.skipped else info.raw_gram
        problem = self._problem(info.loss_values, raw_gram)
        if problem is not None:
            message = problem.message
            if problem.kind == "non-finite loss" and not deferred:
                written = (
                    "nothing was written to .grad (combine)"
                    if self._combining
                    else ".grad holds this step's non-finite gradient"
                )
                message += f" ({written}; pass on_nonfinite='skip' to skip such steps instead)"
            error = ValueError if problem.kind == "negative loss" else NonFiniteStepError
            raise error(deferred_message(message) if deferred else message)
        if raw_gram is not None:
            self._warn_zero_gradients(raw_gram, info.weight_values)

    def _problem(self, values: Tensor, raw_gram: Tensor | None) -> Problem | None:
        """The first thing wrong with a step, from its host copy, for both paths: a non-finite
        loss, a negative loss under the log, then non-finite gradients (``raw_gram``: None when
        the step had no Gram or it is not to be checked)."""
        listed = values.tolist()
        bad = [n for n, v in zip(self._names, listed) if not math.isfinite(v)]
        if bad:
            return Problem(
                "non-finite loss",
                f"non-finite loss(es) {bad}: " + ", ".join(f"{n}={v}" for n, v in zip(self._names, listed) if n in bad),
            )
        negative = [n for n, v in zip(self._names, listed) if v < 0] if self.log_losses else []
        if negative:
            return Problem(
                "negative loss",
                f"loss(es) {negative} are negative ("
                + ", ".join(f"{n}={v}" for n, v in zip(self._names, listed) if n in negative)
                + f"), but method {self.method!r} balances log L (log_losses=True), defined for L >= 0 only: "
                "give the non-negative form of the loss (a divergence, a cross-entropy or a distance; "
                "dtokd's own losses are never below 0)",
            )
        if raw_gram is not None and not all(map(math.isfinite, raw_gram.reshape(-1).tolist())):
            diagonal = [n for n, v in zip(self._names, raw_gram.diagonal().tolist()) if not math.isfinite(v)]
            return Problem("non-finite gradient", f"non-finite gradients for loss(es) {diagonal or list(self._names)}")
        return None

    def _refuse(
        self, problem: Problem, values: Tensor, gradients: ObjectiveGradients | None, scaled: bool, device: torch.device
    ) -> StepInfo:
        """What the host path does with a problem: a GradScaler overflow fills ``.grad`` with NaN
        (``scaler.step`` then skips the step) and is reported as skipped; a negative loss under
        the log raises; a non-finite loss or gradient raises, or with ``on_nonfinite="skip"``
        is reported as a skipped step with nothing written."""
        if problem.kind == "non-finite gradient" and scaled and gradients is not None:
            gradients.backward(torch.full_like(values, math.nan))
            return self._skipped(values, OVERFLOW, device)
        if problem.kind == "negative loss":
            raise ValueError(problem.message)
        if self.on_nonfinite == "raise":
            hint = " (pass on_nonfinite='skip' to skip such steps instead)" if problem.kind == "non-finite loss" else ""
            raise NonFiniteStepError(problem.message + hint)
        return self._skipped(values, problem.message, device)

    def _warn_zero_gradients(self, raw_gram: Tensor, weights: Tensor) -> None:
        """Warn, once per objective, when its gradient was exactly zero at a step (a loss that
        does not depend on the trained parameters, or sits at a flat point), with the weight
        the rule gave it (DTO leaves it out: weight 0; ``ZERO_GRADIENT`` as in the rule)."""
        diagonal, listed = raw_gram.diagonal().tolist(), weights.tolist()
        threshold = ZERO_GRADIENT * sum(diagonal)
        for name, norm2, weight in zip(self._names, diagonal, listed):
            if norm2 <= threshold and name not in self._zero_gradient_warned:
                self._zero_gradient_warned.add(name)
                warnings.warn(
                    f"{type(self).__name__}: the gradient of loss {name!r} was zero at a step "
                    f"(a loss that does not depend on the trained parameters, or a flat point); "
                    f"its weight there: {weight:.4g}. This warning is shown once per loss.",
                    RuntimeWarning,
                    stacklevel=3,
                )

    # -- helpers ----------------------------------------------------------------------------
    def _coefficients(self, weights: Tensor, divisors: Tensor, raw_gram: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The weights every rank applies (rank 0's in global mode, the rank mean in local
        mode) and the coefficients on the raw losses, ``c = pi / divisors``, rescaled (see the
        module notes; ``rescale="norm"`` needs ``raw_gram``, the raw gradients' Gram)."""
        pi = weights.to(torch.float64)
        if self.sync.global_mode:
            pi = self.sync.agree(pi, self.engine.params)
        elif self.sync.local_mode:
            pi = self.sync.mean(pi)
        coefficients = pi / divisors
        if self.rescale == "unit-sum":
            coefficients = coefficients / coefficients.abs().sum().clamp_min(torch.finfo(torch.float64).tiny)
        elif self.rescale == "norm":
            if raw_gram is None:
                raise RuntimeError("rescale='norm' needs the Gram of the raw loss gradients")
            raw_gram = raw_gram.to(coefficients.device, torch.float64)
            reference = self._reference(coefficients)
            if reference is None:
                raise RuntimeError("rescale='norm' has a reference by construction")
            wanted, got = reference @ raw_gram @ reference, coefficients @ raw_gram @ coefficients
            negligible = got <= NEGLIGIBLE_UPDATE * wanted
            factor = torch.where(negligible, 1.0, (wanted / got.clamp_min(torch.finfo(torch.float64).tiny)).sqrt())
            coefficients = coefficients * factor
        return pi, coefficients

    def _reference(self, like: Tensor) -> Tensor | None:
        """The reference weights on the raw losses as a float64 vector on ``like``'s device (the
        mean when ``rescale="norm"`` is given none), or None."""
        if self.reference is None and self.rescale != "norm":
            return None
        m = len(self._names)
        cached = self._reference_vector
        if cached is None or cached.device != like.device or cached.numel() != m:
            if self.reference is None:
                values = [1.0 / m] * m
            elif isinstance(self.reference, Mapping):
                if set(self.reference) != set(self._names):
                    raise ValueError(
                        f"reference={dict(self.reference)!r} must give a weight for each loss {list(self._names)}"
                    )
                values = [float(self.reference[n]) for n in self._names]
            else:
                if len(self.reference) != m:
                    raise ValueError(
                        f"reference={list(self.reference)!r} gives {len(self.reference)} weights "
                        f"for {m} losses {list(self._names)}"
                    )
                values = [float(v) for v in self.reference]
            cached = self._reference_vector = torch.tensor(values, dtype=torch.float64, device=like.device)
        return cached

    def _write(self, gradients: ObjectiveGradients | None, scaled: dict[str, Tensor], coefficients: Tensor) -> None:
        """``.grad += sum_i c_i grad L_i``: from the engine's gradients, or one weighted-sum
        backward; inside :meth:`combine`, the loss ``sum_i c_i L_i`` (c detached) instead."""
        if self._combining:
            c = coefficients.detach()
            self._combined = torch.stack(
                [c[i].to(v.dtype) * v.reshape(()) for i, v in enumerate(scaled.values())]
            ).sum()
            return
        if gradients is not None:
            gradients.backward(coefficients)
        else:
            weighted_sum_backward(list(scaled.values()), coefficients, self.engine.params)

    def _divisors(self, values: Tensor) -> Tensor:
        """``max(L_i, loss_floor)`` for log losses (the factor of ``grad log L_i``), else ones; on
        the values' device, with no check (a negative loss is refused by :meth:`_problem`)."""
        return values.clamp_min(self.loss_floor) if self.log_losses else torch.ones_like(values)

    def _checked(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if not isinstance(losses, Mapping):
            raise TypeError(f"losses must be a mapping name -> scalar tensor, got {type(losses).__name__}")
        if not losses:
            raise ValueError("losses is empty: give at least one named loss")
        devices = set()
        for name, value in losses.items():
            if not isinstance(name, str):
                raise TypeError(f"loss names must be strings, got {name!r}")
            if not isinstance(value, Tensor) or value.numel() != 1 or not value.is_floating_point():
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"loss {name!r} must be a floating-point scalar tensor, got {shape}")
            if not value.requires_grad:
                raise ValueError(
                    f"loss {name!r} does not require grad: it must be computed from the trained parameters"
                )
            devices.add(value.device)
        if len(devices) > 1:
            raise ValueError(f"losses are on different devices {sorted(map(str, devices))}; move them to one")
        if self.names is None:
            self.names = tuple(losses)
        elif set(losses) != set(self.names):
            raise ValueError(
                f"losses have names {sorted(losses)}, but this balancer was first used with "
                f"{sorted(self.names)}; a balancer balances a fixed set of objectives"
            )
        return {n: losses[n] for n in self._names}

    def _skipped(self, values: Tensor, reason: str, device: torch.device) -> StepInfo:
        nan = torch.full_like(values, math.nan)
        return StepInfo(self._names, values, nan, nan, skipped_reason=reason, device=device)


def _check_reference(reference: object) -> None:
    """``reference``: None, or weights (a mapping name -> weight, or a sequence) as
    :func:`~dtokd.balancing.rules.check_weight_vector` takes them."""
    if reference is not None:
        check_weight_vector("reference", reference)


def check_non_negative(name: str, value: object) -> None:
    """A finite number >= 0 (not a boolean), or a ``ValueError`` naming it."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _learned_entries() -> frozenset[str]:
    """Every method's :attr:`Balancer.learned_state` entries."""
    found: set[str] = set()
    pending = [Balancer]
    while pending:
        cls = pending.pop()
        found |= cls.learned_state
        pending.extend(cls.__subclasses__())
    return frozenset(found)


def _describe(state: object) -> str:
    return f"keys {sorted(map(str, state))}" if isinstance(state, Mapping) else f"a {type(state).__name__}"


def _check_reach(losses: Mapping[str, Tensor], params: Sequence[Tensor], balancer: str) -> None:
    """The first step's check that the losses reach the balancer's parameters through the
    autograd graph: none reached is an error (the balancer was built over other parameters, and
    would write nothing), a loss that reaches none of them a warning (its gradient is zero).
    A walk of the graph once, not a backward pass."""
    wanted = {id(p) for p in params if p.requires_grad}
    if not wanted:  # the engine names this case
        return
    unreached = [name for name, loss in losses.items() if not _reaches(loss, wanted)]
    if len(unreached) == len(losses):
        raise ValueError(
            f"{balancer}: no loss {list(losses)} reaches any of the {len(params)} parameters given to the "
            "balancer: it would write no gradient. Build it over the parameters of the model that computes "
            "the losses (e.g. make_balancer(method, student.parameters()))"
        )
    if unreached:
        warnings.warn(
            f"{balancer}: loss(es) {unreached} reach none of the balancer's parameters: their gradient is zero",
            RuntimeWarning,
            stacklevel=4,
        )


def _reaches(loss: Tensor, wanted: set[int]) -> bool:
    """Whether the autograd graph of ``loss`` accumulates into a tensor whose id is in ``wanted``."""
    if loss.grad_fn is None:  # the loss is a leaf itself
        return id(loss) in wanted
    seen: set[Any] = set()
    pending: list[Any] = [loss.grad_fn]
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: the leaf it writes
        if variable is not None and id(variable) in wanted:
            return True
        pending.extend(following for following, _ in node.next_functions)
    return False


def deferred_message(problem: str) -> str:
    """The error for a problem found by a deferred check (it concerns the previous step)."""
    return (
        "the previous step (deferred_checks=True: its update was written to .grad and applied by "
        f"optimizer.step() if that ran): {problem}"
    )


def unique_params(params: Iterable[Tensor], argument: str = "params") -> list[Tensor]:
    """The parameters as a list; errors for non-tensors, non-leaves, duplicates or an empty list."""
    if isinstance(params, Tensor):
        params = [params]
    result, seen = [], set()
    for k, p in enumerate(params):
        if isinstance(p, Mapping):
            raise TypeError(f"{argument}[{k}] is a parameter group dict; pass the tensors themselves")
        if not isinstance(p, Tensor):
            raise TypeError(f"{argument}[{k}] must be a torch.Tensor, got {type(p).__name__}")
        if not p.is_leaf:
            raise ValueError(f"{argument}[{k}] is not a leaf tensor; pass the model's parameters")
        if id(p) in seen:
            raise ValueError(f"{argument}[{k}] appears twice; each parameter must be given once")
        seen.add(id(p))
        result.append(p)
    if not result:
        raise ValueError(f"{argument} is empty: give the parameters to update (e.g. model.parameters())")
    return result


def _to_host(
    values: Tensor, gradients: ObjectiveGradients | None, scaler: torch.amp.GradScaler | None
) -> tuple[Tensor, Tensor | None, float]:
    """The loss values, the (scaled) Gram and the loss scale on the CPU in float64, read with
    ONE device-to-host copy: the only host synchronisation of a step."""
    parts = [values]
    if gradients is not None:
        parts.append(gradients.gram.reshape(-1).to(values.device, torch.float64))
    if scaler is not None:
        parts.append(scaler.scale(torch.ones((), device=values.device)).to(torch.float64).reshape(1))
    host = torch.cat(parts).cpu()
    m = values.numel()
    gram = host[m : m + m * m].view(m, m) if gradients is not None else None
    scale = float(host[-1]) if scaler is not None else 1.0
    return host[:m], gram, scale
