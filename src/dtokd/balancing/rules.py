"""Weight rules: pure functions ``Gram matrix (m x m) -> weights (m)``.

Every rule sees only ``G[i, j] = <g_i, g_j>``, the inner products of the objective
gradients, and returns the weights ``w`` of the combined update ``g = sum_i w_i g_i``.
No autograd, no modules; the only state is what a caller passes in (``generator`` for
PCGrad's random order). Computation happens in float64 on the CPU (the matrices are tiny),
except for DTO with at most two objectives, which runs on the Gram's device with no host
read when called directly (``dto(gram)``); :func:`weights` first validates the Gram on the
host. Results come back in the Gram's dtype and device.

Degenerate inputs have documented answers rather than NaN: an all-zero Gram (every
gradient zero) gives uniform weights for DTO, MGDA and IMTL-G; singular Grams (identical or
linearly dependent gradients) are solved in the minimum-norm sense.

Use :func:`weights` (``weights("dto", gram)``); :data:`RULES` lists the names, and
:data:`RULE_RECORDS` what each needs (the Gram or not, log losses, a device form, its options).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from dtokd.balancing._qp import solve_bounded_min_norm

DEFAULT_RTOL = 1e-6
"""Relative tolerance below which a curvature of the Gram counts as zero (``* trace(G)``)."""
ZERO_GRADIENT = 1e-20
"""A gradient counts as zero for :func:`dto` when ``G_ii <= ZERO_GRADIENT * trace(G)``: a norm
below 1e-10 of the others' (real KD gradients differ by 1e-4 to 1e-5 in norm: far above it)."""


def dto(
    gram: Tensor,
    *,
    constraint: Literal["affine", "simplex"] = "affine",
    rtol: float = DEFAULT_RTOL,
) -> Tensor:
    r"""DTO-KD's min-norm weights (Hayder et al., ICLR 2026, Theorem 3.1).

    ``constraint="affine"`` (the paper)::

        pi = argmin_{1^T pi = 1} pi^T G pi  =  G^+ 1 / (1^T G^+ 1)   (when 1 is in range(G))
        m = 2:  pi_1 = (G22 - G12) / (G11 + G22 - 2 G12),  pi_2 = 1 - pi_1

    so that ``<g*, g_i> = ||g*||^2`` for every i: the step lowers every objective equally
    to first order. Weights may be negative. The general case is solved as
    ``pi = 1/m + N z`` with ``N`` an orthonormal basis of ``1^perp`` and
    ``z = -(N^T G N)^+ N^T G 1/m``, which is the minimum-norm minimiser and needs no
    ``1 in range(G)``: identical gradients (denominator 0) give ``1/m`` each, exactly
    opposite gradients give ``pi = (1/2, 1/2)`` and ``g* = 0``. Curvatures of ``N^T G N``
    below ``rtol * trace(G)`` are treated as zero.

    An objective whose gradient is zero (``G_ii <= ZERO_GRADIENT * trace(G)``: its loss does not depend
    on the parameters, or sits at a flat point) is left out of the affine problem with weight
    0: kept in, the zero vector would be an affine combination and ``g* = 0`` would stop
    training for every objective (the paper does not treat this case). If every gradient is
    zero the weights are ``1/m``.

    ``constraint="simplex"`` adds ``pi >= 0``: the MGDA problem, solved exactly (a zero
    gradient there is Pareto stationarity, and gives ``g* = 0`` as MGDA defines).
    """
    _check_positive("rtol", rtol)
    if constraint == "simplex":
        return mgda(gram)
    if constraint != "affine":
        raise ValueError(f"dto: constraint={constraint!r} is not allowed; use 'affine' or 'simplex'")
    m = gram.shape[0]
    g = gram.to(torch.float64)
    if m == 2:
        return _dto_two(g, rtol).to(gram.dtype)
    if m == 1:
        return torch.ones(1, dtype=gram.dtype, device=gram.device)
    live = g.diagonal() > ZERO_GRADIENT * g.trace()
    if 0 < int(live.sum()) < m:  # leave the zero gradients out
        result = torch.zeros(m, dtype=torch.float64, device=g.device)
        result[live] = dto(g[live][:, live], rtol=rtol).to(torch.float64)
        return result.to(gram.dtype)
    basis = _complement_of_ones(m, g.device)
    centre = torch.full((m,), 1.0 / m, dtype=torch.float64, device=g.device)
    reduced = basis.T @ g @ basis
    z = -torch.linalg.pinv(reduced, atol=rtol * g.trace().abs(), hermitian=True) @ (basis.T @ g @ centre)
    return (centre + basis @ z).to(gram.dtype)


