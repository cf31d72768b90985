"""Alg. 3 end to end: convergence on a toy, atom-level accuracy on a small needle, outputs and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ren_sim import simulate
from tembench.builtin.atom_tracing import AtomTracing
from tembench.builtin.noise import PoissonDose
from tembench.errors import TembenchError
from tembench_ren2020.reconstructor import MultisliceAET


def _run(measurement, **params):
    return MultisliceAET().reconstruct(measurement, MultisliceAET.Params(**params), np)


def test_cost_decreases_monotonically_on_a_noise_free_toy(toy_series):
    rec = _run(toy_series, n_iterations=25, regularizer="none", random_order=False)
    cost = np.asarray(rec.history["cost"])
    assert len(cost) == 25
    assert np.all(np.diff(cost) < 0), cost
    assert cost[-1] < 0.05 * cost[0]
    assert rec.data.min() >= 0          # positivity
    rel = rec.extras["iteration_trace"]["relative_cost"]
    assert len(rel) == 25 and rel[-1] < 0.05 * rel[0] and set(rec.history) == {"cost"}


def test_outputs_are_in_the_sample_frame(toy_series):
    rec = _run(toy_series, n_iterations=2)
    assert rec.kind == "volume" and rec.quantity == "potential_V" and rec.data.dtype == np.float32
    assert isinstance(rec.data, np.ndarray) and rec.data.flags.c_contiguous
    assert rec.data.shape == (24, 24, 24)
    assert rec.sampling_A == pytest.approx((0.5, 0.5, 0.5))
    assert rec.origin_A == pytest.approx((0.0, 0.0, 0.0))      # the 12 Å cell at 0.5 Å voxels
    ex = rec.extras
    assert ex["tau_V"] == 1.0 and ex["slab_thickness_A"] == 5.0
    assert ex["tau_eq6_per_V"] == pytest.approx(1.0 / ex["step_size_alpha_V2"])
    assert ex["step_size_alpha_V2"] == pytest.approx(0.03 / ex["lipschitz_per_tilt_per_V2"])


def test_regularisers_differ_as_expected(toy_series):
    tv = _run(toy_series, n_iterations=8, regularizer="tv", tau_V=2.0)
    lasso = _run(toy_series, n_iterations=8, regularizer="lasso", tau_V=2.0)
    plain = _run(toy_series, n_iterations=8, regularizer="none", positivity=False)
    assert plain.data.min() < 0 <= min(tv.data.min(), lasso.data.min())
    # LASSO zeroes the background, TV leaves it smooth but not sparse
    assert (lasso.data == 0).mean() > (tv.data == 0).mean()


def test_small_needle_noise_free_traces_every_atom(small_needle):
    """Ren Table 1 row 4(a) in miniature: ≥ 99 % atoms found, < 20 pm mean position error."""
    m = simulate(small_needle, tilt_range_deg=(-90.0, 84.0), n_tilts=30)
    rec = _run(m, n_iterations=15)
    score = AtomTracing().score(rec, m, small_needle, AtomTracing.Params())
    assert score["n_true"] == len(small_needle)
    assert score["pct_atoms_found"] >= 99.0, score
    assert score["position_error_mean_pm"] < 20.0, score
    assert score["pct_false_positives"] < 2.0, score


def test_counted_data_are_rescaled_to_intensity(toy_series):
    noisy = PoissonDose().apply(toy_series, PoissonDose.Params(dose_e_per_A2=1e9, dose_mode="total_budget"),
                                np.random.default_rng(0))
    assert noisy.counted
    a = _run(toy_series, n_iterations=3, random_order=False)
    b = _run(noisy, n_iterations=3, random_order=False)
    np.testing.assert_allclose(b.data, a.data, atol=0.05 * float(a.data.max()))
    broken = noisy.replace(geometry=noisy.geometry.replace(extra={k: v for k, v in noisy.geometry.extra.items()
                                                                  if k != "electrons_per_unit_intensity"}))
    with pytest.raises(TembenchError, match="electrons_per_unit_intensity"):
        _run(broken, n_iterations=1)


def test_divergence_is_reported(toy_series):
    bad = toy_series.replace(data=np.full_like(toy_series.data, math.nan))
    with pytest.raises(TembenchError, match="diverged"):
        _run(bad, n_iterations=1)


def test_params_are_validated():
    with pytest.raises(ValueError):
        MultisliceAET.Params(regularizer="l2")
    with pytest.raises(ValueError):
        MultisliceAET.Params(band_limit=3.0)
    with pytest.raises(ValueError):
        MultisliceAET.Params(slice_binning=0)
