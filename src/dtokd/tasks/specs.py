"""Loss specs of a config (``{name: {type: ..., option: value}}``), checked against a task's
loss types: each task keeps its types as :class:`LossType` records (its ``LOSS_TYPES``), and the
task, the config and the trainer read a record, never a type's name."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

Inputs = TypeVar("Inputs")
Output = TypeVar("Output")


@dataclass(frozen=True)
class LossType(Generic[Inputs, Output]):
    """A loss type of a task: its options, what it needs, and how it is computed from the step's
    inputs (``Inputs``: the task's record of what one step offers a loss; ``Output``: a loss, or
    ``{objective: loss}`` for a type whose spec gives several objectives)."""

    defaults: Mapping[str, Any]
    """Its options and their defaults (what a spec may give)."""
    compute: Callable[[Mapping[str, Any], Inputs], Output]
    """``(spec, inputs) -> loss`` (or the objectives' losses by name)."""
    needs_teacher: bool = True
    """Whether it compares the student with a teacher (refused without one)."""
    teacher_features: bool = False
    """Whether it reads the teacher's internals (tapped features, hidden states), so the teacher's
    calls cannot be replaced by its outputs alone (cached logits, offline top-k outputs)."""
    teacher_distribution: bool = False
    """Whether it compares with the teacher's softened output distribution at the spec's
    ``temperature`` (a language model's offline outputs are written at that temperature and
    serve only losses at it)."""
    check: Callable[[str, Mapping[str, Any]], None] | None = None
    """Checks of the resolved spec beyond the options' kinds and ranges (``(name, spec)``)."""
    form_option: str | None = None
    """The option that picks among the loss's equivalent forms (forms that differ by a constant
    of the teacher alone, such as forward KL and forward cross-entropy). Where a spec leaves it
    out or gives ``auto``, the config writes the form the balancing method is measured best with
    (:func:`dtokd.train.config.resolve_distillation_form`)."""
    objectives: Callable[[Mapping[str, Any], Inputs], list[str]] | None = None
    """``(spec, inputs) -> names``: the objectives a spec gives, in order, for a type that gives
    several (None: one, named as the loss)."""


def resolve_specs(
    specs: Mapping[str, Mapping[str, Any]], types: Mapping[str, LossType[Any, Any]], task: str, example: str
) -> dict[str, dict[str, Any]]:
    """:func:`fill_specs` against the types' defaults, then each type's own check."""
    resolved = fill_specs(specs, {kind: dict(record.defaults) for kind, record in types.items()}, task, example)
    for name, spec in resolved.items():
        check = types[spec["type"]].check
        if check is not None:
            check(name, spec)
    return resolved


def losses_where(
    specs: Mapping[str, Mapping[str, Any]],
    types: Mapping[str, LossType[Any, Any]],
    has: Callable[[LossType[Any, Any]], bool],
) -> list[str]:
    """The names of the (resolved) losses whose type ``has`` the property, in order."""
    return [name for name, spec in specs.items() if has(types[spec["type"]])]


def refuse_without_teacher(
    specs: Mapping[str, Mapping[str, Any]], types: Mapping[str, LossType[Any, Any]], teacher: object | None
) -> None:
    """A ValueError naming the losses that need a teacher when ``teacher`` is None."""
    needing = losses_where(specs, types, lambda record: record.needs_teacher)
    if needing and teacher is None:
        raise ValueError(f"loss(es) {needing} need a teacher, but none is configured (teacher.name)")


RANGES: dict[str, tuple[float, float, str]] = {
    "temperature": (0.0, math.inf, "> 0"),
    "label_smoothing": (0.0, 1.0, "in [0, 1)"),
    "alpha": (0.0, math.inf, ">= 0"),
    "beta": (0.0, math.inf, ">= 0"),
    "warmup_epochs": (0.0, math.inf, ">= 0"),
}
"""Options whose values have a range, wherever a task uses them (open at the bound that says so)."""


def fill_specs(
    specs: Mapping[str, Mapping[str, Any]], options: Mapping[str, Mapping[str, Any]], task: str, example: str
) -> dict[str, dict[str, Any]]:
    """Each spec with the defaults of its type (``options[type]``) filled in; an empty ``specs``,
    an unknown type or an unknown option is a ValueError naming it and what is allowed."""
    if not specs:
        raise ValueError(f"losses is empty: give at least one loss, e.g. {example}")
    resolved = {}
    for name, spec in specs.items():
        kind = spec.get("type")
        if not isinstance(kind, str) or kind not in options:
            raise ValueError(
                f"losses.{name}.type={kind!r} is not allowed for task {task!r}; use one of {sorted(options)}"
            )
        unknown = sorted(set(spec) - {"type"} - set(options[kind]))
        if unknown:
            raise ValueError(
                f"losses.{name}: unknown option(s) {unknown} for type {kind!r}; allowed: {sorted(options[kind])}"
            )
        resolved[name] = {"type": kind, **options[kind], **{k: v for k, v in spec.items() if k != "type"}}
        for option, default in options[kind].items():
            _check_value(name, option, resolved[name][option], default)
    return resolved


def _check_value(name: str, option: str, value: Any, default: Any) -> None:
    """``value`` has the kind of ``default`` (a number for a number, a flag for a flag, a word for
    a word) and, for the options of :data:`RANGES`, lies in its range."""
    where = f"losses.{name}.{option}={value!r}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where} is not allowed; it must be true or false")
    elif isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where} is not allowed; it must be a finite number")
        low, high, text = RANGES.get(option, (-math.inf, math.inf, ""))
        strict_low = option == "temperature"
        if value < low or (strict_low and value == low) or value >= high:
            raise ValueError(f"{where} is not allowed; it must be {text}")
    elif isinstance(default, str) and not isinstance(value, str):
        raise ValueError(f"{where} is not allowed; it must be a word (default {default!r})")
