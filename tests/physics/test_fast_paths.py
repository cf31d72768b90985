"""The speed paths of the physics engine give the results of the plain computations they replace."""

import numpy as np
import pytest

from tembench.physics import multislice as M
from tembench.physics import potentials as P


def _crystal(nxy=3, nz=4, a=5.43):
    from ase.build import bulk

    atoms = bulk("Si", "diamond", a=a, cubic=True) * (nxy, nxy, nz)
    return atoms.positions, atoms.numbers, np.diag(atoms.cell.array).copy()


@pytest.mark.parametrize("gpts", [(48, 48), (47, 50), (50, 45)])
def test_half_ky_structure_factors_match_exact_product(gpts):
    """±ky symmetry (real × complex products of half the size) vs the plain complex matrix product."""
    rng = np.random.default_rng(3)
    ny, nx = gpts
    yx = rng.uniform(-5, 25, (300, 2))
    slice_of_atom = rng.integers(0, 5, 300)
    ky, kx = np.fft.fftfreq(ny, d=0.4), np.fft.rfftfreq(nx, d=0.45)
    fast = P._structure_factors_by_slice(yx, slice_of_atom, 5, ky, kx, np)
    for s in range(5):
        exact = P._structure_factor_2d(yx[slice_of_atom == s], ky, kx, np)
        assert np.linalg.norm(fast[s] - exact) <= 1e-5 * np.linalg.norm(exact)


def test_repeated_slices_computed_once_give_the_same_potential(monkeypatch):
    pos, numbers, cell = _crystal()
    kw = dict(gpts=(64, 64), sampling_A=cell[0] / 64, slice_thickness_A=cell[2] / 14, z_range_A=(0, cell[2]))
    rep = P._repeated_slices(pos, numbers, P._assign_slices(pos[:, 2], P.slice_edges(kw["slice_thickness_A"],
                                                                                   kw["z_range_A"])), 14)
    assert len(np.unique(rep)) < 14  # the crystal does repeat slices
    fast = P.projected_potential(pos, numbers, **kw)
    monkeypatch.setattr(P, "_repeated_slices", lambda pos, numbers, idx, n: np.arange(n))
    plain = P.projected_potential(pos, numbers, **kw)
    assert np.array_equal(fast, plain)
    # frozen phonons: nothing repeats
    rng = np.random.default_rng(0)
    moved = pos + rng.normal(0, 0.08, pos.shape)
    idx = P._assign_slices(moved[:, 2], P.slice_edges(kw["slice_thickness_A"], kw["z_range_A"]))
    assert np.array_equal(P._repeated_slices(moved, numbers, idx, 14), np.arange(14))


def test_duplicate_slice_transmissions_match_per_slice():
    rng = np.random.default_rng(1)
    distinct = (rng.random((3, 40, 42)) * 20).astype(np.float32)
    order = [0, 1, 2, 1, 0, 0, 2, 1]
    v = distinct[order]
    v[5, 3, 4] += 1e-3  # nearly but not exactly a repeat: must be kept apart
    assert M.duplicate_slices(v).tolist() == [0, 1, 2, 1, 0, 5, 2, 1]
    kw = dict(energy_keV=200, sampling_A=0.2)
    wave = np.ones((40, 42), np.complex64)
    fast = M.multislice(wave, 1.5, potentials=v, **kw).exit_wave
    t = np.stack([M.transmission_functions(v[m:m + 1], **kw)[0] for m in range(len(v))])
    plain = M.multislice(wave, 1.5, transmissions=t, **kw).exit_wave
    assert np.linalg.norm(fast - plain) <= 1e-5 * np.linalg.norm(plain)  # float32 FFT rounding


@pytest.mark.parametrize("shape", [(2, 40, 42), (45, 50)])
def test_pruned_fft_matches_full_on_band_limited_spectra(shape):
    from tembench.backend import plan_fft2, plan_pruned_fft2
    from tembench.physics.propagation import PropagatorCache

    props = PropagatorCache(shape[-2:], 0.2, 0.025)
    keep = props.kept_columns()
    assert sum(keep) < shape[-1]  # the 2/3 limit leaves columns out
    rng = np.random.default_rng(2)
    x = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    p = props(1.0)
    full = plan_fft2(shape, tag="test-full")
    full.buffer[...] = x
    full.forward()
    full.buffer *= p
    want = full.inverse().copy()
    pruned = plan_pruned_fft2(shape, keep, tag="test-pruned")
    pruned.buffer[...] = x
    pruned.forward_pruned()
    pruned.buffer *= p / np.float32(shape[-1] * shape[-2])
    got = pruned.inverse_pruned()
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
