"""Rotations and slice binning (exact adjoints), partial coherence, memory guard."""

import math

import zlib

import numpy as np
import pytest

from tembench.errors import ResourceError, TembenchError
from tembench.physics import coherence as C
from tembench.physics import memory
from tembench.physics import multislice as M
from tembench.physics import potentials as P
from tembench.physics import rotation as R
from tembench.types import Sample

RNG = np.random.default_rng(3)


@pytest.fixture(autouse=True)
def _rng_per_test(request):
    """A generator seeded by the test's own name: results do not depend on which tests ran before."""
    global RNG
    RNG = np.random.default_rng(zlib.crc32(request.node.name.encode()))


@pytest.mark.parametrize("axis", ["x", "y", "z"])
def test_axis_rotation_adjoint_dot_product(axis):
    x = RNG.standard_normal((14, 16, 18)).astype(np.float32)
    y = RNG.standard_normal((14, 16, 18)).astype(np.float32)
    lhs = np.vdot(R.rotate(x, 23.0, axis).astype(np.float64), y)
    rhs = np.vdot(x.astype(np.float64), R.rotate_adjoint(y, 23.0, axis))
    assert lhs == pytest.approx(rhs, rel=1e-5)
    # the axis fast path is the general operator for that matrix
    np.testing.assert_allclose(R.rotate(x, 23.0, axis), R.rotate(x, matrix=R.axis_rotation_matrix(23.0, axis)),
                               atol=1e-5)


def test_euler_rotation_adjoint_and_relion_convention():
    x = RNG.standard_normal((10, 12, 14)).astype(np.float32)
    y = RNG.standard_normal((10, 12, 14)).astype(np.float32)
    m = R.euler_matrix(30.0, 50.0, -20.0)
    assert np.vdot(R.rotate(x, matrix=m).astype(np.float64), y) == pytest.approx(
        np.vdot(x.astype(np.float64), R.rotate_adjoint(y, matrix=m)), rel=1e-5)
    np.testing.assert_allclose(m @ m.T, np.eye(3), atol=1e-12)
    # RELION: rot and psi about z, tilt about y; a pure tilt equals the y-axis rotation
    np.testing.assert_allclose(R.euler_matrix(0, 40, 0), R.axis_rotation_matrix(40, "y"), atol=1e-12)


def test_rotating_volume_matches_rotating_atoms():
    # the same rotation applied to the atoms (exact) and to the voxel volume (trilinear)
    cell = np.array([12.0, 12.0, 12.0])
    pos = np.array([[4.0, 6.0, 5.0], [8.0, 6.5, 7.5]])
    s = 0.4
    vol = P.potential_volume(Sample(positions_A=pos, numbers=[79, 79], cell_A=cell), s)
    m = R.axis_rotation_matrix(30.0, "y")
    moved = R.rotate_points(pos, m, cell / 2)
    rot = R.rotate(vol, 30.0, "y")
    zz, yy, xx = np.meshgrid(*(np.arange(n) * s for n in vol.shape), indexing="ij")
    for p in moved:  # each atom's potential maximum moves to the rotated position
        near = (xx - p[0]) ** 2 + (yy - p[1]) ** 2 + (zz - p[2]) ** 2 < 1.0
        w = np.clip(rot, 0, None) * near
        com = [float((w * c).sum() / w.sum()) for c in (xx, yy, zz)]
        np.testing.assert_allclose(com, p, atol=0.1)


