"""Gaps in the Ren 2020 plugin's tests found by mutation testing of prox.py and model.py (issue 18 part 6,
tests/mutation/run_mutmut_physics.sh extra). Each test checks a closed form or a documented definition
written out here, never the current output of the function under test. Fast and deterministic."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest

from tembench.errors import TembenchError
from tembench.physics.constants import interaction_constant
from tembench_ren2020 import model as M
from tembench_ren2020 import prox as P


def _volume(seed=0, shape=(4, 5, 6)):
    return np.random.default_rng(seed).normal(0.0, 1.0, shape).astype(np.float32)


def test_apply_prox_dispatches_to_the_closed_forms_with_positivity_by_default():
    x, lam = _volume(), 0.3
    # "none": Table 1's "Positive" row is the projection onto v >= 0 (the default); without it, a copy
    np.testing.assert_array_equal(P.apply_prox(x, "none", lam), np.maximum(x, 0))
    plain = P.apply_prox(x, "none", lam, positivity=False)
    np.testing.assert_array_equal(plain, x)
    assert plain is not x
    # LASSO: max(x − λ, 0) with positivity (default), soft threshold sign(x)·max(|x| − λ, 0) without
    np.testing.assert_allclose(P.apply_prox(x, "lasso", lam), np.maximum(x - lam, 0), atol=1e-7)
    np.testing.assert_allclose(P.apply_prox(x, "lasso", lam, positivity=False),
                               np.sign(x) * np.maximum(np.abs(x) - lam, 0), atol=1e-7)
    # TV: Ren's 15 FGP iterations by default, the given count otherwise, the positivity flag passed on
    np.testing.assert_array_equal(P.apply_prox(x, "tv", lam), P.prox_tv(x, lam, n_iter=15, positivity=True))
    np.testing.assert_array_equal(P.apply_prox(x, "tv", lam, positivity=False, tv_iterations=3),
                                  P.prox_tv(x, lam, n_iter=3, positivity=False))
    assert (P.apply_prox(x, "tv", lam, positivity=False) < 0).any()
    assert not np.array_equal(P.prox_tv(x, lam, n_iter=15), P.prox_tv(x, lam, n_iter=16))
    with pytest.raises(TembenchError, match="regularizer"):
        P.apply_prox(x, "TV", lam)


def test_prox_lasso_and_positivity_write_into_out_and_default_to_positivity():
    x, lam = _volume(1), 0.25
    np.testing.assert_allclose(P.prox_lasso(x, lam), np.maximum(x - lam, 0), atol=1e-7)
    for positivity, ref in ((True, np.maximum(x - lam, 0)), (False, np.sign(x) * np.maximum(np.abs(x) - lam, 0))):
        out = np.empty_like(x)
        assert P.prox_lasso(x, lam, positivity, out=out) is out
        np.testing.assert_allclose(out, ref, atol=1e-7)
    out = np.empty_like(x)
    assert P.prox_positivity(x, out=out) is out
    np.testing.assert_array_equal(out, np.maximum(x, 0))


def test_tv_norm_of_hand_built_arrays():
    # forward differences, Neumann boundary (no difference out of the last voxel): |3| + |−2| = 5
    assert P.tv_norm(np.array([0.0, 3.0, 1.0], np.float32)) == pytest.approx(5.0)
    # (0,0): dy = 2, dx = 1 → √5; (0,1): dy = −1 → 1; (1,0): dx = −2 → 2; (1,1): 0
    assert P.tv_norm(np.array([[0.0, 1.0], [2.0, 0.0]], np.float32)) == pytest.approx(math.sqrt(5.0) + 3.0)


def test_measured_intensities_divide_counts_by_the_dose_and_refuse_counts_without_it():
    data = np.arange(2 * 2 * 3 * 4, dtype=np.float64).reshape(2, 2, 3, 4) * 8.0

    def meas(counted, extra):
        return SimpleNamespace(data=data, counted=counted, geometry=SimpleNamespace(extra=extra))

    img = M.measured_intensities(meas(False, None), 1)
    assert img.dtype == np.float32
    np.testing.assert_array_equal(img, data[1])
    np.testing.assert_allclose(M.measured_intensities(meas(True, {"electrons_per_unit_intensity": 4.0}), 1),
                               data[1] / 4.0, rtol=1e-7)
    for extra in (None, {}, {"electrons_per_unit_intensity": 0.0}, {"electrons_per_unit_intensity": -2.0},
                  {"electrons_per_unit_intensity": math.inf}, {"electrons_per_unit_intensity": math.nan}):
        with pytest.raises(TembenchError, match="electrons_per_unit_intensity"):
            M.measured_intensities(meas(True, extra), 0)
    # below one electron per unit intensity is a valid (low) dose
    np.testing.assert_allclose(M.measured_intensities(meas(True, {"electrons_per_unit_intensity": 0.5}), 0),
                               data[0] * 2.0, rtol=1e-7)


def test_lipschitz_bound_uses_the_slice_thickness_and_operator_bytes_sum_the_cached_matrices(toy_series):
    problem = M.build_problem(toy_series, slice_binning=2)
    p = dataclasses.replace(problem, voxel_A=(0.7, 0.5, 0.4), _operators={})
    # 2·N_f·(σ s_z)²·N_B, s_z = voxel_A[0]
    expected = 2.0 * len(p.defocus_A) * (interaction_constant(p.energy_keV) * 0.7) ** 2 * 2
    assert p.lipschitz_per_tilt() == pytest.approx(expected, rel=1e-12)
    assert p.operator_bytes() == 0
    mats = [p.rotate_bin_operator(k) for k in (0, 3)]
    assert p.operator_bytes() == sum(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes for m in mats)
    assert p.operator_bytes() > 0
    p._operators[("other", "numpy")] = mats[0]        # not a tilt index: not counted
    p._operators[(5, "cupy")] = mats[0]               # device copies: not counted
    assert p.operator_bytes() == sum(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes for m in mats)


def test_slab_phase_scales_with_the_voxel_depth_and_the_series_sums_the_tilts(toy_series):
    """The slab phase is σ·s_z·Σ V (s_z = voxel_A[0]): doubling s_z equals doubling V, whatever s_y, s_x.
    The series loss/gradient is the sum over tilts of the per-tilt ones, float32 like the volume."""
    problem = M.build_problem(toy_series, slice_binning=4)
    v = (np.random.default_rng(2).random(problem.shape) * 3).astype(np.float32)
    img = M.measured_intensities(toy_series, 1)
    sz, sy, sx = problem.voxel_A
    deep = dataclasses.replace(problem, voxel_A=(2 * sz, sy, sx), _operators={})
    l2, g2 = M.tilt_loss_and_gradient(v, img, 1, deep)
    l1, g1 = M.tilt_loss_and_gradient(2 * v, img, 1, problem)
    assert l2 == pytest.approx(l1, rel=1e-5)
    np.testing.assert_allclose(g2, 2 * g1, rtol=1e-4, atol=1e-4 * np.abs(g1).max())   # dL/dV = 2·dL/d(2V)
    total, grad = M.tilt_series_loss_and_gradient(v, toy_series, problem)
    assert grad.dtype == np.float32
    parts = [M.tilt_loss_and_gradient(v, M.measured_intensities(toy_series, k), k, problem)
             for k in range(len(problem.tilt_angles_deg))]
    assert total == pytest.approx(sum(p[0] for p in parts), rel=1e-9)
    np.testing.assert_allclose(grad, sum(p[1] for p in parts), rtol=1e-5, atol=1e-6 * np.abs(grad).max())


def test_in_place_step_moves_the_volume_by_minus_alpha_times_the_gradient(toy_series):
    """step=α: V ← V − α·grad, compared on the change itself (α·|grad| ≈ 1 V, well above float32 rounding
    of V), so the sign and the s_z factor of the in-place adjoint are pinned."""
    problem = M.build_problem(toy_series, slice_binning=4)
    v = (np.random.default_rng(5).random(problem.shape) * 3).astype(np.float32)
    img = M.measured_intensities(toy_series, 2)
    _, g = M.tilt_loss_and_gradient(v, img, 2, problem)
    alpha = 1.0 / float(np.abs(g).max())
    stored = M.to_storage(v, "y")
    M.tilt_loss_and_gradient(M.zyx_view(stored, "y"), img, 2, problem, step=alpha)
    np.testing.assert_allclose(M.zyx_view(stored, "y") - v, -alpha * g, rtol=1e-3, atol=1e-4)


def test_rotation_operators_are_built_once_and_the_optics_options_reach_the_propagation(toy_series):
    problem = M.build_problem(toy_series, slice_binning=4)
    m = problem.rotate_bin_operator(1)
    assert problem.rotate_bin_operator(1) is m            # built once per problem (documented cache)
    assert problem.rotate_bin_operator(1, np) is m
    v = (np.random.default_rng(1).random(problem.shape) * 3).astype(np.float32)
    img = M.measured_intensities(toy_series, 0)
    base, _ = M.tilt_loss_and_gradient(v, img, 0, problem, want_gradient=False)
    # the band limit and the propagator kind of the problem are used: a 1/2 band limit changes the loss by
    # more than 0.1 %; Fresnel instead of the exact propagator by ~1e-6 relative at 300 keV (deterministic, so
    # any difference shows the option reached the propagation)
    cut = M.build_problem(toy_series, slice_binning=4, band_limit=0.5)
    loss, _ = M.tilt_loss_and_gradient(v, img, 0, cut, want_gradient=False)
    assert abs(loss - base) > 1e-3 * base
    fresnel = M.build_problem(toy_series, slice_binning=4, propagator="fresnel")
    assert problem.propagator == "exact"
    assert M.tilt_loss_and_gradient(v, img, 0, fresnel, want_gradient=False)[0] != base


def _with_geometry(series, **changes):
    return series.replace(geometry=series.geometry.replace(**changes))


def test_transfer_functions_refer_the_defocus_to_the_recorded_plane(toy_series):
    """ctfs = H_j for the Geometry's aberrations ∪ {C10: −(exit plane − z_ref)} (Δf = −C10): the measured
    defocus refers to ``defocus_reference_z_A``; moving that plane by +δ along z while adding δ to every
    defocus describes the same optics, so the transfer functions are the same."""
    from tembench.physics.multislice import defocus_ctfs

    g = toy_series.geometry
    p = M.build_problem(toy_series, slice_binning=2)
    ab = {"C30": 5e5}
    pa = M.build_problem(_with_geometry(toy_series, aberrations_A=ab), slice_binning=2)
    sz = p.voxel_A[0]
    nz = p.shape[0]
    cz = float(g.extra["rotation_centre_A"][2])
    bottom = cz - nz * sz / 2.0 - sz / 2.0 + nz * sz          # the bottom face of the last slab
    z_ref = float(g.extra["defocus_reference_z_A"])
    assert pa.extra["exit_plane_z_A"] == pytest.approx(bottom)
    want = defocus_ctfs(p.shape[1:], p.sampling_yx, g.energy_keV, p.defocus_A, {"C30": 5e5, "C10": -(bottom - z_ref)},
                        g.semiangle_mrad)
    np.testing.assert_allclose(pa.ctfs, want, rtol=1e-5, atol=1e-6)
    delta = 37.0
    extra = dict(g.extra, defocus_reference_z_A=z_ref + delta)
    moved = M.build_problem(_with_geometry(toy_series, extra=extra, defocus_A=[d + delta for d in g.defocus_A]),
                            slice_binning=2)
    np.testing.assert_allclose(moved.ctfs, p.ctfs, rtol=1e-4, atol=1e-5)
    assert not np.allclose(pa.ctfs, p.ctfs, atol=1e-3)


def test_problem_geometry_rules(toy_series):
    g = toy_series.geometry
    assert M.build_problem(toy_series).slice_binning == 10          # the documented default N_B
    # the depth voxel is the pixel along the in-plane axis the tilt mixes with z (x for a y tilt axis)
    for axis, voxel in (("y", (0.4, 0.5, 0.4)), ("x", (0.5, 0.5, 0.4))):
        extra = dict(g.extra, rotation_centre_A=(g.extra["rotation_centre_A"][0] * 0.8, g.extra["rotation_centre_A"][1],
                                                 g.extra["rotation_centre_A"][2]))
        p = M.build_problem(_with_geometry(toy_series, sampling_A=(0.5, 0.4), tilt_axis=axis, extra=extra))
        assert p.voxel_A == pytest.approx(voxel)
    # a scalar sampling is the same square pixel
    assert M.build_problem(_with_geometry(toy_series, sampling_A=0.5)).voxel_A == (0.5, 0.5, 0.5)
    # the rotation centre must sit on the field-of-view centre within a quarter pixel
    c = list(g.extra["rotation_centre_A"])
    M.build_problem(_with_geometry(toy_series, extra=dict(g.extra, rotation_centre_A=(c[0] + 0.2 * 0.5, c[1], c[2]))))
    with pytest.raises(TembenchError, match="turns about x"):
        M.build_problem(_with_geometry(toy_series, extra=dict(g.extra, rotation_centre_A=(c[0] + 0.3 * 0.5, c[1], c[2]))))
    # both optics fields are required
    for missing in ("energy_keV", "sampling_A"):
        with pytest.raises(TembenchError, match="lacks energy_keV or sampling_A"):
            M.build_problem(_with_geometry(toy_series, **{missing: None}))
    # without a recorded rotation centre: a cube of nx·s_z, or the given thickness, from z = 0
    bare = {k: v for k, v in g.extra.items() if k != "rotation_centre_A"}
    p = M.build_problem(_with_geometry(toy_series, extra=bare))
    assert p.shape[0] == p.shape[2] and p.origin_A[0] == pytest.approx(0.0)
    p = M.build_problem(_with_geometry(toy_series, extra=bare), thickness_A=6.0)
    assert p.shape[0] == 12 and p.origin_A[0] == pytest.approx(0.0)
    # detector pixels at i·s unless the Geometry says otherwise
    assert M.detector_offset_A(SimpleNamespace(extra=None)) == (0.0, 0.0)
    assert M.detector_offset_A(SimpleNamespace(extra={"detector_pixel_offset_A": (0.1, -0.2)})) == (0.1, -0.2)


def test_detector_offset_direction_reference_default_and_aperture(toy_series):
    """"pixel i shows i·s + offset": with a one-pixel x offset the model's images are the unshifted ones
    rolled by one pixel (I_off[i] = I_0[i + 1], exact on the periodic grid). Without a recorded
    defocus reference the exit face of the cell (2·c_z, what the forward model records) is used; the
    Geometry's aperture reaches the transfer functions; a rotation centre off the cube's mid-depth sets
    the depth to 2·c_z."""
    from tembench.physics.multislice import defocus_ctfs

    g = toy_series.geometry
    s = float(np.broadcast_to(g.sampling_A, (2,))[1])
    p0 = M.build_problem(toy_series, slice_binning=4)
    p1 = M.build_problem(toy_series, slice_binning=4, pixel_offset_A=(0.0, s))
    rng = np.random.default_rng(4)
    ny, nx = p0.shape[1:]
    exit_wave = (1 + 0.3 * rng.normal(size=(ny, nx)) + 0.3j * rng.normal(size=(ny, nx))).astype(np.complex64)
    i0 = np.abs(M._image_waves(exit_wave, p0, np)) ** 2
    i1 = np.abs(M._image_waves(exit_wave, p1, np)) ** 2
    np.testing.assert_allclose(i1, np.roll(i0, -1, axis=-1), rtol=1e-4, atol=1e-4 * i0.max())
    bare = {k: v for k, v in g.extra.items() if k != "defocus_reference_z_A"}
    assert float(g.extra["defocus_reference_z_A"]) == pytest.approx(2 * float(g.extra["rotation_centre_A"][2]))
    pb = M.build_problem(_with_geometry(toy_series, extra=bare), slice_binning=4)
    np.testing.assert_allclose(pb.ctfs, p0.ctfs, rtol=1e-6, atol=1e-6)
    pa = M.build_problem(_with_geometry(toy_series, semiangle_mrad=12.0), slice_binning=4)
    want = defocus_ctfs(p0.shape[1:], p0.sampling_yx, g.energy_keV, p0.defocus_A,
                        {"C10": -(p0.extra["exit_plane_z_A"] - p0.extra["defocus_reference_z_A"])}, 12.0)
    np.testing.assert_allclose(pa.ctfs, want, rtol=1e-5, atol=1e-6)
    c = g.extra["rotation_centre_A"]
    deep = M.build_problem(_with_geometry(toy_series, extra=dict(g.extra, rotation_centre_A=(c[0], c[1], 4.0))))
    assert deep.shape[0] == int(round(8.0 / deep.voxel_A[0]))


def _fgp_reference(x, lam, n_iter, positivity):
    """Beck & Teboulle's FGP for prox_{λ TV} (isotropic, forward differences, Neumann), written out for
    a 2D array: dual step 1/8 = 1/‖∇‖², v = P_C(x − λ∇ᵀp) with |p| ≤ 1."""
    x = x.astype(np.float64)

    def grad(v):
        gy, gx = np.zeros_like(v), np.zeros_like(v)
        gy[:-1] = v[1:] - v[:-1]
        gx[:, :-1] = v[:, 1:] - v[:, :-1]
        return gy, gx

    def div(py, px):   # −∇ᵀ
        d = np.zeros_like(py)
        d[:-1] += py[:-1]
        d[1:] -= py[:-1]
        d[:, :-1] += px[:, :-1]
        d[:, 1:] -= px[:, :-1]
        return d

    proj = (lambda v: np.maximum(v, 0)) if positivity else (lambda v: v)
    ry, rx = np.zeros_like(x), np.zeros_like(x)
    py, px = ry.copy(), rx.copy()
    t = 1.0
    for _ in range(n_iter):
        v = proj(x + lam * div(ry, rx))
        gy, gx = grad(v)
        qy, qx = ry + gy / (8.0 * lam), rx + gx / (8.0 * lam)
        n = np.maximum(1.0, np.sqrt(qy**2 + qx**2))
        qy, qx = qy / n, qx / n
        t_next = 0.5 * (1 + math.sqrt(1 + 4 * t * t))
        ry, rx = qy + (t - 1) / t_next * (qy - py), qx + (t - 1) / t_next * (qx - px)
        py, px, t = qy, qx, t_next
    return proj(x + lam * div(py, px))


@pytest.mark.parametrize("positivity", [True, False])
def test_tv_prox_is_fgp_with_the_documented_step_and_iterations(positivity):
    """prox_tv (array path, 2D) equals FGP written out here with the dual step 1/‖∇‖² = 1/(4·ndim), after
    3 and after 15 iterations; λ = 0 or no iterations is the projection alone."""
    x = np.random.default_rng(3).normal(0, 1, (9, 11)).astype(np.float32)
    for n_iter in (3, 15):
        got = P.prox_tv(x, 0.4, n_iter=n_iter, positivity=positivity)
        np.testing.assert_allclose(got, _fgp_reference(x, 0.4, n_iter, positivity), atol=2e-5)
    for lam, n_iter in ((0.0, 15), (0.4, 0)):
        np.testing.assert_array_equal(P.prox_tv(x, lam, n_iter=n_iter, positivity=positivity),
                                      np.maximum(x, 0) if positivity else x)
    assert not np.allclose(P.prox_tv(x, 1.0, positivity=positivity), np.maximum(x, 0) if positivity else x)
