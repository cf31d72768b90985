"""Finite-difference checks of the gradients MSP steps along (You 2025 Alg. 1), through the core's
``stem_loss_and_gradient``: complex slice potentials, mixed-state probe modes, probe positions
(the Fourier-shift-ramp derivative added for You's position refinement) and its Gauss–Newton curvature.

The engine is float32/complex64, so the central differences use steps large enough for float32
round-off and the directional derivatives are compared with a relative tolerance of 1 % (measured
errors are printed by ``-s``: ≲ 0.3 %).
"""

from __future__ import annotations

import numpy as np
import pytest

from tembench.physics import stem as S
from tembench.physics.constants import interaction_constant

E = 200.0
SAMPLING = 0.2
RNG = np.random.default_rng(11)


def _smooth_noise(shape, width_px, rng):
    k = np.fft.fftfreq(shape[-1])
    f = np.exp(-(k[:, None] ** 2 + k[None, :] ** 2) * (2 * np.pi * width_px) ** 2 / 2)
    return np.fft.ifft2(np.fft.fft2(rng.standard_normal(shape)) * f).real


@pytest.fixture(scope="module")
def problem():
    sig = interaction_constant(E)
    re = _smooth_noise((2, 56, 56), 1.5, RNG)
    re = 0.4 * re / np.abs(re).max() / sig  # ≤ 0.4 rad per slice
    im = 0.02 * np.abs(_smooth_noise((2, 56, 56), 1.5, RNG)) / sig
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


def test_complex_potential_gradient(problem):
    v, probe, pos, meas, kw = problem
    _, g, _ = S.stem_loss_and_gradient(v, meas, 3.0, probe=probe, positions_A=pos, **kw)
    assert g.shape == v.shape and np.iscomplexobj(g)
    for part in (1.0, 1j):  # real (phase) and imaginary (absorption) directions
        d = (part * RNG.standard_normal(v.shape)).astype(np.complex64)
        h = 2.0
        fd = (_loss(v + h * d, meas, probe, pos, kw) - _loss(v - h * d, meas, probe, pos, kw)) / (2 * h)
        an = float(np.real(np.vdot(g, d)))  # dL = Re Σ conj(g)·dV
        print(f"potential {part}: fd {fd:.6e} analytic {an:.6e} rel {abs(fd - an) / abs(an):.2e}")
        assert fd == pytest.approx(an, rel=1e-2)


def test_probe_mode_gradient(problem):
    v, probe, pos, meas, kw = problem
    _, _, gp = S.stem_loss_and_gradient(v, meas, 3.0, probe=probe, positions_A=pos, **kw)
    d = (probe * np.exp(1j * RNG.uniform(0, 2 * np.pi, probe.shape)) + 0.05 * np.abs(probe).max()
         * RNG.standard_normal(probe.shape)).astype(np.complex64)
    h = 0.002  # the amplitude loss is strongly curved where the probe is dark: the difference needs a small step
    fd = (_loss(v, meas, (probe + h * d).astype(np.complex64), pos, kw)
          - _loss(v, meas, (probe - h * d).astype(np.complex64), pos, kw)) / (2 * h)
    an = float(np.real(np.vdot(gp, d)))
    print(f"probe: fd {fd:.6e} analytic {an:.6e} rel {abs(fd - an) / abs(an):.2e}")
    assert fd == pytest.approx(an, rel=1e-2)


def test_position_gradient(problem):
    v, probe, pos, meas, kw = problem
    out = S.stem_loss_and_gradient(v, meas, 3.0, probe=probe, positions_A=pos, return_position_gradient=True, **kw)
    assert len(out) == 4
    g = out[3]
    assert g.shape == (len(pos), 2) and g.dtype == np.float64
    for _ in range(2):
        d = RNG.standard_normal(pos.shape)
        h = 0.01  # Å, well inside the current pixel
        fd = (_loss(v, meas, probe, pos + h * d, kw) - _loss(v, meas, probe, pos - h * d, kw)) / (2 * h)
        an = float((g * d).sum())
        print(f"position: fd {fd:.6e} analytic {an:.6e} rel {abs(fd - an) / abs(an):.2e}")
        assert fd == pytest.approx(an, rel=1e-2)
    # each position's gradient separately (the batch of 3 splits the 4 positions 3 + 1)
    for i in range(len(pos)):
        for a in range(2):
            e = np.zeros_like(pos)
            e[i, a] = 1.0
            fd = (_loss(v, meas, probe, pos + 0.01 * e, kw) - _loss(v, meas, probe, pos - 0.01 * e, kw)) / 0.02
            assert fd == pytest.approx(g[i, a], rel=2e-2, abs=1e-3 * np.abs(g).max())


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
