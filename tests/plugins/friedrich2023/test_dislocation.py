"""dislocation_field pinned on a hand-built case whose answer is known by construction.

A square lattice of perfect sites r₀ (spacing 3 Å) is displaced by the edge-dislocation field to
r = r₀ + u(r₀ − core) and becomes the sample (one atom per column); the "fit" is a hand-built
reconstruction whose columns the test places. The quantifier must map each true column back to
its r₀ (a fixed point it solves itself) and report |u_fit − u_true| with u_true = r − r₀ and
u_fit = r_fit − r₀, both known here without the quantifier:

- fit at r (the displaced columns): error 0, correlation 1;
- fit at r₀ (no displacement seen): error |r − r₀| per column, relative error 100 %, binned by
  |r₀ − core| against core_radius_A;
- fit at r + (0.1, −0.05) Å with two columns missing: error hypot(0.1, 0.05) for every matched
  column, 23 of 25 found.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tembench.structures.defects import edge_dislocation_displacement
from tembench.types import Reconstruction, Sample
from tembench_friedrich2023.dislocation import DislocationField

B_A, NU, CORE = 1.0, 0.39, np.array([6.0, 6.0])      # core between rows and columns (off the branch cut)


@pytest.fixture(scope="module")
def case():
    g = np.arange(5) * 3.0 + 1.5
    x0, y0 = (a.ravel() for a in np.meshgrid(g, g))
    ux, uy = edge_dislocation_displacement(x0 - CORE[0], y0 - CORE[1], B_A, NU)
    x, y = x0 + ux, y0 + uy
    sample = Sample(np.stack([x, y, np.full(25, 5.0)], 1), np.full(25, 78), np.array([60.0, 60.0, 10.0]),
                    name="hand_dislocation",
                    metadata={"burgers_vector_A": [B_A, 0.0, 0.0], "core_xy_A": CORE.tolist(), "poisson_ratio": NU})
    return {"x0": x0, "y0": y0, "x": x, "y": y, "sample": sample}


def _recon(fx, fy):
    # image from −3 Å to 18 Å at 0.25 Å: every column ≥ 1 Å (border_A) inside, periodic images outside
    return Reconstruction(kind="image", data=np.zeros((85, 85)), sampling_A=(0.25, 0.25), origin_A=(-3.0, -3.0),
                          quantity="intensity", extras={"columns": {"x_A": np.asarray(fx), "y_A": np.asarray(fy)}})


def _score(case, fx, fy, **kw):
    p = DislocationField.Params(match_radius_A=1.2, core_radius_A=4.0, **kw)
    return DislocationField().score(_recon(fx, fy), None, case["sample"], p)


def test_the_case_is_what_it_claims(case):
    u = np.hypot(case["x"] - case["x0"], case["y"] - case["y0"])
    assert 0.1 < u.max() < 0.6 and u.min() > 0.01        # a real field, within the matching radius


def test_fit_at_the_displaced_columns_has_zero_error(case):
    out = _score(case, case["x"], case["y"])
    assert out["n_columns_true"] == 25 and out["n_columns_matched"] == 25 and out["pct_columns_found"] == 100.0
    assert out["disp_error_mae_A"] == pytest.approx(0.0, abs=1e-9)
    assert out["disp_error_rmse_A"] == pytest.approx(0.0, abs=1e-9)
    assert out["disp_corr_x"] == pytest.approx(1.0, abs=1e-9) and out["disp_corr_y"] == pytest.approx(1.0, abs=1e-9)
    # the quantifier found the perfect-lattice sites the test started from
    order = np.lexsort((out["ref_y_A"], out["ref_x_A"]))
    want = np.lexsort((case["y0"], case["x0"]))
    np.testing.assert_allclose(out["ref_x_A"][order], case["x0"][want], atol=1e-9)
    np.testing.assert_allclose(out["ref_y_A"][order], case["y0"][want], atol=1e-9)


def test_fit_at_the_perfect_lattice_misses_the_whole_field(case):
    out = _score(case, case["x0"], case["y0"])
    u = np.hypot(case["x"] - case["x0"], case["y"] - case["y0"])
    near = np.hypot(case["x0"] - CORE[0], case["y0"] - CORE[1]) < 4.0
    assert near.sum() == 4                                   # the four sites at 2.12 Å
    assert out["n_columns_core"] == 4
    assert out["disp_error_mae_A"] == pytest.approx(u.mean(), rel=1e-9)
    assert out["disp_error_rmse_A"] == pytest.approx(math.sqrt(np.mean(u ** 2)), rel=1e-9)
    assert out["disp_error_core_mae_A"] == pytest.approx(u[near].mean(), rel=1e-9)
    assert out["disp_error_far_mae_A"] == pytest.approx(u[~near].mean(), rel=1e-9)
    assert out["disp_rel_error_median_pct"] == pytest.approx(100.0, rel=1e-9)
    assert out["disp_true_max_A"] == pytest.approx(u.max(), rel=1e-9)
    np.testing.assert_allclose(out["u_fit_x_A"], 0.0, atol=1e-9)


def test_a_constant_offset_and_missing_columns(case):
    keep = np.ones(25, bool)
    keep[[3, 17]] = False
    out = _score(case, case["x"][keep] + 0.1, case["y"][keep] - 0.05)
    assert out["n_columns_matched"] == 23 and out["pct_columns_found"] == pytest.approx(92.0)
    assert out["disp_error_mae_A"] == pytest.approx(math.hypot(0.1, 0.05), rel=1e-9)
    assert out["disp_error_rmse_A"] == pytest.approx(math.hypot(0.1, 0.05), rel=1e-9)


def test_a_sample_without_a_dislocation_is_skipped(case):
    s = case["sample"]
    plain = Sample(s.positions_A, s.numbers, s.cell_A, name="plain")
    assert DislocationField().score(_recon(case["x"], case["y"]), None, plain, DislocationField.Params()) == {}
