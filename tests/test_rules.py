"""Weight rules against independent float64 references (brute force, closed forms, KKT)."""

import itertools
import math

import numpy as np
import pytest
import torch

from dtokd.balancing import rules, weights


def jacobian(m: int, n: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def gram_of(j: torch.Tensor) -> torch.Tensor:
    return j @ j.T


# ---------------------------------------------------------------- DTO (affine) ----------------------


def affine_reference(g: np.ndarray) -> np.ndarray:
    """Solve the KKT system of min pi^T G pi s.t. sum(pi) = 1 directly (full-rank G)."""
    m = g.shape[0]
    kkt = np.block([[2 * g, np.ones((m, 1))], [np.ones((1, m)), np.zeros((1, 1))]])
    return np.linalg.solve(kkt, np.concatenate([np.zeros(m), [1.0]]))[:m]


@pytest.mark.parametrize("m", [2, 3, 4, 5])
@pytest.mark.parametrize("seed", range(4))
def test_dto_matches_kkt_solution_and_paper_properties(m, seed):
    j = jacobian(m, n=m + 4, seed=seed)
    pi = weights("dto", gram_of(j))
    np.testing.assert_allclose(pi.numpy(), affine_reference(gram_of(j).numpy()), rtol=1e-8, atol=1e-10)
    assert pi.sum().item() == pytest.approx(1.0, abs=1e-12)
    g_star = pi @ j
    inner = j @ g_star
    # Corollary: <g*, d_i> = ||g*||^2 for every i, and >= 0
    np.testing.assert_allclose(inner.numpy(), np.full(m, (g_star @ g_star).item()), rtol=1e-8, atol=1e-10)
    assert (g_star @ g_star).item() >= 0
    assert g_star.norm() <= j.norm(dim=1).min() + 1e-12


def test_dto_two_objectives_closed_form_by_hand():
    # d1 = (2, 0), d2 = (0, 1): G = diag(4, 1); pi1 = (1 - 0)/(4 + 1) = 0.2
    pi = weights("dto", torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    assert pi.tolist() == pytest.approx([0.2, 0.8], abs=1e-15)
    # ||g*||^2 = (G11 G22 - G12^2) / (G11 + G22 - 2 G12) = 4/5
    g_star = pi[0] * torch.tensor([2.0, 0]) + pi[1] * torch.tensor([0.0, 1])
    assert (g_star @ g_star).item() == pytest.approx(0.8)


def test_dto_grid_search_for_two_objectives():
    j = jacobian(2, seed=11)
    grid = np.linspace(-3, 3, 600001)
    points = grid[:, None] * j[0].numpy() + (1 - grid)[:, None] * j[1].numpy()
    best = grid[np.argmin((points**2).sum(1))]
    assert weights("dto", gram_of(j))[0].item() == pytest.approx(best, abs=2e-5)


def test_dto_may_return_negative_weights():
    # d1 nearly along d2 but longer: the affine min-norm point lies outside the segment
    j = torch.tensor([[3.0, 0.1], [1.0, 0.0]], dtype=torch.float64)
    pi = weights("dto", gram_of(j))
    assert pi[0] < 0 < pi[1]
    np.testing.assert_allclose((j @ (pi @ j)).numpy(), [(pi @ j).norm() ** 2] * 2, rtol=1e-10)


def test_dto_identical_gradients_give_half_half():
    j = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    assert weights("dto", gram_of(j)).tolist() == [0.5, 0.5]


def test_dto_nearly_identical_gradients_do_not_blow_up():
    j = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0 + 1e-9]], dtype=torch.float64)
    pi = weights("dto", gram_of(j))
    assert torch.isfinite(pi).all() and pi.abs().max() <= 1.0


def test_dto_opposite_gradients_give_zero_update():
    j = torch.tensor([[1.0, -2.0], [-1.0, 2.0]], dtype=torch.float64)
    pi = weights("dto", gram_of(j))
    assert pi.tolist() == pytest.approx([0.5, 0.5])
    assert (pi @ j).norm().item() == pytest.approx(0.0, abs=1e-15)


