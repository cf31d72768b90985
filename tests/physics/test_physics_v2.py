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
