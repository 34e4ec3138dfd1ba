"""Whether an optimizer has stepped a set of parameters since a mark: what tells the amortized
rule an optimizer step from a micro-batch of gradient accumulation (a backward with no step).

Two signals, either of which counts:

- a global post-step hook on every ``torch.optim.Optimizer``
  (``torch.optim.optimizer.register_optimizer_step_post_hook``) counting the steps of any
  optimizer whose parameter groups hold one of the parameters: every torch optimizer, fused and
  foreach ones included (a fused step leaves the parameters' version counters unchanged), and
  wrappers that call one (``accelerate``'s); a step that a ``GradScaler`` skips calls none;
- the parameters' version counters, which any in-place update bumps (an optimizer that is not a
  ``torch.optim.Optimizer``, ``load_state_dict``), and a backward does not.

An update made through ``.data`` by hand, outside any ``torch.optim.Optimizer``, is seen by
neither (``.data`` has its own version counter).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook


class StepWatch:
    """Counts the optimizer steps over ``params``; :meth:`mark` is compared between two moments."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        self.steps = 0
        self._watch()

    def _watch(self) -> None:
        """Register the global post-step hook (removed when this object is collected)."""
        ids = {id(p) for p in self.params}
        me = weakref.ref(self)

        def count(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            watch = me()
            if watch is not None and any(id(p) in ids for group in optimizer.param_groups for p in group["params"]):
                watch.steps += 1

        handle = register_optimizer_step_post_hook(count)
        self._finalizer = weakref.finalize(self, handle.remove)

    def mark(self) -> tuple[int, int]:
        """``(optimizer steps counted, sum of the parameters' version counters)``: two marks differ
        when an optimizer stepped the parameters in between."""
        return self.steps, sum(p._version for p in self.params)

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (a module sent to spawned processes): the hook is registered again there."""
        return {"params": self.params, "steps": self.steps}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.params, self.steps = state["params"], state["steps"]
        self._watch()