def test_dto_opposite_gradients_with_different_norms():
    j = torch.tensor([[2.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    pi = weights("dto", gram_of(j))
    assert (pi @ j).norm().item() == pytest.approx(0.0, abs=1e-15)
    assert pi.tolist() == pytest.approx([1 / 3, 2 / 3])


def test_dto_general_path_agrees_with_two_objective_fast_path():
    g = gram_of(jacobian(2, seed=3))
    fast = weights("dto", g)
    helmert = rules._complement_of_ones(2, g.device)
    centre = torch.full((2,), 0.5, dtype=torch.float64)
    z = -torch.linalg.pinv(helmert.T @ g @ helmert) @ (helmert.T @ g @ centre)
    torch.testing.assert_close(fast, centre + helmert @ z)


def test_dto_linearly_dependent_gradients_many_objectives():
    j = jacobian(2, n=6, seed=5)
    j = torch.cat([j, j[:1], 0.5 * j[:1] + 0.5 * j[1:]])  # 4 objectives spanning 2 dims
    pi = weights("dto", gram_of(j))
    g_star = pi @ j
    assert pi.sum().item() == pytest.approx(1.0)
    np.testing.assert_allclose((j @ g_star).numpy(), [(g_star @ g_star).item()] * 4, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", ["dto", "mgda", "upgrad", "imtl-g", "aligned-mtl", "mean", "pcgrad"])
def test_one_objective_gets_weight_one(method):
    assert weights(method, torch.tensor([[2.5]], dtype=torch.float64)).tolist() == pytest.approx([1.0])


@pytest.mark.parametrize("method", ["dto", "mgda", "imtl-g", "mean"])
def test_zero_gram_gives_uniform_weights(method):
    assert weights(method, torch.zeros(3, 3, dtype=torch.float64)).tolist() == pytest.approx([1 / 3] * 3)


def test_dto_keeps_dtype_and_is_scale_invariant():
    g = gram_of(jacobian(3, seed=2))
    torch.testing.assert_close(weights("dto", g), weights("dto", 1e6 * g))
    assert weights("dto", g.float()).dtype == torch.float32


# ---------------------------------------------------------------- MGDA / DTO simplex ---------------


def simplex_reference(g: np.ndarray) -> tuple[float, np.ndarray]:
    """Exhaustive search over supports: the affine problem on each support, kept if >= 0."""
    m = g.shape[0]
    best_value, best = math.inf, None
    for size in range(1, m + 1):
        for support in itertools.combinations(range(m), size):
            sub = g[np.ix_(support, support)]
            k = len(support)
            kkt = np.block([[2 * sub, np.ones((k, 1))], [np.ones((1, k)), np.zeros((1, 1))]])
            sol = np.linalg.lstsq(kkt, np.concatenate([np.zeros(k), [1.0]]), rcond=None)[0][:k]
            if (sol >= -1e-12).all():
                w = np.zeros(m)
                w[list(support)] = sol
                value = w @ g @ w
                if value < best_value - 1e-15:
                    best_value, best = value, w
    return best_value, best


@pytest.mark.parametrize("m", [2, 3, 4, 6])
@pytest.mark.parametrize("seed", range(5))
def test_mgda_is_the_exhaustive_simplex_minimiser(m, seed):
    j = jacobian(m, n=3, seed=seed) + 0.5  # some conflict, some agreement
    g = gram_of(j)
    w = weights("mgda", g)
    assert (w >= 0).all() and w.sum().item() == pytest.approx(1.0, abs=1e-12)
    value, ref = simplex_reference(g.numpy())
    assert (w @ g @ w).item() == pytest.approx(value, rel=1e-9, abs=1e-14)
    np.testing.assert_allclose((w @ j).numpy(), ref @ j.numpy(), atol=1e-7)
    torch.testing.assert_close(weights("dto", g, constraint="simplex"), w)


def test_mgda_opposite_gradients_is_pareto_stationary():
    j = torch.tensor([[1.0, 1.0], [-2.0, -2.0]], dtype=torch.float64)
    w = weights("mgda", gram_of(j))
    assert (w @ j).norm().item() == pytest.approx(0.0, abs=1e-14)
    assert w.tolist() == pytest.approx([2 / 3, 1 / 3])


def test_mgda_identical_gradients():
    j = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]], dtype=torch.float64)
    w = weights("mgda", gram_of(j))
    assert (w >= 0).all() and w.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(w @ j, j[0])


# ---------------------------------------------------------------- UPGrad -----------------------------


def upgrad_reference(g: np.ndarray) -> np.ndarray:
    """Sum over i of the exhaustive minimiser of v^T G v over v >= e_i / m."""
    m = g.shape[0]
    total = np.zeros(m)
    for i in range(m):
        lower = np.zeros(m)
        lower[i] = 1.0 / m
        best_value, best = math.inf, None
        for size in range(0, m + 1):
            for free in itertools.combinations(range(m), size):
                v = lower.copy()
                fixed = [k for k in range(m) if k not in free]
                if free:
                    f = list(free)
                    v[f] = np.linalg.lstsq(g[np.ix_(f, f)], -g[np.ix_(f, fixed)] @ lower[fixed], rcond=None)[0]
                if (v >= lower - 1e-12).all() and v @ g @ v < best_value - 1e-15:
                    best_value, best = v @ g @ v, v
        total += best
    return total


@pytest.mark.parametrize("m", [2, 3, 5])
@pytest.mark.parametrize("seed", range(4))
def test_upgrad_matches_exhaustive_projection(m, seed):
    j = jacobian(m, n=6, seed=seed)
    g = gram_of(j) / gram_of(j).trace()
    w = weights("upgrad", gram_of(j))
    np.testing.assert_allclose((w @ j).numpy(), upgrad_reference(g.numpy()) @ j.numpy(), rtol=1e-7, atol=1e-9)
    # the result is in the dual cone: it does not increase any objective to first order
    assert ((j @ (w @ j)) >= -1e-10).all()


# ---------------------------------------------------------------- IMTL-G, Aligned-MTL, Nash, CAGrad --


@pytest.mark.parametrize("m", [2, 3, 4])
def test_imtl_g_equal_projections_on_unit_gradients(m):
    j = jacobian(m, n=9, seed=m)
    w = weights("imtl-g", gram_of(j))
    g = w @ j
    projections = (j / j.norm(dim=1, keepdim=True)) @ g
    np.testing.assert_allclose(projections.numpy(), [projections[0].item()] * m, rtol=1e-9)
    assert w.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("m", [2, 3, 4])
def test_aligned_mtl_against_svd_of_the_jacobian(m):
    j = jacobian(m, n=8, seed=m + 10)
    u, s, vt = torch.linalg.svd(j, full_matrices=False)
    expected = s.min() * (torch.full((m,), 1.0 / m, dtype=torch.float64) @ u @ vt)
    torch.testing.assert_close(weights("aligned-mtl", gram_of(j)) @ j, expected)


@pytest.mark.parametrize("m", [2, 3, 4])
def test_nash_mtl_solves_the_bargaining_equation(m):
    j = jacobian(m, n=10, seed=m + 20) + 1.0
    g = gram_of(j)
    alpha = weights("nash-mtl", g, max_norm=0.0)
    assert (alpha > 0).all()
    np.testing.assert_allclose((g @ alpha).numpy(), (1.0 / alpha).numpy(), rtol=1e-8)
    clipped = weights("nash-mtl", g)  # default max_norm = 1
    assert (clipped @ j).norm().item() == pytest.approx(1.0)
    torch.testing.assert_close(clipped, alpha / math.sqrt(m))


def test_nash_mtl_pareto_stationary_gives_zero():
    j = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    assert weights("nash-mtl", gram_of(j)).tolist() == [0.0, 0.0]


def test_cagrad_against_grid_search():
    j = jacobian(2, n=5, seed=7)
    g = gram_of(j)
    g_n = g / g.trace()
    c = 0.5
    g0 = torch.full((2,), 0.5, dtype=torch.float64)
    sqrt_phi = c * math.sqrt(g0 @ g_n @ g0)
    grid = torch.linspace(0, 1, 200001, dtype=torch.float64)
    ws = torch.stack([grid, 1 - grid], 1)
    objective = ws @ (g_n @ g0) + sqrt_phi * torch.einsum("ki,ij,kj->k", ws, g_n, ws).sqrt()
    w_star = ws[objective.argmin()]
    expected = g0 + sqrt_phi / math.sqrt(w_star @ g_n @ w_star) * w_star
    torch.testing.assert_close(weights("cagrad", g, c=c), expected, atol=1e-4, rtol=1e-4)


def test_cagrad_with_c_zero_is_the_mean():
    g = gram_of(jacobian(3, seed=1))
    torch.testing.assert_close(weights("cagrad", g, c=0.0), torch.full((3,), 1 / 3, dtype=torch.float64))


# ---------------------------------------------------------------- PCGrad, mean, fixed ---------------


def pcgrad_reference(j: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    m = j.shape[0]
    out = torch.zeros_like(j[0])
    for i in range(m):
        gi = j[i].clone()
        for k in torch.randperm(m, generator=generator).tolist():
            if k != i and gi @ j[k] < 0:
                gi = gi - (gi @ j[k]) / (j[k] @ j[k]) * j[k]
        out += gi
    return out


@pytest.mark.parametrize("m", [2, 3, 5])
def test_pcgrad_against_explicit_projections(m):
    j = jacobian(m, n=4, seed=m)
    w = weights("pcgrad", gram_of(j), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(w @ j, pcgrad_reference(j, torch.Generator().manual_seed(3)))


def test_pcgrad_no_conflict_is_the_sum():
    j = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    assert weights("pcgrad", gram_of(j)).tolist() == [1.0, 1.0]


def test_mean_and_fixed():
    g = gram_of(jacobian(4))
    assert weights("mean", g).tolist() == [0.25] * 4
    assert weights("fixed", g, weights=[0.1, 0.2, 0.3, 0.4]).tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])


# ---------------------------------------------------------------- validation ------------------------


@pytest.mark.parametrize(
    "gram, message",
    [
        (torch.ones(2, 3), "square"),
        (torch.ones(0, 0), "square"),
        (torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), "non-finite"),
        (torch.tensor([[1.0, 0.5], [0.0, 1.0]]), "symmetric"),
        (torch.tensor([[-1.0, 0.0], [0.0, 1.0]]), "non-negative diagonal"),
        (torch.ones(2, 2, dtype=torch.int64), "floating"),
    ],
)
def test_bad_gram_is_rejected(gram, message):
    with pytest.raises(ValueError, match=message):
        weights("dto", gram)


