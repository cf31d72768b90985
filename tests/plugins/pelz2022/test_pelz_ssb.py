"""SSB (eq 3): recovers a weak phase object, refocuses, matches a direct evaluation, EER = dense."""

from __future__ import annotations

import numpy as np
import pytest

from tembench.builtin.noise import PoissonDose
from tembench.builtin.noise_eer import ElectronEventsConversion
from tembench.builtin.quantifiers import normalized_cross_correlation as ncc
from tembench.physics import constants, optics
from tembench_pelz2022 import _kernels, ssb
from tembench_pelz2022.common import load_4d, probe_optics, scan_step
from tembench_pelz2022.interactive import InteractiveSSB

# the synthetic data of conftest.py (not imported: another conftest module may own that name)
ENERGY_KEV, SAMPLING_A, SEMIANGLE_MRAD = 200.0, 0.25, 25.0


def _prepare(measurement, **kw):
    x, grid = load_4d(measurement, "ssb")
    opt = probe_optics(measurement.geometry, "ssb")
    return ssb.prepare(x, grid, opt, scan_step(measurement.geometry, "ssb"), **kw)


def test_quadratic_matrix_reproduces_the_aberration_function():
    lam = constants.wavelength_A(ENERGY_KEV)
    quad = {"C10": -73.0, "C12": 21.0, "phi12": 0.7}
    Q = ssb.quadratic_matrix(quad, lam)
    rng = np.random.default_rng(0)
    k = rng.normal(size=(50, 2))
    chi = optics.aberration_function(k[:, 0], k[:, 1], lam, quad)
    assert np.allclose(np.einsum("ni,ij,nj->n", k, Q, k), chi, rtol=1e-12, atol=1e-12)


def test_ssb_recovers_weak_phase_object(focused, phase_object):
    rec = ssb.SSB().reconstruct(focused.measurement, ssb.SSB.Params(), np)
    assert rec.quantity == "phase_rad" and rec.data.shape == (64, 64)
    assert rec.sampling_A == (0.25, 0.25) and rec.origin_A == (0.0, 0.0)
    assert max(rec.extras["detector_shape_used"]) <= 32
    assert ncc(rec.data, phase_object) >= 0.95
    # quantitative: the band-limited (|K| < 2k0) phase has ≥ 75 % of the object's rms
    assert 0.75 < rec.data.std() / phase_object.std() < 1.05


def test_refocusing_corrects_a_known_defocus(defocused, phase_object):
    # the rotation is given (the true 0°): this checks the aberration correction, not the rotation search
    # (which, left free on uncorrected data, finds the rotation that best hides the defocus: NCC 0.63)
    params = ssb.SSB.Params(rotation_deg=0.0)
    corrected = ssb.SSB().reconstruct(defocused.measurement, params, np).data
    wrong = ssb.SSB().reconstruct(defocused.measurement, params.model_copy(update={"correct_aberrations": False}), np).data
    half = ssb.SSB().reconstruct(defocused.measurement, params.model_copy(update={"defocus_A": 40.0}), np).data
    assert ncc(corrected, phase_object) >= 0.95
    assert ncc(wrong, phase_object) < 0.3
    assert ncc(wrong, phase_object) < ncc(half, phase_object) < ncc(corrected, phase_object)


@pytest.mark.parametrize("numba", [False, True])
def test_reduction_matches_direct_evaluation_with_higher_order_aberrations(defocused, numba):
    if numba and not _kernels.HAVE_NUMBA:
        pytest.skip("numba not installed")
    d = _prepare(defocused.measurement, rotation_deg=12.0)
    ab = {"C10": -60.0, "C12": 15.0, "phi12": 0.4, "C30": 2.0e4, "C23": 300.0, "phi23": 1.0}
    ref = d.reference_spectrum(ab)
    fast = d.spectrum(ab, numba=numba)  # folds C30/C23 into G, separable C10/C12
    assert np.abs(fast - ref).max() <= 1e-5 * np.abs(ref).max()
    # unfolding restores G
    g0 = _prepare(defocused.measurement, rotation_deg=12.0).G
    d.set_fixed_aberrations({})
    assert np.allclose(d.G, g0, atol=1e-5 * np.abs(g0).max())


def test_eer_input_gives_the_same_image_as_dense(focused):
    rng = np.random.default_rng(5)
    counted = PoissonDose().apply(focused.measurement, PoissonDose.Params(electrons_per_pattern=200), rng)
    eer = ElectronEventsConversion().apply(counted, ElectronEventsConversion.Params(), rng)
    a = ssb.SSB().reconstruct(counted, ssb.SSB.Params(), np).data
    b = ssb.SSB().reconstruct(eer, ssb.SSB.Params(), np).data
    assert np.array_equal(a, b)


def test_poisson_noise_degrades_gracefully(focused, phase_object):
    # a 0.05 rad object needs ~1e5 e/pattern; the score must rise monotonically with dose, for both
    # normalisations, and the transfer-weighted sum (eq 3 as written) must beat the flat mean at low dose
    rng = np.random.default_rng(9)
    scores = {"mean": [], "sum": []}
    for dose in (300, 3000, 30000, 300000):
        m = PoissonDose().apply(focused.measurement, PoissonDose.Params(electrons_per_pattern=dose), rng)
        for norm in scores:
            # rotation given (the true 0°): at 300 e/pattern this weak object leaves nothing to estimate it from
            rec = ssb.SSB().reconstruct(m, ssb.SSB.Params(normalization=norm, rotation_deg=0.0), np).data
            assert np.all(np.isfinite(rec))
            scores[norm].append(ncc(rec, phase_object))
    for s in scores.values():
        assert all(b > a for a, b in zip(s, s[1:])), scores
        assert s[-1] > 0.8
    assert scores["sum"][1] > scores["mean"][1]


def test_interactive_refocus_equals_a_full_reconstruction(defocused, phase_object):
    view = InteractiveSSB.from_measurement(defocused.measurement)
    # the interactive view reduces with the given rotation (0°) and the flat least-squares normalisation
    p = ssb.SSB.Params(defocus_A=50.0, rotation_deg=0.0, normalization="mean")
    full = ssb.SSB().reconstruct(defocused.measurement, p, np).data
    assert np.allclose(view.phase(defocus_A=50.0), full, atol=1e-6)
    assert ncc(view.phase(), phase_object) >= 0.95   # the recorded defocus
    assert view.last_reduce_s >= 0
    panels, K = view.g_panels(9)
    assert panels.shape[0] == 9 and K.shape == (9, 2) and np.all(np.hypot(*K.T) > 0)
