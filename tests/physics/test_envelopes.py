"""Coherence envelopes pinned against their closed forms, with literal numbers.

Conventions (tembench.physics.optics): Δ = rms focal spread (Å), θ = rms illumination angle per
axis (mrad), χ with C10 = −Δf:

    E_t(k) = exp[−½ (π λ Δ k²)²]
    E_s(k) = exp[−½ (θ/λ)² |∇_k χ|²];  for C10 and C30 only, |∇_k χ| = 2πλk (C10 + C30 λ² k²),
             so E_s = exp[−2π² θ² k² (C10 + C30 λ² k²)²]

This is Kirkland's E_s = exp[−(πα/λ)² (Cs λ³k³ − Δf λk)²] = exp[−(α/2λ)² |∇_k χ|²] for a Gaussian
source of rms θ per axis (Kirkland's 1/e semiangle α = √2 θ). Every expected value below was computed by hand from
these formulas with λ(300 keV) = 0.019687489 Å and is written as a literal, so a change of
convention or a slipped factor (×10 in θ, λ in the wrong place) fails here.
The incoherent sums of tembench.physics.coherence (the simulation path) are checked against the
same literals on a weak phase grating, where the linear image is exactly the coherent one times
the envelope (for a pure defocus, χ(q + k) − χ(q) = χ(k) + q·∇χ(k)).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tembench.physics import coherence as C
from tembench.physics import optics
from tembench.physics.constants import wavelength_A

LAM_300 = 0.019687489  # Å, relativistic, 300 keV (12.2643/sqrt(V(1 + 0.97848e-6 V)))


def test_wavelength_used_below_is_the_300_keV_one():
    assert wavelength_A(300.0) == pytest.approx(LAM_300, rel=1e-6)


@pytest.mark.parametrize("k, expected", [(0.4, 0.9568879604468941), (0.7, 0.6614514311629665)],
                         ids=["k0.4", "k0.7"])
def test_temporal_envelope_closed_form(k, expected):
    # Δ = 30 Å; k along a diagonal so both axes enter
    e = optics.temporal_envelope(np.array([k / math.sqrt(2)]), np.array([k / math.sqrt(2)]), LAM_300, 30.0)
    assert float(e[0]) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("k, expected", [(0.45, 0.8227489243760782), (0.6, 0.08626776537811338)],
                         ids=["k0.45", "k0.6"])
def test_spatial_envelope_closed_form_defocus_and_cs(k, expected):
    # C10 = −500 Å (Δf = 500 Å underfocus), C30 = 1.2 mm, θ = 0.5 mrad rms per axis
    ab = {"C10": -500.0, "C30": 1.2e7}
    e = optics.spatial_envelope(np.array([0.6 * k]), np.array([0.8 * k]), LAM_300, ab, 0.5)
    assert float(e[0]) == pytest.approx(expected, rel=1e-6)


def test_spatial_envelope_closed_form_astigmatism():
    # χ = πλ C12 [(kx² − ky²) cos 2φ12 + 2 kx ky sin 2φ12]: ∇χ written out in the test
    ab = {"C12": 50.0, "phi12": 0.3}
    e = optics.spatial_envelope(np.array([0.2]), np.array([0.5]), LAM_300, ab, 1.0)
    assert float(e[0]) == pytest.approx(0.9857909881821959, rel=1e-6)


def test_ctf_carries_both_envelopes_and_the_aperture():
    ab = {"C10": -500.0, "C30": 1.2e7}
    k = 0.45
    ky, kx = np.array([0.0]), np.array([k])
    h = optics.ctf(ky, kx, LAM_300, ab, semiangle_mrad=None, focal_spread_A=30.0, source_angle_rms_mrad=0.5)
    et = math.exp(-0.5 * (math.pi * LAM_300 * 30.0 * k * k) ** 2)
    es = 0.8227489243760782
    assert abs(complex(h[0])) == pytest.approx(et * es, rel=1e-5)
    # χ(k) = πλk² C10 + ½ π C30 λ³ k⁴, written out: exp(−iχ) phase
    chi = math.pi * LAM_300 * k * k * (-500.0) + 0.5 * math.pi * 1.2e7 * LAM_300 ** 3 * k ** 4
    assert np.angle(complex(h[0])) == pytest.approx(math.remainder(-chi, 2 * math.pi), abs=1e-4)
    # an aperture of 10 mrad cuts k = 0.45 Å⁻¹ (8.9 mrad passes, 0.6 Å⁻¹ = 11.8 mrad does not)
    hk = optics.ctf(np.array([0.0, 0.0]), np.array([0.45, 0.6]), LAM_300, ab, semiangle_mrad=10.0, edge_mrad=0.0)
    assert abs(complex(hk[0])) == pytest.approx(1.0) and abs(complex(hk[1])) == 0.0


def _grating_contrast(kg_px: int, n: int, s: float, **kw) -> float:
    """|Fourier coefficient at the grating frequency| of the HRTEM image of a weak cos grating."""
    x = np.arange(n) * s
    v = (0.05 * np.cos(2 * np.pi * kg_px * x / (n * s)))[None, None, :] * np.ones((1, n, 1))
    img = C.partially_coherent_hrtem_images(v.astype(np.float32), 0.0, energy_keV=300.0, sampling_A=s,
                                            defocus_values_A=[500.0], band_limit=None,
                                            bandlimit_transmission=False, **kw)[0]
    return abs(np.fft.fft2(img - img.mean())[0, kg_px])


def test_illumination_spread_sum_equals_the_spatial_envelope_on_a_grating():
    # k_g = 8/(64·0.25 Å) = 0.5 Å⁻¹, Δf = 500 Å, θ = 0.5 mrad: E_s = exp(−½(2π·500·0.5·0.5e-3)²)
    coh = _grating_contrast(8, 64, 0.25)
    inc = _grating_contrast(8, 64, 0.25, illumination_rms_mrad=0.5, n_illumination=9)
    assert inc / coh == pytest.approx(0.7346029443286334, rel=2e-3)


def test_focal_spread_sum_equals_the_temporal_envelope_on_a_grating():
    # k_g = 12/16 Å = 0.75 Å⁻¹, Δ = 30 Å: E_t = exp(−½(πλΔk²)²)
    coh = _grating_contrast(12, 64, 0.25)
    inc = _grating_contrast(12, 64, 0.25, focal_spread_A=30.0)
    assert inc / coh == pytest.approx(0.5800298787332931, rel=2e-3)