def test_unknown_method_and_option_are_named():
    with pytest.raises(ValueError, match="unknown weight rule 'dtoo'.*'dto'"):
        weights("dtoo", torch.eye(2))
    with pytest.raises(TypeError, match=r"'mgda' does not accept option\(s\) \['c'\]"):
        weights("mgda", torch.eye(2), c=0.4)
    with pytest.raises(ValueError, match="constraint='box'"):
        weights("dto", torch.eye(2), constraint="box")
    with pytest.raises(ValueError, match="weights has 3 entries, but there are 2"):
        weights("fixed", torch.eye(2), weights=[1, 2, 3])
    with pytest.raises(ValueError, match="rtol must be a positive"):
        weights("dto", torch.eye(2), rtol=-1.0)


def test_rules_survive_strong_dominance():
    # a real KD Gram (ResNet-20, first steps): ||g_distill|| / ||g_task|| ~ 7e-5, cos ~ -0.79
    g = torch.tensor([[4.516e-09, -5.344e-05], [-5.344e-05, 0.99999]], dtype=torch.float64)
    j = torch.linalg.cholesky(g + 1e-30 * torch.eye(2, dtype=torch.float64))  # rows with this Gram
    for method in ["dto", "mgda", "upgrad", "imtl-g", "nash-mtl", "aligned-mtl", "cagrad", "pcgrad"]:
        w = weights(method, g)
        assert torch.isfinite(w).all(), method
        assert (w @ j).norm() > 0, method
    # CAGrad's correction keeps the norm sqrt(phi) instead of being cut to zero
    w = weights("cagrad", g, c=0.5)
    g0 = j.mean(0)
    correction = w @ j - g0
    assert correction.norm().item() == pytest.approx(0.5 * g0.norm().item(), rel=1e-6)


