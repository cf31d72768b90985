"""COM / DPC / iCOM: known gradients, quantitative phase, rotation estimate, EER = dense."""

from __future__ import annotations

import numpy as np
import pytest

from tembench.builtin.noise import PoissonDose
from tembench.builtin.noise_eer import ElectronEventsConversion
from tembench.builtin.quantifiers import normalized_cross_correlation as ncc
from tembench.physics import constants
from tembench_pelz2022 import dpc, synthetic
from tembench_pelz2022.common import load_4d

# the synthetic data of conftest.py (not imported: another conftest module may own that name)
ENERGY_KEV, SAMPLING_A, SEMIANGLE_MRAD = 200.0, 0.25, 25.0

LAM = constants.wavelength_A(ENERGY_KEV)


def _gradient(measurement, **kw):
    x, grid = load_4d(measurement, "dpc")
    return dpc.gradient_field(x, grid, LAM, **kw)


def test_com_measures_a_known_phase_ramp():
    # φ = 2π (a_y y + a_x x) on the periodic cell: every pattern's COM is the tilt, g = 2π a exactly
    n = 64
    ay, ax = 3 / (n * SAMPLING_A), -2 / (n * SAMPLING_A)  # whole cycles over the cell (periodic)
    y, x = np.mgrid[:n, :n] * SAMPLING_A
    ramp = 2 * np.pi * (ay * y + ax * x)
    m = synthetic.simulate(ramp, SAMPLING_A, 4, ENERGY_KEV, SEMIANGLE_MRAD).measurement
    gy, gx = _gradient(m)
    assert np.allclose(gy, 2 * np.pi * ay, rtol=1e-3) and np.allclose(gx, 2 * np.pi * ax, rtol=1e-3)
    # the regularised iterative integration on a padded grid recovers the (non-periodic) ramp of the scan window
    phase, hist = dpc.iterative_dpc(gy, gx, (4 * SAMPLING_A,) * 2, n_iter=400, padding_factor=2.0)
    truth = ramp[::4, ::4] - ramp[::4, ::4].mean()
    assert hist[-1] < hist[0]
    assert ncc(phase, truth) > 0.999
    assert np.abs(phase - truth).max() < 0.05 * np.ptp(truth)


def test_icom_is_quantitative_for_a_phase_object(focused, blurred_truth, phase_object):
    rec = dpc.ICOM().reconstruct(focused.measurement, dpc.ICOM.Params(), np)
    assert rec.quantity == "phase_rad" and rec.sampling_A == (SAMPLING_A, SAMPLING_A)
    # eq 3.2: integrated COM = |P|² ⋆ φ, in radians
    truth = blurred_truth - blurred_truth.mean()
    assert ncc(rec.data, truth) > 0.9999
    assert rec.data.std() / truth.std() == pytest.approx(1.0, abs=0.01)
    assert ncc(rec.data, phase_object) > 0.95


def test_iterative_dpc_converges_to_icom_and_regularisation_filters(focused):
    gy, gx = _gradient(focused.measurement)
    step = (SAMPLING_A, SAMPLING_A)
    direct = dpc.icom(gy, gx, step)
    it, hist = dpc.iterative_dpc(gy, gx, step, step_size=0.5, n_iter=60, padding_factor=1.0)
    assert np.allclose(it, direct, atol=1e-5 * np.ptp(direct))
    assert all(b <= a + 1e-12 for a, b in zip(hist, hist[1:]))
    lowpass, _ = dpc.iterative_dpc(gy, gx, step, n_iter=60, padding_factor=1.0, lambda2_A2=5.0)
    highpass, _ = dpc.iterative_dpc(gy, gx, step, n_iter=5, padding_factor=1.0, lambda1_per_A2=50.0)
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(64), np.fft.fftfreq(64), indexing="ij"))

    def frac_high(a):
        p = np.abs(np.fft.fft2(a)) ** 2
        return p[k > 0.25].sum() / p[k > 0].sum()

    def frac_low(a):
        p = np.abs(np.fft.fft2(a)) ** 2
        return p[(k > 0) & (k < 0.05)].sum() / p[k > 0].sum()

    assert frac_high(lowpass) < 0.5 * frac_high(direct)
    assert frac_low(highpass) < 0.5 * frac_low(direct)


@pytest.mark.parametrize("rotation_deg", [17.0, -50.0])
def test_rotation_estimate_finds_a_known_detector_rotation(phase_object, blurred_truth, rotation_deg):
    m = synthetic.simulate(phase_object, SAMPLING_A, 2, ENERGY_KEV, SEMIANGLE_MRAD,
                           rotation_deg=rotation_deg).measurement
    gy, gx = _gradient(m)
    est = dpc.estimate_rotation_deg(gy, gx, (2 * SAMPLING_A,) * 2)
    assert abs((est - rotation_deg + 90) % 180 - 90) < 1.0
    rec = dpc.ICOM().reconstruct(m, dpc.ICOM.Params(rotation_deg=None), np)
    assert abs((rec.extras["rotation_deg"] - rotation_deg + 180) % 360 - 180) < 1.0  # 180° branch too
    truth = blurred_truth[::2, ::2]
    assert ncc(rec.data, truth) > 0.99
    # a mis-rotated gradient field is cos θ · ∇O plus a curl field that the integration removes
    wrong = dpc.ICOM().reconstruct(m, dpc.ICOM.Params(rotation_deg=0.0), np)
    assert wrong.data.std() / rec.data.std() == pytest.approx(abs(np.cos(np.radians(rotation_deg))), abs=0.02)


def test_eer_and_dense_give_identical_dpc(focused):
    rng = np.random.default_rng(2)
    counted = PoissonDose().apply(focused.measurement, PoissonDose.Params(electrons_per_pattern=50), rng)
    eer = ElectronEventsConversion().apply(counted, ElectronEventsConversion.Params(), rng)
    for cls in (dpc.ICOM, dpc.DPC):
        for norm in ("frame", "mean"):
            p = cls.Params(normalize=norm)
            a = cls().reconstruct(counted, p, np).data
            b = cls().reconstruct(eer, p, np).data
            assert np.array_equal(a, b)


def test_dpc_noise_degrades_gracefully(focused, blurred_truth):
    rng = np.random.default_rng(4)
    scores = []
    for dose in (1, 100, 10000):
        m = PoissonDose().apply(focused.measurement, PoissonDose.Params(electrons_per_pattern=dose), rng)
        # rotation given (the true 0°): at ≤ 100 e/pattern this weak object leaves nothing to estimate it from
        rec = dpc.DPC().reconstruct(m, dpc.DPC.Params(normalize="mean", rotation_deg=0.0), np).data
        assert np.all(np.isfinite(rec))
        scores.append(ncc(rec, blurred_truth))
    assert scores[0] < scores[1] < scores[2] and scores[2] > 0.6, scores
