"""Loss specs of a config (``{name: {type: ..., option: value}}``), checked against a task's table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def fill_specs(specs: Mapping[str, Mapping[str, Any]], options: Mapping[str, Mapping[str, Any]], task: str,
               example: str) -> dict[str, dict[str, Any]]:
    """Each spec with the defaults of its type (``options[type]``) filled in; an empty ``specs``,
    an unknown type or an unknown option is a ValueError naming it and what is allowed."""
    if not specs:
        raise ValueError(f"losses is empty: give at least one loss, e.g. {example}")
    resolved = {}
    for name, spec in specs.items():
        kind = spec.get("type")
        if kind not in options:
            raise ValueError(f"losses.{name}.type={kind!r} is not allowed for task {task!r}; use one of "
                             f"{sorted(options)}")
        unknown = sorted(set(spec) - {"type"} - set(options[kind]))
        if unknown:
            raise ValueError(f"losses.{name}: unknown option(s) {unknown} for type {kind!r}; allowed: "
                             f"{sorted(options[kind])}")
        resolved[name] = {"type": kind, **options[kind], **{k: v for k, v in spec.items() if k != "type"}}
    return resolved
