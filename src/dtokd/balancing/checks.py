"""What a balancer checks, apart from its arithmetic: the losses' structure, the values of a step
(non-finite or negative losses, non-finite gradients), that the losses reach the balancer's
parameters, the parameters themselves, and the numbers of its options. Each check raises (or
returns a :class:`Problem`) with a message that names the loss, the argument or the value."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

from torch import Tensor

from dtokd.balancing.rule_common import check_weight_vector
from dtokd.balancing.rules import ZERO_GRADIENT
from dtokd.balancing.sharded import is_sharded


class NonFiniteStepError(ValueError):
    """A step's losses or gradients were NaN or infinite (with ``on_nonfinite="raise"``): what a
    diverged run raises, told apart by its type from every other error."""


class Problem(NamedTuple):
    """What is wrong with a step (see :meth:`Balancer._problem`)."""

    kind: Literal["non-finite loss", "negative loss", "non-finite gradient"]
    message: str


def find_problem(
    names: Sequence[str], values: Tensor, raw_gram: Tensor | None, log_losses: bool, method: str
) -> Problem | None:
    """The first thing wrong with a step, from its host copy, for both paths: a non-finite
    loss, a negative loss under the log, then non-finite gradients (``raw_gram``: None when
    the step had no Gram or it is not to be checked)."""
    listed = values.tolist()
    bad = [n for n, v in zip(names, listed) if not math.isfinite(v)]
    if bad:
        return Problem(
            "non-finite loss",
            f"non-finite loss(es) {bad}: " + ", ".join(f"{n}={v}" for n, v in zip(names, listed) if n in bad),
        )
    negative = [n for n, v in zip(names, listed) if v < 0] if log_losses else []
    if negative:
        return Problem(
            "negative loss",
            f"loss(es) {negative} are negative ("
            + ", ".join(f"{n}={v}" for n, v in zip(names, listed) if n in negative)
            + f"), but method {method!r} balances log L (log_losses=True), defined for L >= 0 only: "
            "give the non-negative form of the loss (a divergence, a cross-entropy or a distance; "
            "dtokd's own losses are never below 0)",
        )
    if raw_gram is not None and not all(map(math.isfinite, raw_gram.reshape(-1).tolist())):
        diagonal = [n for n, v in zip(names, raw_gram.diagonal().tolist()) if not math.isfinite(v)]
        return Problem("non-finite gradient", f"non-finite gradients for loss(es) {diagonal or list(names)}")
    return None


def checked_losses(losses: Mapping[str, Tensor], names: Sequence[str] | None) -> dict[str, Tensor]:
    """The losses' structure, checked before anything is computed: a non-empty mapping of string
    names to floating scalar tensors in the autograd graph, all on one device, with the names
    ``names`` (the first step's; None at the first step), in that order."""
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
            raise ValueError(f"loss {name!r} does not require grad: it must be computed from the trained parameters")
        devices.add(value.device)
    if len(devices) > 1:
        raise ValueError(f"losses are on different devices {sorted(map(str, devices))}; move them to one")
    if names is None:
        return dict(losses)
    if set(losses) != set(names):
        raise ValueError(
            f"losses have names {sorted(losses)}, but this balancer was first used with "
            f"{sorted(names)}; a balancer balances a fixed set of objectives"
        )
    return {n: losses[n] for n in names}


def check_reference(reference: object) -> None:
    """``reference``: None, or weights (a mapping name -> weight, or a sequence) as
    :func:`~dtokd.balancing.rule_common.check_weight_vector` takes them."""
    if reference is not None:
        check_weight_vector("reference", reference)


def check_non_negative(name: str, value: object) -> None:
    """A finite number >= 0 (not a boolean), or a ``ValueError`` naming it."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_reach(losses: Mapping[str, Tensor], params: Sequence[Tensor], balancer: str) -> None:
    """The first step's check that the losses reach the balancer's parameters through the
    autograd graph: none reached is an error (the balancer was built over other parameters, and
    would write nothing), a loss that reaches none of them a warning (its gradient is zero).
    A walk of the graph once, not a backward pass."""
    trained = [p for p in params if p.requires_grad]
    if not trained or is_sharded(trained):  # none: the engine names it; FSDP2: the graph ends at its unsharded copies
        return
    wanted = {id(p) for p in trained}
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


def warn_zero_gradients(
    names: Sequence[str], raw_gram: Tensor, weights: Tensor, warned: set[str], balancer: str
) -> None:
    """Warn, once per objective (``warned`` holds those already named), when its gradient was
    exactly zero at a step (a loss that does not depend on the trained parameters, or sits at a
    flat point), with the weight the rule gave it (DTO leaves it out: weight 0;
    ``ZERO_GRADIENT`` as in the rule)."""
    diagonal, listed = raw_gram.diagonal().tolist(), weights.tolist()
    threshold = ZERO_GRADIENT * sum(diagonal)
    for name, norm2, weight in zip(names, diagonal, listed):
        if norm2 <= threshold and name not in warned:
            warned.add(name)
            warnings.warn(
                f"{balancer}: the gradient of loss {name!r} was zero at a step "
                f"(a loss that does not depend on the trained parameters, or a flat point); "
                f"its weight there: {weight:.4g}. This warning is shown once per loss.",
                RuntimeWarning,
                stacklevel=4,
            )


def check_state_method(
    state: object, method: str, learned_state: frozenset[str], learned_anywhere: frozenset[str], balancer: str
) -> None:
    """A balancer state (``state_dict()``) that ``method`` may load: a mapping with ``names``,
    saved by ``method``; one saved before the method was recorded is recognised by its learned
    entries (``learned_anywhere``: every method's). Another method's state is refused: its
    learned weights would be dropped, or this method's learner restarted, silently."""
    if not isinstance(state, Mapping) or "names" not in state:
        what = f"keys {sorted(map(str, state))}" if isinstance(state, Mapping) else f"a {type(state).__name__}"
        raise ValueError(f"{balancer}.load_state_dict: not a balancer state: {what}")
    saved = state.get("method")
    if saved is None:
        learned = set(state) & learned_anywhere
        if state.get("names") is not None and not (learned & learned_state or learned == learned_state):
            saved = f"a method whose state holds {sorted(learned) or 'no learned weights'}"
    if saved is not None and saved != method:
        raise ValueError(
            f"this balancer state was saved by method {saved!r}, but it is loaded into {method!r}: "
            "resume with the method that saved it (or start this method afresh, without the state)"
        )
