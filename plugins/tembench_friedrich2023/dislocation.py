"""Displacement-field accuracy around an edge dislocation (Friedrich 2023 Fig. 2.8, strain mapping).

Quantifier ``dislocation_field``: fitted column positions (``column_fit``) vs the isotropic elastic
displacement field u(x, y) that ``pt_edge_dislocation`` used to build the sample. The ground truth is
the sample's metadata (Burgers vector, core position, Poisson ratio) — never seen by reconstructors.
Each true (displaced) column r is mapped back to its perfect-lattice site r₀ by solving
r = r₀ + u(r₀ − core) (fixed point); the true displacement is u(r₀ − core) and the measured one
r_fit − r₀, so the displacement error equals the position error of a matched column, binned here by
distance from the core and set against |u| (relative error) — what a strain map would inherit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from tembench import Quantifier
from tembench.metrics import Metric
from tembench.structures.defects import edge_dislocation_displacement
from tembench_friedrich2023.quantify import _columns_of, _matched, _ScoringParams


def reference_sites(x_A, y_A, core_xy_A, burgers_A: float, nu: float, n_iter: int = 50):
    """Perfect-lattice sites r₀ and displacements u(r₀) with r₀ + u(r₀ − core) = r (fixed point)."""
    x, y = np.asarray(x_A, np.float64), np.asarray(y_A, np.float64)
    x0, y0 = x.copy(), y.copy()
    for _ in range(n_iter):
        ux, uy = edge_dislocation_displacement(x0 - core_xy_A[0], y0 - core_xy_A[1], burgers_A, nu)
        x0, y0 = x - ux, y - uy
    ux, uy = edge_dislocation_displacement(x0 - core_xy_A[0], y0 - core_xy_A[1], burgers_A, nu)
    return x0, y0, ux, uy


class DislocationField(Quantifier):
    """Fitted column displacements vs the analytic edge-dislocation field u(x, y) of the sample (Fig. 2.8).

    Needs a sample with ``burgers_vector_A``, ``core_xy_A`` and ``poisson_ratio`` in its metadata
    (``pt_edge_dislocation``) and a ``column_fit`` reconstruction; otherwise returns nothing.
    The displacement is relative to the perfect lattice, whose rigid offset the field fixes; the
    error |u_fit − u_true| is binned by distance r from the core (``core_radius_A``).
    """

    name = "dislocation_field"
    accepts = ("image",)
    version = "1"
    metrics = {
        "disp_error_mae_A": Metric("Å", "lower", (0.0, None), headline=True,
                                   description="mean |u_fit − u_true| over matched columns"),
        "disp_error_rmse_A": Metric("Å", "lower", (0.0, None), description="RMS |u_fit − u_true|"),
        "disp_error_core_mae_A": Metric("Å", "lower", (0.0, None),
                                        description="mean |u_fit − u_true| within core_radius_A of the core"),
        "disp_error_far_mae_A": Metric("Å", "lower", (0.0, None),
                                       description="mean |u_fit − u_true| beyond core_radius_A"),
        "disp_rel_error_median_pct": Metric("%", "lower", (0.0, None),
                                            description="median |u_fit − u_true| / |u_true| (|u_true| > 0.05 Å)"),
        "disp_true_max_A": Metric("Å", None, (0.0, None), diagnostic=True, description="largest |u_true|"),
        "disp_corr_x": Metric("", "higher", (-1.0, 1.0), description="correlation of fitted and true u_x"),
        "disp_corr_y": Metric("", "higher", (-1.0, 1.0), description="correlation of fitted and true u_y"),
        "n_columns_*": Metric("", None, (0, None), diagnostic=True, description="columns scored"),
        "pct_columns_found": Metric("%", "higher", (0.0, 100.0), description="true columns with a fitted match"),
    }

    class Params(_ScoringParams):
        core_radius_A: float = Field(5.0, gt=0, description="columns within this distance of the core are 'core'")

    def score(self, reconstruction, measurement, sample, params) -> dict[str, Any]:
        md = getattr(sample, "metadata", None) or {}
        if not {"burgers_vector_A", "core_xy_A", "poisson_ratio"} <= set(md):
            return {}
        cols, grid = _columns_of(reconstruction, measurement, None)
        if cols is None:
            return {}
        mt = _matched(cols, grid, sample, params)
        truth, it, iq = mt["truth"], mt["it"], mt["iq"]
        b = float(np.linalg.norm(md["burgers_vector_A"]))
        core = np.asarray(md["core_xy_A"], np.float64)
        x0, y0, ux, uy = reference_sites(truth["x_A"], truth["y_A"], core, b, float(md["poisson_ratio"]))
        fx, fy = np.asarray(cols["x_A"], np.float64)[iq], np.asarray(cols["y_A"], np.float64)[iq]
        mx, my = fx - x0[it], fy - y0[it]
        tx, ty = ux[it], uy[it]
        err = np.hypot(mx - tx, my - ty)
        umag = np.hypot(tx, ty)
        r = np.hypot(x0[it] - core[0], y0[it] - core[1])
        nan = float("nan")
        near = r < params.core_radius_A
        big = umag > 0.05
        nt = len(truth["x_A"])

        def corr(a, c):
            return float(np.corrcoef(a, c)[0, 1]) if len(a) > 2 and np.std(a) > 0 and np.std(c) > 0 else nan

        return {
            "disp_error_mae_A": float(err.mean()) if len(err) else nan,
            "disp_error_rmse_A": float(np.sqrt(np.mean(err ** 2))) if len(err) else nan,
            "disp_error_core_mae_A": float(err[near].mean()) if near.any() else nan,
            "disp_error_far_mae_A": float(err[~near].mean()) if (~near).any() else nan,
            "disp_rel_error_median_pct": float(np.median(err[big] / umag[big]) * 100) if big.any() else nan,
            "disp_true_max_A": float(umag.max()) if len(umag) else nan,
            "disp_corr_x": corr(mx, tx), "disp_corr_y": corr(my, ty),
            "n_columns_true": nt, "n_columns_matched": len(it), "n_columns_core": int(near.sum()),
            "pct_columns_found": 100.0 * len(it) / nt if nt else nan,
            "ref_x_A": x0[it], "ref_y_A": y0[it], "u_true_x_A": tx, "u_true_y_A": ty,
            "u_fit_x_A": mx, "u_fit_y_A": my,
        }
