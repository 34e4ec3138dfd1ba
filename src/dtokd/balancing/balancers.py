"""Balancers built from a weight rule, and the factory :func:`make_balancer`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from dtokd.balancing import rules
from dtokd.balancing.amortized import AmortizedDTOBalancer
from dtokd.balancing.base import Balancer, NonFinitePolicy, Rescale, unique_params
from dtokd.balancing.distributed import Sync, SyncMode
from dtokd.balancing.engines import ENGINES, ExactEngine, RepresentationEngine, SubsetEngine
from dtokd.balancing.gradnorm import GradNormBalancer


class RuleBalancer(Balancer):
    """A stateless weight rule of :mod:`dtokd.balancing.rules` applied every step."""

    def __init__(self, method: str, engine: Any, *, rule_options: Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(engine, **kwargs)
        rules.check_rule_options(method, rule_options)
        self.method = method
        self.rule_options = dict(rule_options)
        self.needs_gram = method not in rules.GRAM_FREE_RULES
        if method == "fixed":
            _check_fixed_weights(self.rule_options.get("weights"))
        if method == "anchored" and "anchor" not in self.rule_options:
            raise TypeError("method 'anchored' needs anchor=..., the name of the loss to keep whole (e.g. anchor='task')")
        self._fixed_on_device: Tensor | None = None

    def _weights(self, gram: Tensor | None, loss_values: Tensor) -> Tensor:
        if gram is None:
            m = loss_values.shape[0]
            gram = torch.zeros(m, m, dtype=torch.float64, device=loss_values.device)
        return rules.weights(self.method, gram, **self._options_by_index())

    def _options_by_index(self) -> dict[str, Any]:
        """The rule's options with loss names (fixed weights by name, the anchor) as indices."""
        options = dict(self.rule_options)
        if self.method == "fixed" and isinstance(options["weights"], Mapping):
            options["weights"] = _ordered_weights(options["weights"], self.names)  # type: ignore[arg-type]
        if self.method == "anchored" and isinstance(options.get("anchor"), str):
            options["anchor"] = _anchor_index(options["anchor"], self.names)  # type: ignore[arg-type]
        return options

    def _weights_on_device(self, gram: Tensor | None, loss_values: Tensor) -> Tensor | None:
        """DTO (affine) with one or two objectives, anchored, mean and fixed need no host read: their
        weights are computed where the losses are (the Gram comes from this balancer's engine,
        square and symmetric by construction; finiteness is checked after the step)."""
        m, device = loss_values.shape[0], loss_values.device
        if not self._has_device_rule(m):
            return None
        if self.method in ("dto", "anchored"):  # the rule itself: no Gram validation on the host
            return rules.RULES[self.method](gram, **self._options_by_index()).to(torch.float64)  # type: ignore[arg-type]
        if self.method == "mean":
            return torch.full((m,), 1.0 / m, dtype=torch.float64, device=device)
        if self._fixed_on_device is None or self._fixed_on_device.device != device:  # fixed
            host = self._weights(None, loss_values.new_zeros(m).cpu())
            self._fixed_on_device = host.to(device)  # once: the weights are constant
        return self._fixed_on_device

    def _has_device_rule(self, num_losses: int) -> bool:
        if self.method == "dto":
            return self.rule_options.get("constraint", "affine") == "affine" and num_losses <= 2
        return self.method in ("mean", "fixed", "anchored")


def _check_fixed_weights(weights: object) -> None:
    if weights is None:
        raise TypeError("method 'fixed' needs weights=..., e.g. weights={'distill': 0.9, 'task': 0.1}")
    if not isinstance(weights, (Mapping, Sequence)) or isinstance(weights, str):
        raise TypeError(f"fixed: weights must be a mapping name -> weight or a sequence, got {weights!r}")


def _anchor_index(anchor: str, names: tuple[str, ...]) -> int:
    if anchor not in names:
        raise ValueError(f"anchored: anchor={anchor!r} is not one of the losses {list(names)}")
    return names.index(anchor)


def _ordered_weights(weights: Mapping[str, float], names: tuple[str, ...]) -> list[float]:
    if set(weights) != set(names):
        raise ValueError(f"fixed: weights are given for {sorted(weights)}, but the losses are {sorted(names)}")
    return [float(weights[n]) for n in names]


BALANCERS: tuple[str, ...] = (*rules.RULES, "dto-amortized", "gradnorm")
"""Every method :func:`make_balancer` knows."""

_LOG_BY_DEFAULT = frozenset({"dto", "dto-amortized", "anchored"})


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
    deferred_checks: bool = False,
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
    ``log_losses``: balance the gradients of ``log L_i`` (default for ``"dto"`` and
    ``"dto-amortized"``, as in the paper) or of ``L_i`` (default for the others).
    ``loss_floor``: the smallest loss value the log transform uses. ``rescale``:
    ``"unit-sum"`` divides the update's coefficients on the raw losses by their absolute sum
    (default ``"none"``: the paper's ``g* = sum_i pi_i grad log L_i``; the amortized form
    always uses ``"unit-sum"``, as FAMO does); ``"norm"`` keeps the rule's direction and gives
    the update the length of the ``reference`` combination of the raw loss gradients (weights
    by loss name, e.g. fixed KD's ``{"distill": 0.9, "task": 0.1}``; default their mean), at the
    cost of the Gram (see :mod:`dtokd.balancing.base`). ``reference`` with another rescale: only
    reported, as ``StepInfo.update_ratio``. ``on_nonfinite``: ``"raise"`` or ``"skip"``.
    ``deferred_checks``: no host synchronisation in a step; a non-finite or negative loss is
    reported by the next ``backward`` (or ``balancer.check_deferred()``), after that step's
    update was applied (see :class:`~dtokd.balancing.base.Balancer`).
    ``sync``: under ``torch.distributed``, ``"global"`` (the global batch's Gram and losses,
    weights identical on all ranks), ``"local"`` or ``"off"``; ``check_sync`` verifies that
    all ranks computed the same weights (default: ``DTOKD_DEBUG=1``). See
    :mod:`dtokd.balancing.distributed`.
    ``options``: the rule's own options (e.g. ``constraint="simplex"`` for ``"dto"``,
    ``weights=`` for ``"fixed"``, ``c=`` for ``"cagrad"``), or those of
    :class:`~dtokd.balancing.amortized.AmortizedDTOBalancer` and
    :class:`~dtokd.balancing.gradnorm.GradNormBalancer`.
    """
    if method not in BALANCERS:
        raise ValueError(f"unknown balancing method {method!r}; available: {list(BALANCERS)}")
    param_list = unique_params(params)
    built_engine = _make_engine(engine, param_list, gram_params, batched)
    common: dict[str, Any] = {
        "log_losses": method in _LOG_BY_DEFAULT if log_losses is None else log_losses,
        "loss_floor": loss_floor,
        "reference": reference,
        "on_nonfinite": on_nonfinite,
        "deferred_checks": deferred_checks,
        "sync": Sync(sync, check=check_sync),
    }
    if method == "dto-amortized":
        if rescale != "none":
            raise ValueError("dto-amortized always rescales like FAMO ('unit-sum'); do not pass rescale=")
        return AmortizedDTOBalancer(built_engine, **common, **options)
    if method == "gradnorm":
        return GradNormBalancer(built_engine, rescale=rescale, **common, **options)
    return RuleBalancer(method, built_engine, rule_options=options, rescale=rescale, **common)


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
