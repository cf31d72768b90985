"""Gaps in the tests of the atom tracer's internals (``tembench/analysis/atom_tracing.py``: ``trace_atoms``,
``_refine``, ``_fit_gaussians``, ``_merge``, ``_Window``, ``render_sites``) found by mutation testing
(issue 18 part 6; session 7 sample, tests/mutation/RESULTS.md).

References are written out independently: Gaussians rendered voxel by voxel with ``np.exp`` on the full
grid, window voxels enumerated by a triple loop, merged sites by the intensity-weighted mean by hand, and
small volumes whose atoms (positions, amplitudes, widths) are known by construction.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tembench.analysis import atom_tracing as at
from tembench.analysis.atom_tracing import render_sites, trace_atoms


def _exact(shape, d, centres_vox, A, s):
    """Σ A·exp(-|(i - c)·d|²/2σ²) on the full (nz, ny, nx) grid (no window)."""
    g = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    out = np.zeros(shape)
    for c, a, sg in zip(np.atleast_2d(centres_vox), np.atleast_1d(A), np.atleast_1d(s)):
        r2 = (((g - c) * d) ** 2).sum(-1)
        out += a * np.exp(-r2 / (2 * sg * sg))
    return out


def test_window_offsets_indices_validity_and_separable_gaussian_by_hand():
    d = np.array([0.4, 0.5, 0.45])
    win = at._Window(1.1, d)
    # every integer offset with |o·d| ≤ 1.1 Å, by a triple loop
    want = sorted(o for o in itertools.product(range(-3, 4), repeat=3)
                  if sum((o[k] * d[k]) ** 2 for k in range(3)) <= 1.1 ** 2)
    assert sorted(map(tuple, win.offsets.tolist())) == want and len(win) == len(want)
    shape = (5, 6, 4)
    anchor = np.array([[0, 5, 2], [2, 3, 1]])            # the first at a corner: part of its window is outside
    c = np.array([[0.3, 4.6, 2.2], [2.1, 2.7, 1.4]])
    s = np.array([0.5, 0.7])
    flat, valid = win.index(anchor, shape)
    e, u, r2 = win.gauss(anchor, c, s)
    for n in range(2):
        for m, o in enumerate(win.offsets):
            p = anchor[n] + o
            inside = all(0 <= p[k] < shape[k] for k in range(3))
            assert valid[n, m] == inside
            if inside:
                assert flat[n, m] == np.ravel_multi_index(tuple(p), shape)
            disp = (p - c[n]) * d
            np.testing.assert_allclose([u[k][n, m] for k in range(3)], disp, rtol=1e-12, atol=1e-15)
            assert r2[n, m] == pytest.approx((disp ** 2).sum(), rel=1e-12)
            assert e[n, m] == pytest.approx(np.exp(-(disp ** 2).sum() / (2 * s[n] ** 2)), rel=1e-12)
    np.testing.assert_array_equal(win.gauss(anchor, c, s, with_derivatives=False), e)


@pytest.mark.parametrize("n_sites", [2, 40])    # scatter-add (few sites) and bincount (many) branches
def test_window_accumulate_adds_every_site_inside_the_volume(n_sites):
    rng = np.random.default_rng(n_sites)
    d = np.array([0.5, 0.4, 0.45])
    shape = (7, 8, 6)
    c = rng.uniform(-0.4, np.array(shape) - 0.6, (n_sites, 3))
    anchor = np.rint(c).astype(np.int64)
    A, s = rng.uniform(0.5, 2.0, n_sites), rng.uniform(0.3, 0.6, n_sites)
    win = at._Window(1.3, d)
    out = np.full(int(np.prod(shape)), 0.25)
    win.accumulate(out, shape, anchor, c, A, s)
    want = np.full(shape, 0.25)
    for n in range(n_sites):                              # by hand: only the window voxels inside the volume
        for o in win.offsets:
            p = anchor[n] + o
            if all(0 <= p[k] < shape[k] for k in range(3)):
                want[tuple(p)] += A[n] * np.exp(-(((p - c[n]) * d) ** 2).sum() / (2 * s[n] ** 2))
    np.testing.assert_allclose(out.reshape(shape), want, rtol=1e-12, atol=1e-14)


def test_render_sites_default_radius_anchors_and_empty_input():
    d = np.array([0.5, 0.5, 0.5])
    shape = (15, 15, 15)
    c = np.array([[7.2, 6.9, 7.4]])
    out = render_sites(shape, c, [2.0], [0.4], d)
    # default radius 3σ + half the voxel diagonal = 1.2 + 0.433 Å around the anchor voxel (7, 7, 7)
    R = 3 * 0.4 + 0.5 * np.linalg.norm(d)
    g = np.stack(np.meshgrid(*[np.arange(15)] * 3, indexing="ij"), -1)
    dist = np.linalg.norm((g - 7) * d, axis=-1)
    exact = _exact(shape, d, c, [2.0], [0.4])
    np.testing.assert_allclose(out[dist <= R * (1 + 1e-9)], exact[dist <= R * (1 + 1e-9)], rtol=1e-12)
    assert np.all(out[dist > R * (1 + 1e-9)] == 0.0)
    assert (dist <= R).sum() > (dist <= 1.2 + 1e-9).sum()          # the half diagonal is included
    # given anchors: the window sits on them, not on the nearest voxel
    shifted = render_sites(shape, c, [2.0], [0.4], d, radius_A=0.6, anchors=[[9, 7, 7]])
    near = np.linalg.norm((g - [9, 7, 7]) * d, axis=-1) <= 0.6 + 1e-9
    np.testing.assert_allclose(shifted[near], exact[near], rtol=1e-12)
    assert np.all(shifted[~near] == 0.0) and shifted[7, 7, 7] == 0.0
    assert render_sites((3, 4, 5), np.zeros((0, 3)), [], [], 1.0).shape == (3, 4, 5)


def test_fit_gaussians_recovers_an_exact_gaussian_and_respects_the_bounds():
    d = np.array([0.45, 0.5, 0.4])
    win = at._Window(1.6, d)
    anchor = np.array([[5, 5, 5], [5, 5, 5]])
    true_c = np.array([[5.3, 4.8, 5.2], [5.0, 5.0, 5.0]])
    true_A, true_s = np.array([1.5, 0.8]), np.array([0.42, 0.5])
    g = np.stack(np.meshgrid(*[np.arange(11)] * 3, indexing="ij"), -1)
    vol = [_exact((11, 11, 11), d, true_c[n], true_A[n], true_s[n]) for n in range(2)]
    flat, valid = win.index(anchor, (11, 11, 11))
    y = np.stack([vol[n].reshape(-1)[flat[n]] for n in range(2)])
    w = np.ones_like(y)
    y[1, :5], w[1, :5] = 99.0, 0.0                        # zero weight: those voxels do not count
    c, A, s = at._fit_gaussians(y, w, anchor, win, anchor + np.array([[0.2, -0.1, 0.1]]),
                                np.array([1.0, 1.0]), np.array([0.35, 0.35]), 40, (0.2, 0.8), 1e-9)
    np.testing.assert_allclose(c, true_c, atol=1e-6)
    np.testing.assert_allclose(A, true_A, rtol=1e-6)
    np.testing.assert_allclose(s, true_s, rtol=1e-6)
    del g
    # bounds: σ cannot leave s_bounds, the centre cannot leave anchor ± 1 voxel, A stays ≥ A_min
    y_far = _exact((11, 11, 11), d, [[5.0, 5.0, 6.8]], [1.0], [0.9]).reshape(-1)[flat[:1]]
    c2, A2, s2 = at._fit_gaussians(y_far, np.ones_like(y_far), anchor[:1], win, anchor[:1].astype(float),
                                   np.array([1.0]), np.array([0.5]), 30, (0.3, 0.6), 0.05)
    assert s2[0] <= 0.6 and np.all(np.abs(c2 - anchor[:1]) <= 1.0 + 1e-12) and A2[0] >= 0.05
    y_neg = -np.abs(y[:1])
    _, A3, _ = at._fit_gaussians(y_neg, np.ones_like(y_neg), anchor[:1], win, anchor[:1].astype(float),
                                 np.array([1.0]), np.array([0.5]), 20, (0.3, 0.6), 0.05)
    assert A3[0] == pytest.approx(0.05)


def test_refine_subtracts_the_other_sites_and_fits_new_ones_on_the_residual():
    d = np.array([0.5, 0.5, 0.5])
    shape = (12, 12, 18)
    c_true = np.array([[6.0, 6.0, 5.6], [6.0, 6.2, 8.3], [6.0, 6.0, 14.0]])
    A_true, s_true = np.array([1.0, 0.7, 0.9]), np.array([0.4, 0.45, 0.4])
    data = _exact(shape, d, c_true, A_true, s_true)
    anchor = np.rint(c_true).astype(np.int64)
    # site 0 is known with wrong parameters, site 1 (1.35 Å away: their Gaussians overlap) with its true
    # ones, site 2 is new (not in the model yet, and far from both)
    c0 = c_true + np.array([[0.15, -0.1, 0.1], [0.0, 0.0, 0.0], [0.2, 0.2, -0.2]])
    A0, s0 = np.array([0.8, 0.7, 0.5]), np.array([0.5, 0.45, 0.5])
    is_new = np.array([False, False, True])
    win = at._Window(1.1, d)
    resid = data - render_sites(shape, c0[:2], A0[:2], s0[:2], d, radius_A=3.0, anchors=anchor[:2])
    c, A, s, n_valid = at._refine(resid, anchor, c0, A0, s0, is_new, win, 40, (0.2, 0.8), 1e-9)
    # site 0's window holds data − site 1's (exact) model = its own atom alone: the fit is exact; the new
    # site sees the residual as it is (= its own atom)
    for k in (0, 2):
        np.testing.assert_allclose(c[k], c_true[k], atol=1e-6)
        assert A[k] == pytest.approx(A_true[k], rel=1e-6) and s[k] == pytest.approx(s_true[k], rel=1e-6)
    assert n_valid.tolist() == [len(win)] * 3


def test_merge_is_intensity_weighted_keeps_the_brightest_id_and_counts():
    d = np.array([0.5, 0.4, 0.5])
    c = np.array([[2.0, 2.0, 2.0], [2.0, 2.0, 4.0], [10.0, 10.0, 10.0], [2.0, 2.0, 6.5], [20.0, 3.0, 3.0]])
    A = np.array([1.0, 2.0, 1.0, 0.5, 1.0])
    s = np.array([0.5, 0.4, 0.5, 0.6, 0.5])
    anchor = np.rint(c).astype(np.int64) + np.array([0, 0, 1])   # anchors that are not rint(c)
    ids = np.array([10, 11, 12, 13, 14])
    # 0–1 (1.0 Å apart) and 1–3 (1.25 Å) chain into one component below 1.3 Å; 2 and 4 stay alone
    an2, c2, A2, s2, ids2, n_merged = at._merge(anchor, c, A, s, ids, d, 1.3)
    assert n_merged == 2 and len(A2) == 3
    I = A * s ** 3
    grp = [0, 1, 3]
    cm = (I[grp, None] * c[grp]).sum(0) / I[grp].sum()
    sm = (I[grp] * s[grp]).sum() / I[grp].sum()
    k = int(np.flatnonzero(ids2 == 11)[0])                  # the brightest member (A s³ = 0.128 vs 0.125, 0.108)
    np.testing.assert_allclose(c2[k], cm, rtol=1e-12)
    assert s2[k] == pytest.approx(sm, rel=1e-12)
    assert A2[k] * s2[k] ** 3 == pytest.approx(I[grp].sum(), rel=1e-12)   # integrated intensity conserved
    np.testing.assert_array_equal(an2[k], np.rint(cm).astype(np.int64))
    for j, i in ((int(np.flatnonzero(ids2 == 12)[0]), 2), (int(np.flatnonzero(ids2 == 14)[0]), 4)):
        np.testing.assert_array_equal(an2[j], anchor[i])    # single sites keep their anchor and values
        np.testing.assert_array_equal(c2[j], c[i])
        assert A2[j] == pytest.approx(A[i], rel=1e-12) and s2[j] == pytest.approx(s[i], rel=1e-12)
    assert sorted(ids2.tolist()) == [11, 12, 14]
    # nothing within reach, or fewer than two sites: unchanged, 0 merged
    out = at._merge(anchor, c, A, s, ids, d, 0.5)
    assert out[-1] == 0 and out[2] is A
    assert at._merge(anchor[:1], c[:1], A[:1], s[:1], ids[:1], d, 100.0)[-1] == 0


def _blobs(shape=(18, 18, 18), d=(0.5, 0.5, 0.5)):
    d = np.asarray(d, float)
    c = np.array([[5.2, 5.0, 5.4], [5.0, 12.3, 11.8], [12.6, 6.1, 12.0], [12.0, 12.0, 5.3]])
    A = np.array([1.0, 0.6, 0.8, 0.5])
    s = np.array([0.35, 0.30, 0.40, 0.38])
    return _exact(shape, d, c, A, s), d, c, A, s


def _sorted(res):
    o = np.lexsort(res.positions_vox.T[::-1])
    return res.positions_vox[o], res.amplitude[o], res.sigma_A[o]


def test_trace_atoms_exact_on_four_isolated_atoms_with_history():
    vol, d, c, A, s = _blobs()
    res = trace_atoms(vol, d)
    pos, amp, sig = _sorted(res)
    o = np.lexsort(c.T[::-1])
    np.testing.assert_allclose(pos, c[o], atol=1e-5)
    np.testing.assert_allclose(amp, A[o], rtol=1e-5)
    np.testing.assert_allclose(sig, s[o], rtol=1e-5)
    np.testing.assert_array_equal(res.sampling_A, d)
    assert res.converged and res.n_rounds == 2
    h = res.history
    assert h["n_sites"] == [4.0, 4.0] and h["n_added"] == [4.0, 0.0] and h["n_changed"] == [4.0, 0.0]
    assert h["n_removed"] == [0.0, 0.0] and h["n_merged"] == [0.0, 0.0] and h["n_candidates"][0] == 4.0
    assert h["n_refined"][0] == 4.0 and h["rms_shift_vox"][0] == float("inf") and h["rms_shift_vox"][1] < 0.005
    assert len(h["time_s"]) == 2 and all(t >= 0 for t in h["time_s"])
    # TraceResult: integrated intensity A (2π)^{3/2} σ³; positions in Å from an origin, and in (x, y, z)
    np.testing.assert_allclose(res.intensity, res.amplitude * (2 * np.pi) ** 1.5 * res.sigma_A ** 3)
    org = np.array([1.0, -2.0, 0.5])
    np.testing.assert_allclose(res.positions_A(org), org + res.positions_vox * d)
    np.testing.assert_allclose(res.positions_xyz_A(org), (org + res.positions_vox * d)[:, ::-1])
    # one round only: not converged
    one = trace_atoms(vol, d, max_rounds=1)
    assert one.n_rounds == 1 and not one.converged and len(one) == 4


def test_trace_atoms_thresholds_background_and_integrated_intensity_criterion():
    vol, d, c, A, s = _blobs()
    # an absolute threshold between the amplitudes drops exactly the weaker atoms
    res = trace_atoms(vol, d, intensity_threshold=0.7)
    assert sorted(np.round(res.amplitude, 4).tolist()) == [0.8, 1.0]
    # the fraction of the volume's maximum (a voxel value, below the peak amplitude 1.0 of the off-grid atom)
    assert vol.max() < 0.95
    res = trace_atoms(vol, d, intensity_threshold_frac=0.55 / vol.max())
    assert sorted(np.round(res.amplitude, 4).tolist()) == [0.6, 0.8, 1.0]
    # an offset volume: "median" removes it
    res = trace_atoms(vol + 0.2, d, background="median")
    np.testing.assert_allclose(np.sort(res.amplitude), np.sort(A), rtol=1e-3)
    # the integrated intensity criterion: A σ³ = 0.0429, 0.0162, 0.0512, 0.0274 (median 0.0351); 0.6 × the
    # median removes the 0.6 / 0.30 Å atom only
    res = trace_atoms(vol, d, min_integrated_frac=0.6)
    assert sorted(np.round(res.amplitude, 4).tolist()) == [0.5, 0.8, 1.0]
    # the size criterion: FWHM below min_size_vox voxels removes every atom of σ < that · 0.5 Å / 2.355
    res = trace_atoms(vol, d, min_size_vox=2.355 * 0.33 / 0.5)
    assert sorted(np.round(res.sigma_A, 3).tolist()) == [0.35, 0.38, 0.4]


def test_batches_of_sites_give_the_same_model_and_fits(monkeypatch):
    """Sites are processed in batches of _CHUNK_ELEMENTS // window size: with batches of 2 sites the rendered
    model, the refined sites and a whole trace equal the one-batch results (and the exact rendering)."""
    vol, d, c, A, s = _blobs()
    one = render_sites(vol.shape, c, A, s, d, radius_A=2.0)
    res1 = trace_atoms(vol, d)
    win = at._Window(1.1, d)
    anchor = np.rint(c).astype(np.int64)
    ref1 = at._refine(vol, anchor, c + 0.1, A * 0.9, s, np.ones(4, bool), win, 5, (0.1, 1.0), 1e-9)
    monkeypatch.setattr(at, "_CHUNK_ELEMENTS", 2 * len(at._Window(2.0, d)))
    assert [(sl.start, sl.stop) for sl in at._chunks(5, len(at._Window(2.0, d)))] == [(0, 2), (2, 4), (4, 5)]
    assert [(sl.start, sl.stop) for sl in at._chunks(3, 10**9)] == [(0, 1), (1, 2), (2, 3)]   # ≥ 1 per batch
    many = render_sites(vol.shape, c, A, s, d, radius_A=2.0)
    np.testing.assert_allclose(many, one, rtol=1e-13, atol=1e-15)
    # every Gaussian is cut at 2 Å from its anchor voxel, ≥ 2 − 0.433 Å from its centre
    assert np.abs(many - vol).max() < 4 * np.exp(-(2.0 - 0.5 * np.linalg.norm(d)) ** 2 / (2 * 0.4 ** 2))
    monkeypatch.setattr(at, "_CHUNK_ELEMENTS", len(win))               # one site per batch
    ref2 = at._refine(vol, anchor, c + 0.1, A * 0.9, s, np.ones(4, bool), win, 5, (0.1, 1.0), 1e-9)
    for a, b in zip(ref1, ref2):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    res2 = trace_atoms(vol, d)
    np.testing.assert_allclose(res2.positions_vox, res1.positions_vox, atol=1e-9)


def test_fit_centre_is_held_within_one_voxel_of_the_anchor_on_both_sides():
    d = np.array([0.5, 0.5, 0.5])
    win = at._Window(1.6, d)
    anchor = np.array([[5, 5, 5]])
    flat, _ = win.index(anchor, (11, 11, 11))
    for x_true, bound in ((6.8, 6.0), (3.2, 4.0)):          # an atom 1.8 voxels off, above and below
        y = _exact((11, 11, 11), d, [[5.0, 5.0, x_true]], [1.0], [0.6]).reshape(-1)[flat]
        c, _, _ = at._fit_gaussians(y, np.ones_like(y), anchor, win, anchor.astype(float), np.array([1.0]),
                                    np.array([0.6]), 30, (0.3, 0.9), 1e-9)
        assert abs(c[0, 2] - 5.0) <= 1.0 + 1e-12 and c[0, 2] == pytest.approx(bound, abs=0.05)


def test_trace_atoms_refusals_name_the_problem():
    vol, d, *_ = _blobs()
    for kw, msg in (({"background": "mean"}, "background must be 'zero' or 'median', got 'mean'"),
                    ({"sigma_range_vox": (0.0, 1.5)}, r"need 0 < sigma_range_vox\[0\]"),
                    ({"sigma_init_vox": 2.0}, r"got \(0.25, 1.5\) and 2.0")):
        with pytest.raises(at.TembenchError, match=msg):
            trace_atoms(vol, d, **kw)
    with pytest.raises(at.TembenchError, match="needs a real-valued volume, got dtype complex128"):
        trace_atoms(vol.astype(complex), d)
    one = trace_atoms(vol, d, max_rounds=1)
    assert one.converged is False and trace_atoms(vol, d).converged is True


def test_trace_history_counts_removed_new_sites_apart_and_rms_shift_by_definition():
    vol, d, c, A, s = _blobs()
    # threshold 0.7: the 0.6 and 0.5 atoms are candidates (DoG above half the threshold's response) but
    # fitted below 0.7 — new sites dropped in their first round are not "removed" (only existing sites are)
    res = trace_atoms(vol, d, intensity_threshold=0.7)
    h = res.history
    assert h["n_candidates"][0] == 4.0 and h["n_sites"][0] == 2.0 and h["n_added"][0] == 2.0
    assert h["n_removed"] == [0.0] * len(h["n_removed"])
    # two atoms 1.6 Å apart: the second round refits each with the other subtracted, so the sites move; the
    # recorded RMS shift is √(mean |Δc·d/d_ref|²) between the positions after round 1 and after round 2
    pair = _exact((16, 16, 16), d, [[8.0, 8.0, 6.9], [8.2, 7.9, 10.1]], [1.0, 0.8], [0.4, 0.35])
    r1, r2 = trace_atoms(pair, d, max_rounds=1), trace_atoms(pair, d, max_rounds=2)
    assert len(r1) == len(r2) == 2
    o1, o2 = np.lexsort(r1.positions_vox.T[::-1]), np.lexsort(r2.positions_vox.T[::-1])
    moved = (r2.positions_vox[o2] - r1.positions_vox[o1]) * d / 0.5
    want = np.sqrt(np.mean(np.sum(moved ** 2, axis=1)))
    assert want > 1e-3                                      # they did move
    assert r2.history["rms_shift_vox"][1] == pytest.approx(want, rel=1e-9)
