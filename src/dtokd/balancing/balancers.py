"""Balancers built from a weight rule, and the factory :func:`make_balancer`."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from dtokd.balancing import rules
from dtokd.balancing.amortized import AmortizedDTOBalancer
from dtokd.balancing.base import Balancer, NonFinitePolicy, Rescale
from dtokd.balancing.checks import unique_params
from dtokd.balancing.cross_batch import CrossBatchBalancer
from dtokd.balancing.distributed import Sync, SyncMode
from dtokd.balancing.engines import ENGINES, ExactEngine, RepresentationEngine, SubsetEngine
from dtokd.balancing.gated import GatedAmortizedBalancer
from dtokd.balancing.gradnorm import GradNormBalancer
from dtokd.balancing.loss_size import LossSizeBalancer
from dtokd.balancing.rule_common import check_weight_vector


class RuleBalancer(Balancer):
    """A stateless weight rule of :mod:`dtokd.balancing.rules` applied every step; what the rule
    needs (the Gram, a device form, required options, options by loss name) is read from its
    record (:data:`~dtokd.balancing.rules.RULE_RECORDS`)."""

    def __init__(self, method: str, engine: Any, *, rule_options: Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(engine, **kwargs)
        self.rule = rules.rule_record(method)
        rules.check_rule_options(method, rule_options)
        for option, what in self.rule.required.items():
            if rule_options.get(option) is None:
                raise TypeError(f"method {method!r} needs {what}")
        for option in self.rule.per_loss:
            value = rule_options.get(option)
            if value is not None:
                check_weight_vector(f"{method}: {option}", value)
        self.method = method
        self.rule_options = dict(rule_options)
        self.needs_gram = self.rule.needs_gram
        self._constant_weights: Tensor | None = None  # a Gram-free rule's weights, on the losses' device

    def _weights(self, gram: Tensor | None, loss_values: Tensor) -> Tensor:
        if gram is None:  # a Gram-free rule: the weights depend on m and the options only
            m = loss_values.shape[0]
            gram = torch.zeros(m, m, dtype=torch.float64, device=loss_values.device)
        return rules.weights(self.method, gram, **self._options_by_index())

    def _options_by_index(self) -> dict[str, Any]:
        """The rule's options with loss names as the rule takes them: per-loss mappings ordered
        like the losses, a loss's name as its index."""
        names: tuple[str, ...] = self.names  # type: ignore[assignment]
        options = dict(self.rule_options)
        for option in self.rule.per_loss:
            value = options.get(option)
            if isinstance(value, Mapping):
                if set(value) != set(names):
                    raise ValueError(
                        f"{self.method}: {option} are given for {sorted(value)}, but the losses are {sorted(names)}"
                    )
                options[option] = [float(value[n]) for n in names]
        for option in self.rule.loss_index:
            value = options.get(option)
            if isinstance(value, str):
                if value not in names:
                    raise ValueError(f"{self.method}: {option}={value!r} is not one of the losses {list(names)}")
                options[option] = names.index(value)
        return options

    def _weights_on_device(self, gram: Tensor | None, loss_values: Tensor) -> Tensor:
        """The rule's device form, with no host read (the Gram comes from this balancer's engine,
        square and symmetric by construction; finiteness is checked after the step). A
        Gram-free rule's constant weights are computed once and kept on the device."""
        if not self.needs_gram:
            device = loss_values.device
            if self._constant_weights is None or self._constant_weights.device != device:
                host = self._weights(None, loss_values.new_zeros(loss_values.shape[0]).cpu())
                self._constant_weights = host.to(device)
            return self._constant_weights
        return self.rule.function(gram, **self._options_by_index()).to(torch.float64)

    def _has_device_rule(self, num_losses: int) -> bool:
        return self.rule.runs_on_device(num_losses, self.rule_options)


