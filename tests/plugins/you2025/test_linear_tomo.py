"""You 2025 Alg. 2 (joint_linear_tomo): the operator, its adjoint, its alignment derivatives and the recovery of
known translations and Euler angles."""

import numpy as np
import pytest

from tembench.errors import TembenchError
from tembench.physics.rotation import euler_rotate, rotate
from tembench_you2025 import linear_tomo as LT
from tembench_you2025 import tomo_common as T


def blobs(n=20, n_blobs=5, seed=0, r_lo=0.0, r_hi=5.0, width=1.5, dtype=np.float64):
    """Gaussian blobs (voxel units) at distances r_lo..r_hi from the box centre n/2."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n) - n / 2,) * 3, indexing="ij")
    d = rng.normal(size=(n_blobs, 3))
    d *= rng.uniform(r_lo, r_hi, (n_blobs, 1)) / np.linalg.norm(d, axis=1)[:, None]
    v = np.zeros((n, n, n))
    for c in d:
        v += np.exp(-((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) / (2 * width**2))
    return v.astype(dtype), d


def test_projection_is_shifted_turned_sum_and_adjoint_is_exact():
    v, _ = blobs()
    s, e, t = 0.5, (3.0, 25.0, -4.0), (0.3, -0.7)
    ref = T.shift_image((s * euler_rotate(v, e).sum(axis=0)).astype(np.float32), t, s)
    np.testing.assert_allclose(LT.project(v.astype(np.float32), e, t, s), ref, atol=1e-4 * float(np.abs(ref).max()))
    # the fast path (tilt and sum fused, psi on the 2D projection) is the frame's slabs operator
    np.testing.assert_allclose(LT.project(v, e, (0, 0), s), T.slabs(v, e, 20, s)[0], rtol=1e-5, atol=1e-6)
    rng = np.random.default_rng(1)
    img = rng.standard_normal((3, 20, 20))
    es = np.array([e, (0.0, -40.0, 0.0), (1.0, 10.0, 2.0)])
    ts = np.array([t, (0.0, 0.0), (-1.2, 0.4)])
    lhs = np.vdot(LT.project(v, es, ts, s), img)
    rhs = np.vdot(v, LT.project_adjoint(img, es, ts, s, 20))
    assert lhs == pytest.approx(rhs, rel=1e-10)


@pytest.mark.parametrize("euler", [(3.0, 25.0, -4.0), (0.0, 20.0, 0.0), (0.0, 0.0, 0.0)])
def test_alignment_jacobian_matches_central_differences(euler):
    """∂ŷ/∂Θ (exact for the bilinear interpolant; at angle 0 every sample sits on a node: central slopes) and
    ∂ŷ/∂τ (Fourier derivative) against central differences of :func:`project`."""
    v, _ = blobs()
    s, t = 0.5, (0.3, -0.7)
    _, jt, je = LT.projection_jacobian(v, euler, t, s)
    h = 1e-3
    for i in range(3):
        ep, em = np.array(euler, float), np.array(euler, float)
        ep[i] += h
        em[i] -= h
        fd = (LT.project(v, ep, t, s) - LT.project(v, em, t, s)) / (2 * h)
        # the interpolant is piecewise linear in the angle: a sample crossing a grid line inside ±h makes a
        # local O(h) difference, so compare in norm (max: looser)
        assert np.linalg.norm(fd - je[i]) < 2e-3 * np.linalg.norm(je[i]), LT.EULER_NAMES[i]
        assert np.abs(fd - je[i]).max() < 1e-2 * np.abs(je[i]).max(), LT.EULER_NAMES[i]
    for i in range(2):
        tp, tm = np.array(t, float), np.array(t, float)
        tp[i] += h
        tm[i] -= h
        fd = (LT.project(v, euler, tp, s) - LT.project(v, euler, tm, s)) / (2 * h)
        assert np.abs(fd - jt[i]).max() < 2e-3 * np.abs(jt[i]).max()


def _euler_after_lab_rotation(euler, omega_deg):
    """ZYZ angles (rot, tilt, psi) of exp([ω]×)·R(Θ), by scipy (independent of the module): intrinsic 'ZYZ'
    (a, b, c) has R = R_z(a) R_y(b) R_z(c), so (psi, tilt, rot) = (a, b, c); of it and the other branch
    (a + 180°, −b, c + 180°) the one nearest Θ."""
    from scipy.spatial.transform import Rotation

    from tembench.physics.rotation import euler_matrix

    r = Rotation.from_rotvec(np.radians(omega_deg)) * Rotation.from_matrix(euler_matrix(*euler))
    a, b, c = r.as_euler("ZYZ", degrees=True)
    cands = [np.array([c, b, a]), np.array([c + 180.0, -b, a + 180.0])]
    cands = [np.asarray(euler) + (x - np.asarray(euler) + 180.0) % 360.0 - 180.0 for x in cands]
    return min(cands, key=lambda x: float(np.sum((x - np.asarray(euler)) ** 2)))


@pytest.mark.parametrize("euler", [(3.0, 25.0, -4.0), (0.0, -60.0, 0.0), (-1.2, 12.5, 0.9)])
def test_lab_frame_jacobian_matches_central_differences_along_lab_rotations(euler):
    """∂ŷ/∂ω (joint_angle_frame='lab'): the derivative of :func:`project` along R ← exp([h·e_a]×)·R for the lab axes
    a = x, y, z, each Euler path computed by scipy; and the first-order map N (lab → Euler increments)."""
    v, _ = blobs()
    s, t, h = 0.5, (0.3, -0.7), 1e-3
    _, _, jw = LT.projection_jacobian_lab(v, euler, t, s)
    n = LT.lab_to_euler_matrix(euler)
    for a in range(3):
        w = np.zeros(3)
        w[a] = h
        ep, em = _euler_after_lab_rotation(euler, w), _euler_after_lab_rotation(euler, -w)
        np.testing.assert_allclose((ep - em) / (2 * h), n[:, a], rtol=1e-4, atol=1e-6)
        fd = (LT.project(v, ep, t, s) - LT.project(v, em, t, s)) / (2 * h)
        # float32 operators: the tilt part of the differences is noisier (measured ≤ 5e-3 in norm, 8e-3 max)
        assert np.linalg.norm(fd - jw[a]) < 1e-2 * np.linalg.norm(jw[a]), "xyz"[a]
        assert np.abs(fd - jw[a]).max() < 2e-2 * np.abs(jw[a]).max(), "xyz"[a]
    # gimbal lock: below a tilt of 3° the columns stay the Euler ones
    _, _, je = LT.projection_jacobian(v, (1.0, 2.0, -1.0), t, s)
    _, _, jw = LT.projection_jacobian_lab(v, (1.0, 2.0, -1.0), t, s)
    np.testing.assert_array_equal(jw, je)


def test_lab_frame_is_used_only_with_all_three_angles(monkeypatch):
    """joint_angle_frame='lab': the joint steps take the lab columns and map ω back by N when rot, tilt and psi are
    all refined (the result differs from 'euler'), and leave a subset of the angles on the Euler path (bit-identical)."""
    v, _ = blobs(n=12, n_blobs=3, r_hi=3.0)
    euler = np.array([[0.0, -30.0, 0.0], [0.0, 25.0, 0.0]])
    y = LT.project(v, euler + np.array([[0.4, 0.3, -0.5], [-0.3, -0.4, 0.6]]), np.zeros((2, 2)), 0.5)
    kw = {"n_outer": 2, "n_volume_steps": 3, "n_final_steps": 1, "downsample": 1, "prealign": "none",
          "start_euler_outer": 0, "angle_solver": "joint", "power_iterations": 2, "joint_cg_iterations": 5,
          "threshold_fraction": 0.0}
    calls = []
    real = LT.projection_jacobian_lab
    monkeypatch.setattr(LT, "projection_jacobian_lab", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(frame, angles):
        return LT.joint_linear_tomography(y, 0.5, euler, np.zeros((2, 2)),
                                          {**kw, "refine_euler": angles, "joint_angle_frame": frame}).euler_deg

    np.testing.assert_array_equal(run("lab", ("tilt", "psi")), run("euler", ("tilt", "psi")))
    assert calls == []
    e_lab, e_euler = run("lab", LT.EULER_NAMES), run("euler", LT.EULER_NAMES)
    assert len(calls) == 2 * 2                          # 2 joint steps × 2 tilts
    assert np.abs(e_lab - e_euler).max() > 1e-3
    # the step's ω (here stubbed: 0.3° about lab x, 2° about lab z, capped at 1°) becomes Θ + N ω
    omega = np.array([[0.3, 0.0, 2.0], [-0.2, 0.1, 0.0]])
    monkeypatch.setattr(LT, "_joint_gauss_newton", lambda vol, tgt, e, t, *a, **k: (
        None, np.zeros((2, 2)), omega.copy(), 0.0, 0.0))
    got = LT.joint_linear_tomography(y, 0.5, euler, np.zeros((2, 2)),
                                     {**kw, "n_outer": 1, "refine_euler": LT.EULER_NAMES, "joint_angle_frame": "lab"})
    capped = np.clip(omega, -1.0, 1.0)
    want = euler + np.stack([LT.lab_to_euler_matrix(euler[k]) @ capped[k] for k in range(2)])
    np.testing.assert_allclose(got.euler_deg, want, rtol=0, atol=1e-12)


def test_rotate_derivative_matches_central_difference_per_axis():
    v, _ = blobs(n=16, n_blobs=3)
    for axis, a in (("x", 17.0), ("y", -33.0), ("z", 8.0)):
        d = LT.rotate_derivative(v, a, axis)
        fd = (rotate(v, a + 1e-3, axis) - rotate(v, a - 1e-3, axis)) / 2e-3
        assert np.abs(d - fd).max() < 2e-3 * np.abs(d).max(), axis


def test_loss_gradients_match_finite_differences():
    v, _ = blobs(n=16, n_blobs=4, r_hi=4.0)
    s = 0.5
    rng = np.random.default_rng(2)
    euler = np.array([(1.0, -30.0, 2.0), (0.0, 15.0, -1.0)])
    tau = np.array([(0.2, -0.4), (-0.3, 0.1)])
    y = LT.project(v, euler + rng.normal(0, 0.5, euler.shape), tau + 0.2, s)
    loss, gv, gt, ge = LT.loss_and_gradients(v, y, euler, tau, s)

    def f(vv=v, ee=euler, tt=tau):
        return float(np.sum((LT.project(vv, ee, tt, s) - y) ** 2))

    assert loss == pytest.approx(f())
    h = 1e-3
    for k in range(2):
        for i in range(3):
            ep, em = euler.copy(), euler.copy()
            ep[k, i] += h
            em[k, i] -= h
            assert ge[k, i] == pytest.approx((f(ee=ep) - f(ee=em)) / (2 * h), rel=5e-3, abs=1e-3 * np.abs(ge).max())
        for i in range(2):
            tp, tm = tau.copy(), tau.copy()
            tp[k, i] += h
            tm[k, i] -= h
            assert gt[k, i] == pytest.approx((f(tt=tp) - f(tt=tm)) / (2 * h), rel=1e-5)
    d = rng.standard_normal(v.shape)
    fd = (f(vv=v + 1e-4 * d) - f(vv=v - 1e-4 * d)) / 2e-4
    assert np.vdot(gv, d) == pytest.approx(fd, rel=1e-6)


def test_downsampled_images_keep_the_rotation_centre():
    """A projection downsampled by f equals the projection of the coarse volume on the coarse grid about the
    same centre (a blob at the centre stays at the coarse centre, an off-centre blob at its coarse position)."""
    n, s, f = 24, 0.5, 2
    z, y, x = np.meshgrid(*(np.arange(n) - n / 2,) * 3, indexing="ij")
    c = (1.0, 3.0, -4.0)
    v = np.exp(-((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) / (2 * 2.0**2))
    img = LT.project(v, (0, 0, 0), (0, 0), s)
    coarse = LT.downsample_images(img[None], f, s)[0]
    m = n // f
    yy, xx = np.meshgrid(np.arange(m) - m / 2, np.arange(m) - m / 2, indexing="ij")
    w = coarse / coarse.sum()
    assert float((w * yy).sum()) * f == pytest.approx(c[1], abs=0.02)
    assert float((w * xx).sum()) * f == pytest.approx(c[2], abs=0.02)


def test_cc_shift_finds_large_and_subpixel_shifts():
    v, _ = blobs(n=32, n_blobs=6, r_hi=8.0, width=1.5)
    img = LT.project(v, (0, 30, 0), (0, 0), 0.5)
    for d in ((3.3, -5.1), (-0.2, 0.35), (6.0, 6.0)):
        got = LT.cc_shift(img, T.shift_image(img, d, 0.5), 0.5)
        np.testing.assert_allclose(got, d, atol=0.1 * 0.5)


def _gauge_free(tau, euler):
    return LT._fix_translation_gauge(tau, np.zeros_like(tau), euler, "3d")


def test_recovers_known_translations_same_operator():
    """Noise-free projections made with the operator: translations up to ±3 px recovered within 0.5 px (0.1 px
    measured) once the unmeasurable common 3D shift is removed from both."""
    n, s = 32, 0.5
    v, _ = blobs(n=n, n_blobs=10, seed=1, r_lo=4.0, r_hi=11.0, width=1.2, dtype=np.float32)
    tilts = np.arange(-60.0, 61.0, 10.0)
    euler = np.stack([0 * tilts, tilts, 0 * tilts], 1)
    rng = np.random.default_rng(3)
    tau = rng.uniform(-1.5, 1.5, (len(tilts), 2))
    y = LT.project(v, euler, tau, s)
    res = LT.joint_linear_tomography(y, s, euler, np.zeros_like(tau),
                                     dict(refine_euler=(), n_outer=6, n_outer_full=0, n_volume_steps=25,
                                          n_final_steps=5))
    err = np.abs(_gauge_free(res.translations_A, euler) - _gauge_free(tau, euler)) / s
    assert err.max() < 0.5
    np.testing.assert_array_equal(res.euler_deg, euler)
    assert res.history["alignment_loss"][-1] <= res.history["alignment_loss"][0]
    # the centre-of-mass start alone is already within a voxel here (compact object, no background)
    com = LT.com_translations(y, s, 0.1)
    assert np.abs(_gauge_free(com, euler) - _gauge_free(tau, euler)).max() / s < 1.0


def _atom_tilt_series(euler, tau, n=32, s=0.5, seed=1):
    """Projections (V·Å) of 24 atoms (Pt, Cu, Si) turned by the true Euler matrices about the box centre and moved by
    τ, from the core's projected-potential code (structure factors, not this operator's interpolation), blurred by
    a 0.5 Å Gaussian (a finite resolution: the blur commutes with rotation and projection)."""
    from tembench.physics.potentials import projected_potential
    from tembench.physics.rotation import euler_matrix, rotate_points

    rng = np.random.default_rng(seed)
    c = np.full(3, n * s / 2)
    pts = []
    while len(pts) < 24:
        q = rng.uniform(-6, 6, 3)
        if 2.0 < np.linalg.norm(q) < 6.5 and all(np.linalg.norm(q - r) > 1.5 for r in pts):
            pts.append(q)
    pos = np.array(pts) + c
    z = rng.choice([78, 29, 14], len(pos))
    ky, kx = np.meshgrid(np.fft.fftfreq(n, s), np.fft.fftfreq(n, s), indexing="ij")
    blur = np.exp(-2 * np.pi**2 * 0.5**2 * (kx**2 + ky**2))
    out = []
    for e, t in zip(euler, tau):
        p = rotate_points(pos, euler_matrix(*e), c) + np.array([t[1], t[0], 0.0])
        img = projected_potential(p, z, gpts=(n, n), sampling_A=s)[0]
        out.append(np.fft.ifft2(np.fft.fft2(img) * blur).real)
    return np.array(out, np.float32)


@pytest.mark.slow
def test_recovers_translations_and_angles_from_independently_projected_atoms():
    """No inverse crime: atoms projected by the potential code at the true alignment (τ up to ±3 voxels, tilt and
    psi errors N(0, 0.5°)); from nominal angles and τ = 0 with the default schedule (6 outer iterations on 2×
    down-sampled images, 6 at full resolution; the angles by joint Gauss–Newton steps from outer iteration 5 on).
    Measured (gauge removed): τ 0.02 voxel max; psi 0.15° max (rms 0.21° → 0.07°); tilt 0.26° max, rms 0.47° →
    0.13° (the alternating per-tilt steps, ``angle_solver='alternating'``: psi 0.22°, tilt 0.69° max, tilt rms 0.23°).
    No threshold: max(y − t, 0) is not a linear projection, and with the default t = 0.1·max the angles came out
    worse (measured with the alternating steps: psi 0.34°, tilt 0.75° max)."""
    n, s = 32, 0.5
    rng = np.random.default_rng(1)
    tilts = np.arange(-60.0, 61.0, 10.0)
    nominal = np.stack([0 * tilts, tilts, 0 * tilts], 1)
    err = rng.normal(0, 0.5, nominal.shape)
    err[:, 0] = 0
    truth = nominal + err
    tau = rng.uniform(-1.5, 1.5, (len(tilts), 2))
    y = _atom_tilt_series(truth, tau, n, s)
    res = LT.joint_linear_tomography(y, s, nominal, np.zeros_like(tau),
                                     dict(refine_euler=("tilt", "psi"), n_outer=6, n_outer_full=6,
                                          threshold_fraction=0.0))
    t_err = np.abs(_gauge_free(res.translations_A, res.euler_deg) - _gauge_free(tau, truth)) / s
    idx = [1, 2]
    e_err = LT._fix_euler_gauge(res.euler_deg, nominal, idx) - LT._fix_euler_gauge(truth, nominal, idx)
    e_start = LT._fix_euler_gauge(nominal, nominal, idx) - LT._fix_euler_gauge(truth, nominal, idx)
    print("tau err (voxels) max", t_err.max(), "euler err max", np.abs(e_err).max(0), "rms",
          np.sqrt((e_err**2).mean(0)), "start rms", np.sqrt((e_start**2).mean(0)))
    assert t_err.max() < 0.5
    assert np.abs(e_err[:, 2]).max() < 0.25                            # psi
    assert np.abs(e_err[:, 1]).max() < 0.4                             # tilt (end tilts weakest)
    rms, rms0 = np.sqrt((e_err**2).mean(0)), np.sqrt((e_start**2).mean(0))
    assert rms[1] < 0.4 * rms0[1] and rms[2] < 0.5 * rms0[2]


@pytest.mark.slow
def test_recovers_angles_same_operator_many_tilts():
    """Projections made with the operator, 25 tilts ±60°, psi and tilt errors N(0, 0.5°), τ up to ±3 voxels, 14
    outer iterations at full resolution with the alternating per-tilt steps (pinned: the joint steps take ≈ 5× the
    time here): measured τ 0.02 voxel max, tilt 0.49° max / 0.13° rms, psi 0.27° max (next to tilt 0 and at the
    end tilt) / 0.07° rms."""
    n, s = 32, 0.5
    v, _ = blobs(n=n, n_blobs=14, seed=1, r_lo=5.0, r_hi=12.0, width=1.2, dtype=np.float32)
    rng = np.random.default_rng(5)
    tilts = np.arange(-60.0, 61.0, 5.0)
    nominal = np.stack([0 * tilts, tilts, 0 * tilts], 1)
    err = rng.normal(0, 0.5, nominal.shape)
    err[:, 0] = 0
    truth = nominal + err
    tau = rng.uniform(-1.5, 1.5, (len(tilts), 2))
    y = LT.project(v, truth, tau, s)
    res = LT.joint_linear_tomography(y, s, nominal, np.zeros_like(tau),
                                     dict(refine_euler=("tilt", "psi"), downsample=1, n_outer=14, n_outer_full=0,
                                          threshold_fraction=0.0, angle_solver="alternating",
                                          n_volume_steps=40, start_euler_outer=3, n_final_steps=2))
    idx = [1, 2]
    e_err = LT._fix_euler_gauge(res.euler_deg, nominal, idx) - LT._fix_euler_gauge(truth, nominal, idx)
    t_err = np.abs(_gauge_free(res.translations_A, res.euler_deg) - _gauge_free(tau, truth)) / s
    print("tau err (voxels) max", t_err.max(), "euler err max", np.abs(e_err).max(0), "rms", np.sqrt((e_err**2).mean(0)))
    assert t_err.max() < 0.5
    assert np.abs(e_err[:, 1:]).max() < 0.5
    assert np.sqrt((e_err[:, 1:] ** 2).mean(axis=0)).max() < 0.2


def _atoms_volume(n=24, n_atoms=20, r_lo=2.0, r_hi=8.5, width=1.0, min_d=2.5, seed=1):
    """Gaussian "atoms" (voxel units, width 1 voxel) at least ``min_d`` apart, r_lo..r_hi from the box centre n/2."""
    from you_sim import atom_offsets

    pts = atom_offsets(n_atoms, r_lo, r_hi, min_d, seed)
    z, y, x = np.meshgrid(*(np.arange(n) - n / 2,) * 3, indexing="ij")
    v = np.zeros((n, n, n))
    for c in pts:
        v += np.exp(-((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) / (2 * width**2))
    return v.astype(np.float32)


@pytest.mark.slow
def test_joint_solver_recovers_known_euler_angles_and_shifts_same_operator():
    """Issue 15: noise-free projections of 20 Gaussian atoms made with the operator at known alignment — 11 tilts
    ±60°, errors of 0.5–1.5° (random sign) on all three Euler angles and shifts of 1–3 Å (2–6 voxels) — from the
    nominal angles and τ = 0. Scored by :func:`tomo_scores.alignment_errors` (the common rotation removed by
    Procrustes, the volume-shift part of τ by least squares — not the gauge fixes of this module). The joint
    Gauss–Newton steps (V, τ, Θ together) reach the angles the alternating per-tilt steps do not (module doc).
    Measured: rotation error median / max 0.04 / 0.16° (start 1.47 / 2.21°), τ 0.003 Å; the alternating steps on the
    same schedule 0.40 / 0.72°; on two other draws the joint steps give 0.05 / 0.27° and 0.09 / 0.18° — the max at
    the ±60° tilts is the weak part (docs/you2025_alignment_angles.md). Fails with the angle update removed."""
    from you_sim import ISSUE15_JOINT_SCHEDULE, issue15_alignment_draw, issue15_scores

    n, s = 24, 0.5
    v = _atoms_volume(n)
    tilts, nominal, truth, tau = issue15_alignment_draw(5)
    y = LT.project(v, truth, tau, s)
    res = LT.joint_linear_tomography(y, s, nominal, np.zeros_like(tau),
                                     dict(ISSUE15_JOINT_SCHEDULE, com_threshold_fraction=0.3))
    # com_threshold_fraction 0.3: the start of docs/you2025_alignment_angles.md (the default until linear_tomo v2);
    # from the 0.1 default's centres of mass the same draw ends at 0.15 / 0.41° (the angles depend on the start)
    start, got = issue15_scores(res, nominal, tau, truth)
    assert start["rotation_error_median_deg"] > 1.0
    assert got["translation_error_max_A"] < 0.5 * s
    assert got["rotation_error_median_deg"] < 0.1
    assert got["rotation_error_max_deg"] < 0.2


def test_bad_input_is_refused():
    with pytest.raises(TembenchError, match="n_tilts"):
        LT.joint_linear_tomography(np.zeros((4, 4)), 0.5, np.zeros((1, 3)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="refine_euler"):
        LT.LinearTomoParams(refine_euler=("yaw",))
    with pytest.raises(ValueError, match="translation_gauge"):
        LT.LinearTomoParams(translation_gauge="2d")


def _cluster(cell=8.0):
    """Six atoms (Cu, Si, O pairs) within 2.2 Å of the centre of an 8 Å cube, at least 1.6 Å apart."""
    from tembench.types import Sample

    rng = np.random.default_rng(2)
    pts = []
    while len(pts) < 6:
        q = rng.uniform(-2.0, 2.0, 3)
        if np.linalg.norm(q) < 2.2 and all(np.linalg.norm(q - r) > 1.6 for r in pts):
            pts.append(q)
    return Sample(positions_A=np.array(pts) + cell / 2, numbers=[29, 29, 14, 14, 8, 8], cell_A=[cell] * 3)


@pytest.fixture(scope="module")
def unaligned_series():
    """stem4d_tilt_series: 7 tilts ±60°, true translations up to ±0.6 Å (±2.4 voxels), 16 × 16 probes 0.5 Å apart,
    200 keV, 25 mrad, simulated on 0.125 Å, the central 32² detector pixels kept → 0.25 Å voxels."""
    from tembench_you2025.tilt_series import STEM4DTiltSeries

    p = STEM4DTiltSeries.Params(sampling_A=0.125, energy_keV=200.0, semiangle_mrad=25.0, defocus_A=20.0,
                                scan_step_A=0.5, window_gpts=64, detector_gpts=32, slice_thickness_A=1.0,
                                tilt_angles_deg=[-60.0, -40.0, -20.0, 0.0, 20.0, 40.0, 60.0], detectors={},
                                max_translation_A=0.6, alignment_seed=1)
    return STEM4DTiltSeries().simulate(_cluster(), p, np)


@pytest.mark.slow
def test_reconstructor_recovers_translations_from_msp_projections(unaligned_series):
    """The whole route (msp per tilt → projections on the TomoGrid → Alg. 2) on multislice data of atoms — not the
    tomography operator: the true translations (gauge removed) within 1 voxel = 0.25 Å, median within 0.25 voxel
    (measured with the default thresholds: 0.55 voxel max at the +60° tilt, 0.12 median; 0.26 max without them; the
    paper: half within 0.4 Å, max 0.8 Å)."""
    from tembench_you2025.tilt_series import true_alignment

    m = unaligned_series
    rec = LT.JointLinearTomo().reconstruct(m, LT.JointLinearTomoParams(refine_euler=(), n_outer=8, n_outer_full=0), np)
    e_true, tau_true = true_alignment(m)
    s = rec.sampling_A[0]
    n = len(e_true)
    assert rec.kind == "volume" and rec.quantity == "potential_V" and rec.data.shape == tuple(rec.extras["shape"])
    np.testing.assert_allclose(np.asarray(rec.origin_A) + s * np.array(rec.data.shape) / 2,
                               T.rotation_centre_zyx_A(m.geometry))
    err = np.abs(_gauge_free(rec.extras["translations_A"], e_true) - _gauge_free(tau_true, e_true)) / s
    print("translation errors (voxels)", err.round(2))
    assert err.max() < 1.0 and np.median(err) < 0.25
    assert rec.extras["probe_modes"].shape[0] == n and rec.extras["positions_A"].shape == (n, 256, 2)
    assert rec.extras["projections_VA"].shape == (n,) + rec.data.shape[1:]
    assert len(rec.extras["pattern_scale"]) == n


def test_linear_stage_refuses_other_kinds(unaligned_series):
    with pytest.raises(TembenchError, match="4dstem_tilt_series"):
        LT.linear_stage(unaligned_series.replace(kind="4dstem"), None)
