"""Synthetic Gaussian-column ADF images shared by the Friedrich 2023 column-fitting tests."""

from __future__ import annotations

import numpy as np

from tembench_friedrich2023.columns import ColumnModel, ImageGrid


def lattice_model(n: int = 4, spacing_A: float = 2.0, step_A: float = 0.2, sigma_A: float = 0.45,
                  background: float = 0.1, seed: int = 3, margin_A: float = 1.6):
    """An n×n square lattice of columns with heights in [0.6, 1.4] on a constant background, and its grid."""
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.arange(n) * spacing_A + margin_A, np.arange(n) * spacing_A + margin_A)
    h = rng.uniform(0.6, 1.4, n * n)
    model = ColumnModel(xs.ravel(), ys.ravel(), h, sigma_A, [background])
    npx = int(round(((n - 1) * spacing_A + 2 * margin_A) / step_A)) + 1
    return model, ImageGrid((npx, npx), (step_A, step_A), (0.0, 0.0))
