"""Issue 12: DPC/iCOM at very low dose say when the centre-of-mass field carries no signal (and do not trust a
rotation estimated from noise), as SSB does; the criterion's noise model is pinned on pure white noise."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from tembench.builtin.noise import PoissonDose
from tembench_pelz2022 import dpc, synthetic

STEP_A = 0.5


@pytest.fixture(scope="module")
def rotated_object():
    # smooth atoms (σ 0.8 Å, 1 rad) on a 32² scan, detector rotated 17°: DPC sees them clearly at 100 e/pattern
    phi = synthetic.gaussian_atoms_phase((32, 32), STEP_A, 20, 0.8, 1.0, np.random.default_rng(7))
    return phi, synthetic.simulate(phi, STEP_A, 1, 200.0, 25.0, rotation_deg=17.0).measurement


def _dose(m, electrons, seed=0):
    return PoissonDose().apply(m, PoissonDose.Params(electrons_per_pattern=electrons), np.random.default_rng(seed))


def test_com_signal_is_rayleigh_on_white_noise_and_sqrt_n_without_noise():
    # the noise model: independent Gaussian COM noise per probe position → the statistic is Rayleigh(1):
    # mean sqrt(π/2), P(z > 2) = e^-2
    rng = np.random.default_rng(1)
    z = np.array([dpc.com_signal(rng.normal(size=(32, 32)), rng.normal(size=(32, 32)), (0.5, 0.5))["sigmas"]
                  for _ in range(300)])
    assert z.mean() == pytest.approx(math.sqrt(math.pi / 2), abs=0.08)
    assert np.mean(z > 2.0) == pytest.approx(math.exp(-2.0), abs=0.05)
    # a curl-free field without noise (any rotation of it: the statistic does not depend on it): all its energy
    # in one eigenvalue, z = sqrt(n modes)
    phi = synthetic.gaussian_atoms_phase((32, 32), 0.5, 6, 1.0, 1.0, np.random.default_rng(2))
    qy, qx = dpc._freqs(phi.shape, (0.5, 0.5))
    f = np.fft.fft2(phi)
    gy, gx = np.real(np.fft.ifft2(1j * qy * f)), np.real(np.fft.ifft2(1j * qx * f))
    ry, rx = dpc.rotate_field(gy, gx, 40.0)
    s = dpc.com_signal(ry, rx, (0.5, 0.5))
    assert s["n_modes"] == 32 * 32 - 1 and s["sigmas"] == pytest.approx(math.sqrt(s["n_modes"]), rel=1e-6)
    # the band |q| ≤ 2π·2k0 holds fewer modes
    assert dpc.com_signal(ry, rx, (0.5, 0.5), k0_A_inv=0.5)["n_modes"] < s["n_modes"]


@pytest.mark.parametrize("cls", [dpc.DPC, dpc.ICOM])
def test_one_electron_per_pattern_warns_and_falls_back_to_zero_rotation(rotated_object, cls):
    _, m = rotated_object
    noisy = _dose(m, 1)
    with pytest.warns(UserWarning, match=r"no signal above the shot noise at [0-9.]+ e/pattern.*needs 4.*rotation_deg=0"):
        rec = cls().reconstruct(noisy, cls.Params(n_iter=8) if cls is dpc.DPC else cls.Params(), np)
    e = rec.extras
    assert e["com_signal"]["detected"] is False and e["com_signal"]["sigmas"] < dpc.COM_SIGNAL_MIN_SIGMAS
    assert e["com_signal"]["dose_per_pattern"] == pytest.approx(1.0, abs=0.05)
    assert e["rotation_estimated"] is False and e["rotation_deg"] == 0.0 and e["transpose"] is False
    assert np.all(np.isfinite(rec.data))
    # rotation given: the data still hold no signal (warned), but nothing about the rotation
    with pytest.warns(UserWarning, match="no signal") as rec_w:
        given = cls().reconstruct(noisy, cls.Params(rotation_deg=17.0), np)
    assert not any("rotation cannot" in str(w.message) for w in rec_w)
    assert given.extras["rotation_deg"] == 17.0 and "rotation_estimated" not in given.extras


@pytest.mark.parametrize("cls", [dpc.DPC, dpc.ICOM])
def test_hundred_electrons_per_pattern_does_not_warn(rotated_object, cls):
    phi, m = rotated_object
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        rec = cls().reconstruct(_dose(m, 100), cls.Params(), np)
    e = rec.extras
    assert e["com_signal"]["detected"] is True and e["com_signal"]["sigmas"] > 1.5 * dpc.COM_SIGNAL_MIN_SIGMAS  # measured 6.8–9.5 over 6 draws
    assert e["com_signal"]["dose_per_pattern"] == pytest.approx(100.0, rel=0.05)
    assert e["rotation_estimated"] is True
    assert abs((e["rotation_deg"] - 17.0 + 180.0) % 360.0 - 180.0) < 8.0


def test_dark_field_correlation_counts_as_signal_and_noise_does_not():
    # a blind-noise COM field (curl-free excess ~ Rayleigh) whose integrated phase matches the dark-field image:
    # the linear statistic √N·|r| finds it; an independent dark-field image does not (N(0, 1))
    rng = np.random.default_rng(5)
    gy, gx = rng.normal(size=(2, 32, 32))
    o = dpc.resolve_orientation(gy, gx, (0.5, 0.5), 0.0, False)
    phase = dpc.icom(o["gy"], o["gx"], (0.5, 0.5))
    matched = dpc.com_signal_check(gy, gx, (0.5, 0.5), None, o, dark_field=phase + rng.normal(size=phase.shape) * phase.std())
    assert matched["detected"] and matched["dark_field_sigmas"] > 10 and matched["sigmas"] < dpc.COM_SIGNAL_MIN_SIGMAS
    z = [dpc.com_signal_check(gy, gx, (0.5, 0.5), None, o, dark_field=rng.normal(size=(32, 32)))["dark_field_sigmas"]
         for _ in range(200)]
    assert np.mean(z) == pytest.approx(math.sqrt(2 / math.pi), abs=0.1)  # |N(0, 1)|
    assert dpc.com_signal_check(gy, gx, (0.5, 0.5), None, o)["dark_field_sigmas"] is None