def _dto_two(g: Tensor, rtol: float) -> Tensor:
    """Theorem 3.1 in closed form, without host synchronisation (``torch.where``): on a GPU
    Gram the weights stay on the GPU. ``(pi_1, pi_2) = (G22 - G12, G11 - G12) / denominator``;
    one zero gradient: all the weight on the other (see :func:`dto`)."""
    diagonal = g.diagonal()
    numerators = diagonal.flip(0) - g[0, 1]
    denominator = numerators.sum()
    degenerate = denominator <= rtol * g.trace()
    pi = torch.where(degenerate, 0.5, numerators / denominator)
    zero = diagonal <= ZERO_GRADIENT * g.trace()
    only_one = zero[0] ^ zero[1]
    return torch.where(only_one, (~zero).to(torch.float64), pi)


def _complement_of_ones(m: int, device: torch.device) -> Tensor:
    """An orthonormal basis (m x (m-1)) of the vectors whose entries sum to zero."""
    helmert = torch.zeros(m, m - 1, dtype=torch.float64, device=device)
    for k in range(1, m):
        helmert[:k, k - 1] = 1.0
        helmert[k, k - 1] = -float(k)
        helmert[:, k - 1] /= math.sqrt(k * (k + 1))
    return helmert


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


def mean(gram: Tensor) -> Tensor:
    """Equal weights ``1/m``: the plain average of the gradients."""
    return _uniform(gram)


def anchored(gram: Tensor, *, anchor: int) -> Tensor:
    r"""Task-anchored weights (dtokd's own, beyond the paper, experimental): the ``anchor``
    objective's gradient kept whole; every other gradient first scaled down to at most the
    anchor's norm, then stripped of the component that conflicts with the anchor (a one-sided
    projection); the weights normalised to sum to 1::

        s_j = min(1, ||d_a|| / ||d_j||)
        g   = d_a + sum_{j != a} s_j (d_j - min(0, <d_j, d_a>) / ||d_a||^2 d_a)
        w_a = (1 - sum_{j != a} s_j min(0, G_ja) / G_aa) / S,   w_j = s_j / S,   S the sum of the numerators

    so that ``<g, d_a> > 0``: the anchor (the task loss) decreases to first order whatever the
    other objectives (a weak teacher's) ask for, and no other objective outweighs it in norm.
    A zero anchor gradient gives ``1/m``; one objective: 1.
    """
    m = gram.shape[0]
    if not isinstance(anchor, int) or isinstance(anchor, bool) or not 0 <= anchor < m:
        raise ValueError(f"anchored: anchor={anchor!r} must be the index of one of the {m} objectives")
    g = gram.to(torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    anchor_norm2 = g[anchor, anchor]
    others = torch.arange(m, device=g.device) != anchor
    scales = torch.where(others, (anchor_norm2 / g.diagonal().clamp_min(tiny)).sqrt().clamp_max(1.0), 1.0)
    conflict = torch.where(others, scales * g[anchor].clamp_max(0.0), 0.0).sum()
    numerators = torch.where(others, scales, 1.0 - conflict / anchor_norm2.clamp_min(tiny))
    result = torch.where(anchor_norm2 > 0, numerators / numerators.sum(), 1.0 / m)
    return result.to(gram.dtype)


def fixed(gram: Tensor, *, weights: Sequence[float]) -> Tensor:
    """The classic fixed weighted sum ``sum_i a_i g_i`` with the given ``weights`` ``a``."""
    m = gram.shape[0]
    values = check_weight_vector("fixed: weights", weights)
    if len(values) != m:
        raise ValueError(f"fixed: weights has {len(values)} entries, but there are {m} objectives")
    return torch.tensor(values, dtype=gram.dtype, device=gram.device)


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


def _always(num_objectives: int, options: Mapping[str, object]) -> bool:
    return True


def _dto_on_device(num_objectives: int, options: Mapping[str, object]) -> bool:
    return options.get("constraint", "affine") == "affine" and num_objectives <= 2


@dataclass(frozen=True)
class Rule:
    """A weight rule and what a balancer needs to know about it. Adding a rule: its function,
    one record in :data:`RULE_RECORDS`, and its tests; nothing else reads the rule's name."""

    function: Callable[..., Tensor]
    needs_gram: bool = True
    """Whether the weights depend on the Gram (if not, one weighted backward pass is the step,
    and the weights are the same at every step)."""
    log_losses: bool = False
    """Whether a balancer applies the rule to ``log L_i`` by default (the paper's DTO does)."""
    device_form: Callable[[int, Mapping[str, object]], bool] | None = None
    """``(m, options) -> bool``: whether ``function(gram, **options)`` runs on the Gram's device
    with no host read for m objectives (None: never; the rule then runs in float64 on the host)."""
    required: Mapping[str, str] = field(default_factory=dict)
    """Options the rule cannot do without -> what the error says to give (with an example)."""
    per_loss: tuple[str, ...] = ()
    """Options holding one value per objective: a balancer also takes them as a mapping by loss
    name and orders them like the losses."""
    loss_index: tuple[str, ...] = ()
    """Options naming one objective by its index: a balancer also takes the loss's name."""

    def runs_on_device(self, num_objectives: int, options: Mapping[str, object]) -> bool:
        """Whether this rule, for ``num_objectives`` objectives and ``options``, needs no host read."""
        return self.device_form is not None and self.device_form(num_objectives, options)


RULE_RECORDS: Mapping[str, Rule] = {
    "dto": Rule(dto, log_losses=True, device_form=_dto_on_device),
    "mgda": Rule(mgda),
    "pcgrad": Rule(pcgrad),
    "imtl-g": Rule(imtl_g),
    "nash-mtl": Rule(nash_mtl),
    "upgrad": Rule(upgrad, per_loss=("pref_vector",)),
    "aligned-mtl": Rule(aligned_mtl, per_loss=("pref_vector",)),
    "cagrad": Rule(cagrad),
    "mean": Rule(mean, needs_gram=False, device_form=_always),
    "fixed": Rule(
        fixed,
        needs_gram=False,
        device_form=_always,
        per_loss=("weights",),
        required={"weights": "weights=..., e.g. weights={'distill': 0.9, 'task': 0.1}"},
    ),
    "anchored": Rule(
        anchored,
        log_losses=True,
        device_form=_always,
        loss_index=("anchor",),
        required={"anchor": "anchor=..., the name of the loss to keep whole (e.g. anchor='task')"},
    ),
}
"""Every weight rule by name, with its facts."""

RULES: Mapping[str, Callable[..., Tensor]] = {name: record.function for name, record in RULE_RECORDS.items()}
"""Every weight rule's function by name."""


def rule_record(method: str) -> Rule:
    """The record of rule ``method``; a ``ValueError`` listing the rules for an unknown name."""
    try:
        return RULE_RECORDS[method]
    except KeyError:
        raise ValueError(f"unknown weight rule {method!r}; available: {sorted(RULES)}") from None


@functools.lru_cache(maxsize=None)
def rule_options(method: str) -> tuple[str, ...]:
    """The keyword options that rule ``method`` accepts."""
    rule = rule_record(method).function
    return tuple(name for name, p in inspect.signature(rule).parameters.items() if p.kind is p.KEYWORD_ONLY)


def check_rule_options(method: str, options: Mapping[str, object]) -> None:
    """Raise a ``TypeError`` naming any option that ``method`` does not accept."""
    allowed = rule_options(method)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"{method!r} does not accept option(s) {unknown}; allowed: {list(allowed) or 'none'}")


