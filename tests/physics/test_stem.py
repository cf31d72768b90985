"""4D-STEM: normalisation, batch cropping, virtual detectors, streaming, gradients, abTEM."""

import zlib

import numpy as np
import pytest

from tembench.errors import TembenchError
from tembench.physics import potentials as P
from tembench.physics import stem as S

RNG = np.random.default_rng(7)


@pytest.fixture(autouse=True)
def _rng_per_test(request):
    """A generator seeded by the test's own name: results do not depend on which tests ran before."""
    global RNG
    RNG = np.random.default_rng(zlib.crc32(request.node.name.encode()))


def _si(cells_xy, cells_z=1, n_per_cell=54):
    from ase.build import bulk

    atoms = bulk("Si", "diamond", a=5.43, cubic=True) * (cells_xy, cells_xy, cells_z)
    cell = np.diag(atoms.cell.array)
    n = n_per_cell * cells_xy
    dz = cell[2] / (4 * cells_z)
    v = P.projected_potential(atoms.positions, atoms.numbers, gpts=(n, n), sampling_A=cell[0] / n,
                              slice_thickness_A=dz, z_range_A=(0, cell[2]))
    return v, cell[0] / n, dz


def test_vacuum_pattern_normalised_and_centred():
    v = np.zeros((2, 64, 64), np.float32)
    r = S.stem_scan(v, 2.0, energy_keV=200, sampling_A=0.1, positions_A=[[3.0, 3.2]], semiangle_mrad=20,
                    window_gpts=(48, 48), detectors={"bf": (0, 25), "adf": (30, None)})
    pat = r.patterns[0]
    assert float(pat.sum()) == pytest.approx(1.0, abs=1e-5)
    cy = (pat * np.arange(48)[:, None]).sum()
    cx = (pat * np.arange(48)[None, :]).sum()
    assert (cy, cx) == pytest.approx((24.0, 24.0), abs=1e-3)  # unscattered beam at (k//2, k//2)
    assert r.images["bf"][0] == pytest.approx(1.0, abs=1e-4) and r.images["adf"][0] < 1e-6


def test_batch_cropping_matches_full_field_on_periodic_crystal():
    # a window cut from a 4-cell periodic field equals the 2-cell field itself: cropping is exact
    v4, s, dz = _si(4, n_per_cell=27)
    v2, _, _ = _si(2, n_per_cell=27)
    pos = np.array([[1.3, 2.2], [7.9, 14.1], [12.0, 3.3]])
    kw = dict(energy_keV=200, sampling_A=s, positions_A=pos, semiangle_mrad=20, window_gpts=(54, 54),
              detectors={"adf": (40, None)})
    a = S.stem_scan(v4, dz, **kw)
    b = S.stem_scan(v2, dz, **{**kw, "positions_A": pos % (2 * 5.43)})
    np.testing.assert_allclose(a.patterns, b.patterns, atol=1e-6)
    np.testing.assert_allclose(a.images["adf"], b.images["adf"], rtol=1e-4)


def test_virtual_detector_equals_pattern_integral_and_streaming():
    v, s, dz = _si(2, n_per_cell=27)
    pos = S.scan_positions((0, 0), (2.0, 2.0), 0.7).reshape(-1, 2)
    kw = dict(energy_keV=200, sampling_A=s, positions_A=pos, semiangle_mrad=20, window_gpts=(54, 54),
              detectors={"ring": (25.0, 60.0)}, batch_size=4)
    full = S.stem_scan(v, dz, **kw)
    names, masks = S.detector_masks((54, 54), s, 200, {"ring": (25.0, 60.0)})
    manual = (full.patterns * np.fft.fftshift(masks[0])[None]).sum(axis=(1, 2))
    np.testing.assert_allclose(full.images["ring"], manual, rtol=1e-4)
    streamed = np.zeros_like(full.patterns)
    only = S.stem_scan(v, dz, return_patterns=False, out=streamed, **kw)
    assert only.patterns is None
    np.testing.assert_allclose(streamed, full.patterns)
    none = S.stem_scan(v, dz, return_patterns=False, **kw)
    assert none.patterns is None and none.images["ring"].shape == (len(pos),)


def test_binning_and_crop_preserve_counts_near_centre():
    v = np.zeros((1, 64, 64), np.float32)
    r = S.stem_scan(v, 1.0, energy_keV=300, sampling_A=0.1, positions_A=[[3.2, 3.2]], semiangle_mrad=15,
                    window_gpts=(60, 60), detector_binning=3, detector_gpts=(12, 12))
    assert r.patterns.shape == (1, 12, 12)
    assert float(r.patterns.sum()) == pytest.approx(1.0, abs=1e-4)  # the disc is inside the crop
    assert np.unravel_index(r.patterns[0].argmax(), (12, 12)) in [(6, 6), (5, 6), (6, 5), (5, 5)]


