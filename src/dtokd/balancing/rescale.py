"""How a step's coefficients on the raw losses are scaled after the rule: ``rescale``.

- ``"none"``: ``c_i = pi_i / max(L_i, loss_floor)`` (log losses) or ``pi_i``, as the rule gives them;
- ``"unit-sum"``: ``c /= sum_i |c_i|`` (the amortized rule's, as FAMO does);
- ``"norm"``: ``c *= ||sum_i r_i grad L_i|| / ||sum_i c_i grad L_i||`` with ``r`` the ``reference``.

``rescale="norm"`` keeps the rule's direction and gives the update the length of the
``reference`` combination of the raw loss gradients (default: their mean, ``r_i = 1/m``; give
the weights of the fixed KD a learning rate was tuned for, e.g. ``{"distill": 0.9, "task":
0.1}``, to take that step's length). Both norms come from the Gram of the raw gradients,
``||sum_i c_i grad L_i||^2 = c^T G_raw c``, so the rescale needs the Gram whatever the rule,
and the lengths are those where the engine measures it (over every parameter for ``exact``;
at the representation or over the subset for the others, whose ratio then scales the update);
an update below ``1e-6`` of the reference length (gradients that cancel) is left as it is.
A ``reference`` given with another ``rescale`` is only reported: ``StepInfo.update_ratio``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

Rescale = Literal["none", "unit-sum", "norm"]
RESCALES = ("none", "unit-sum", "norm")
NEGLIGIBLE_UPDATE = 1e-12  # (update length / reference length)^2 below which rescale="norm" leaves the update


def rescaled(coefficients: Tensor, rescale: str, raw_gram: Tensor | None, reference: Tensor | None) -> Tensor:
    """The coefficients scaled as ``rescale`` says (``"norm"`` needs ``raw_gram``, the raw
    gradients' Gram, and ``reference``, a float64 vector on the coefficients' device); no host
    read."""
    tiny = torch.finfo(torch.float64).tiny
    if rescale == "unit-sum":
        return coefficients / coefficients.abs().sum().clamp_min(tiny)
    if rescale != "norm":
        return coefficients
    if raw_gram is None or reference is None:
        raise RuntimeError("rescale='norm' needs the Gram of the raw loss gradients and a reference")
    raw_gram = raw_gram.to(coefficients.device, torch.float64)
    wanted, got = reference @ raw_gram @ reference, coefficients @ raw_gram @ coefficients
    negligible = got <= NEGLIGIBLE_UPDATE * wanted
    return coefficients * torch.where(negligible, 1.0, (wanted / got.clamp_min(tiny)).sqrt())


def reference_vector(
    reference: Mapping[str, float] | Sequence[float] | None, names: Sequence[str], device: torch.device
) -> Tensor:
    """The reference weights on the raw losses, in the losses' order, as a float64 vector on
    ``device`` (their mean when none is given)."""
    m = len(names)
    if reference is None:
        values = [1.0 / m] * m
    elif isinstance(reference, Mapping):
        if set(reference) != set(names):
            raise ValueError(f"reference={dict(reference)!r} must give a weight for each loss {list(names)}")
        values = [float(reference[n]) for n in names]
    else:
        if len(reference) != m:
            raise ValueError(
                f"reference={list(reference)!r} gives {len(reference)} weights for {m} losses {list(names)}"
            )
        values = [float(v) for v in reference]
    return torch.tensor(values, dtype=torch.float64, device=device)
