"""The multi-task baselines as weight rules (pure functions ``Gram (m x m) -> weights (m)``,
float64 on the host): MGDA, UPGrad, PCGrad, IMTL-G, Aligned-MTL, CAGrad and Nash-MTL, each
tested against an independent reference (and TorchJD's where it has one). Their records, with
DTO's, are :data:`dtokd.balancing.rules.RULE_RECORDS`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from dtokd.balancing._qp import solve_bounded_min_norm
from dtokd.balancing.rule_common import (
    DEFAULT_RTOL,
    _back,
    _check_non_negative,
    _check_positive,
    _normalised,
    _preference,
    _uniform,
)


def mgda(gram: Tensor) -> Tensor:
    r"""MGDA (Désidéri 2012; Sener & Koltun, NeurIPS 2018): the min-norm point of the convex hull.

    ``w = argmin_{w >= 0, 1^T w = 1} w^T G w``, solved exactly by an active-set method
    (not Frank-Wolfe), so ties and singular Grams get the exact minimiser. The result
    is Pareto-stationary when ``g = 0``. An all-zero Gram gives uniform weights.
    """
    m = gram.shape[0]
    g, scale = _normalised(gram)
    if scale == 0.0:
        return _uniform(gram)
    w = solve_bounded_min_norm(g, np.zeros(m), sum_to_one=True, start=np.full(m, 1.0 / m))
    return _back(w, gram)


def upgrad(gram: Tensor, *, pref_vector: Sequence[float] | None = None, reg_eps: float = 0.0) -> Tensor:
    r"""UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024).

    Each gradient, scaled by its preference ``p_i`` (default ``1/m``), is projected onto the
    dual cone ``{x : <x, g_j> >= 0 for all j}``; the projections are summed. In weights::

        w = sum_i argmin_{v >= p_i e_i} v^T (G / tr G + reg_eps I) v

    Each projection is an exact QP solve. ``reg_eps`` (default 0) reproduces TorchJD's
    diagonal regularisation when set to its 1e-4.
    """
    m = gram.shape[0]
    _check_non_negative("reg_eps", reg_eps)
    pref = _preference(pref_vector, m)
    g, scale = _normalised(gram)
    g = g + reg_eps * np.eye(m)
    if scale == 0.0 and reg_eps == 0.0:
        return _back(pref, gram)
    total = np.zeros(m)
    for i in range(m):
        lower = np.zeros(m)
        lower[i] = pref[i]
        total += solve_bounded_min_norm(g, lower, sum_to_one=False, start=lower)
    return _back(total, gram)


def pcgrad(gram: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    r"""PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020).

    For each i, in a random order of the others j: if ``<g_i', g_j> < 0``, remove the
    conflicting part, ``g_i' <- g_i' - <g_i', g_j> / ||g_j||^2 g_j``; then ``g = sum_i g_i'``.
    Tracked as weights on the original gradients. The order is drawn with
    ``torch.randperm(m, generator=generator)`` (global RNG when ``generator`` is None);
    for m = 2 it does not matter.
    """
    m = gram.shape[0]
    g = gram.detach().to("cpu", torch.float64)
    total = torch.zeros(m, dtype=torch.float64)
    for i in range(m):
        current = torch.zeros(m, dtype=torch.float64)
        current[i] = 1.0
        for j in torch.randperm(m, generator=generator).tolist():
            if j == i:
                continue
            inner = float(g[j] @ current)
            if inner < 0.0:
                current[j] -= inner / float(g[j, j])
        total += current
    return total.to(device=gram.device, dtype=gram.dtype)


def imtl_g(gram: Tensor, *, rtol: float = DEFAULT_RTOL) -> Tensor:
    r"""IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021).

    Weights on the affine set with equal projections of ``g`` on every unit gradient
    ``u_i = g_i / ||g_i||``:  ``w = G^+ s / (1^T G^+ s)`` with ``s_i = sqrt(G_ii)`` (the
    pseudo-inverse form of Quinton & Rey 2024, which allows dependent gradients).
    Returns zeros when ``1^T G^+ s`` vanishes (no such combination).
    """
    _check_positive("rtol", rtol)
    g, scale = _normalised(gram)
    if scale == 0.0:
        return _uniform(gram)
    s = np.sqrt(np.clip(np.diag(g), 0.0, None))
    v = np.linalg.pinv(g, rcond=rtol, hermitian=True) @ s
    total = v.sum()
    if abs(total) < 1e-12:
        return _back(np.zeros_like(v), gram)
    return _back(v / total, gram)


def aligned_mtl(
    gram: Tensor,
    *,
    pref_vector: Sequence[float] | None = None,
    scale_mode: Literal["min", "median", "rmse"] = "min",
) -> Tensor:
    r"""Aligned-MTL (Senushkin et al., "Independent Component Alignment for MTL", CVPR 2023).

    With ``G = V diag(lambda) V^T`` restricted to its rank ``r`` (eigenvalues above
    ``max(lambda) m eps``), ``B = sqrt(s) V diag(lambda)^(-1/2) V^T`` and ``w = B p``, where
    ``s`` is the smallest (``"min"``), median, or mean (``"rmse"``) kept eigenvalue and ``p``
    the preference (default ``1/m``). The aligned gradients have equal norms and are
    orthogonal. A zero Gram gives ``w = p``.
    """
    if scale_mode not in ("min", "median", "rmse"):
        raise ValueError(f"aligned-mtl: scale_mode={scale_mode!r} is not allowed; use 'min', 'median' or 'rmse'")
    m = gram.shape[0]
    pref = _preference(pref_vector, m)
    g = gram.detach().to("cpu", torch.float64).numpy()
    eigenvalues, vectors = np.linalg.eigh(g)
    keep = eigenvalues > eigenvalues.max(initial=0.0) * m * np.finfo(np.float64).eps
    if not keep.any():
        return _back(pref, gram)
    eigenvalues, vectors = eigenvalues[keep], vectors[:, keep]
    scale = {"min": eigenvalues.min(), "median": np.median(eigenvalues), "rmse": eigenvalues.mean()}[scale_mode]
    balance = math.sqrt(scale) * (vectors / np.sqrt(eigenvalues)) @ vectors.T
    return _back(balance @ pref, gram)


def cagrad(gram: Tensor, *, c: float = 0.4, norm_eps: float = 1e-12) -> Tensor:
    r"""CAGrad (Liu et al., "Conflict-Averse Gradient Descent for MTL", NeurIPS 2021).

    With ``g0 = mean_i g_i`` and ``phi = c^2 ||g0||^2``::

        w* = argmin_{w in simplex}  g_w^T g0 + sqrt(phi) ||g_w||,    g_w = sum_i w_i g_i
        g  = g0 + sqrt(phi) / ||g_w*|| g_w*   ->   weights 1/m + sqrt(phi)/||g_w*|| w*

    on the Gram normalised to unit trace (as TorchJD does), solved with SLSQP (as the
    authors' code does). If ``||g_w*|| < norm_eps`` (relative to the normalised Gram) the
    weights are zero. TorchJD uses ``norm_eps = 1e-4``, which zeroes the update whenever one
    gradient is 1e-4 times smaller than the other, a dominance seen in KD; the correction
    ``sqrt(phi) g_w / ||g_w||`` keeps norm ``sqrt(phi)`` as ``g_w -> 0``, so our default
    1e-12 only guards against an exactly vanishing ``g_w``.
    """
    _check_non_negative("c", c)
    _check_non_negative("norm_eps", norm_eps)
    from scipy.optimize import minimize

    m = gram.shape[0]
    g, scale = _normalised(gram)
    mean_weights = np.full(m, 1.0 / m)
    sqrt_phi = c * math.sqrt(max(mean_weights @ g @ mean_weights, 0.0))
    linear = g @ mean_weights

    def objective(w: np.ndarray) -> float:
        return float(linear @ w + sqrt_phi * math.sqrt(max(w @ g @ w, 0.0) + 1e-30))

    def gradient(w: np.ndarray) -> np.ndarray:
        return linear + sqrt_phi * (g @ w) / math.sqrt(max(w @ g @ w, 0.0) + 1e-30)

    result = minimize(
        objective,
        mean_weights,
        jac=gradient,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * m,
        constraints=({"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)},),
        options={"ftol": 1e-14, "maxiter": 500},
    )
    w = np.clip(result.x, 0.0, None)
    w /= w.sum()
    g_w_norm = math.sqrt(max(w @ g @ w, 0.0))
    if scale == 0.0 or g_w_norm < norm_eps:
        return _back(np.zeros(m), gram)
    return _back(mean_weights + sqrt_phi / g_w_norm * w, gram)


def nash_mtl(gram: Tensor, *, max_norm: float = 1.0, tol: float = 1e-10) -> Tensor:
    r"""Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022).

    The Nash bargaining solution ``alpha > 0`` with ``G alpha = 1 / alpha`` (element-wise),
    found exactly as the minimiser of the strictly convex
    ``f(alpha) = 1/2 alpha^T G alpha - sum_i log alpha_i`` by damped Newton steps (the paper
    approximates it with a few convex-concave iterations). At the solution
    ``||g||^2 = alpha^T G alpha = m``; if ``max_norm > 0`` and ``||g|| > max_norm`` the weights
    are scaled down to ``||g|| = max_norm`` (the authors' and TorchJD's default 1.0).

    No solution exists when the gradients are Pareto-stationary (a convex combination is 0,
    e.g. exactly opposite gradients); then the weights are zero: no step helps everyone.
    """
    _check_non_negative("max_norm", max_norm)
    _check_positive("tol", tol)
    m = gram.shape[0]
    g, scale = _normalised(gram)
    if scale == 0.0 or float(mgda_value(g)) <= 1e-10:
        return _back(np.zeros(m), gram)
    alpha = 1.0 / np.sqrt(np.diag(g))
    for _ in range(200):
        residual = g @ alpha - 1.0 / alpha
        if np.linalg.norm(residual) <= tol * (1.0 + np.linalg.norm(1.0 / alpha)):
            break
        hessian = g + np.diag(1.0 / alpha**2)
        direction = -np.linalg.solve(hessian, residual)
        step = 1.0
        objective = 0.5 * alpha @ g @ alpha - np.log(alpha).sum()
        while True:
            candidate = alpha + step * direction
            if (candidate > 0).all():
                value = 0.5 * candidate @ g @ candidate - np.log(candidate).sum()
                if value <= objective + 1e-4 * step * (residual @ direction):
                    break
            step *= 0.5
            if step < 1e-12:
                raise RuntimeError(f"nash-mtl: Newton line search failed on Gram {gram.tolist()}")
        alpha = candidate
    alpha = alpha / math.sqrt(scale)  # the solution for G = scale * g
    norm = math.sqrt(m)
    if max_norm > 0 and norm > max_norm:
        alpha = alpha * (max_norm / norm)
    return _back(alpha, gram)


def mgda_value(normalised_gram: np.ndarray) -> float:
    """``min_{w in simplex} w^T G w``: zero iff the gradients are Pareto-stationary."""
    m = normalised_gram.shape[0]
    w = solve_bounded_min_norm(normalised_gram, np.zeros(m), sum_to_one=True, start=np.full(m, 1.0 / m))
    return float(w @ normalised_gram @ w)
