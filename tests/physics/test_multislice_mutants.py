"""Gaps in the multislice tests found by running the multislice.py mutants the first mutation run never
reached (issue 18 part 6; docs/testing.md): non-square grids, stacks longer than one transmission chunk,
repeated slices with non-default band-limit options, batches of waves and of potentials. The reference is
a plain numpy multislice written out here from the module's convention
ψ_{m+1} = F⁻¹{exp(−iπλΔz_m k²) F{t_m ψ_m}}, t_m = exp(iσ v_m) (no band limit), not the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest

from tembench.errors import TembenchError
from tembench.physics import multislice as M
from tembench.physics.constants import interaction_constant, wavelength_A

E = 300.0


def _reference(wave, potentials, dz, sampling):
    """Plain complex128 multislice without band limit (the module docstring's convention)."""
    lam, sig = wavelength_A(E), interaction_constant(E)
    ny, nx = potentials.shape[-2:]
    k2 = np.fft.fftfreq(ny, sampling[0])[:, None] ** 2 + np.fft.fftfreq(nx, sampling[1])[None, :] ** 2
    psi = np.asarray(wave, np.complex128)
    for v, d in zip(potentials, np.broadcast_to(dz, (len(potentials),))):
        psi = np.fft.ifft2(np.exp(-1j * np.pi * lam * d * k2) * np.fft.fft2(np.exp(1j * sig * v) * psi))
    return psi


def _smooth_stack(rng, n, shape, sampling, vmax=6.0):
    """n smooth random slices (V·Å) on a (ny, nx) grid: σ·v up to ~0.05 rad per slice."""
    ky = np.fft.fftfreq(shape[-2], sampling[0])[:, None]
    kx = np.fft.fftfreq(shape[-1], sampling[1])[None, :]
    f = np.exp(-(ky**2 + kx**2) / (2 * 0.8**2))
    v = np.fft.ifft2(np.fft.fft2(rng.standard_normal((n,) + tuple(shape))) * f).real
    return (vmax * v / np.abs(v).max()).astype(np.float32)


def _incident(rng, shape):
    w = 1.0 + 0.1 * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))
    return w.astype(np.complex64)


def test_multislice_on_a_non_square_grid_matches_the_written_out_reference():
    rng = np.random.default_rng(21)
    shape, s = (24, 40), (0.21, 0.17)
    v = _smooth_stack(rng, 5, shape, s)
    dz = np.array([1.0, 2.5, 0.7, 2.0, 1.3])
    wave = _incident(rng, shape)
    r = M.multislice(wave, dz, energy_keV=E, sampling_A=s, potentials=v, band_limit=None,
                     bandlimit_transmission=False)
    assert r.waves is None   # waves are kept only on request
    want = _reference(wave, v, dz, s)
    np.testing.assert_allclose(r.exit_wave, want, atol=2e-5 * np.abs(want).max())


def test_a_stack_longer_than_one_transmission_chunk():
    """70 slices on a small grid span two chunks of transmissions (64 + 6)."""
    rng = np.random.default_rng(22)
    shape, s = (16, 20), (0.2, 0.2)
    n = 70
    assert M.TRANSMISSION_CHUNK_BYTES // (8 * shape[0] * shape[1]) >= 64   # so the chunk is 64 slices
    v = _smooth_stack(rng, n, shape, s, vmax=2.0)
    wave = _incident(rng, shape)
    r = M.multislice(wave, 0.8, energy_keV=E, sampling_A=s, potentials=v, band_limit=None,
                     bandlimit_transmission=False, keep_waves=True)
    want = _reference(wave, v, 0.8, s)
    np.testing.assert_allclose(r.exit_wave, want, atol=5e-5 * np.abs(want).max())
    assert r.waves.shape == (n,) + shape
    np.testing.assert_allclose(r.waves[-1], _reference(wave, v[:-1], 0.8, s), atol=5e-5 * np.abs(want).max())
    # with a band limit (the default, and a narrower one): the same as propagating the stack's precomputed
    # transmissions
    for bl in ({}, {"band_limit": 0.5}):
        a = M.multislice(wave, 0.8, energy_keV=E, sampling_A=s, potentials=v, **bl).exit_wave
        t = M.transmission_functions(v, energy_keV=E, sampling_A=s, **bl)
        b = M.multislice(wave, 0.8, energy_keV=E, sampling_A=s, transmissions=t, **bl).exit_wave
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("band", [dict(band_limit=None, bandlimit_transmission=False),
                                  dict(band_limit=0.5, bandlimit_transmission=True),
                                  dict(band_limit=0.5, bandlimit_transmission=False)])
