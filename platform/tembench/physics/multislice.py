"""Multislice wave propagation (Ren 2020 Alg. 1, You 2025 eqs 5–6), its adjoint (Ren Alg. 2) and
plane-wave HRTEM image formation with the amplitude loss (Ren eq 5) and its gradient.

Conventions
-----------
* One step is ψ_{m+1} = P_{Δz_m}{t_m ψ_m} with t_m = exp(iσ v_m) (v in V·Å, σ in rad/(V·Å));
  the last slice is also followed by its propagation, so the exit plane is the bottom of the stack.
* Waves are complex64 (…, ny, nx); a leading batch axis is allowed everywhere.
* Gradients are returned as g = 2 ∂L/∂z* for complex z, so that dL = Re Σ conj(g)·dz; for a real
  potential the gradient is g_v = Re(−iσ conj(t) g_t) = ∂L/∂v.
* HRTEM image at defocus Δf: ψ_j = F⁻¹{H_j F{ψ_exit}} with H_j the CTF of the objective for
  aberrations ∪ {C10: C10 − Δf_j} (Δf = −C10, see :mod:`tembench.physics.optics`); I_j = |ψ_j|².
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from tembench.backend import fft2, get_array_module, ifft2, plan_fft2, plan_pruned_fft2
from tembench.errors import TembenchError
from tembench.physics.constants import interaction_constant, wavelength_A
from tembench.physics.grid import check_gpts, check_sampling, spatial_frequencies
from tembench.physics.optics import ctf, normalize_aberrations
from tembench.physics.propagation import DEFAULT_BAND_LIMIT, PropagatorCache


# --- transmission ---------------------------------------------------------------------------
def transmission_function(potential_VA, sigma: float, xp=None, out=None):
    """t = exp(iσv) (complex64) for real or complex v (…, ny, nx) in V·Å.

    Real input uses float32 cos/sin into the real and imaginary parts (≈20× faster than complex
    exp); a complex v (imaginary part = absorption) uses the general exponential.
    """
    xp = xp or get_array_module(potential_VA)
    v = potential_VA
    if xp.iscomplexobj(v):
        t = xp.exp(1j * sigma * v.astype(xp.complex64))
        if out is not None:
            out[...] = t
            return out
        return t.astype(xp.complex64)
    if out is None:
        out = xp.empty(v.shape, dtype=xp.complex64)
    phase = (v * np.float32(sigma)).astype(xp.float32, copy=False)
    parts = out.view(xp.float32).reshape(v.shape + (2,))
    xp.cos(phase, out=parts[..., 0])
    xp.sin(phase, out=parts[..., 1])
    return out


def transmission_gradient(grad_t, t, sigma: float, complex_potential: bool = False):
    """Chain rule through t = exp(iσv): g_v = −iσ conj(t) g_t (real part for a real potential)."""
    g = (-1j * sigma) * (t.conj() * grad_t)
    return g if complex_potential else g.real


def bandlimit(array, mask):
    """ifft2(fft2(array)·mask) over the last two axes."""
    return ifft2(fft2(array) * mask)


def _slice_transmission(v, sigma, t_plan, mask, xp):
    """t = exp(iσv) of one slice in ``t_plan.buffer``, band-limited by ``mask`` if given (planned FFTs)."""
    if xp.iscomplexobj(v):
        t_plan.buffer[...] = transmission_function(v, sigma, xp)
    else:
        transmission_function(v, sigma, xp, out=t_plan.buffer)
    if mask is not None:
        buf = t_plan.forward()
        buf *= mask
        t_plan.inverse()
    return t_plan.buffer


def transmission_functions(potentials, *, energy_keV: float, sampling_A, bandlimit_transmission: bool = True,
                           band_limit: float | None = DEFAULT_BAND_LIMIT, xp=None, out=None):
    """Precomputed t_m = exp(iσv_m) for a slice stack (n, ny, nx) complex64, band-limited by default.

    Reuse them when the same potential is propagated many times (4D-STEM probes, several tilts of
    the beam); pass to :func:`multislice` as ``transmissions``. The band limit runs as batched,
    planned FFTs over chunks of slices.
    """
    xp = xp or get_array_module(potentials)
    sigma = interaction_constant(energy_keV)
    n = potentials.shape[0]
    t = out if out is not None else xp.empty(potentials.shape, dtype=xp.complex64)
    if not bandlimit_transmission:
        return transmission_function(potentials, sigma, xp, out=t)
    plane = int(np.prod(potentials.shape[1:]))
    chunk = max(1, min(64, TRANSMISSION_CHUNK_BYTES // (8 * plane)))  # fixed: one FFT plan per grid
    if n < chunk:  # short stacks (e.g. the distinct slices of a crystal): a power-of-two batch, few plans
        chunk = 1 << (n - 1).bit_length()
    props = propagator_cache(potentials.shape[-2:], sampling_A, energy_keV, "fresnel", band_limit, (0.0, 0.0), xp)
    mask = props.mask() * np.float32(1.0 / plane)  # the inverse FFT's 1/N folded in
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        plan = plan_pruned_fft2((chunk,) + tuple(potentials.shape[1:]), props.kept_columns(), xp=xp,
                                tag="transmission-stack")
        if c1 - c0 < chunk:
            plan.buffer[c1 - c0:] = 0
        if xp.iscomplexobj(potentials):
            plan.buffer[: c1 - c0] = transmission_function(potentials[c0:c1], sigma, xp)
        else:
            transmission_function(potentials[c0:c1], sigma, xp, out=plan.buffer[: c1 - c0])
        buf = plan.forward_pruned()
        buf *= mask
        t[c0:c1] = plan.inverse_pruned()[: c1 - c0]
    return t


# Slices band-limited together in :func:`transmission_functions` (bytes of complex64 per chunk).
TRANSMISSION_CHUNK_BYTES = 2 * 2**20
# Transmissions of repeated slices are computed once and kept while they fit in this many bytes.
DEDUP_CACHE_BYTES = 256 * 2**20


def duplicate_slices(stack):
    """For each slice m of ``stack`` (n, …), the first index whose slice is bitwise identical.

    Crystals without frozen phonons repeat a few distinct slices many times; their transmission
    functions (exp, two FFTs) are then computed once. Slices are grouped by a sample of their
    values and every match is confirmed by an exact comparison of the whole slice, so only truly
    identical slices share work (a result is identical to computing them one by one).
    """
    xp = get_array_module(stack)
    n = stack.shape[0]
    rep = np.arange(n)
    if n < 2:
        return rep
    flat = stack.reshape(n, -1)
    step = max(1, flat.shape[1] // 256)
    sample = xp.ascontiguousarray(flat[:, ::step])
    if xp is not np:  # pragma: no cover - GPU
        sample = sample.get()
    groups: dict[bytes, list[int]] = {}
    for m in range(n):
        cands = groups.setdefault(sample[m].tobytes(), [])
        for r in cands:
            if bool(xp.array_equal(flat[r], flat[m])):
                rep[m] = r
                break
        else:
            cands.append(m)
    return rep


# --- propagator caches ----------------------------------------------------------------------
@lru_cache(maxsize=32)
def _propagators(gpts, sampling, wavelength, kind, band_limit, tilt, xp_name):
    xp = get_array_module("gpu" if xp_name == "cupy" else "cpu")
    return PropagatorCache(gpts, sampling, wavelength, kind, band_limit, tilt, xp)


def propagator_cache(gpts, sampling_A, energy_keV: float, kind: str = "fresnel",
                     band_limit: float | None = DEFAULT_BAND_LIMIT, tilt_mrad=(0.0, 0.0), xp=np) -> PropagatorCache:
    """Shared :class:`PropagatorCache` for a grid/energy (module-level cache)."""
    return _propagators(check_gpts(gpts), check_sampling(sampling_A), wavelength_A(energy_keV), kind,
                        None if band_limit is None else float(band_limit),
                        tuple(float(t) for t in tilt_mrad), xp.__name__)


def _thicknesses(slice_thickness_A, n_slices: int) -> np.ndarray:
    dz = np.broadcast_to(np.asarray(slice_thickness_A, dtype=np.float64), (n_slices,))
    if np.any(dz < 0):
        raise TembenchError(f"slice_thickness_A must be >= 0 Å; got {slice_thickness_A}")
    return dz


# --- multislice -----------------------------------------------------------------------------
@dataclass
class MultisliceResult:
    """Exit wave (…, ny, nx) and, if kept, the wave entering each slice ψ_m (n_slices, …, ny, nx)."""

    exit_wave: object
    waves: object | None = None


def multislice(wave, slice_thickness_A, *, energy_keV: float, sampling_A, potentials=None, transmissions=None,
               propagator: str = "fresnel", band_limit: float | None = DEFAULT_BAND_LIMIT,
               bandlimit_transmission: bool = True, tilt_mrad=(0.0, 0.0), keep_waves: bool = False,
               xp=None) -> MultisliceResult:
    """Propagate ``wave`` (…, ny, nx) through a stack of slices (Ren 2020 Alg. 1, lines 1–5).

    Give either ``potentials`` (n, ny, nx) or (n, …, ny, nx) in V·Å, real or complex, or precomputed
    ``transmissions`` of the same shape (complex64, e.g. from :func:`transmission_functions`, used
    as given). ``slice_thickness_A`` is a scalar or one value per slice. ``bandlimit_transmission``
    (default) band-limits each t computed from a potential, as Kirkland and abTEM do: two more FFTs
    per slice, but without it coarse grids alias (48 Å Si at 0.5 Å: 1.6 % exit-wave error).
    ``keep_waves`` stores ψ_m for :func:`multislice_backward`.
    """
    xp = xp or get_array_module(wave)
    if (potentials is None) == (transmissions is None):
        raise TembenchError("multislice: give exactly one of potentials or transmissions")
    stack = potentials if transmissions is None else transmissions
    n = stack.shape[0]
    dz = _thicknesses(slice_thickness_A, n)
    gpts = tuple(wave.shape[-2:])
    if tuple(stack.shape[-2:]) != gpts:
        raise TembenchError(f"multislice: wave grid {gpts} differs from slice grid {tuple(stack.shape[-2:])}")
    props = propagator_cache(gpts, sampling_A, energy_keV, propagator, band_limit, tilt_mrad, xp)
    # column FFTs only where the band-limited propagator is non-zero (see PrunedFFT2Plan)
    plan = plan_pruned_fft2(np.broadcast_shapes(wave.shape, stack.shape[1:]), props.kept_columns(), xp=xp)
    plan.buffer[...] = wave
    inv_n = 1.0 / (gpts[0] * gpts[1])
    waves = xp.empty((n,) + plan.shape, dtype=xp.complex64) if keep_waves else None
    # transmissions are made a chunk of slices at a time (batched FFTs, little per-slice overhead)
    plane = int(np.prod(stack.shape[1:]))
    chunk = max(1, min(64, TRANSMISSION_CHUNK_BYTES // (8 * plane)))
    t_chunk = None
    t_unique, slot = None, None
    if transmissions is None and n > 1:
        rep = duplicate_slices(potentials)
        unique = np.flatnonzero(rep == np.arange(n))
        if unique.size < n and unique.size * plane * 8 <= DEDUP_CACHE_BYTES:
            # repeated slices (crystals): each distinct transmission is computed once
            t_unique = transmission_functions(potentials[unique], energy_keV=energy_keV, sampling_A=sampling_A,
                                              bandlimit_transmission=bandlimit_transmission,
                                              band_limit=band_limit, xp=xp)
            slot = np.searchsorted(unique, rep)
    for m in range(n):
        if keep_waves:
            waves[m] = plan.buffer
        if transmissions is not None:
            t = transmissions[m]
        elif t_unique is not None:
            t = t_unique[slot[m]]
        else:
            if m % chunk == 0:
                c1 = min(n, m + chunk)
                t_chunk = transmission_functions(potentials[m:c1], energy_keV=energy_keV, sampling_A=sampling_A,
                                                 bandlimit_transmission=bandlimit_transmission,
                                                 band_limit=band_limit, xp=xp,
                                                 out=None if t_chunk is None or c1 - m != chunk else t_chunk)
            t = t_chunk[m % chunk]
        buf = plan.buffer
        xp.multiply(buf, t, out=buf)
        buf = plan.forward_pruned()
        xp.multiply(buf, props.scaled(dz[m], inv_n), out=buf)  # the inverse FFT's 1/N folded in
        plan.inverse_pruned()
    return MultisliceResult(exit_wave=plan.buffer.copy(), waves=waves)


def multislice_backward(grad_exit, waves, slice_thickness_A, *, energy_keV: float, sampling_A, potentials=None,
                        transmissions=None, propagator: str = "fresnel",
                        band_limit: float | None = DEFAULT_BAND_LIMIT, bandlimit_transmission: bool = True,
                        tilt_mrad=(0.0, 0.0), complex_potential: bool = False, xp=None):
    """Adjoint of :func:`multislice` (Ren 2020 Alg. 2): gradients w.r.t. every slice and the incident wave.

    ``grad_exit`` = 2 ∂L/∂ψ_exit* (…, ny, nx); ``waves`` = ψ_m from ``multislice(keep_waves=True)``.
    Returns ``(grad_potentials, grad_incident)``: grad_potentials has the shape of the waves stack
    (n, …, ny, nx), float32 ∂L/∂v (complex 2∂L/∂v* if ``complex_potential``); sum over a batch
    axis yourself if the slices were shared (broadcast) across the batch.
    """
    xp = xp or get_array_module(grad_exit)
    stack = potentials if transmissions is None else transmissions
    n = stack.shape[0]
    dz = _thicknesses(slice_thickness_A, n)
    gpts = tuple(grad_exit.shape[-2:])
    sigma = interaction_constant(energy_keV)
    props = propagator_cache(gpts, sampling_A, energy_keV, propagator, band_limit, tilt_mrad, xp)
    plan = plan_fft2(waves.shape[1:], xp=xp)
    plan.buffer[...] = grad_exit
    t_plan = plan_fft2(stack.shape[1:], xp=xp, tag="transmission") if transmissions is None else None
    grads = xp.empty(waves.shape, dtype=xp.complex64 if complex_potential else xp.float32)
    for m in range(n - 1, -1, -1):
        buf = plan.forward()
        xp.multiply(buf, props(dz[m]).conj(), out=buf)
        g_tpsi = plan.inverse()  # gradient w.r.t. the product t_m ψ_m
        if transmissions is not None:
            t = transmissions[m]
        else:
            t = _slice_transmission(potentials[m], sigma, t_plan, props.mask() if bandlimit_transmission else None,
                                    xp)
        g_t = waves[m].conj() * g_tpsi
        if bandlimit_transmission and transmissions is None:
            g_t = bandlimit(g_t, props.mask())  # the mask is real and symmetric: self-adjoint
            t_raw = transmission_function(potentials[m], sigma, xp)
            grads[m] = transmission_gradient(g_t, t_raw, sigma, complex_potential)
        else:
            grads[m] = transmission_gradient(g_t, t, sigma, complex_potential)
        xp.multiply(g_tpsi, t.conj(), out=plan.buffer)
    return grads, plan.buffer.copy()


# --- plane-wave HRTEM -----------------------------------------------------------------------
def plane_wave(gpts, xp=np):
    """Unit-amplitude plane wave (ny, nx) complex64: |ψ|² = 1 per pixel (the flux contract)."""
    return xp.ones(check_gpts(gpts), dtype=xp.complex64)


def defocus_ctfs(gpts, sampling_A, energy_keV: float, defocus_values_A, aberrations: dict | None = None,
                 semiangle_mrad: float | None = None, xp=np):
    """Objective transfer functions H_j (n_defocus, ny, nx) complex64 for defocus Δf_j (Δf = −C10)."""
    lam = wavelength_A(energy_keV)
    ky, kx = spatial_frequencies(gpts, sampling_A, xp=xp, dtype=np.float64)
    base = normalize_aberrations(aberrations)
    out = xp.empty((len(defocus_values_A),) + check_gpts(gpts), dtype=xp.complex64)
    for j, df in enumerate(defocus_values_A):
        ab = dict(base)
        ab["C10"] = base.get("C10", 0.0) - float(df)
        out[j] = ctf(ky, kx, lam, ab, semiangle_mrad)
    return out


def image_waves(exit_wave, ctfs):
    """ψ_j = F⁻¹{H_j F{ψ_exit}} for each transfer function: (n_defocus, …, ny, nx)."""
    xp = get_array_module(exit_wave)
    spec = fft2(exit_wave)
    h = ctfs.reshape((ctfs.shape[0],) + (1,) * (exit_wave.ndim - 2) + ctfs.shape[-2:])
    return ifft2(h * spec[None]).astype(xp.complex64)


def image_waves_adjoint(grad_waves, ctfs):
    """Adjoint of :func:`image_waves`: Σ_j F⁻¹{conj(H_j) F{g_j}}."""
    xp = get_array_module(grad_waves)
    h = ctfs.reshape((ctfs.shape[0],) + (1,) * (grad_waves.ndim - 3) + ctfs.shape[-2:])
    return ifft2((h.conj() * fft2(grad_waves)).sum(axis=0)).astype(xp.complex64)


def amplitude_loss(predicted_wave, measured_intensity, eps: float = 1e-12):
    """Ren 2020 eq 5 / You 2025 eq 16: L = Σ (|ψ| − √I)² and g = 2∂L/∂ψ* = 2(ψ − √I ψ/|ψ|).

    Returns ``(loss, grad)``; loss is a Python float (summed in float64).
    """
    xp = get_array_module(predicted_wave)
    amp = xp.abs(predicted_wave)
    sqrt_i = xp.sqrt(xp.maximum(measured_intensity, 0))
    resid = amp - sqrt_i
    loss = float(xp.sum(resid.astype(xp.float64) ** 2))
    grad = 2.0 * predicted_wave * (resid / xp.maximum(amp, eps))
    return loss, grad.astype(xp.complex64)


def intensity_amplitude_loss(predicted_intensity, measured_intensity, eps: float = 1e-12):
    """L = Σ (√Î − √I)² on intensities, and dL/dÎ = (√Î − √I)/√Î (for incoherent sums/binning)."""
    xp = get_array_module(predicted_intensity)
    sp = xp.sqrt(xp.maximum(predicted_intensity, 0))
    resid = sp - xp.sqrt(xp.maximum(measured_intensity, 0))
    loss = float(xp.sum(resid.astype(xp.float64) ** 2))
    return loss, (resid / xp.maximum(sp, eps)).astype(xp.float32)


def hrtem_exit_wave(potentials, slice_thickness_A, *, energy_keV: float, sampling_A, incident=None,
                    propagator: str = "fresnel", band_limit: float | None = DEFAULT_BAND_LIMIT,
                    bandlimit_transmission: bool = True, tilt_mrad=(0.0, 0.0), keep_waves: bool = False,
                    xp=None) -> MultisliceResult:
    """Plane-wave (or given ``incident``) exit wave through ``potentials`` (n, ny, nx) V·Å."""
    xp = xp or get_array_module(potentials)
    wave = plane_wave(potentials.shape[-2:], xp) if incident is None else incident
    return multislice(wave, slice_thickness_A, energy_keV=energy_keV, sampling_A=sampling_A, potentials=potentials,
                      propagator=propagator, band_limit=band_limit, bandlimit_transmission=bandlimit_transmission,
                      tilt_mrad=tilt_mrad, keep_waves=keep_waves, xp=xp)


def hrtem_images(potentials, slice_thickness_A, *, energy_keV: float, sampling_A, defocus_values_A,
                 aberrations: dict | None = None, semiangle_mrad: float | None = None, **kwargs):
    """Noise-free HRTEM defocus series (n_defocus, ny, nx) float32 (Ren 2020 Alg. 1 and eq 3)."""
    xp = kwargs.get("xp") or get_array_module(potentials)
    res = hrtem_exit_wave(potentials, slice_thickness_A, energy_keV=energy_keV, sampling_A=sampling_A, **kwargs)
    h = defocus_ctfs(potentials.shape[-2:], sampling_A, energy_keV, defocus_values_A, aberrations, semiangle_mrad, xp)
    w = image_waves(res.exit_wave, h)
    return (w.real**2 + w.imag**2).astype(xp.float32)


def hrtem_loss_and_gradient(potentials, measured_intensities, slice_thickness_A, *, energy_keV: float, sampling_A,
                            defocus_values_A, aberrations: dict | None = None, semiangle_mrad: float | None = None,
                            incident=None, propagator: str = "fresnel",
                            band_limit: float | None = DEFAULT_BAND_LIMIT, bandlimit_transmission: bool = True,
                            complex_potential: bool = False, return_incident_gradient: bool = False, xp=None):
    """Amplitude loss of a defocus series and its gradient w.r.t. every slice (Ren 2020 eq A.10).

    ``measured_intensities`` (n_defocus, ny, nx). Returns ``(loss, grad_potentials)`` with
    grad_potentials (n_slices, ny, nx) float32 in 1/(V·Å) units of L, and, if asked, the
    gradient w.r.t. the incident wave as a third element.
    """
    xp = xp or get_array_module(potentials)
    res = hrtem_exit_wave(potentials, slice_thickness_A, energy_keV=energy_keV, sampling_A=sampling_A,
                          incident=incident, propagator=propagator, band_limit=band_limit,
                          bandlimit_transmission=bandlimit_transmission, keep_waves=True, xp=xp)
    h = defocus_ctfs(potentials.shape[-2:], sampling_A, energy_keV, defocus_values_A, aberrations, semiangle_mrad, xp)
    w = image_waves(res.exit_wave, h)
    loss, g_w = amplitude_loss(w, xp.asarray(measured_intensities))
    g_exit = image_waves_adjoint(g_w, h)
    grads, g_in = multislice_backward(g_exit, res.waves, slice_thickness_A, energy_keV=energy_keV,
                                      sampling_A=sampling_A, potentials=potentials, propagator=propagator,
                                      band_limit=band_limit, bandlimit_transmission=bandlimit_transmission,
                                      complex_potential=complex_potential, xp=xp)
    if return_incident_gradient:
        return loss, grads, g_in
    return loss, grads
