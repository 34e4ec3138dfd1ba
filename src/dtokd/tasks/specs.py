"""Loss specs of a config (``{name: {type: ..., option: value}}``), checked against a task's table."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

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
