"""Scintillator–PMT detector noise: moments against the compound Poisson–Gaussian model and Fig. 2.3 peaks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.signal import find_peaks

from tembench.builtin.detector_noise import ScintillatorPMT, single_electron_relative_sigma
from tembench.builtin.noise import PoissonDose
from tembench.errors import TembenchError
from tembench.types import Geometry, Measurement


def adf(value=0.01, shape=(256, 256), step=0.2):
    return Measurement("adf_image", np.full(shape, value, np.float32), ("y", "x"),
                       Geometry(energy_keV=300.0, sampling_A=(step, step), scan_step_A=(step, step)))


def run(m, seed=0, **kw):
    return ScintillatorPMT().apply(m, ScintillatorPMT.Params(**kw), np.random.default_rng(seed))


def test_relative_sigma_matches_eq_2_11_defaults():
    # m_c = 300 photons, η = 0.25, δ = 4: sqrt((1 − .25 + 1/3)/75 + 300/300²) = 0.1333
    rel = single_electron_relative_sigma(300.0, 0.25, 4.0)
    assert rel == pytest.approx(math.sqrt((0.75 + 1 / 3) / 75 + 1 / 300), rel=1e-12)
    assert 0.13 < rel < 0.14


def test_low_dose_histogram_has_evenly_spaced_single_electron_peaks():
    # Fig. 2.3: low-dose background, λ = 1.5 electrons per pixel
    lam = 1.5
    m = adf(value=lam / (1000.0 * 0.04))  # dose 1000 e/Å², 0.2 Å pixels → 40 e per probe position
    out = run(m, dose_e_per_A2=1000.0)
    x = out.data.ravel().astype(np.float64)
    hist, edges = np.histogram(x, bins=np.arange(-0.5, 6.0, 0.04))
    centres = (edges[:-1] + edges[1:]) / 2
    peaks, _ = find_peaks(hist, prominence=hist.max() * 0.02, distance=10)
    pos = centres[peaks]
    pos = pos[(pos > 0.5) & (pos < 3.5)]
    assert len(pos) == 3
    assert np.allclose(pos, [1, 2, 3], atol=0.1)                # one peak per electron count
    assert np.allclose(np.diff(pos), 1.0, atol=0.1)             # evenly spaced
    rel = single_electron_relative_sigma(300.0, 0.25, 4.0)
    one = x[(x > 0.5) & (x < 1.5)]
    assert one.std() == pytest.approx(rel, rel=0.1)            # single-electron pulse width (eq 2.11)
    # compound moments: E = λ, Var = λ (1 + σ₁²)
    n = x.size
    assert abs(x.mean() - lam) < 5 * math.sqrt(lam * (1 + rel**2) / n)
    assert x.var() == pytest.approx(lam * (1 + rel**2), rel=0.03)


def test_counted_input_is_not_counted_twice_and_normalized_output():
    m = adf(value=0.5)
    counted = PoissonDose().apply(m, PoissonDose.Params(dose_e_per_A2=500.0), np.random.default_rng(3))
    out = run(counted, output="normalized")
    alpha = 500.0 * 0.04
    # mean of normalized output = input intensity; residual vs counts is the PMT term only
    assert abs(out.data.mean() - 0.5) < 5 * math.sqrt(0.5 / alpha / out.data.size)
    resid = out.data.astype(np.float64) * alpha - counted.data
    rel = single_electron_relative_sigma(300.0, 0.25, 4.0)
    assert resid.var() == pytest.approx(rel**2 * counted.data.mean(), rel=0.05)


def test_errors():
    with pytest.raises(TembenchError, match="finite dose"):
        run(adf())
    m4 = Measurement("4dstem", np.ones((2, 2, 4, 4)), ("scan_y", "scan_x", "k_y", "k_x"))
    with pytest.raises(TembenchError, match="pixelated"):
        run(m4, dose_e_per_A2=10.0)
