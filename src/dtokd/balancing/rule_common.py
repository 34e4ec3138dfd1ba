"""What the weight rules share: the tolerance for a vanishing curvature, the check of weights
given by the user, and the small conversions between the Gram (a tensor) and NumPy."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

DEFAULT_RTOL = 1e-6
"""Relative tolerance below which a curvature of the Gram counts as zero (``* trace(G)``)."""


def check_weight_vector(name: str, values: object) -> list[float]:
    """Weights on objectives as floats: numbers (not booleans or strings), finite, >= 0 and not
    all zero (a weight below 0 ascends its loss; all zero trains nothing). ``values``: a
    sequence, or a mapping name -> weight."""
    listed = list(values.values()) if isinstance(values, Mapping) else values
    if isinstance(listed, (str, bytes)) or not isinstance(listed, Sequence):
        raise TypeError(f"{name} must be a sequence of numbers or a mapping name -> number, got {values!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in listed):
        raise ValueError(f"{name} must be numbers, got {values!r}")
    floats = [float(v) for v in listed]
    if not all(math.isfinite(v) and v >= 0 for v in floats) or not any(floats):
        raise ValueError(f"{name} must be finite numbers >= 0, not all zero, got {values!r}")
    return floats


def _normalised(gram: Tensor) -> tuple[np.ndarray, float]:
    """The Gram as float64 numpy divided by its trace, and the trace (0 for a zero Gram)."""
    g = gram.detach().to("cpu", torch.float64).numpy()
    g = 0.5 * (g + g.T)
    scale = float(np.trace(g))
    return (g / scale if scale > 0 else g), max(scale, 0.0)


def _back(w: np.ndarray, like: Tensor) -> Tensor:
    return torch.as_tensor(np.asarray(w, dtype=np.float64)).to(device=like.device, dtype=like.dtype)


def _uniform(gram: Tensor) -> Tensor:
    m = gram.shape[0]
    return torch.full((m,), 1.0 / m, dtype=gram.dtype, device=gram.device)


def _preference(pref_vector: Sequence[float] | None, m: int) -> np.ndarray:
    if pref_vector is None:
        return np.full(m, 1.0 / m)
    pref = np.asarray(check_weight_vector("pref_vector", pref_vector), dtype=np.float64)
    if pref.shape != (m,):
        raise ValueError(f"pref_vector must be {m} finite non-negative numbers, got {list(pref_vector)}")
    return pref


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_non_negative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