def test_separable_euler_rotation_is_adjoint_and_turns_atoms_like_the_matrix():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((12, 14, 16)).astype(np.float32)
    y = rng.standard_normal((12, 14, 16)).astype(np.float32)
    e = (7.0, 25.0, -4.0)
    assert np.vdot(R.euler_rotate(x, e).astype(np.float64), y) == pytest.approx(
        np.vdot(x.astype(np.float64), R.euler_rotate_adjoint(y, e)), rel=1e-5)
    np.testing.assert_array_equal(R.euler_rotate(x, (0, 0, 0)), x)
    np.testing.assert_array_equal(R.euler_rotate(x, (0, 25.0, 0)), R.rotate(x, 25.0, "y"))
    # atoms turned by euler_matrix land where the separable rotation moves their potential maxima
    cell = np.array([12.0, 12.0, 12.0])
    pos = np.array([[4.0, 6.0, 5.0], [8.0, 4.5, 7.5]])
    s = 0.4
    vol = P.potential_volume(Sample(positions_A=pos, numbers=[79, 79], cell_A=cell), s)
    e = (20.0, 30.0, -15.0)
    moved = R.rotate_points(pos, R.euler_matrix(*e), cell / 2)
    rot = R.euler_rotate(vol, e)
    zz, yy, xx = np.meshgrid(*(np.arange(n) * s for n in vol.shape), indexing="ij")
    for p in moved:
        near = (xx - p[0]) ** 2 + (yy - p[1]) ** 2 + (zz - p[2]) ** 2 < 1.0
        w = np.clip(rot, 0, None) * near
        com = [float((w * c).sum() / w.sum()) for c in (xx, yy, zz)]
        np.testing.assert_allclose(com, p, atol=0.1)


def test_slice_binning_adjoint_and_sum():
    v = RNG.standard_normal((23, 5, 6)).astype(np.float32)
    b = R.bin_slices(v, 5)
    assert b.shape == (5, 5, 6)
    np.testing.assert_allclose(b.sum(0), v.sum(0), rtol=1e-5, atol=1e-5)
    y = RNG.standard_normal(b.shape).astype(np.float32)
    assert np.vdot(b.astype(np.float64), y) == pytest.approx(np.vdot(v.astype(np.float64),
                                                                     R.bin_slices_adjoint(y, 5, 23)), rel=1e-6)
    np.testing.assert_allclose(R.binned_thicknesses(23, 5, 0.5), [2.5, 2.5, 2.5, 2.5, 1.5])


def test_defocus_spread_matches_temporal_envelope_for_weak_object():
    # for a weak phase object the incoherent focal sum equals the linear CTF times E_t
    n, s, e = 64, 0.2, 300.0
    v = P.projected_potential([[6.1, 6.6, 0.0]], [6], gpts=(n, n), sampling_A=s) * 0.02
    kw = dict(energy_keV=e, sampling_A=s, defocus_values_A=[200.0], aberrations={"C30": 5e5},
              bandlimit_transmission=False, band_limit=None)
    img = C.partially_coherent_hrtem_images(v, 0.0, focal_spread_A=40.0, **kw)[0]
    from tembench.physics.constants import interaction_constant, wavelength_A
    from tembench.physics.grid import spatial_frequencies
    from tembench.physics.optics import ctf, temporal_envelope

    lam = wavelength_A(e)
    ky, kx = spatial_frequencies((n, n), s, dtype=np.float64)
    h = ctf(ky, kx, lam, {"C10": -200.0, "C30": 5e5})
    lin = 2 * interaction_constant(e) * np.real(np.fft.ifft2(np.fft.fft2(v[0]) * (-np.imag(h))
                                                              * temporal_envelope(ky, kx, lam, 40.0)))
    err = np.linalg.norm((img - 1) - lin) / np.linalg.norm(lin)
    assert err < 0.05


def test_illumination_spread_blurs_and_keeps_flux():
    n, s = 48, 0.25
    v = P.projected_potential(RNG.uniform(0, 12, (20, 3)), [14] * 20, gpts=(n, n), sampling_A=s,
                              slice_thickness_A=3.0, z_range_A=(0, 12))
    kw = dict(energy_keV=200, sampling_A=s, defocus_values_A=[300.0])
    coh = M.hrtem_images(v, 3.0, **kw)
    inc = C.partially_coherent_hrtem_images(v, 3.0, illumination_rms_mrad=1.0, n_illumination=3, **kw)
    assert float(inc.mean()) == pytest.approx(float(coh.mean()), rel=1e-3)
    assert float(inc.std()) < float(coh.std())
    tilts, w = C.illumination_tilts(1.0, 3)
    assert w.sum() == pytest.approx(1.0) and np.sqrt((w * tilts[:, 0] ** 2).sum()) == pytest.approx(1.0, rel=1e-6)


