"""Finite-difference checks of the gradients MSP steps along (You 2025 Alg. 1), through the core's
``stem_loss_and_gradient``: complex slice potentials, mixed-state probe modes, probe positions
(the Fourier-shift-ramp derivative added for You's position refinement) and its Gauss–Newton curvature.

The engine is float32/complex64 (the loss is summed in float64), so each central difference uses a step
chosen from a scan of its error against h: large enough for the float32 round-off of the loss, small
enough for the truncation error. Measured errors (printed by ``-s``) are 10–100× below the tolerances,
and a 1 % error in any of the three gradients, a flipped sign or swapped position axes fails.

Every test draws from its own seeded generator (none is shared at module level), so each result is the
same whichever tests run and in whatever order (``-k`` subsets, shuffled or reversed order).
"""

from __future__ import annotations

import numpy as np
import pytest

from tembench.physics import stem as S
from tembench.physics.constants import interaction_constant

E = 200.0
SAMPLING = 0.2


def _smooth_noise(shape, width_px, rng):
    k = np.fft.fftfreq(shape[-1])
    f = np.exp(-(k[:, None] ** 2 + k[None, :] ** 2) * (2 * np.pi * width_px) ** 2 / 2)
    return np.fft.ifft2(np.fft.fft2(rng.standard_normal(shape)) * f).real


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(11)
    sig = interaction_constant(E)
    re = _smooth_noise((2, 56, 56), 1.5, rng)
    re = 0.4 * re / np.abs(re).max() / sig  # ≤ 0.4 rad per slice
    im = 0.02 * np.abs(_smooth_noise((2, 56, 56), 1.5, rng)) / sig
    v = (re + 1j * im).astype(np.complex64)
    probe = S.make_probe_modes((32, 32), SAMPLING, E, 30.0, {"C10": -30.0}, n_modes=2, defocus_spread_A=30.0)
    # away from half-pixel boundaries, where the whole-pixel window origin jumps (the model is continuous
    # there only up to the probe tails cut by the window)
    pos = np.array([[4.02, 4.13], [4.53, 4.88], [5.07, 3.73], [5.62, 5.24]])
    truth_v = (v * 1.1 + 0.05 * v.conj()).astype(np.complex64)
    meas = S.stem_scan(truth_v, 3.0, energy_keV=E, sampling_A=SAMPLING, positions_A=pos + 0.07, probe=probe,
                       bandlimit_transmission=False, band_limit=None).patterns
    kw = dict(energy_keV=E, sampling_A=SAMPLING, complex_potential=True, band_limit=None, amplitude_eps=1e-5,
              batch_size=3)
    return v, probe, pos, meas, kw


def _loss(v, meas, probe, pos, kw):
    return S.stem_loss_and_gradient(v, meas, 3.0, probe=probe, positions_A=pos, **kw)[0]


def _check_direction(fd, g, d, rel, l1_tol):
    """The central difference ``fd`` along ``d`` against dL = Re Σ conj(g)·d.

    Along a random direction the terms of Σ cancel (|dL| is 0.4–10 % of Σ|terms| here), so the
    difference is compared with a tolerance on the size of the terms (l1_tol · Σ|Re conj(g)·d|, ≥ 8×
    below |dL| on every direction used: a wrong sign or scale still fails); along a direction aligned
    with g (every term ≥ 0) it is compared with a relative tolerance.
    """
    terms = np.real(np.conj(g) * d).astype(np.float64)
    an = float(terms.sum())
    l1 = float(np.abs(terms).sum())
    print(f"fd {fd:.6e} analytic {an:.6e} rel {abs(fd - an) / abs(an):.2e} err/l1 {abs(fd - an) / l1:.2e}")
    assert fd == pytest.approx(an, rel=rel, abs=l1_tol * l1)


def test_complex_potential_gradient(problem):
    """∂L/∂V for the real (phase) and imaginary (absorption) parts; h = 1 V·Å (σh ≈ 7e-4 rad) sits between
    the truncation error (∝ h², 3e-4 relative at 2 V·Å along g) and the float32 round-off of the loss."""
    v, probe, pos, meas, kw = problem
    rng = np.random.default_rng(101)
    _, g, _ = S.stem_loss_and_gradient(v, meas, 3.0, probe=probe, positions_A=pos, **kw)
    assert g.shape == v.shape and np.iscomplexobj(g)
    h = 1.0

    def central(d):
        return (_loss(v + h * d, meas, probe, pos, kw) - _loss(v - h * d, meas, probe, pos, kw)) / (2 * h)

    for part in (1.0, 1j):
        along = np.sign(np.real(np.conj(part) * g))  # the sign of each term of dL along part
        d = (part * along * rng.uniform(0.5, 1.5, v.shape)).astype(np.complex64)
        _check_direction(central(d), g, d, rel=2e-3, l1_tol=0.0)  # measured ≤ 1e-4
        d = (part * rng.standard_normal(v.shape)).astype(np.complex64)
        _check_direction(central(d), g, d, rel=0.0, l1_tol=1e-3)  # measured err/l1 ≤ 3e-5


