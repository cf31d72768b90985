"""The reconstruction's forward model: geometry, gradients vs finite differences, storage order."""

from __future__ import annotations

import numpy as np
import pytest

from ren_sim import simulate
from tembench.errors import TembenchError
from tembench_ren2020.model import (
    build_problem,
    detector_offset_A,
    fft_count_per_tilt,
    tilt_loss_and_gradient,
    tilt_series_loss_and_gradient,
    to_storage,
    zyx_view,
)


def _fd_check(measurement, problem, amplitude_V, seed=0):
    """Relative error of ⟨∇L, d⟩ against a central difference of the full tilt-series loss."""
    rng = np.random.default_rng(seed)
    v = (np.abs(rng.normal(size=problem.shape)) * amplitude_V).astype(np.float32)
    loss, grad = tilt_series_loss_and_gradient(v, measurement, problem)
    d = rng.normal(size=problem.shape).astype(np.float32)
    eps = 1.0
    lp, _ = tilt_series_loss_and_gradient(v + eps * d, measurement, problem)
    lm, _ = tilt_series_loss_and_gradient(v - eps * d, measurement, problem)
    fd = (lp - lm) / (2 * eps)
    an = float(np.sum(grad.astype(np.float64) * d))
    return loss, abs(fd - an) / abs(an)


@pytest.mark.parametrize("binning,propagator", [(1, "exact"), (4, "exact"), (3, "fresnel")])
def test_full_tilt_series_gradient_matches_finite_differences(toy_series, binning, propagator):
    problem = build_problem(toy_series, slice_binning=binning, propagator=propagator)
    loss, err = _fd_check(toy_series, problem, 20.0)
    assert loss > 0
    assert err < 2e-3, err


def test_gradient_in_the_strong_scattering_regime_and_about_x(toy_sample):
    """Heavier potentials (phases ≈ 1 rad per slab) and a tilt series about x."""
    m = simulate(toy_sample, tilt_range_deg=(-60.0, 60.0), n_tilts=5, tilt_axis="x", defocus_values_A=[300.0])
    problem = build_problem(m, slice_binning=6)
    assert problem.tilt_axis == "x" and problem.voxel_A[0] == pytest.approx(m.geometry.sampling_A[0])
    _, err = _fd_check(m, problem, 150.0, seed=2)
    assert err < 2e-3, err


def test_storage_order_view_gives_the_same_loss_and_gradient(toy_series):
    problem = build_problem(toy_series, slice_binning=4)
    rng = np.random.default_rng(4)
    v = (rng.random(problem.shape) * 30).astype(np.float32)
    img = np.asarray(toy_series.data[3], np.float32)
    l1, g1 = tilt_loss_and_gradient(v, img, 3, problem)
    stored = to_storage(v, "y")
    assert stored.flags.c_contiguous and stored.shape == (v.shape[0], v.shape[2], v.shape[1])
    l2, g2 = tilt_loss_and_gradient(zyx_view(stored, "y"), img, 3, problem)
    assert l1 == pytest.approx(l2, rel=1e-6)
    np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-6 * np.abs(g1).max())
    assert to_storage(g2, "y").flags.c_contiguous   # the gradient comes back in storage order


def test_problem_geometry_follows_the_forward_model(toy_series):
    g = toy_series.geometry
    p = build_problem(toy_series, slice_binning=10)
    nz, ny, nx = p.shape
    assert (ny, nx) == toy_series.data.shape[-2:]
    # the rotation centre (box centre in voxel units) is the tilt series' rotation centre
    cx, cy, cz = g.extra["rotation_centre_A"]
    assert p.origin_A[0] + nz / 2 * p.voxel_A[0] == pytest.approx(cz)
    assert p.origin_A[2] + nx / 2 * p.voxel_A[2] == pytest.approx(cx)
    # slabs: 24 voxels in bins of 10 → 10, 10, 4; screens at slab centres, exit at the bottom face
    assert p.n_slabs == 3
    np.testing.assert_allclose(p.slab_distances_A, [5.0, 3.5, 1.0])
    assert p.extra["exit_plane_z_A"] == pytest.approx(p.origin_A[0] + (nz - 0.5) * p.voxel_A[0])
    assert fft_count_per_tilt(p) == 4 * 3 + 2 * 3
    # the forward model bins a 2× finer grid but keeps detector pixel centres at i·s, and says so
    assert g.extra["simulation_factor"] == 2
    assert detector_offset_A(g) == (0.0, 0.0)
    assert p.extra["pixel_offset_A"] == (0.0, 0.0)
    recorded = g.replace(extra=dict(g.extra, detector_pixel_offset_A=(0.0, 0.05)))
    assert detector_offset_A(recorded) == (0.0, 0.05)
    assert p.lipschitz_per_tilt() == pytest.approx(2 * 2 * (p.sigma * 0.5) ** 2 * 10)


def test_model_reproduces_the_forward_model_on_the_true_potential(toy_sample, toy_series):
    """The ground-truth potential volume through the reconstruction's model fits the data well."""
    problem = build_problem(toy_series, slice_binning=2)
    truth = toy_sample.potential_volume(0.5).astype(np.float32)
    assert truth.shape == problem.shape
    loss_true, _ = tilt_series_loss_and_gradient(truth, toy_series, problem)
    loss_zero, _ = tilt_series_loss_and_gradient(np.zeros_like(truth), toy_series, problem)
    assert loss_true < 0.05 * loss_zero
    # a misplaced rotation centre or pixel offset would cost far more than the model error
    shifted = np.roll(truth, 2, axis=2)
    loss_shift, _ = tilt_series_loss_and_gradient(shifted, toy_series, problem)
    assert loss_shift > 5 * loss_true
    # the old binning offset of a 2× finer simulation (f − 1)/2 fine pixels = 0.125 Å, now removed at
    # the source, would more than double the misfit: the forward model and this model agree on i·s
    old_offset = build_problem(toy_series, slice_binning=2, pixel_offset_A=(0.125, 0.125))
    loss_old_offset, _ = tilt_series_loss_and_gradient(truth, toy_series, old_offset)
    assert loss_old_offset > 2 * loss_true