def test_bin_image_keeps_vacuum_one():
    assert np.allclose(C.bin_image(np.ones((2, 12, 12), np.float32), 3), 1.0)
    with pytest.raises(TembenchError, match="binned"):
        C.bin_image(np.ones((10, 10)), 3)


def test_memory_guard_raises_before_allocating():
    need = memory.hrtem_tilt_series_bytes((4096, 4096), 500, 60, 3)
    with pytest.raises(ResourceError, match="GiB"):
        memory.check_memory(need, "test job", "Use less.", limit=2**30)
    assert memory.check_memory(1000, "tiny", "", limit=2**30) == 1000


def test_tilted_propagator_shifts_the_wave():
    # a tilt θ displaces the wave by Δz·tanθ
    from tembench.physics.constants import wavelength_A
    from tembench.physics.propagation import propagator

    n, s, dz, t = 128, 0.1, 200.0, 10.0
    g = np.exp(-(((np.arange(n) - 40) * s) ** 2)[None, :] / 0.5).astype(np.complex64) * np.ones((n, 1))
    p = propagator((n, n), s, wavelength_A(300), dz, tilt_mrad=(0.0, t), band_limit=None)
    out = np.abs(np.fft.ifft2(np.fft.fft2(g) * p)) ** 2
    x = np.arange(n) * s
    shift = (out.mean(0) * x).sum() / out.mean(0).sum() - 40 * s
    assert shift == pytest.approx(dz * math.tan(t * 1e-3), rel=1e-3)


@pytest.mark.parametrize("axis,n_bin,angle", [("y", 4, 23.0), ("x", 3, -71.0), ("y", 1, 90.0), ("y", 5, 0.0)])
def test_fused_rotate_and_bin_matches_and_is_adjoint(axis, n_bin, angle):
    rng = np.random.default_rng(7)
    x = rng.random((11, 9, 10)).astype(np.float32)
    w = R.rotate_and_bin(x, angle, axis, n_bin)
    ref = R.bin_slices(R.rotate(x, angle, axis), n_bin)
    assert w.shape == ref.shape == (-(-11 // n_bin), 9, 10)
    np.testing.assert_allclose(w, ref, rtol=1e-5, atol=1e-5)
    y = rng.random(w.shape).astype(np.float32)
    back = R.rotate_and_bin_adjoint(y, angle, axis, n_bin, nz=11)
    assert back.shape == x.shape
    np.testing.assert_allclose(back, R.rotate_adjoint(R.bin_slices_adjoint(y, n_bin, 11), angle, axis),
                               rtol=1e-5, atol=1e-5)
    lhs = np.vdot(w.astype(np.float64), y)
    rhs = np.vdot(x.astype(np.float64), back.astype(np.float64))
    assert lhs == pytest.approx(rhs, rel=1e-6)
    m = R.rotate_bin_operator(x.shape, angle, axis, n_bin)
    assert m.dtype == np.float32 and m.shape[1] == 11 * (10 if axis == "y" else 9)


def test_rotation_keeps_dtype_and_plane_cache_holds_a_tilt_series():
    x = np.random.default_rng(1).random((6, 5, 4)).astype(np.float32)
    R._plane_operator.cache_clear()
    for a in np.linspace(-60, 60, 61):
        assert R.rotate(x, a, "y").dtype == np.float32
    for a in np.linspace(-60, 60, 61):
        R.rotate_adjoint(x, a, "y")
    info = R._plane_operator.cache_info()
    assert info.misses <= 61 and info.hits >= 60