@pytest.mark.parametrize("m, seed", [(2, 0), (2, 1), (3, 2), (4, 3), (5, 4)])
def test_anchored_weights_against_the_explicit_projection(m, seed):
    """w @ J equals the capped one-sided projection built vector by vector, over the normalising sum."""
    j = torch.randn(m, 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    j[0] *= 5.0  # one gradient far longer than the others: its scale is capped
    for anchor in range(m):
        d_a = j[anchor]
        g = d_a.clone()
        total = 1.0
        for k in range(m):
            if k != anchor:
                scaled = j[k] * min(1.0, float(d_a.norm() / j[k].norm()))
                dot = float(scaled @ d_a)
                g = g + scaled - min(0.0, dot) / float(d_a @ d_a) * d_a
                total += min(1.0, float(d_a.norm() / j[k].norm())) - min(0.0, dot) / float(d_a @ d_a)
        w = weights("anchored", j @ j.T, anchor=anchor)
        torch.testing.assert_close(w @ j, g / total, rtol=1e-12, atol=1e-12)
        assert float(w.sum()) == pytest.approx(1.0)
        assert float((w @ j) @ d_a) > 0  # the anchor always descends


def test_anchored_special_cases():
    agree = torch.tensor([[1.0, 0.5], [0.5, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(weights("anchored", agree, anchor=1), torch.tensor([0.5, 0.5], dtype=torch.float64))
    opposite = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    w = weights("anchored", opposite, anchor=1)  # d_0 = -d_1: its whole gradient conflicts and is removed
    torch.testing.assert_close(
        w @ torch.tensor([[1.0], [-1.0]], dtype=torch.float64), torch.tensor([-1.0 / 3], dtype=torch.float64)
    )
    zero_anchor = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(
        weights("anchored", zero_anchor, anchor=1), torch.tensor([0.5, 0.5], dtype=torch.float64)
    )
    torch.testing.assert_close(
        weights("anchored", torch.ones(1, 1, dtype=torch.float64), anchor=0), torch.ones(1, dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="anchor=2 must be the index of one of the 2 objectives"):
        weights("anchored", agree, anchor=2)