def test_mixed_state_modes_sum_incoherently():
    v, s, dz = _si(2, n_per_cell=27)
    modes = S.make_probe_modes((54, 54), s, 200, 20, {"C10": -20.0}, n_modes=3, defocus_spread_A=40.0)
    assert float((np.abs(modes) ** 2).sum()) == pytest.approx(1.0, rel=1e-5)
    pos = [[2.0, 3.0]]
    kw = dict(energy_keV=200, sampling_A=s, positions_A=pos)
    mixed = S.stem_scan(v, dz, probe=modes, **kw).patterns
    separate = sum(S.stem_scan(v, dz, probe=modes[i:i + 1], **kw).patterns for i in range(3))
    np.testing.assert_allclose(mixed, separate, atol=1e-7)


def test_probe_larger_than_window_is_an_error():
    v = np.zeros((1, 64, 64), np.float32)
    with pytest.raises(TembenchError, match="larger than its window"):
        S.stem_scan(v, 1.0, energy_keV=200, sampling_A=0.1, positions_A=[[3, 3]], semiangle_mrad=25,
                    aberrations={"C10": -400.0}, window_gpts=(32, 32))


def test_sampling_too_coarse_for_aperture():
    with pytest.raises(TembenchError, match="sampling_A"):
        S.check_sampling_for_aperture(0.5, 200, 30.0)


def test_stem_gradients_finite_differences():
    n, s = 64, 0.1
    pos_atoms = RNG.uniform(0, 6.4, (14, 3))
    v = P.projected_potential(pos_atoms, [14] * 14, gpts=(n, n), sampling_A=s, slice_thickness_A=2.0,
                              z_range_A=(0, 4.0))
    probe = S.make_probe_modes((48, 48), s, 200, 20, {"C10": -10.0}, n_modes=2, defocus_spread_A=20.0)
    pos = np.array([[2.0, 2.1], [2.53, 2.88], [3.1, 1.7]])
    meas = S.stem_scan(v * 1.2, 2.0, energy_keV=200, sampling_A=s, positions_A=pos, probe=probe,
                       bandlimit_transmission=False).patterns
    kw = dict(energy_keV=200, sampling_A=s, positions_A=pos, batch_size=2)
    loss, gv, gp = S.stem_loss_and_gradient(v, meas, 2.0, probe=probe, **kw)
    d = RNG.standard_normal(v.shape).astype(np.float32)
    f = lambda x: S.stem_loss_and_gradient(x, meas, 2.0, probe=probe, **kw)[0]  # noqa: E731
    h = 0.2
    assert (f(v + h * d) - f(v - h * d)) / (2 * h) == pytest.approx(float((gv * d).sum()), rel=0.02)
    dp = (probe * np.exp(1j * RNG.uniform(0, 2 * np.pi, probe.shape))).astype(np.complex64)
    g = lambda p: S.stem_loss_and_gradient(v, meas, 2.0, probe=p.astype(np.complex64), **kw)[0]  # noqa: E731
    h = 0.003
    assert (g(probe + h * dp) - g(probe - h * dp)) / (2 * h) == pytest.approx(float(np.real(np.vdot(gp, dp))),
                                                                             rel=0.02)


@pytest.mark.abtem
def test_patterns_match_abtem():
    abtem = __import__("_deps").require("abtem")  # skips locally, fails under CI (tests/_deps.py)
    abtem.config.set({"device": "cpu", "dask.lazy": False})
    v, s, dz = _si(2, n_per_cell=54)
    n = v.shape[-1]
    pa = abtem.PotentialArray(v.transpose(0, 2, 1).copy(), slice_thickness=dz, sampling=(s, s))
    pos = np.array([[2.0, 3.0], [5.55, 1.234]])  # (y, x)
    waves = abtem.Probe(semiangle_cutoff=20, energy=200e3, defocus=30).multislice(
        pa, scan=abtem.CustomScan(pos[:, ::-1].copy())).compute().array
    ref = np.fft.fftshift(np.abs(np.fft.fft2(waves)) ** 2, axes=(-2, -1)).transpose(0, 2, 1)
    ref /= ref.sum(axis=(1, 2), keepdims=True)  # abTEM normalises its probe differently
    ours = S.stem_scan(v, dz, energy_keV=200, sampling_A=s, positions_A=pos, semiangle_mrad=20,
                       aberrations={"defocus": 30.0}, window_gpts=(n, n)).patterns
    ours = ours / ours.sum(axis=(1, 2), keepdims=True)
    for a, b in zip(ours, ref):
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-4  # measured 8e-7