def test_probe_mode_gradient(problem):
    """∂L/∂ψ* of the probe modes; directions weighted by |ψ| + 5 % of its peak, h = 5e-4 (the amplitude loss
    is strongly curved where the probe is dark: 2e-3 relative at h = 4e-3 along g)."""
    v, probe, pos, meas, kw = problem
    rng = np.random.default_rng(102)
    _, _, gp = S.stem_loss_and_gradient(v, meas, 3.0, probe=probe, positions_A=pos, **kw)
    assert gp.shape == probe.shape
    h = 5e-4
    w = np.abs(probe) + 0.05 * np.abs(probe).max()

    def central(d):
        return (_loss(v, meas, (probe + h * d).astype(np.complex64), pos, kw)
                - _loss(v, meas, (probe - h * d).astype(np.complex64), pos, kw)) / (2 * h)

    d = (np.exp(1j * np.angle(gp)) * w * rng.uniform(0.5, 1.5, probe.shape)).astype(np.complex64)
    _check_direction(central(d), gp, d, rel=2e-3, l1_tol=0.0)  # measured ≤ 4e-5
    d = (w * (rng.standard_normal(probe.shape) + 1j * rng.standard_normal(probe.shape))).astype(np.complex64)
    _check_direction(central(d), gp, d, rel=0.0, l1_tol=5e-4)  # measured err/l1 ≤ 3e-5, |dL|/l1 ≥ 4e-3


def test_position_gradient(problem):
    """∂L/∂ρ against central differences, per component and along random directions.

    The model is continuous in ρ only between half-pixel boundaries, where the whole-pixel window origin
    jumps (the fixture's positions are 0.02–0.08 Å from one). The step, 2 mÅ at most along any
    coordinate, keeps every difference on one side (checked below) and sits where the truncation error
    (∝ h²) and the float32 round-off of the loss (∝ 1/h) are both small: measured relative errors
    ≤ 2e-4 for h = 1–3 mÅ, against 5 % at h = 30 mÅ, where some differences straddle a boundary.
    """
    v, probe, pos, meas, kw = problem
    rng = np.random.default_rng(103)
    out = S.stem_loss_and_gradient(v, meas, 3.0, probe=probe, positions_A=pos, return_position_gradient=True, **kw)
    assert len(out) == 4
    g = out[3]
    assert g.shape == (len(pos), 2) and g.dtype == np.float64
    h = 2e-3  # Å
    window, field = probe.shape[-2:], v.shape[-2:]
    origins = S._window_origins(pos, (SAMPLING, SAMPLING), window, field)[0]

    def central(d):
        for sign in (1, -1):  # the differences must not cross a half-pixel boundary
            moved = S._window_origins(pos + sign * h * d, (SAMPLING, SAMPLING), window, field)[0]
            np.testing.assert_array_equal(moved, origins)
        return (_loss(v, meas, probe, pos + h * d, kw) - _loss(v, meas, probe, pos - h * d, kw)) / (2 * h)

    scale = np.abs(g).max()
    assert scale > 0
    # each position's gradient separately (the batch of 3 splits the 4 positions 3 + 1): every component
    # is at least a third of the largest here, so each one is compared on its own
    for i in range(len(pos)):
        for a in range(2):
            e = np.zeros_like(pos)
            e[i, a] = 1.0
            fd = central(e)
            print(f"position {i},{a}: fd {fd:.6e} analytic {g[i, a]:.6e} rel {abs(fd - g[i, a]) / abs(g[i, a]):.2e}")
            assert fd == pytest.approx(g[i, a], rel=3e-3, abs=1e-4 * scale)
    for _ in range(3):  # random directions, at most 1 along any coordinate
        d = rng.uniform(-1.0, 1.0, pos.shape)
        fd = central(d)
        an = float((g * d).sum())
        print(f"position direction: fd {fd:.6e} analytic {an:.6e} rel {abs(fd - an) / abs(an):.2e}")
        assert fd == pytest.approx(an, rel=3e-3, abs=1e-4 * scale * np.abs(d).sum())


def test_position_newton_step_recovers_offset():
    """With the true object and probe, one Gauss–Newton step −H⁻¹∂L/∂ρ from ρ_true − δ lands near ρ_true."""
    sig = interaction_constant(E)
    v = _smooth_noise((1, 56, 56), 1.2, np.random.default_rng(5))
    v = (0.5 * v / np.abs(v).max() / sig).astype(np.float32)
    probe = S.make_probe_modes((32, 32), SAMPLING, E, 30.0, {"C10": -30.0})
    true = np.array([[4.0, 4.1], [4.53, 4.88], [5.1, 3.7]])
    meas = S.stem_scan(v, 3.0, energy_keV=E, sampling_A=SAMPLING, positions_A=true, probe=probe,
                       bandlimit_transmission=False, band_limit=None).patterns
    delta = np.array([[0.05, -0.04], [-0.03, 0.06], [0.04, 0.03]])
    out = S.stem_loss_and_gradient(v, meas, 3.0, energy_keV=E, sampling_A=SAMPLING, positions_A=true - delta,
                                   probe=probe, band_limit=None, return_position_curvature=True, amplitude_eps=1e-7)
    g, H = out[3], out[4]
    assert H.shape == (3, 2, 2)
    assert np.allclose(H, H.transpose(0, 2, 1))
    assert np.all(np.linalg.eigvalsh(H) > 0)
    step = -np.linalg.solve(H, g[..., None])[..., 0]
    err = np.abs(step - delta).max()
    print(f"Newton step error {err:.4f} Å for offsets up to {np.abs(delta).max()} Å")
    assert err < 0.2 * np.abs(delta).max()


def test_defaults_unchanged_without_new_options(problem):
    v, probe, pos, meas, kw = problem
    base = {k: kw[k] for k in ("energy_keV", "sampling_A", "complex_potential", "band_limit", "batch_size")}
    a = S.stem_loss_and_gradient(v, meas, 3.0, probe=probe, positions_A=pos, **base)
    b = S.stem_loss_and_gradient(v, meas, 3.0, probe=probe, positions_A=pos, return_position_gradient=True, **base)
    assert len(a) == 3
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[2], b[2])
    with pytest.raises(Exception, match="amplitude_eps"):
        S.stem_loss_and_gradient(v, meas, 3.0, probe=probe, positions_A=pos, amplitude_eps=-1.0, **base)
