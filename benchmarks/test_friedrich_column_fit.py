"""Column-fitting speed (Friedrich 2023 eq 2.19, StatSTEM-style): columns per second for ~300 and ~1000 columns.

Run: ``python -m pytest benchmarks/test_friedrich_column_fit.py -s``. The image is a Pt [001]-like
square lattice of columns (1.96 Å spacing, ±0.05 Å jitter, heights 0.5–1.5, ρ ≈ 0.45 Å) at 0.25 Å
pixels on a constant background with Poisson noise (1000 counts per unit height); starts are
displaced by 0.1 Å and ρ starts at 0.5 Å. All columns are fitted at once (per-column width,
least squares). ``extra_info`` holds columns/s, iterations, the fit's position RMS error and the
ratio of the fit time to one evaluation of model + sparse Jacobian (the floor of any Gauss–Newton
fit on this model). Target: ≥ 300 columns in < 5 s on one core.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from tembench_friedrich2023 import columns as C


def _lattice(n_side: int, seed: int = 0, spacing_A: float = 1.96, step_A: float = 0.25):
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.arange(n_side) * spacing_A + 1.5, np.arange(n_side) * spacing_A + 1.5)
    n = n_side * n_side
    x, y = xs.ravel() + rng.normal(0, 0.05, n), ys.ravel() + rng.normal(0, 0.05, n)
    true = C.ColumnModel(x, y, rng.uniform(0.5, 1.5, n), 0.45 + rng.normal(0, 0.02, n), [0.1])
    npx = int(((n_side - 1) * spacing_A + 3.0) / step_A) + 1
    grid = C.ImageGrid((npx, npx), (step_A, step_A))
    img = rng.poisson(true.image(grid) * 1000) / 1000
    x0, y0 = x + rng.normal(0, 0.1, n), y + rng.normal(0, 0.1, n)
    return true, grid, img, x0, y0


@pytest.mark.parametrize("n_side", [18, 32])
def test_column_fit_speed(benchmark, n_side):
    true, grid, img, x0, y0 = _lattice(n_side)
    ev = C._Evaluator(grid)
    t = time.perf_counter()
    ev.model_and_jacobian(true)
    t_jac = time.perf_counter() - t
    res = benchmark.pedantic(lambda: C.fit_columns(img, grid, x0, y0, sigma_init_A=0.5), rounds=3, iterations=1)
    t_fit = benchmark.stats.stats.min
    err = np.hypot(res.model.x_A - true.x_A, res.model.y_A - true.y_A)
    benchmark.extra_info.update({
        "columns": len(true), "pixels": int(np.prod(grid.shape)), "columns_per_s": len(true) / t_fit,
        "iterations": res.n_iter, "converged": res.converged, "position_rms_error_A": float(np.sqrt(np.mean(err ** 2))),
        "fit_over_one_jacobian": t_fit / t_jac,
    })
    print(f"\n{len(true)} columns, {np.prod(grid.shape)} px: {t_fit:.2f} s ({len(true) / t_fit:.0f} columns/s), "
          f"{res.n_iter} iterations, position rms error {np.sqrt(np.mean(err ** 2)) * 100:.2f} pm, "
          f"fit = {t_fit / t_jac:.0f} × one model+Jacobian evaluation")
    assert res.converged and np.sqrt(np.mean(err ** 2)) < 0.02