def test_bad_geometry_is_rejected(toy_series):
    bad = toy_series.replace(data=toy_series.data[0], axes=("defocus", "y", "x"))
    with pytest.raises(TembenchError, match="n_tilt, n_defocus"):
        build_problem(bad)
    g = toy_series.geometry.replace(tilt_angles_deg=[0.0, 1.0])
    with pytest.raises(TembenchError, match="tilt angles"):
        build_problem(toy_series.replace(geometry=g))
    g = toy_series.geometry.replace(tilt_axis="z")
    with pytest.raises(TembenchError, match="tilt_axis"):
        build_problem(toy_series.replace(geometry=g))
    extra = dict(toy_series.geometry.extra, rotation_centre_A=[3.0, 6.0, 6.0])
    with pytest.raises(TembenchError, match="turns about"):
        build_problem(toy_series.replace(geometry=toy_series.geometry.replace(extra=extra)))
    with pytest.raises(TembenchError, match="slice_binning"):
        build_problem(toy_series, slice_binning=0)


@pytest.mark.parametrize("in_place", [True, False])
def test_in_place_gradient_step_equals_the_returned_gradient(toy_series, monkeypatch, in_place):
    import tembench_ren2020.model as model

    if not in_place:  # the fallback that forms mᵀg and then adds it
        monkeypatch.setattr(model, "_csc_matvecs", None)
    problem = build_problem(toy_series, slice_binning=4)
    v = (np.random.default_rng(5).random(problem.shape) * 30).astype(np.float32)
    img = np.asarray(toy_series.data[2], np.float32)
    loss, g = tilt_loss_and_gradient(v, img, 2, problem)
    stored = to_storage(v, "y")
    alpha = 0.37
    loss2, none = tilt_loss_and_gradient(zyx_view(stored, "y"), img, 2, problem, step=alpha)
    assert none is None and loss2 == pytest.approx(loss, rel=1e-6)
    want = v - alpha * g
    np.testing.assert_allclose(zyx_view(stored, "y"), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    with pytest.raises(TembenchError, match="storage-ordered"):    # a (z, y, x) C array would be copied
        tilt_loss_and_gradient(v, img, 2, problem, step=alpha)


def _sequential_reference(m, stored, g_rows, scale):
    """The definitions, one float32 operation at a time in a fixed order: forward rows summed from 0 in stored-entry
    order, then scaled; the adjoint adds a·(scale·g[r]) into the volume row r after row r − 1 (the order of the numba
    kernels the scipy calls replaced)."""
    f32 = np.float32
    fwd = np.zeros((m.shape[0], stored.shape[-1]), np.float32)
    x = stored.reshape(m.shape[1], -1)
    acc = stored.reshape(m.shape[1], -1).copy()
    for r in range(m.shape[0]):
        row = g_rows[r] * f32(scale)
        for jj in range(m.indptr[r], m.indptr[r + 1]):
            c, a = m.indices[jj], m.data[jj]
            fwd[r] = fwd[r] + a * x[c]
            acc[c] = acc[c] + a * row
    return fwd * f32(scale), acc


@pytest.mark.parametrize("axis", ["y", "x"])
def test_rotate_bin_kernels_are_the_sequential_sums_and_adjoint(axis):
    """Bit for bit the sequential float32 sums (so independent of BLAS, numba or the fallback's temporary), and
    ⟨s·A v, g⟩ = ⟨v, s·Aᵀ g⟩. Fails if the adjoint forms mᵀg before adding it to a non-zero volume."""
    import tembench_ren2020.model as model
    from tembench.physics.rotation import rotate_bin_operator

    rng = np.random.default_rng(9)
    v = rng.random((12, 7, 9)).astype(np.float32)
    m = rotate_bin_operator(v.shape, 31.0, axis, 5)
    stored = to_storage(v, axis)
    g = rng.random((3, 7, 9)).astype(np.float32)
    w = model.rotate_bin_apply(m, stored, axis, 2.0, np)
    assert w.shape == (3, 7, 9) and w.flags.c_contiguous
    acc = np.zeros_like(stored)
    model.rotate_bin_adjoint_add(m, g, acc, axis, 2.0, np)
    # ⟨s·A v, g⟩ = ⟨v, s·Aᵀ g⟩ with A = B_N R_θ in (z, y, x) order
    assert np.vdot(w.astype(np.float64), g) == pytest.approx(
        np.vdot(v.astype(np.float64), zyx_view(acc, axis).astype(np.float64)), rel=1e-5)

    base = (rng.random(stored.shape) * 3).astype(np.float32)          # accumulate into a non-zero volume
    got = base.copy()
    model.rotate_bin_adjoint_add(m, g, got, axis, 0.7, np)
    g_rows = np.ascontiguousarray(g.transpose(model.STORAGE[axis])).reshape(m.shape[0], -1)
    fwd_ref, acc_ref = _sequential_reference(m, base, g_rows, 0.7)
    np.testing.assert_array_equal(got.reshape(m.shape[1], -1), acc_ref)
    fwd = model.rotate_bin_apply(m, base, axis, 0.7, np)
    n_out, nb = m.shape[0] // base.shape[1], base.shape[1]
    np.testing.assert_array_equal(fwd, np.ascontiguousarray(fwd_ref.reshape(n_out, nb, -1).transpose(model.STORAGE[axis])))
