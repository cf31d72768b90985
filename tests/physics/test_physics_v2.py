"""Issue 10 (physics engine, second pass): defects a user could reach, each pinned by a test."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tembench.errors import TembenchError
from tembench.physics import grid, propagation
from tembench.physics.constants import wavelength_A


@pytest.mark.parametrize("energy_keV, sampling_A", [(300.0, 0.010), (80.0, 0.020)])
def test_exact_propagator_accepts_fine_sampling_inside_the_band_limit(energy_keV, sampling_A):
    """Below ≈ λ/√2 sampling the grid corner lies beyond 1/λ, but the 2/3 band limit removes those
    frequencies: the exact propagator must exist there and equal its closed form inside the mask."""
    n, dz = 64, 2.0
    lam = wavelength_A(energy_keV)
    assert sampling_A < lam / math.sqrt(2)  # the corner frequency is evanescent
    p = propagation.propagator((n, n), sampling_A, lam, dz, "exact")
    mask = propagation.band_limit_mask((n, n), sampling_A)
    ky, kx = grid.spatial_frequencies((n, n), sampling_A, dtype=np.float64)
    k2 = ky**2 + kx**2
    kept = mask > 0
    ref = np.exp(2j * math.pi * dz * (np.sqrt(1 / lam**2 - k2[kept]) - 1 / lam)) * mask[kept]
    np.testing.assert_allclose(p[kept], ref, atol=3e-6)
    assert np.all(p[~kept] == 0)
    # unitary on the fully kept frequencies
    np.testing.assert_allclose(np.abs(p[mask == 1]), 1.0, atol=1e-6)


def test_exact_propagator_still_refuses_evanescent_frequencies_it_would_keep():
    lam = wavelength_A(300.0)
    with pytest.raises(TembenchError, match="evanescent"):
        propagation.propagator((64, 64), 0.010, lam, 2.0, "exact", band_limit=None)
    # 2/3 band limit at 0.005 Å: cut-off 66.7 1/Å > 1/λ = 50.8 1/Å
    with pytest.raises(TembenchError, match="band_limit"):
        propagation.propagator((64, 64), 0.005, lam, 2.0, "exact")


# --- slicing: every slice propagated by its own thickness ---------------------------------------
def _explicit_multislice(v, dz, energy_keV, s, incident):
    """Reference: t·ψ then propagate by that slice's Δz, slice by slice, with the public primitives."""
    from tembench.physics.constants import interaction_constant
    from tembench.physics.multislice import transmission_function

    lam = wavelength_A(energy_keV)
    sigma = interaction_constant(energy_keV)
    mask = propagation.band_limit_mask(v.shape[-2:], s)
    psi = incident.astype(np.complex128)
    for m in range(v.shape[0]):
        t = np.fft.ifft2(np.fft.fft2(transmission_function(v[m], sigma)) * mask)
        psi = propagation.propagate((psi * t).astype(np.complex64), float(dz[m]), s, lam)
    return psi


def test_default_slicing_uses_whole_slices_and_sliced_potential_covers_the_cell():
    from tembench.physics import potentials as P
    from tembench.types import Sample

    rng = np.random.default_rng(3)
    pos = np.c_[rng.uniform(0, 6, (10, 2)), rng.uniform(0.3, 4.6, 10)]
    v = P.projected_potential(pos, [14] * 10, gpts=(32, 32), sampling_A=6 / 32, slice_thickness_A=2.0)
    assert v.shape[0] == 3  # 0.3 .. 6.3 Å: three whole 2 Å slices, none thinner
    # a 48.87 Å cell at 0.5 Å: 98 slices over the cell, the last 0.37 Å thick
    sample = Sample(positions_A=[[1.0, 1.0, 1.0], [2.0, 2.0, 47.0]], numbers=[14, 8], cell_A=[4.0, 4.0, 48.87])
    vs, dz = P.sliced_potential(sample, gpts=(16, 16), sampling_A=0.25, slice_thickness_A=0.5)
    assert vs.shape[0] == len(dz) == 98
    assert dz[:-1] == pytest.approx(np.full(97, 0.5)) and dz[-1] == pytest.approx(0.37)
    assert float(dz.sum()) == pytest.approx(48.87)
    np.testing.assert_array_equal(P.slice_thicknesses([1.0, 2.5], (0.0, 9.9)), [1.0, 2.5])


def test_non_dividing_slice_thickness_propagates_each_slice_by_its_own_thickness():
    from tembench.physics import multislice as M
    from tembench.physics import potentials as P
    from tembench.physics import stem as S

    n, s, e = 48, 0.15, 200.0
    rng = np.random.default_rng(4)
    pos = np.c_[rng.uniform(0, n * s, (14, 2)), rng.uniform(0, 5.0, 14)]
    z_range = (0.0, 5.0)  # 2 + 2 + 1 Å
    v = P.projected_potential(pos, rng.choice([6, 14], 14), gpts=(n, n), sampling_A=s, slice_thickness_A=2.0,
                              z_range_A=z_range)
    dz = P.slice_thicknesses(2.0, z_range)
    np.testing.assert_allclose(dz, [2.0, 2.0, 1.0])
    incident = np.ones((n, n), np.complex64)
    ref = _explicit_multislice(v, dz, e, s, incident)
    got = M.multislice(incident, dz, energy_keV=e, sampling_A=s, potentials=v).exit_wave
    np.testing.assert_allclose(got, ref, atol=2e-5)
    wrong = M.multislice(incident, 2.0, energy_keV=e, sampling_A=s, potentials=v).exit_wave
    assert np.max(np.abs(wrong - ref)) > 50 * np.max(np.abs(got - ref))  # the test sees a nominal Δz
    # HRTEM images and 4D-STEM take the same per-slice thicknesses
    img = M.hrtem_images(v, dz, energy_keV=e, sampling_A=s, defocus_values_A=[0.0])
    np.testing.assert_allclose(img[0], np.abs(ref) ** 2, atol=5e-5)
    probe = S.make_probe_modes((n, n), s, e, 20.0)
    pat = S.stem_scan(v, dz, energy_keV=e, sampling_A=s, positions_A=[[3.6, 3.6]], probe=probe).patterns[0]
    psi = _explicit_multislice(v, dz, e, s, np.asarray(probe[0]))
    ref_pat = np.fft.fftshift(np.abs(np.fft.fft2(psi)) ** 2) / (n * n)
    np.testing.assert_allclose(pat, ref_pat, atol=2e-6 * ref_pat.max())
