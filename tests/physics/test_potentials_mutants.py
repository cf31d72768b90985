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