def weights(method: str, gram: Tensor, **options: object) -> Tensor:
    """Weights of rule ``method`` (see :data:`RULES`) for an m x m Gram matrix, m >= 1.

    ``gram[i, j] = <g_i, g_j>``. Raises ``ValueError`` for a matrix that is not square,
    not symmetric, not finite, or has a negative diagonal, and ``TypeError`` for an option
    the rule does not take.
    """
    rule = rule_record(method).function
    check_rule_options(method, options)
    check_gram(gram)
    return rule(gram, **options)


def check_gram(gram: Tensor) -> None:
    """Validate a Gram matrix: square m x m (m >= 1), finite, symmetric, non-negative diagonal."""
    if not isinstance(gram, Tensor):
        raise TypeError(f"gram must be a torch.Tensor, got {type(gram).__name__}")
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ValueError(f"gram must be a square m x m matrix with m >= 1, got shape {tuple(gram.shape)}")
    if not gram.is_floating_point():
        raise ValueError(f"gram must be floating point, got dtype {gram.dtype}")
    g = gram.detach().tolist()
    m = len(g)
    if not all(math.isfinite(v) for row in g for v in row):
        raise ValueError(f"gram contains non-finite entries: {g}")
    diagonal = [g[i][i] for i in range(m)]
    scale = max(max(abs(v) for v in diagonal), torch.finfo(gram.dtype).tiny)
    if any(abs(g[i][j] - g[j][i]) > 1e-5 * scale for i in range(m) for j in range(i + 1, m)):
        raise ValueError(f"gram must be symmetric, got {g}")
    if any(v < 0 for v in diagonal):
        raise ValueError(f"gram must have a non-negative diagonal (squared norms), got {diagonal}")


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
