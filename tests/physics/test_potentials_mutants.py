"""Gaps in the potential tests found by running potentials.py mutants the first mutation run never reached
(issue 18 part 6; tests/mutation/RESULTS.md): which slice an atom lands in, and the dropped Nyquist
row/column of even grids. Each test checks the documented rule written out here.
"""

from __future__ import annotations

import numpy as np
import pytest

from tembench.physics import potentials as P

GPTS, S = (32, 36), (0.2, 0.2)


@pytest.mark.parametrize("method", ["exact", "spread"])
def test_an_atom_lands_in_the_slice_whose_half_open_range_holds_it(method):
    """Slices [z_k, z_k+1) of slice_edges: an atom at z is in slice k with z_k ≤ z < z_k+1 (on an edge: the
    slice starting there); atoms before the first or beyond the last edge go to the end slices. Only that
    slice holds its potential."""
    edges = P.slice_edges(2.0, (0.0, 8.0))                     # 0 2 4 6 8: four slices
    for z, k in ((0.0, 0), (1.3, 0), (2.0, 1), (3.99, 1), (4.0, 2), (7.9, 3), (-0.4, 0), (8.6, 3)):
        v = P.projected_potential([[3.1, 2.7, z]], [14], gpts=GPTS, sampling_A=S, slice_thickness_A=2.0,
                                  z_range_A=(0.0, 8.0), method=method)
        assert v.shape[0] == len(edges) - 1
        held = np.flatnonzero(np.abs(v).reshape(len(v), -1).max(axis=1) > 0)
        np.testing.assert_array_equal(held, [k], err_msg=f"z = {z} Å")


