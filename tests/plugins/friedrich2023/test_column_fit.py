"""Column fitting (Friedrich 2023 eqs 2.19–2.20): exactness, unbiasedness and efficiency on synthetic images."""

from __future__ import annotations

import numpy as np
import pytest
from _friedrich_synthetic import lattice_model

from tembench_friedrich2023 import columns as C


def test_noise_free_fit_recovers_parameters_from_perturbed_start():
    true, grid = lattice_model(n=5, sigma_A=0.45)
    true.sigma_A[:] = np.random.default_rng(0).uniform(0.4, 0.5, len(true))
    img = true.image(grid, window_sigmas=8)
    rng = np.random.default_rng(1)
    res = C.fit_columns(img, grid, true.x_A + rng.normal(0, 0.1, len(true)), true.y_A + rng.normal(0, 0.1, len(true)),
                        sigma_init_A=0.55)
    m = res.model
    assert res.converged
    np.testing.assert_allclose(m.x_A, true.x_A, atol=1e-5)
    np.testing.assert_allclose(m.y_A, true.y_A, atol=1e-5)
    np.testing.assert_allclose(m.sigma_A, true.sigma_A, rtol=1e-4)
    np.testing.assert_allclose(m.scs, true.scs, rtol=1e-4)
    np.testing.assert_allclose(m.background, true.background, atol=1e-5)


def test_common_width_and_planar_background():
    true, grid = lattice_model(n=4)
    true = C.ColumnModel(true.x_A, true.y_A, true.height, 0.42, [0.2, 0.01, -0.02], common_width=True)
    img = true.image(grid, window_sigmas=8)
    res = C.fit_columns(img, grid, true.x_A + 0.05, true.y_A - 0.05, sigma_init_A=0.5, common_width=True,
                        background="planar")
    assert res.model.n_params == 3 * len(true) + 1 + 3
    np.testing.assert_allclose(res.model.sigma_A, 0.42, rtol=1e-4)
    np.testing.assert_allclose(res.model.background, true.background, atol=1e-5)
    np.testing.assert_allclose(res.model.x_A, true.x_A, atol=1e-5)


def test_scs_is_gaussian_volume_and_voronoi_integral_agrees_for_separated_columns():
    true, grid = lattice_model(n=3, spacing_A=3.0, sigma_A=0.4, margin_A=2.0, step_A=0.1)
    img = true.image(grid, window_sigmas=8)
    np.testing.assert_allclose(true.scs, 2 * np.pi * true.height * 0.4 ** 2)
    # pixel sum × pixel area of one Gaussian = its volume (sampling 0.1 Å ≪ σ)
    one = C.ColumnModel(true.x_A[:1], true.y_A[:1], true.height[:1], 0.4, [0.0]).image(grid, 8)
    assert one.sum() * grid.pixel_area_A2 == pytest.approx(true.scs[0], rel=1e-6)
    vor = C.scs_voronoi(img, grid, true)
    np.testing.assert_allclose(vor, true.scs, rtol=2e-3)     # tails leaking across 1.5 Å = 3.75σ


def test_find_columns_locates_every_column():
    true, grid = lattice_model(n=4, step_A=0.2)
    img = np.random.default_rng(2).poisson(true.image(grid) * 200) / 200
    x, y = C.find_columns(img, grid, min_distance_A=1.0, smooth_A=0.2)
    assert len(x) == len(true)
    d = np.min(np.hypot(x[:, None] - true.x_A[None], y[:, None] - true.y_A[None]), axis=1)
    assert d.max() < 0.2


@pytest.mark.parametrize("loss", ["lsq", "poisson"])
def test_fit_is_unbiased_and_its_spread_approaches_the_crlb_at_high_dose(loss):
    """50 Poisson repeats of 16 overlapping columns at 1e4 electrons per unit height.

    Unbiased: every parameter's mean is within a few standard errors of the truth (bias ≪ spread).
    Efficient: the spread over repeats / √CRLB is within 20 % of 1 (median over columns), for the
    Poisson ML estimator and for StatSTEM's least squares (whose efficiency is < 1 but close at
    this contrast: its asymptotic (sandwich) standard deviation is 1.09 × √CRLB in position and 1.04 × in SCS).
    """
    true, grid = lattice_model(n=4, background=0.1)
    alpha = 1e4
    img = true.image(grid)
    cr = C.crlb(true, grid, alpha)
    rng = np.random.default_rng(11)
    n_rep = 50
    out = []
    for _ in range(n_rep):
        counts = rng.poisson(img * alpha).astype(float)
        data = counts if loss == "poisson" else counts / alpha
        res = C.fit_columns(data, grid, true.x_A + rng.normal(0, 0.05, len(true)),
                            true.y_A + rng.normal(0, 0.05, len(true)), sigma_init_A=0.5, loss=loss)
        scale = alpha if loss == "poisson" else 1.0
        out.append([res.model.x_A, res.model.y_A, res.model.scs / scale])
    out = np.array(out)                        # (repeat, kind, column)
    truth = np.array([true.x_A, true.y_A, true.scs])
    sd = out.std(axis=0, ddof=1)
    z = (out.mean(axis=0) - truth) / (sd / np.sqrt(n_rep))
    assert np.sqrt(np.mean(z ** 2)) < 1.5          # standardised bias consistent with zero
    assert np.max(np.abs(out.mean(axis=0) - truth) / sd) < 0.5   # bias ≪ spread for every column
    ratio = sd / np.sqrt(np.array([cr.var_x_A2, cr.var_y_A2, cr.var_scs]))
    med = np.median(ratio, axis=1)
    assert np.all(np.abs(med - 1) < 0.2), med


def test_columns_cut_by_the_image_edge_stay_sane_and_have_a_finite_crlb():
    """A periodic crystal scanned over one cell puts columns on the first row/column of pixels (as stem4d does)."""
    spacing, step = 1.96, 0.25
    xs, ys = np.meshgrid(np.arange(-1, 5) * spacing, np.arange(-1, 5) * spacing)
    true = C.ColumnModel(xs.ravel(), ys.ravel(), 1.0, 0.2, [0.01])
    npx = int(round(4 * spacing / step))
    grid = C.ImageGrid((npx, npx), (step, step), (0.0, 0.0))
    img = np.random.default_rng(4).poisson(true.image(grid) * 400) / 400
    x0, y0 = C.find_columns(img, grid, min_distance_A=0.8, smooth_A=0.2)
    res = C.fit_columns(img, grid, x0, y0)
    m = res.model
    assert np.all((m.sigma_A >= 0.5 * step - 1e-12) & (m.sigma_A < 0.5))
    assert np.all((m.x_A >= -0.5 * step) & (m.x_A <= (npx - 0.5) * step))
    assert np.all(m.height < 3.0)
    cr = C.crlb(m, grid, 400.0)
    assert np.all(np.isfinite(cr.var_x_A2) & (cr.var_x_A2 > 0)) and np.all(np.isfinite(cr.var_scs))
    inner = (m.x_A > 1) & (m.x_A < 6.8) & (m.y_A > 1) & (m.y_A < 6.8)
    d = np.min(np.hypot(m.x_A[inner, None] - true.x_A, m.y_A[inner, None] - true.y_A), axis=1)
    assert inner.sum() == 9 and d.max() < 0.03