BALANCER_CLASSES: dict[str, type[Balancer]] = {
    cls.method: cls
    for cls in (AmortizedDTOBalancer, CrossBatchBalancer, GatedAmortizedBalancer, GradNormBalancer, LossSizeBalancer)
}
"""The methods that are not a weight rule of :mod:`dtokd.balancing.rules`, by name: a class each."""

BALANCERS: tuple[str, ...] = (*rules.RULES, *BALANCER_CLASSES)
"""Every method :func:`make_balancer` knows."""


def distillation_form(method: str) -> str:
    """The token-level KD loss's form for ``method`` where the user leaves it to the library
    (:attr:`~dtokd.balancing.base.Balancer.distillation_form`; ``forward_kl`` for every rule)."""
    _check_method(method)
    return BALANCER_CLASSES[method].distillation_form if method in BALANCER_CLASSES else Balancer.distillation_form


def options_for_one_objective(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` for ``method`` over a single objective, with what one objective settles filled
    in where the user left it out (the rule's record,
    :attr:`~dtokd.balancing.rules.Rule.one_objective`: ``fixed`` gets ``weights=[1.0]``, the
    plain backward pass)."""
    _check_method(method)
    settled = rules.RULE_RECORDS[method].one_objective if method in rules.RULE_RECORDS else {}
    return {**settled, **options}


def options_without_losses_after(method: str, options: Mapping[str, Any], driver: str) -> dict[str, Any]:
    """``options`` for ``method`` in ``driver``, a loop that cannot re-evaluate a step's losses
    after the optimizer step: the method's settings for that case
    (:attr:`~dtokd.balancing.base.Balancer.without_losses_after`; ``dto-amortized`` learns from
    the next step's losses, ``update="next-step"``) filled in; a ``ValueError`` for one the user
    set otherwise."""
    _check_method(method)
    needed = BALANCER_CLASSES[method].without_losses_after if method in BALANCER_CLASSES else {}
    result = dict(options)
    for name, value in needed.items():
        if result.setdefault(name, value) != value:
            raise ValueError(
                f"{method} in {driver} needs {name}={value!r}, not {result[name]!r}: {driver} cannot "
                "re-evaluate a step's losses after the optimizer step"
            )
    return result


def _check_method(method: str) -> None:
    if method not in BALANCERS:
        raise ValueError(f"unknown balancing method {method!r}; available: {list(BALANCERS)}")


def _log_losses_by_default(method: str) -> bool:
    """Whether ``method`` balances ``log L_i`` unless told otherwise (its rule's record, or its class)."""
    if method in rules.RULE_RECORDS:
        return rules.RULE_RECORDS[method].log_losses
    return BALANCER_CLASSES[method].log_losses_by_default


def make_balancer(
    method: str,
    params: Iterable[Tensor],
    *,
    engine: str = "exact",
    gram_params: Iterable[Tensor] | None = None,
    batched: bool = False,
    log_losses: bool | None = None,
    loss_floor: float = 1e-8,
    rescale: Rescale = "none",
    reference: Mapping[str, float] | Sequence[float] | None = None,
    on_nonfinite: NonFinitePolicy = "raise",
    deferred_checks: bool | Literal["auto"] = False,
    sync: SyncMode = "global",
    check_sync: bool | None = None,
    **options: Any,
) -> Balancer:
    """A balancer for ``method`` (one of :data:`BALANCERS`) over ``params``.

    Then, in the training loop, instead of ``(0.9 * kd + 0.1 * ce).backward()``::

        info = balancer.backward({"distill": kd, "task": ce})
        optimizer.step()

    ``engine``: ``"exact"`` (default), ``"subset"`` (the Gram over ``gram_params``),
    ``"representation"`` (pass ``representation=`` to ``backward``); see
    :mod:`dtokd.balancing.engines`. ``batched``: one vmapped VJP instead of m.
    ``log_losses``: balance the gradients of ``log L_i`` (default for ``"dto"``,
    ``"dto-amortized"`` (as in the paper) and ``"anchored"``) or of ``L_i`` (default for the others).
    ``loss_floor``: the smallest loss value the log transform uses. ``rescale`` (``"none"``:
    the paper's ``g* = sum_i pi_i grad log L_i``; ``"unit-sum"``; ``"norm"`` to the length of the
    ``reference`` combination, e.g. fixed KD's ``{"distill": 0.9, "task": 0.1}``): see
    :mod:`dtokd.balancing.rescale`. ``on_nonfinite``: ``"raise"`` or ``"skip"``.
    ``deferred_checks``: no host synchronisation in a step, a bad step reported by the next
    ``backward``; ``"auto"`` wherever every step allows it (:class:`~dtokd.balancing.base.Balancer`).
    ``sync`` under ``torch.distributed`` (``"global"``: the global batch's Gram and losses;
    ``"local"``; ``"off"``) and ``check_sync``: :mod:`dtokd.balancing.distributed`.
    ``options``: the rule's own options (e.g. ``constraint="simplex"`` for ``"dto"``,
    ``weights=`` for ``"fixed"``, ``c=`` for ``"cagrad"``), or those of
    :class:`~dtokd.balancing.amortized.AmortizedDTOBalancer`,
    :class:`~dtokd.balancing.gradnorm.GradNormBalancer`,
    :class:`~dtokd.balancing.cross_batch.CrossBatchBalancer` (``task=``, ``beta=``, ``rho=``) and
    :class:`~dtokd.balancing.loss_size.LossSizeBalancer` (``task=``, ``scale=``).
    """
    _check_method(method)
    _check_flags(log_losses=log_losses, batched=batched)
    param_list = unique_params(params)
    built_engine = _make_engine(engine, param_list, gram_params, batched)
    common: dict[str, Any] = {
        "log_losses": _log_losses_by_default(method) if log_losses is None else log_losses,
        "loss_floor": loss_floor,
        "reference": reference,
        "on_nonfinite": on_nonfinite,
        "deferred_checks": deferred_checks,
        "sync": Sync(sync, check=check_sync),
    }
    if method in BALANCER_CLASSES:
        return _class_balancer(BALANCER_CLASSES[method], built_engine, rescale=rescale, **common, **options)
    return RuleBalancer(method, built_engine, rule_options=options, rescale=rescale, **common)


def _check_flags(**flags: object) -> None:
    """Switches given as anything but a boolean (``"false"`` would read as true) are refused."""
    for name, flag in flags.items():
        if flag is not None and not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")


def _class_balancer(cls: type[Balancer], engine: Any, **options: Any) -> Balancer:
    """A balancer of a method with its own class, an option its constructors (its own and those
    of the method classes it extends) do not take named with the ones they do."""
    own: list[str] = []
    for klass in cls.__mro__[: cls.__mro__.index(Balancer)]:
        if "__init__" in vars(klass):
            names = inspect.signature(vars(klass)["__init__"]).parameters
            own += [n for n in names if n not in ("self", "engine", "kwargs", *own)]
    common = ("log_losses", "loss_floor", "reference", "on_nonfinite", "deferred_checks", "sync", "rescale")
    unknown = sorted(set(options) - set(own) - set(common))
    if unknown:
        raise TypeError(f"{cls.method!r} does not accept option(s) {unknown}; allowed: {own}")
    return cls(engine, **options)


def _make_engine(
    engine: str, params: list[Tensor], gram_params: Iterable[Tensor] | None, batched: bool
) -> ExactEngine | SubsetEngine | RepresentationEngine:
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is not allowed; use one of {list(ENGINES)}")
    if engine == "subset":
        if gram_params is None:
            raise ValueError("engine='subset' needs gram_params= (the parameters the Gram is computed over)")
        return SubsetEngine(params, unique_params(gram_params, "gram_params"), batched=batched)
    if gram_params is not None:
        raise ValueError(f"gram_params= is only used by engine='subset', not engine={engine!r}")
    if engine == "representation":
        return RepresentationEngine(params, batched=batched)
    return ExactEngine(params, batched=batched)
