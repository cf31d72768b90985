"""Projected potentials and volumes against the analytic parameterisation."""

import numpy as np
import pytest

from tembench.errors import TembenchError
from tembench.physics import potentials as P
from tembench.physics.constants import SCATTERING_FACTOR_TO_POTENTIAL_V_A2 as K
from tembench.types import Sample


@pytest.mark.parametrize("param", ["lobato", "kirkland"])
def test_single_atom_integral_and_profile(param):
    n, s = 160, 0.08
    L = n * s
    c = (5.13, 6.71)  # off-grid: sub-pixel placement
    v = P.projected_potential([[c[1], c[0], 0.0]], [14], gpts=(n, n), sampling_A=s, parametrization=param)[0]
    # ∫ v d²ρ = K f_e(0)
    assert float(v.sum()) * s * s == pytest.approx(K * P.scattering_factor(14, 0.0, param), rel=1e-4)
    yy, xx = np.mgrid[0:n, 0:n] * s
    ref = sum(
        P.atom_projected_potential(14, np.hypot(yy - c[0] + dy * L, xx - c[1] + dx * L), param)
        for dy in (-1, 0, 1) for dx in (-1, 0, 1)
    )
    r = np.hypot(yy - c[0], xx - c[1])
    # The grid holds the band-limited potential: it rings at the Nyquist frequency around the
    # log-singular core, but its local (annular) averages are the analytic profile.
    for lo, hi in [(0.5, 1.0), (1.0, 2.0), (2.0, 3.0)]:
        ring = (r > lo) & (r < hi)
        assert float(v[ring].mean()) == pytest.approx(float(ref[ring].mean()), rel=0.01)


def test_real_space_potential_matches_projection():
    # ∫ V(sqrt(ρ²+z²)) dz = v(ρ) for the analytic radial forms
    z = np.linspace(-20, 20, 40001)
    for rho in (0.3, 1.0):
        for param in ("lobato", "kirkland"):
            vz = P.atom_potential(79, np.hypot(rho, z), param)
            assert np.trapezoid(vz, z) == pytest.approx(float(P.atom_projected_potential(79, rho, param)), rel=1e-4)


def test_slices_partition_atoms():
    rng = np.random.default_rng(1)
    pos = rng.uniform(0, 10, (50, 3))
    nums = rng.choice([6, 8, 14], 50)
    full = P.projected_potential(pos, nums, gpts=(48, 48), sampling_A=10 / 48)
    sl = P.projected_potential(pos, nums, gpts=(48, 48), sampling_A=10 / 48, slice_thickness_A=2.0, z_range_A=(0, 10))
    assert sl.shape == (5, 48, 48) and sl.dtype == np.float32
    np.testing.assert_allclose(sl.sum(0), full[0], atol=1e-3 * float(full.max()))


def test_frozen_phonon_displacement_changes_and_keeps_integral():
    pos = [[2.0, 2.0, 1.0], [5.0, 5.0, 1.0]]
    v0 = P.projected_potential(pos, [14, 14], gpts=(64, 64), sampling_A=0.125)
    v1 = P.projected_potential(pos, [14, 14], gpts=(64, 64), sampling_A=0.125, rms_displacement_A=0.1,
                               rng=np.random.default_rng(0))
    assert not np.allclose(v0, v1)
    assert float(v1.sum()) == pytest.approx(float(v0.sum()), rel=1e-5)


def test_unknown_element_named():
    with pytest.raises(TembenchError, match="110"):
        P.projected_potential([[0, 0, 0]], [110], gpts=(8, 8), sampling_A=0.5)


def test_volume_projects_to_projected_potential():
    s = 0.25
    sample = Sample(positions_A=[[3.1, 4.2, 3.3], [5.0, 2.7, 5.9]], numbers=[14, 8], cell_A=[8.0, 8.0, 9.0])
    vol = P.potential_volume(sample, s)
    assert vol.shape == (36, 32, 32) and vol.dtype == np.float32
    proj = P.projected_potential(sample.positions_A, sample.numbers, gpts=(32, 32), sampling_A=s)[0]
    np.testing.assert_allclose(vol.sum(0) * s, proj, atol=5e-3 * float(proj.max()))


def test_volume_shell_average_matches_analytic():
    s = 0.1
    c = np.array([4.03, 4.11, 4.17])
    vol = P.potential_volume(Sample(positions_A=[c], numbers=[14], cell_A=[8.0, 8.0, 8.4]), s)
    zz, yy, xx = np.meshgrid(*(np.arange(n) * s for n in vol.shape), indexing="ij")
    r = np.sqrt((xx - c[0]) ** 2 + (yy - c[1]) ** 2 + (zz - c[2]) ** 2)
    ref = P.atom_potential(14, r)
    for lo, hi in [(0.6, 1.0), (1.0, 1.6)]:
        shell = (r > lo) & (r < hi)
        assert float(vol[shell].mean()) == pytest.approx(float(ref[shell].mean()), rel=0.01)
