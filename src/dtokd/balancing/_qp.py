"""A small exact solver for the quadratic programmes behind MGDA and UPGrad.

Both rules solve, for a positive semi-definite Gram matrix ``Q`` (m x m, m small)::

    minimise  x^T Q x   subject to   x >= lower   [and   sum(x) == 1]

MGDA (and DTO with ``constraint="simplex"``) is the simplex case ``lower = 0`` with the
equality; UPGrad solves the bound-only case once per objective with ``lower = e_i / m``.

The solver is a primal active-set method (Nocedal & Wright, *Numerical Optimization*,
Algorithm 16.3): it walks from a feasible point along exact solutions of the
equality-constrained problem on the free variables, fixing a variable at its bound when a
step hits it and releasing the one with the most negative multiplier when the step is
zero. Every face problem is solved in the minimum-norm least-squares sense, so a singular
``Q`` (identical or linearly dependent gradients) is handled; because the objective is a
PSD quadratic form with no linear term it is bounded below on every face, and the method
terminates with an exact (to float64) minimiser after finitely many steps.
"""

from __future__ import annotations

import numpy as np

_MAX_ITERATIONS_PER_DIM = 50


def solve_bounded_min_norm(gram: np.ndarray, lower: np.ndarray, *, sum_to_one: bool, start: np.ndarray) -> np.ndarray:
    """Minimise ``x^T gram x`` over ``x >= lower`` (and ``sum(x) == 1`` if asked).

    ``start`` must be feasible. ``gram`` should be normalised (e.g. unit trace): the
    tolerances below are absolute.
    """
    m = gram.shape[0]
    tol = 1e-12
    x = start.astype(np.float64).copy()
    at_bound = np.isclose(x, lower, rtol=0.0, atol=tol)
    if sum_to_one and at_bound.all():
        at_bound[np.argmin(np.diag(gram))] = False
    on_face_minimum = False  # whether x minimises the objective on the current face
    for _ in range(_MAX_ITERATIONS_PER_DIM * max(m, 1)):
        free = ~at_bound
        if not on_face_minimum:
            step = np.zeros(m)
            step[free] = _face_step(gram, x, free, sum_to_one)
            if np.abs(step).max(initial=0.0) > 1e-12 * max(1.0, np.abs(x).max()):
                length, blocking = 1.0, -1
                for i in np.flatnonzero(free & (step < 0)):
                    ratio = (lower[i] - x[i]) / step[i]
                    if ratio < length:
                        length, blocking = max(ratio, 0.0), int(i)
                x = x + length * step
                if blocking >= 0:
                    x[blocking] = lower[blocking]
                    at_bound[blocking] = True
                    continue
            on_face_minimum = True
        multipliers = _bound_multipliers(gram, x, free, sum_to_one)
        candidates = np.where(at_bound, multipliers, np.inf)
        worst = int(np.argmin(candidates))
        if candidates[worst] >= -1e-12:
            return np.maximum(x, lower)
        at_bound[worst] = False
        on_face_minimum = False
    raise RuntimeError(
        f"active-set QP did not converge in {_MAX_ITERATIONS_PER_DIM * m} iterations "
        f"(m={m}); the Gram matrix may be ill-conditioned: {gram.tolist()}"
    )


def _face_step(gram: np.ndarray, x: np.ndarray, free: np.ndarray, sum_to_one: bool) -> np.ndarray:
    """Minimum-norm step p on the free variables minimising (x+p)^T Q (x+p) [with sum(p)=0]."""
    k = int(free.sum())
    if k == 0:
        return np.zeros(0)
    q_ff = gram[np.ix_(free, free)]
    gradient = (gram @ x)[free]
    if sum_to_one:
        kkt = np.zeros((k + 1, k + 1))
        kkt[:k, :k] = q_ff
        kkt[:k, k] = 1.0
        kkt[k, :k] = 1.0
        rhs = np.concatenate([-gradient, [0.0]])
        return np.linalg.lstsq(kkt, rhs, rcond=None)[0][:k]
    return np.linalg.lstsq(q_ff, -gradient, rcond=None)[0]


def _bound_multipliers(gram: np.ndarray, x: np.ndarray, free: np.ndarray, sum_to_one: bool) -> np.ndarray:
    """Lagrange multipliers mu of ``x >= lower`` from  Q x = mu + nu 1  (nu: equality's)."""
    gradient = gram @ x
    nu = gradient[free].mean() if (sum_to_one and free.any()) else 0.0
    return gradient - nu