def test_repeated_slices_give_what_their_transmissions_give(band):
    """A crystal-like stack (3 distinct slices repeated, computed once each) = the same stack's
    transmissions computed slice by slice with the same options, for each band-limit option."""
    rng = np.random.default_rng(23)
    shape, s = (20, 28), (0.19, 0.16)
    u = _smooth_stack(rng, 3, shape, s)
    v = u[[0, 1, 2, 0, 1, 2, 1, 0]]
    wave = _incident(rng, shape)
    got = M.multislice(wave, 1.5, energy_keV=E, sampling_A=s, potentials=v, **band).exit_wave
    t = np.stack([M.transmission_functions(v[i:i + 1], energy_keV=E, sampling_A=s,
                                           bandlimit_transmission=band["bandlimit_transmission"],
                                           band_limit=band["band_limit"])[0] for i in range(len(v))])
    want = M.multislice(wave, 1.5, energy_keV=E, sampling_A=s, transmissions=t,
                        band_limit=band["band_limit"]).exit_wave
    np.testing.assert_allclose(got, want, atol=1e-5)
    if band["band_limit"] is None:
        np.testing.assert_allclose(got, _reference(wave, v, 1.5, s), atol=3e-5)


def test_batches_of_waves_and_of_potentials_are_stacks_of_single_runs():
    """A batch of waves (B, ny, nx) through one stack, and one wave through a stack with a batch axis
    (n, B, ny, nx), give the single runs stacked."""
    rng = np.random.default_rng(24)
    shape, s = (18, 26), (0.2, 0.15)
    v = _smooth_stack(rng, 3, shape, s)
    waves = np.stack([_incident(rng, shape) for _ in range(3)])
    kw = dict(energy_keV=E, sampling_A=s, band_limit=None, bandlimit_transmission=False)
    batch = M.multislice(waves, 1.2, potentials=v, **kw).exit_wave
    assert batch.shape == (3,) + shape
    for i in range(3):
        np.testing.assert_allclose(batch[i], _reference(waves[i], v, 1.2, s), atol=2e-5)
    vb = np.stack([v, 0.5 * v[::-1], -v], axis=1)   # (n, B, ny, nx)
    out = M.multislice(waves[0], 1.2, potentials=vb, **kw).exit_wave
    assert out.shape == (3,) + shape
    for i in range(3):
        np.testing.assert_allclose(out[i], _reference(waves[0], vb[:, i], 1.2, s), atol=2e-5)


def test_multislice_refusals():
    v = np.zeros((2, 16, 20), np.float32)
    w = np.ones((16, 20), np.complex64)
    kw = dict(energy_keV=E, sampling_A=0.2)
    with pytest.raises(TembenchError, match="exactly one of potentials or transmissions"):
        M.multislice(w, 1.0, **kw)
    with pytest.raises(TembenchError, match="exactly one of potentials or transmissions"):
        M.multislice(w, 1.0, potentials=v, transmissions=v.astype(np.complex64), **kw)
    with pytest.raises(TembenchError, match=r"wave grid \(16, 18\) differs from slice grid \(16, 20\)"):
        M.multislice(np.ones((16, 18), np.complex64), 1.0, potentials=v, **kw)


