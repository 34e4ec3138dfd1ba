"""The balancer contract: ``backward(losses) -> StepInfo``.

One step, for losses ``L_i`` (a mapping name -> scalar tensor)::

    objective_i = log L_i   (log_losses=True, DTO's choice)   or   L_i
    d_i         = grad objective_i = grad L_i / max(L_i, loss_floor)   (or grad L_i)
    G[i, j]     = <d_i, d_j>            (from the engine; only if the rule needs it)
    pi          = rule(G)               (subclass)
    c_i         = pi_i / max(L_i, loss_floor)   (or pi_i);   rescale="unit-sum": c /= sum_i |c_i|
    rescale="norm": c *= ||sum_i r_i grad L_i|| / ||sum_i c_i grad L_i||   (r: ``reference``)
    .grad      += sum_i c_i grad L_i

``rescale`` and ``reference``: see :mod:`dtokd.balancing.rescale`.

The losses' structure is checked before anything is computed: a non-empty mapping of string names to
floating scalar tensors in the autograd graph, all on one device, with the same names on every call (the
first call fixes them and their order). A NaN or infinite loss raises a :class:`NonFiniteStepError` (a
``ValueError``) naming it (``on_nonfinite="skip"`` instead writes no gradient and reports
``StepInfo.skipped``). With ``log_losses=True`` a negative loss is an error (its log is undefined) and a
loss below ``loss_floor`` (zero included) is taken as ``loss_floor``.

Host synchronisation: a step reads the device once (loss values, Gram, loss scale in one copy), and the
value checks use that read. The step takes one of two paths, chosen in one place
(:meth:`Balancer._runs_on_device`): on the host (read, check, run the rule in float64 on the CPU, then
write; a failed check writes nothing), or on the device (rules with a device form, ``on_nonfinite="raise"``,
no Gram from an engine that ``checks_before_writing``: the update is queued first and the read follows, so
the CPU never waits for the forward pass; a failed check raises with ``.grad`` written).
``deferred_checks=True`` defers even that read to the next ``backward`` (or
:meth:`Balancer.check_deferred`): no host synchronisation in a step, a bad step reported one step late;
``"auto"`` defers wherever every step allows it. Why and what it costs: docs/methods.md ("No wait at all")
and docs/cost.md.

Mixed precision: under ``torch.autocast`` nothing changes (the Gram's dot products run in float32 at least
and are summed in float64). With ``torch.amp.GradScaler`` pass ``scaler=`` to :meth:`Balancer.backward`
instead of scaling the losses yourself: gradients are computed from the scaled losses (so fp16 does not
underflow), the Gram is unscaled before the rule sees it, and ``.grad`` receives the scaled combination that
``scaler.step`` expects. If the scaled gradients overflow, ``.grad`` is filled with NaN so that
``scaler.step`` skips the step and lowers the scale, and the step is reported as skipped.

Data parallelism: see :mod:`dtokd.balancing.distributed` (``sync=``); losses and Gram are
those of the global batch by default. StepInfo's numbers are read from the device on first access.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from dtokd.balancing.checks import (
    NonFiniteStepError,
    Problem,
    check_reach,
    check_reference,
    check_state_method,
    checked_losses,
    deferred_message,
    find_problem,
    warn_zero_gradients,
)
from dtokd.balancing.distributed import Sync
from dtokd.balancing.engines import ObjectiveGradients, weighted_sum_backward
from dtokd.balancing.rescale import RESCALES, Rescale, reference_vector, rescaled
from dtokd.balancing.stepinfo import OVERFLOW, StepInfo

NonFinitePolicy = Literal["raise", "skip"]


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
    """The token-level KD loss's form this method is measured best with, where the user leaves it to the library
    (``divergence: auto``): ``forward_kl`` (floor 0), or ``forward_ce`` (the cross-entropy to the teacher, floor
    at its entropy) for a method whose raw-loss coefficient goes as ``1 / L`` (docs/methods.md, "Which to pick")."""

    without_losses_after: Mapping[str, object] = {}
    """The options a driver that cannot re-evaluate a step's losses after the optimizer step
    builds this method with (:func:`~dtokd.balancing.balancers.options_without_losses_after`)."""

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
        check_reference(reference)
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
        self.engine, self.log_losses, self.loss_floor = engine, log_losses, float(loss_floor)
        self.rescale, self.reference = rescale, reference
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

    def _weights(self, gram: Tensor | None, loss_values: Tensor) -> Tensor:
        """Weights ``pi`` (m, float64) from the Gram of the objective gradients (None if not
        ``needs_gram``) and the detached float64 loss values of this step."""
        raise NotImplementedError

    def diagnostics(self) -> dict[str, float]:
        """What the rule learned beyond its weights, by name, for ``steps.jsonl`` (a host read; none here)."""
        return {}

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
        learned_anywhere = frozenset().union(*(cls.learned_state for cls in _subclasses(Balancer)))
        check_state_method(state, self.method, self.learned_state, learned_anywhere, type(self).__name__)
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
            check_reach(ordered, self.engine.params, type(self).__name__)
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

        What the weights cost before the framework's own backward, by method and engine:
        docs/frameworks.md. Mixed precision: under autocast as is; the framework scales the
        loss (``scaler=`` is :meth:`backward`'s only). A step that ``on_nonfinite="skip"`` skips
        returns a zero loss (zero gradients) in the graph.
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
            warn_zero_gradients(self._names, raw_gram, pi, self._zero_gradient_warned, type(self).__name__)
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
            warn_zero_gradients(
                self._names, raw_gram, info.weight_values, self._zero_gradient_warned, type(self).__name__
            )

    def _problem(self, values: Tensor, raw_gram: Tensor | None) -> Problem | None:
        """The first thing wrong with a step, from its host copy (:func:`~dtokd.balancing.checks.find_problem`)."""
        return find_problem(self._names, values, raw_gram, self.log_losses, self.method)

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

    def _coefficients(self, weights: Tensor, divisors: Tensor, raw_gram: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The weights every rank applies (rank 0's in global mode, the rank mean in local
        mode) and the coefficients on the raw losses, ``c = pi / divisors``, rescaled (see the
        module notes; ``rescale="norm"`` needs ``raw_gram``, the raw gradients' Gram)."""
        pi = weights.to(torch.float64)
        if self.sync.global_mode:
            pi = self.sync.agree(pi, self.engine.params)
        elif self.sync.local_mode:
            pi = self.sync.mean(pi)
        coefficients = rescaled(pi / divisors, self.rescale, raw_gram, self._reference(pi))
        return pi, coefficients

    def _reference(self, like: Tensor) -> Tensor | None:
        """The reference weights on the raw losses as a float64 vector on ``like``'s device (the
        mean when ``rescale="norm"`` is given none), or None."""
        if self.reference is None and self.rescale != "norm":
            return None
        cached = self._reference_vector
        if cached is None or cached.device != like.device or cached.numel() != len(self._names):
            cached = self._reference_vector = reference_vector(self.reference, self._names, like.device)
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
        """The losses in the order of the first step's names (:func:`~dtokd.balancing.checks.checked_losses`)."""
        ordered = checked_losses(losses, self.names)
        self.names = tuple(ordered)
        return ordered

    def _skipped(self, values: Tensor, reason: str, device: torch.device) -> StepInfo:
        nan = torch.full_like(values, math.nan)
        return StepInfo(self._names, values, nan, nan, skipped_reason=reason, device=device)


def _subclasses(cls: type[Balancer]) -> list[type[Balancer]]:
    """``cls`` and every class below it."""
    below: list[type[Balancer]] = cls.__subclasses__()
    return [cls, *(sub for direct in below for sub in _subclasses(direct))]


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