@pytest.mark.parametrize("method", ["exact", "spread"])
def test_even_grids_hold_nothing_at_the_nyquist_row_and_column(method):
    """The Nyquist row (even ny) and column (even nx) of each slice's spectrum are zero (dropped: they have no
    ±k partner); odd axes keep their highest frequencies."""
    rng = np.random.default_rng(31)
    pos = np.column_stack([rng.uniform(0, 7, 12), rng.uniform(0, 6, 12), rng.uniform(0, 2, 12)])
    for gpts in ((32, 36), (33, 36), (32, 35)):
        v = P.projected_potential(pos, [14] * 6 + [79] * 6, gpts=gpts, sampling_A=S, slice_thickness_A=2.0,
                                  z_range_A=(0.0, 2.0), method=method)
        spec = np.abs(np.fft.fft2(v[0].astype(np.float64)))
        scale = spec.max()
        if gpts[0] % 2 == 0:
            assert spec[gpts[0] // 2].max() < 1e-6 * scale
        if gpts[1] % 2 == 0:
            assert spec[:, gpts[1] // 2].max() < 1e-6 * scale
        odd_edge = spec[(gpts[0] - 1) // 2] if gpts[0] % 2 else spec[:, (gpts[1] - 1) // 2]
        assert odd_edge.max() > 1e-4 * scale


@pytest.mark.parametrize("method", ["exact", "spread"])
def test_slices_with_equal_signatures_but_different_atoms_are_not_repeats(method):
    """Repeated slices are found by six sums (count, Σx, Σy, ΣZ, Σxy, Σx²y) and then confirmed atom by atom.
    Three atoms on a line at x0 + (1, 2, −3) Å and their mirror image x0 + (−1, −2, 3) Å share all six
    sums yet are different slices: each must get its own potential (= that slice computed alone), while a
    true repeat (the same atoms listed in another order) equals its original."""
    x0, y0 = 3.5, 3.25   # binary fractions: the float sums agree exactly, so the signatures do collide
    a = [(x0 + d, y0) for d in (1.0, 2.0, -3.0)]
    b = [(x0 - d, y0) for d in (1.0, 2.0, -3.0)]
    kw = dict(gpts=GPTS, sampling_A=S, slice_thickness_A=2.0, z_range_A=(0.0, 6.0), method=method)
    pos = [(x, y, 0.5) for x, y in a] + [(x, y, 2.5) for x, y in b] + [(x, y, 4.5) for x, y in a[::-1]]
    v = P.projected_potential(pos, [14] * 9, **kw)
    alone_a = P.projected_potential([(x, y, 0.5) for x, y in a], [14] * 3, **kw)[0]
    alone_b = P.projected_potential([(x, y, 2.5) for x, y in b], [14] * 3, **kw)[1]
    scale = np.abs(alone_a).max()
    assert np.abs(alone_a - alone_b).max() > 0.1 * scale          # the two slices do differ
    np.testing.assert_allclose(v[0], alone_a, atol=1e-5 * scale)
    np.testing.assert_allclose(v[1], alone_b, atol=1e-5 * scale)
    np.testing.assert_allclose(v[2], alone_a, atol=1e-5 * scale)


# --- HEAD's rewritten projected_potential / _spread_potential (third pass, RESULTS.md) -------------------------


@pytest.mark.parametrize(("z_atoms", "n_slices"), [((0.0, 5.0), 3), ((0.0, 4.0), 2), ((1.0, 1.0), 1),
                                                   ((0.1, 0.4), 3)])
def test_default_range_of_a_scalar_thickness_is_whole_slices_from_the_lowest_atom(z_atoms, n_slices):
    """Without z_range_A a scalar thickness dz slices [z_min, z_min + n·dz), n = ⌈(z_max − z_min)/dz⌉ (≥ 1;
    a range that dz divides — up to float rounding, 0.3/0.1 — is not given an extra empty slice)."""
    pos = [[2.0, 2.0, z_atoms[0]], [4.0, 3.0, z_atoms[1]]]
    dz = 0.1 if z_atoms == (0.1, 0.4) else 2.0
    v = P.projected_potential(pos, [14, 14], gpts=GPTS, sampling_A=S, slice_thickness_A=dz, method="exact")
    assert v.shape == (n_slices, *GPTS)


def test_a_cell_without_atoms_is_zero_float32_of_the_requested_shape():
    v = P.projected_potential(np.zeros((0, 3)), [], gpts=GPTS, sampling_A=S, slice_thickness_A=2.0,
                              z_range_A=(0.0, 8.0))
    assert v.shape == (4, *GPTS) and v.dtype == np.float32 and not v.any()


def test_frozen_phonon_displacements_are_independent_along_x_and_y_with_the_given_rms():
    """One atom: its x and y follow from the phase of the lowest Fourier coefficient along each axis
    (v = Σ K(|k|) e^{−2πik·r}, K > 0 there). Over 300 draws the displacements have the given rms along
    x and y separately (±25 %, ≈ 6σ) and are uncorrelated — the same draw for x and y, or for every atom,
    fails."""
    rng = np.random.default_rng(5)
    rms, x0, y0 = 0.15, 3.1, 2.7
    ny, nx = GPTS
    d = []
    for _ in range(300):
        v = P.projected_potential([[x0, y0, 0.0]], [14], gpts=GPTS, sampling_A=S, rms_displacement_A=rms, rng=rng,
                                  method="exact")[0].astype(np.float64)
        f = np.fft.fft2(v)
        x = -np.angle(f[0, 1]) * nx * S[1] / (2 * np.pi)
        y = -np.angle(f[1, 0]) * ny * S[0] / (2 * np.pi)
        d.append([(x - x0 + nx * S[1] / 2) % (nx * S[1]) - nx * S[1] / 2,
                  (y - y0 + ny * S[0] / 2) % (ny * S[0]) - ny * S[0] / 2])
    d = np.array(d)
    np.testing.assert_allclose(np.sqrt((d ** 2).mean(axis=0)), [rms, rms], rtol=0.25)
    assert abs(np.corrcoef(d.T)[0, 1]) < 0.25
    # two atoms in one call: each gets its own displacement
    v = P.projected_potential([[2.0, 2.0, 0.0], [5.0, 4.0, 0.0]], [14, 14], gpts=GPTS, sampling_A=S,
                              rms_displacement_A=rms, rng=np.random.default_rng(1), method="exact")[0]
    ref = P.projected_potential([[2.0, 2.0, 0.0], [5.0, 4.0, 0.0]], [14, 14], gpts=GPTS, sampling_A=S,
                                method="exact")[0]
    fv, fr = np.fft.fft2(v.astype(np.float64)), np.fft.fft2(ref.astype(np.float64))
    shift = fv / np.where(np.abs(fr) > 1e-6 * np.abs(fr).max(), fr, 1)   # a rigid shift: |ratio| = 1 everywhere
    low = np.abs(fr) > 0.1 * np.abs(fr).max()
    assert np.ptp(np.abs(shift[low])) > 0.05


def test_method_spread_is_used_when_asked_for_on_a_small_cell():
    """method="spread" on a cell where "auto" picks "exact": the result is the spread path's (≈ 1e-5 relative
    from the exact one, never bit-identical), not the exact path's."""
    rng = np.random.default_rng(2)
    pos = np.column_stack([rng.uniform(0, 7, 6), rng.uniform(0, 6, 6), rng.uniform(0, 2, 6)])
    kw = dict(gpts=GPTS, sampling_A=S, slice_thickness_A=2.0, z_range_A=(0.0, 2.0))
    assert P.choose_method(6, GPTS, 1) == "exact"
    ve = P.projected_potential(pos, [14] * 6, method="exact", **kw)
    vs = P.projected_potential(pos, [14] * 6, method="spread", **kw)
    err = np.linalg.norm(vs - ve) / np.linalg.norm(ve)
    assert 0 < err < 1e-4


def test_spread_path_with_an_element_missing_from_a_batch_of_slices():
    """70 slices (more than one batch of the spread path on this grid): carbon only in slice 0, silicon in
    every slice (moving, so no slice repeats another). The later batch has no carbon; its silicon must
    still be there — the spread potential agrees with the exact one slice by slice."""
    n = 70
    pos = [[1.0, 1.0, 0.5]] + [[1.0 + 0.07 * i, 2.0 + 0.05 * i, i + 0.5] for i in range(n)]
    num = [6] + [14] * n
    kw = dict(gpts=GPTS, sampling_A=S, slice_thickness_A=1.0, z_range_A=(0.0, float(n)))
    ve = P.projected_potential(pos, num, method="exact", **kw)
    vs = P.projected_potential(pos, num, method="spread", **kw)
    err = np.linalg.norm((vs - ve).reshape(n, -1), axis=1) / np.linalg.norm(ve.reshape(n, -1), axis=1)
    assert err.max() < 1e-4


def test_spread_path_wraps_atoms_outside_the_cell_like_the_exact_path():
    """The grid is periodic: atoms at x, y < 0 or beyond the cell (up to two cells away) give the potential of
    their periodic images on both paths."""
    L = np.array([GPTS[1] * S[1], GPTS[0] * S[0]])
    base = np.array([[1.0, 1.5, 0.3], [3.0, 4.0, 0.6], [5.5, 2.0, 0.9], [0.4, 5.0, 1.2]])
    shifted = base.copy()
    shifted[:, :2] += np.array([[-1, 0], [1, 1], [0, -2], [2, 1]]) * L
    kw = dict(gpts=GPTS, sampling_A=S, slice_thickness_A=2.0, z_range_A=(0.0, 2.0))
    ref = P.projected_potential(base, [14, 14, 79, 79], method="exact", **kw)
    for method in ("exact", "spread"):
        v = P.projected_potential(shifted, [14, 14, 79, 79], method=method, **kw)
        assert np.linalg.norm(v - ref) / np.linalg.norm(ref) < 1e-4, method