def test_duplicate_slices_finds_exactly_the_bitwise_repeats():
    """rep[m] = the first index whose slice is bitwise identical to slice m (its docstring): also for two
    slices, and a slice differing from an earlier one in a single value (one the sampled signature may
    skip) is not a repeat."""
    rng = np.random.default_rng(25)
    a, b, c = (rng.standard_normal((30, 40)).astype(np.float32) for _ in range(3))
    near = a.copy()
    near[0, 1] += 1.0          # not on the signature's sample grid (every 4th value of the 1200)
    np.testing.assert_array_equal(M.duplicate_slices(np.stack([a, b, a, c, b, near, c, a])), [0, 1, 0, 3, 1, 5, 3, 0])
    np.testing.assert_array_equal(M.duplicate_slices(np.stack([a, a])), [0, 0])
    np.testing.assert_array_equal(M.duplicate_slices(np.stack([a, near])), [0, 1])
    np.testing.assert_array_equal(M.duplicate_slices(a[None]), [0])


def test_transmission_functions_band_limit_by_default_and_for_complex_potentials():
    """Band-limited by default; a complex potential with zero imaginary part gives the real potential's
    transmissions on the band-limited path too, also over more than one chunk of slices; an imaginary part
    (absorption) lowers |t| where it is positive."""
    rng = np.random.default_rng(26)
    shape, s = (16, 20), (0.2, 0.2)
    v = (20.0 * rng.standard_normal((70,) + shape)).astype(np.float32)   # white: the band limit matters
    kw = dict(energy_keV=E, sampling_A=s)
    default = M.transmission_functions(v, **kw)
    np.testing.assert_array_equal(default, M.transmission_functions(v, bandlimit_transmission=True, **kw))
    plain = M.transmission_functions(v, bandlimit_transmission=False, **kw)
    assert np.abs(default - plain).max() > 0.01
    np.testing.assert_allclose(plain, np.exp(1j * interaction_constant(E) * v.astype(np.float64)), atol=2e-6)
    vc = v.astype(np.complex64)
    np.testing.assert_allclose(M.transmission_functions(vc, **kw), default, atol=2e-6)
    absorb = M.transmission_functions((v + 1j * np.abs(v)).astype(np.complex64), bandlimit_transmission=False, **kw)
    np.testing.assert_allclose(np.abs(absorb), np.exp(-interaction_constant(E) * np.abs(v)), rtol=1e-5)
    assert M.propagator_cache(shape, s, E) is M.propagator_cache(shape, s, E, "fresnel")   # the default kind


@pytest.mark.parametrize("bandlimit_transmission", [True, False])
def test_backward_gradient_of_a_complex_potential_against_finite_differences(bandlimit_transmission):
    """multislice_backward(complex_potential=True) returns g = 2∂L/∂v* with dL = Re Σ conj(g)·dv, along the
    phase (real) and absorption (imaginary) directions, for L = Σ|ψ_exit − target|²."""
    rng = np.random.default_rng(27)
    shape, s = (20, 24), (0.2, 0.2)
    v = (_smooth_stack(rng, 3, shape, s) + 0.3j * np.abs(_smooth_stack(rng, 3, shape, s))).astype(np.complex64)
    wave = _incident(rng, shape)
    target = _incident(rng, shape)
    kw = dict(energy_keV=E, sampling_A=s, bandlimit_transmission=bandlimit_transmission)

    def loss(x):
        psi = M.multislice(wave, 1.5, potentials=x, **kw).exit_wave.astype(np.complex128)
        return float(np.sum(np.abs(psi - target) ** 2))

    r = M.multislice(wave, 1.5, potentials=v, keep_waves=True, **kw)
    g, _ = M.multislice_backward(2 * (r.exit_wave - target), r.waves, 1.5, potentials=v, complex_potential=True, **kw)
    assert g.dtype == np.complex64
    for part in (1.0, 1j):
        d = (part * rng.standard_normal(v.shape)).astype(np.complex64)
        h = 0.05
        fd = (loss(v + h * d) - loss(v - h * d)) / (2 * h)
        terms = np.real(np.conj(g) * d).astype(np.float64)
        assert fd == pytest.approx(terms.sum(), abs=2e-3 * np.abs(terms).sum())


