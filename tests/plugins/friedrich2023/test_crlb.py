"""Cramér–Rao lower bound (Friedrich 2023 eqs 2.25–2.29) against finite differences and Monte Carlo."""

from __future__ import annotations

import numpy as np
import pytest
from _friedrich_synthetic import lattice_model

from tembench_friedrich2023 import columns as C
from tembench_friedrich2023 import stats


def _expected_loglik(theta, model0, grid, alpha, lam0):
    """E_{y~Poisson(λ0)} ln p(y; θ) up to a θ-independent constant: Σ λ0 ln λ(θ) − λ(θ)."""
    lam = alpha * model0.with_theta(theta).image(grid, window_sigmas=8).ravel()
    return float(np.sum(lam0 * np.log(lam) - lam))


def test_fisher_matrix_is_minus_the_hessian_of_the_expected_loglikelihood():
    """Eq 2.26 ↔ eq 2.27: −∂²E[ln p]/∂θ² by central differences equals Σ ∂λ∂λ/λ."""
    true, grid = lattice_model(n=2, spacing_A=1.6, background=0.2)
    true.sigma_A[:] = [0.45, 0.5, 0.4, 0.47]
    true = C.ColumnModel(true.x_A, true.y_A, true.height, true.sigma_A, [0.2, 0.01, -0.015])   # planar background
    alpha = 50.0
    F = C.fisher_information(true, grid, alpha, window_sigmas=8).toarray()
    lam0 = alpha * true.image(grid, window_sigmas=8).ravel()
    th = true.theta()
    n = len(th)
    h = 1e-4 * np.maximum(np.abs(th), 0.1)
    H = np.zeros((n, n))
    f0 = _expected_loglik(th, true, grid, alpha, lam0)
    for i in range(n):
        for j in range(i, n):
            def f(di, dj):
                t = th.copy()
                t[i] += di * h[i]
                t[j] += dj * h[j]
                return _expected_loglik(t, true, grid, alpha, lam0)
            if i == j:
                H[i, i] = (f(1, 0) - 2 * f0 + f(-1, 0)) / h[i] ** 2
            else:
                H[i, j] = H[j, i] = (f(1, 1) - f(1, -1) - f(-1, 1) + f(-1, -1)) / (4 * h[i] * h[j])
    np.testing.assert_allclose(-H, F, rtol=2e-3, atol=2e-3 * np.abs(F).max())


def test_scs_bound_is_the_delta_method_of_eq_2_28():
    true, grid = lattice_model(n=2, spacing_A=1.8)
    alpha = 1e3
    cr = C.crlb(true, grid, alpha)
    Finv = np.linalg.inv(C.fisher_information(true, grid, alpha).toarray())
    for n in range(len(true)):
        g = np.zeros(true.n_params)
        g[true.index(2)[n]] = 2 * np.pi * true.sigma_A[n] ** 2                 # ∂SCS/∂η
        g[true.index(3)[n]] = 4 * np.pi * true.height[n] * true.sigma_A[n]     # ∂SCS/∂ρ
        assert cr.var_scs[n] == pytest.approx(g @ Finv @ g, rel=1e-8)
        assert cr.var_x_A2[n] == pytest.approx(Finv[true.index(0)[n], true.index(0)[n]], rel=1e-8)
    # the bound scales as 1/dose
    np.testing.assert_allclose(C.crlb(true, grid, 4 * alpha).var_x_A2, cr.var_x_A2 / 4, rtol=1e-9)


def test_sparse_inverse_path_matches_dense():
    true, grid = lattice_model(n=3)
    F = C.fisher_information(true, grid, 100.0)
    rows = np.arange(F.shape[0])
    np.testing.assert_allclose(C.inverse_entries(F, rows, rows, dense_limit=0),
                               C.inverse_entries(F, rows, rows), rtol=1e-8)


def test_crlb_matches_monte_carlo_of_ml_and_lsq_estimators_for_one_gaussian():
    """400 Poisson images of one column (peak 2000 e, background 100 e).

    Poisson ML: variance / CRLB within the 99.9 % χ² interval of a 400-sample variance (and 0.8–1.2)
    for x, y, η, ρ, SCS and ζ. Least squares: its variance matches the sandwich covariance
    (JᵀJ)⁻¹JᵀΣJ(JᵀJ)⁻¹ the same way, and that is ≥ the CRLB (efficiency ≤ 1).
    """
    grid = C.ImageGrid((21, 21), (0.2, 0.2), (0.0, 0.0))
    true = C.ColumnModel([2.03], [1.97], [1.0], [0.45], [0.05])
    alpha = 2000.0
    lam = true.image(grid) * alpha
    cr = C.crlb(true, grid, alpha)
    bound = np.array([cr.var_x_A2[0], cr.var_y_A2[0], cr.var_height[0], cr.var_sigma_A2[0], cr.var_scs[0],
                      cr.var_background[0]])
    sand = C.lsq_covariance(true, grid, alpha)
    g = np.array([0, 0, 2 * np.pi * 0.45 ** 2, 4 * np.pi * 1.0 * 0.45, 0])
    sand_d = np.array([*np.diag(sand)[:4], g @ sand @ g, sand[4, 4]])
    assert np.all(sand_d >= bound * (1 - 1e-9))          # Gauss–Markov: LSQ cannot beat the bound
    rng = np.random.default_rng(5)
    n = 400
    est = {"poisson": [], "lsq": []}
    for _ in range(n):
        y = rng.poisson(lam).astype(float)
        for loss in est:
            res = C.fit_columns(y if loss == "poisson" else y / alpha, grid, [2.0], [2.0], sigma_init_A=0.4, loss=loss)
            m = res.model
            s = alpha if loss == "poisson" else 1.0
            est[loss].append([m.x_A[0], m.y_A[0], m.height[0] / s, m.sigma_A[0], m.scs[0] / s, m.background[0] / s])
    _, lo, hi = stats.variance_ci_from(1.0, n - 1, 0.999)
    for loss, ref in (("poisson", bound), ("lsq", sand_d)):
        v = np.var(np.array(est[loss]), axis=0, ddof=1)
        r = v / ref
        assert np.all((r > lo) & (r < hi)), (loss, r)
        assert np.all(np.abs(r - 1) < 0.2), (loss, r)
    eff = bound / sand_d
    assert np.all(eff > 0.5) and np.all(eff <= 1 + 1e-9)


@pytest.mark.parametrize("common", [False, True])
def test_local_crlb_matches_the_exact_inverse(common):
    true, grid = lattice_model(n=9, spacing_A=1.96, sigma_A=0.5)
    if common:
        true = C.ColumnModel(true.x_A, true.y_A, true.height, 0.5, true.background, common_width=True)
    ex = C.crlb(true, grid, 300.0, method="exact")       # 81 columns: each tile sees ≈ 40 of them
    lo = C.crlb(true, grid, 300.0, method="local")
    for a, b in ((lo.var_x_A2, ex.var_x_A2), (lo.var_y_A2, ex.var_y_A2), (lo.var_scs, ex.var_scs),
                 (lo.var_sigma_A2, ex.var_sigma_A2)):
        np.testing.assert_allclose(a, b, rtol=3e-4)
