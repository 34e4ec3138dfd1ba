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

import torch
from torch import Tensor

from dtokd.balancing.mtl_rules import aligned_mtl, cagrad, imtl_g, mgda, nash_mtl, pcgrad, upgrad
from dtokd.balancing.rule_common import DEFAULT_RTOL, _check_positive, _uniform, check_weight_vector

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
    one_objective: Mapping[str, object] = field(default_factory=dict)
    """Options that a single objective settles (a required option with only one possible value
    then): filled in by :func:`~dtokd.balancing.balancers.options_for_one_objective`."""

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
        one_objective={"weights": [1.0]},
    ),
    "anchored": Rule(
        anchored,
        log_losses=True,
        device_form=_always,
        loss_index=("anchor",),
        required={"anchor": "anchor=..., the name of the loss to keep whole (e.g. anchor='task')"},
        one_objective={"anchor": 0},
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
