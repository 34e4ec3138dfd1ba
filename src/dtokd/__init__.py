"""dtokd: knowledge distillation with the task/distillation trade-off solved per step (DTO-KD).

The public names are imported on first use, so that ``import dtokd`` (and the ``dtokd``
command's start, which handles Ctrl-C from its first line) does not wait for PyTorch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = ["BALANCERS", "Balancer", "NonFiniteStepError", "StepInfo", "__version__", "make_balancer", "weights"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("dtokd.balancing"), name)
    raise AttributeError(f"module 'dtokd' has no attribute {name!r}")