def test_hrtem_options_reach_the_multislice_and_a_batch_of_exit_waves_is_imaged_wave_by_wave():
    """hrtem_exit_wave passes its transmission option on (= multislice of a plane wave with it) and keeps no
    waves unless asked; image_waves of a batch of exit waves (B, ny, nx) is (n_defocus, B, ny, nx), each the
    image of its own wave; a negative slice thickness is refused."""
    rng = np.random.default_rng(28)
    shape, s = (20, 24), (0.2, 0.17)
    v = (20.0 * rng.standard_normal((2,) + shape)).astype(np.float32)
    kw = dict(energy_keV=E, sampling_A=s)
    for bt in (True, False):
        r = M.hrtem_exit_wave(v, 1.5, bandlimit_transmission=bt, **kw)
        assert r.waves is None
        want = M.multislice(np.ones(shape, np.complex64), 1.5, potentials=v, bandlimit_transmission=bt, **kw)
        np.testing.assert_allclose(r.exit_wave, want.exit_wave, atol=1e-6)
    assert M.hrtem_exit_wave(v, 1.5, keep_waves=True, **kw).waves.shape == (2,) + shape
    h = M.defocus_ctfs(shape, s, E, [0.0, 80.0, -40.0], {"C30": 5e4}, 20.0)
    waves = np.stack([_incident(rng, shape) for _ in range(2)])
    got = M.image_waves(waves, h)
    assert got.shape == (3, 2) + shape
    for b in range(2):
        np.testing.assert_allclose(got[:, b], M.image_waves(waves[b], h), atol=1e-6)
        np.testing.assert_allclose(got[:, b], np.fft.ifft2(h * np.fft.fft2(waves[b])), atol=2e-6)
    with pytest.raises(TembenchError, match="slice_thickness_A must be >= 0"):
        M.multislice(np.ones(shape, np.complex64), [1.0, -0.5], potentials=v, **kw)


@pytest.mark.parametrize("bandlimit_transmission, band_limit", [(True, 2 / 3), (False, 2 / 3), (True, 0.5)])
def test_hrtem_gradient_with_either_transmission_option_against_finite_differences(bandlimit_transmission,
                                                                                    band_limit):
    """The HRTEM loss gradient w.r.t. the slices with and without the band limit on t, and with a narrower
    band limit (the backward pass must use the forward's options), along a direction aligned with the
    gradient and a random one."""
    rng = np.random.default_rng(29)
    shape, s = (24, 20), (0.2, 0.2)
    v = (30.0 * rng.standard_normal((3,) + shape)).astype(np.float32)   # white: the band limit on t matters
    kw = dict(energy_keV=E, sampling_A=s, defocus_values_A=[0.0, 120.0], aberrations={"C30": 1e5},
              bandlimit_transmission=bandlimit_transmission, band_limit=band_limit)
    meas = M.hrtem_images(1.3 * v + 2.0, 1.5, **kw)
    loss, g = M.hrtem_loss_and_gradient(v, meas, 1.5, **kw)
    for d in (np.sign(g) * rng.uniform(0.5, 1.5, v.shape), rng.standard_normal(v.shape)):
        d = d.astype(np.float32)
        h = 0.05
        fd = (M.hrtem_loss_and_gradient(v + h * d, meas, 1.5, **kw)[0]
              - M.hrtem_loss_and_gradient(v - h * d, meas, 1.5, **kw)[0]) / (2 * h)
        terms = (g * d).astype(np.float64)
        assert fd == pytest.approx(terms.sum(), rel=5e-3, abs=2e-3 * np.abs(terms).sum())
