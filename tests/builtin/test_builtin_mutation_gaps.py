"""Gaps in the tests of the built-in reconstructors found by mutation testing (issue 18 part 6).

The existing Wiener test scores with a normalised cross-correlation, which is blind to the absolute
phase scale. Here the linear weak-phase image model, I/Ī = 1 + 2 A E_t sin χ ⊛ φ, is written out and
the reconstruction must return the object's phase in radians. Independent of the code under test:
χ(k) = πλk² C10 with C10 = −Δf, λ a literal, the envelope exp(−½(πλΔk²)²) written out.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tembench.builtin.reconstructors import DirectImage, WeakPhaseWiener
from tembench.errors import TembenchError
from tembench.types import Geometry, Measurement

LAM_300 = 0.019687489  # Å at 300 keV
N, S, DF = 64, 0.25, 300.0   # 64² pixels of 0.25 Å, Δf = 300 Å underfocus


def _chi(k):
    return math.pi * LAM_300 * k * k * (-DF)


def _linear_image(components, dose=1.0, focal_spread_A=0.0, extra_contrast=None):
    """Linear HRTEM image of φ = Σ a cos(2π (gy y + gx x)) (pixel frequencies (iy, ix)), times a dose."""
    y = np.arange(N)[:, None] * S
    x = np.arange(N)[None, :] * S
    img = np.ones((N, N))
    for a, iy, ix in components:
        k = math.hypot(iy, ix) / (N * S)
        t = 2 * math.sin(_chi(k)) * math.exp(-0.5 * (math.pi * LAM_300 * focal_spread_A * k * k) ** 2)
        img += t * a * np.cos(2 * math.pi * (iy * y + ix * x) / (N * S))
    if extra_contrast is not None:
        img += extra_contrast
    return (dose * img).astype(np.float32)


def _amplitude(phase, iy, ix):
    """Amplitude a of a cos(2π k·r) component of a real image."""
    return 2 * abs(np.fft.fft2(phase)[iy % N, ix % N]) / phase.size


def _measurement(data, **geo):
    g = dict(energy_keV=300.0, sampling_A=(S, S), defocus_A=[DF])
    g.update(geo)
    return Measurement(kind="hrtem_image", data=data, axes=("y", "x"), geometry=Geometry(**g))


def _wiener(m, eps=1e-6):
    return WeakPhaseWiener().reconstruct(m, WeakPhaseWiener.Params(epsilon=eps), np)


# two frequencies well transferred at Δf = 300 Å (2 sin χ = −1.02 and −1.25), and the two lowest
# frequencies (2 sin χ = −0.14: weak, but with ε = 1e-6 the filter still returns them, only k = 0 is dropped)
COMPONENTS = [(0.02, 0, 6), (0.015, 5, 3), (0.01, 1, 0), (0.01, 0, 1)]


def test_wiener_returns_the_phase_in_radians_independent_of_the_dose():
    for dose in (1.0, 57.0):
        rec = _wiener(_measurement(_linear_image(COMPONENTS, dose=dose)))
        assert rec.data.dtype == np.float32 and rec.quantity == "phase_rad"
        for a, iy, ix in COMPONENTS:
            assert _amplitude(rec.data, iy, ix) == pytest.approx(a, rel=2e-3)
        # the mean phase is not transferred and is set to zero
        assert abs(float(rec.data.mean())) < 1e-7


def test_wiener_divides_by_the_temporal_envelope_given_in_the_geometry():
    # Δ = 60 Å: E_t = 0.873 and 0.886 at these frequencies, so ignoring it would be a 13–15 % scale error
    img = _linear_image(COMPONENTS, focal_spread_A=60.0)
    rec = _wiener(_measurement(img, extra={"focal_spread_A": 60.0}))
    for a, iy, ix in COMPONENTS:
        assert _amplitude(rec.data, iy, ix) == pytest.approx(a, rel=2e-3)


def test_wiener_gives_no_phase_beyond_the_objective_aperture():
    # 12 mrad at 300 keV: cut-off 0.61 Å⁻¹ (9.75 pixels, the components at 6 px are at 7.4 mrad);
    # contrast at 12 pixels (14.8 mrad, e.g. detector noise) is not phase
    y = np.arange(N)[:, None] * S
    noise = 0.01 * np.cos(2 * math.pi * 12 * y / (N * S)) * np.ones((1, N))
    rec = _wiener(_measurement(_linear_image(COMPONENTS[:1], extra_contrast=noise), semiangle_mrad=12.0))
    assert _amplitude(rec.data, 12, 0) < 1e-6
    assert _amplitude(rec.data, 0, 6) == pytest.approx(0.02, rel=2e-3)


def test_wiener_refuses_incomplete_geometry_and_an_empty_image():
    img = _linear_image(COMPONENTS)
    for geo in (dict(energy_keV=None), dict(sampling_A=None), dict(defocus_A=None), dict(defocus_A=[])):
        with pytest.raises(TembenchError, match="needs geometry"):
            _wiener(_measurement(img, **geo))
    with pytest.raises(TembenchError, match="no signal"):
        _wiener(_measurement(np.zeros((N, N), np.float32)))


def test_direct_image_normalises_any_positive_mean_and_keeps_the_grid_origin():
    data = np.full((4, 5), 0.5)   # float64 input, mean below 1
    rec = DirectImage().reconstruct(_measurement(data), DirectImage.Params(), np)
    assert rec.data.dtype == np.float32
    np.testing.assert_allclose(rec.data, 1.0)
    assert rec.sampling_A == (S, S) and rec.origin_A == (0.0, 0.0) and rec.quantity == "intensity"
    # an ADF image without probe positions starts at the origin of the scan
    m = Measurement(kind="adf_image", data=data, axes=("scan_y", "scan_x"), geometry=Geometry(scan_step_A=(0.5, 0.4)))
    rec = DirectImage().reconstruct(m, DirectImage.Params(normalize=False), np)
    assert rec.origin_A == (0.0, 0.0) and rec.sampling_A == (0.5, 0.4)
    np.testing.assert_allclose(rec.data, 0.5)
    with pytest.raises(TembenchError, match="scan_step_A"):
        DirectImage().reconstruct(m.replace(geometry=Geometry()), DirectImage.Params(), np)
