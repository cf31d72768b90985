"""PRISM: 4D-STEM from a plane-wave scattering matrix (Ophus 2017, *Adv. Struct. Chem. Imaging* 3:13).

Conventional 4D-STEM (:func:`tembench.physics.stem.stem_scan`) propagates every probe through every
slice. Multislice is linear in the incident wave, so a probe that is a sum of plane waves exits as
the same sum of the plane waves' exit waves. PRISM propagates each plane wave inside the aperture
once — the columns of the scattering matrix S — and builds every probe's exit wave as a weighted
sum of them:

    ψ_exit(r; ρ) = Σ_k c_k(ρ) S_k(r),   c_k(ρ) = Ψ̃(k) exp(−2πi k·ρ) / N_w

with Ψ̃ the probe's spectrum on the window grid.

**Interpolation factor f.** The plane waves are taken every f-th reciprocal pixel of the field,
i.e. on the frequency grid of a window of N/f pixels, so the expanded probe repeats with period
N/f. The exit wave is therefore read only inside that window around each probe (Ophus's
"partitioned crop"), and the diffraction pattern is its Fourier transform: a detector pixel of
λ/(window·sampling). This is an approximation for f > 1 (the probe's tails beyond the window and
scattering that leaves it are lost). For f = 1 the window is the whole field, and the result is
conventional multislice, exactly up to float rounding.

Geometry and conventions are those of :mod:`tembench.physics.stem`: probe modes centred on window
pixel (wy//2, wx//2); the window origin is the whole pixel nearest each position, and the rest is a
sub-pixel phase; a pattern is Σ_modes |F ψ|²/(wy·wx), fftshifted, then binned and cropped.

Cost: building S is n_k multislices of the whole field (n_k ≈ π(α·f_field)²/f², the plane waves in
the aperture); each probe then costs one (M × n_k)·(n_k × N_w) product and one window FFT instead
of 2·n_slices window FFTs. PRISM wins when there are many probes per plane wave.
"""

from __future__ import annotations

import math

import numpy as np

from tembench.backend import asnumpy, fft2, get_array_module, plan_fft2
from tembench.errors import TembenchError
from tembench.physics.grid import check_gpts, check_sampling, spatial_frequencies
from tembench.physics.multislice import DEDUP_CACHE_BYTES, duplicate_slices, multislice, transmission_functions
from tembench.physics.potentials import _blas_threads
from tembench.physics.propagation import DEFAULT_BAND_LIMIT
from tembench.physics.stem import (
    StemResult,
    _check_probe_in_window,
    _Collector,
    _window_origins,
    check_sampling_for_aperture,
    make_probe_modes,
)

#: working memory of one batch of plane waves (S-matrix build) and of probes (scan), bytes. The build's
#: batch is small on purpose: each slice streams the batch through 2 FFTs and 2 products, and 3 MB
#: (8 waves of 216²) stays in cache — 16 MB (44 waves) took 1.2x the CPU time (216² x 22 slices, f = 2 / 4).
SMATRIX_BATCH_BYTES = 3 * 2**20
SCAN_BATCH_BYTES = 16 * 2**20
#: per-probe S-matrix windows (n_k · window pixels · 8 bytes) larger than this are contracted by groups of
#: probes in one matrix product (:meth:`SMatrix._band_products`): above a 2 MB cache a per-probe product
#: streams its window from memory (f = 2, 216² field: 24 MB per probe, 2.5 ms vs 0.7 ms grouped)
BAND_PRODUCT_BYTES = 2 * 2**20


def prism_window(field_gpts, interpolation) -> tuple[int, int]:
    """The window (N_y/f_y, N_x/f_x) of interpolation factor f; refuses an f that does not divide the field."""
    ny, nx = check_gpts(field_gpts)
    fy, fx = (int(v) for v in np.broadcast_to(np.asarray(interpolation), (2,)))
    if fy < 1 or fx < 1:
        raise TembenchError(f"PRISM interpolation factor must be a whole number >= 1, got {interpolation}")
    if ny % fy or nx % fx:
        def divisors(n):
            return [d for d in range(1, min(n, 16) + 1) if n % d == 0]

        raise TembenchError(
            f"PRISM interpolation factor {fy, fx} does not divide the {ny} x {nx}-pixel field: the plane waves "
            f"must repeat an exact number of times across the field. Factors that divide it: "
            f"{divisors(ny)} (y), {divisors(nx)} (x); or change sampling_A so the field has such a size.")
    return ny // fy, nx // fx


class SMatrix:
    """The plane-wave scattering matrix of a slice stack: S_k for the k on a window's frequency grid.

    ``select`` (wy, wx) bool, FFT order, marks the window frequencies to expand (those where the
    probe's spectrum is non-zero). ``columns`` holds the exit waves (n_k, NY, NX) complex64.
    """

    def __init__(self, transmissions, slice_thickness_A, *, energy_keV: float, sampling_A, window_gpts, select,
                 propagator: str = "fresnel", band_limit: float | None = DEFAULT_BAND_LIMIT,
                 batch_size: int | None = None, xp=None):
        xp = xp or get_array_module(transmissions)
        self.xp = xp
        self.sampling = check_sampling(sampling_A)
        self.field = tuple(transmissions.shape[-2:])
        self.window = check_gpts(window_gpts)
        self.interpolation = (self.field[0] // self.window[0], self.field[1] // self.window[1])
        sel = np.asarray(asnumpy(select), bool)
        if sel.shape != self.window:
            raise TembenchError(f"select has shape {sel.shape}, expected the window {self.window}")
        self.index = np.flatnonzero(sel.ravel())  # flat window-grid indices of the plane waves
        if self.index.size == 0:
            raise TembenchError("PRISM: the probe has no plane wave inside its aperture")
        ky, kx = spatial_frequencies(self.window, self.sampling, xp=np, dtype=np.float64)
        kyy = np.broadcast_to(ky, self.window).ravel()[self.index]
        kxx = np.broadcast_to(kx, self.window).ravel()[self.index]
        self.k = np.stack([kyy, kxx], axis=1)  # (n_k, 2) 1/Å
        ny, nx = self.field
        y = np.arange(ny) * self.sampling[0]
        x = np.arange(nx) * self.sampling[1]
        n_k = len(self.index)
        # pixel-major layout (NY, NX, n_k): a probe's window is then a few rectangular views whose
        # contraction with its coefficients is one strided matrix product, no gather
        self.columns_t = xp.empty((ny, nx, n_k), dtype=xp.complex64)
        bs = batch_size or max(1, min(n_k, SMATRIX_BATCH_BYTES // (8 * ny * nx)))
        for b0 in range(0, n_k, bs):
            b1 = min(n_k, b0 + bs)
            # plane waves exp(2πi k·r), periodic over the window (k on its frequency grid): phases in
            # float64, the separable product in complex64
            ey = np.exp(2j * math.pi * kyy[b0:b1, None] * y[None, :]).astype(np.complex64)  # (b, ny)
            ex = np.exp(2j * math.pi * kxx[b0:b1, None] * x[None, :]).astype(np.complex64)  # (b, nx)
            waves = np.empty((b1 - b0, ny, nx), np.complex64)
            np.multiply(ey[:, :, None], ex[:, None, :], out=waves)
            res = multislice(xp.asarray(waves), slice_thickness_A, energy_keV=energy_keV, sampling_A=self.sampling,
                             transmissions=transmissions, propagator=propagator, band_limit=band_limit, xp=xp)
            for r0 in range(0, ny, 8):  # the transposed store in row blocks (3x faster than one strided copy)
                self.columns_t[r0:r0 + 8, :, b0:b1] = res.exit_wave[:, r0:r0 + 8].transpose(1, 2, 0)

    @property
    def columns(self):
        """S as (n_k, NY, NX): the exit wave of each plane wave (a transposed view)."""
        return self.columns_t.transpose(2, 0, 1)

    @property
    def n_waves(self) -> int:
        return len(self.index)

    def coefficients(self, modes_k, shifts_A):
        """c (B, M, n_k) for probes whose spectra are ``modes_k`` (M, wy, wx), moved by ``shifts_A`` (B, 2) Å."""
        xp = self.xp
        spec = modes_k.reshape(modes_k.shape[0], -1)[:, xp.asarray(self.index)]  # (M, n_k)
        phase = np.exp(-2j * math.pi * (np.asarray(shifts_A, np.float64) @ self.k.T))  # (B, n_k)
        n_w = self.window[0] * self.window[1]
        return (xp.asarray(phase.astype(np.complex64))[:, None, :] * spec[None]) * np.float32(1.0 / n_w)

    def exit_waves(self, coeffs, origins, out=None):
        """ψ_exit (B, M, wy, wx) of the probes: Σ_k c_k S_k read in each probe's window (origins (B, 2) px)."""
        xp = self.xp
        b, m, n_k = coeffs.shape
        wy, wx = self.window
        ny, nx = self.field
        if out is None:
            out = xp.empty((b, m, wy, wx), dtype=xp.complex64)
        if (wy, wx) == (ny, nx):  # f = 1: one product for the whole batch
            flat = self.columns_t.reshape(ny * nx, n_k)
            out.reshape(b * m, ny * nx)[...] = coeffs.reshape(b * m, n_k) @ flat.T
            return out
        origins = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
        # One probe's contraction is a row-by-row matrix-vector product (memory-bound): BLAS threads only add
        # synchronisation. With OpenBLAS's default threads on 2 cores it took 8x the CPU time of one thread
        # (f = 2, 108² window, 261 plane waves: 7.3 s vs 0.9 s for 256 probes), hence one BLAS thread here.
        with _blas_threads(1 if xp is np else None):
            if n_k * wy * wx * 8 > BAND_PRODUCT_BYTES:
                singles = self._band_products(coeffs, origins, out)
            else:
                singles = range(b)
            for i in singles:
                oy, ox = origins[i]
                ct = coeffs[i].T  # (n_k, M)
                # the window wraps around the periodic field: at most 2 x 2 rectangular pieces
                for ys, dy in _pieces(int(oy), wy, ny):
                    for xs, dx in _pieces(int(ox), wx, nx):
                        part = self.columns_t[ys, xs] @ ct  # (hy, hx, M)
                        out[i, :, dy:dy + part.shape[0], dx:dx + part.shape[1]] = part.transpose(2, 0, 1)
        return out

    def _band_products(self, coeffs, origins, out):
        """Exit waves of the probes whose window rows lie within a quarter window of each other, as one
        matrix product per group over the band of whole field rows they cover (S read once per group, a
        compute-bound product instead of one memory-bound product per probe; the band computes f·(1 + 1/4)
        times the pixels needed). Returns the indices left for the per-probe path (groups of < 4 probes).

        Each output element is the same length-n_k sum either way; BLAS may order it differently, so the
        two paths agree to float32 rounding (test), and a given scan (positions, batch size) is reproducible.
        """
        xp = self.xp
        b, m, n_k = coeffs.shape
        wy, wx = self.window
        ny, nx = self.field
        span = min(max(1, wy // 4), ny - wy)
        limit = max(1, SCAN_BATCH_BYTES // (8 * m * (wy + span) * nx))  # probes per group (the band's result)
        order = np.argsort(origins[:, 0], kind="stable")
        oy_sorted = origins[order, 0]
        singles = []
        g0 = 0
        while g0 < b:
            g1 = int(np.searchsorted(oy_sorted, oy_sorted[g0] + span, side="right"))
            g1 = min(g1, g0 + limit)
            group = order[g0:g1]
            if len(group) < 4:
                singles.extend(int(i) for i in group)
                g0 = g1
                continue
            y0 = int(oy_sorted[g0])
            hy = int(oy_sorted[g1 - 1]) - y0 + wy
            c = coeffs[xp.asarray(group)].reshape(len(group) * m, n_k)
            band = xp.empty((len(group) * m, hy, nx), dtype=xp.complex64)
            for ys, dy in _pieces(y0, hy, ny):
                rows = self.columns_t[ys]  # (h, nx, n_k), contiguous
                h = rows.shape[0]
                band[:, dy:dy + h] = (c @ rows.reshape(h * nx, n_k).T).reshape(len(group) * m, h, nx)
            band = band.reshape(len(group), m, hy, nx)
            for j, i in enumerate(group):
                ry = int(origins[i, 0]) - y0
                for xs, dx in _pieces(int(origins[i, 1]), wx, nx):
                    piece = band[j, :, ry:ry + wy, xs]
                    out[i, :, :, dx:dx + piece.shape[-1]] = piece
            g0 = g1
        return singles


def _pieces(o: int, w: int, n: int):
    """(slice of the field, offset in the window) of the window [o, o + w) wrapped on a field of n."""
    if o + w <= n:
        return [(slice(o, o + w), 0)]
    return [(slice(o, n), 0), (slice(0, o + w - n), n - o)]


def prism_scan(potentials, slice_thickness_A, *, energy_keV: float, sampling_A, positions_A, interpolation=1,
               probe=None, semiangle_mrad: float | None = None, aberrations: dict | None = None,
               detectors: dict | None = None, return_patterns: bool = True, out=None, out_weight: float | None = None,
               detector_binning: int = 1, detector_gpts=None, batch_size: int | None = None,
               propagator: str = "fresnel", band_limit: float | None = DEFAULT_BAND_LIMIT,
               bandlimit_transmission: bool = True, transmissions=None, progress=None, xp=None) -> StemResult:
    """4D-STEM by PRISM with interpolation factor ``interpolation`` (f, or (f_y, f_x)).

    The arguments and the :class:`~tembench.physics.stem.StemResult` are those of
    :func:`~tembench.physics.stem.stem_scan`, except that the probe window is not free: it is the
    field divided by f (``probe``, if given, must have that shape). f = 1 equals conventional
    multislice with the whole field as the window.
    """
    stack = potentials if transmissions is None else transmissions
    if stack is None:
        raise TembenchError("prism_scan: give potentials or transmissions")
    xp = xp or get_array_module(stack)
    sampling = check_sampling(sampling_A)
    field = tuple(stack.shape[-2:])
    window = prism_window(field, interpolation)
    if probe is None:
        check_sampling_for_aperture(sampling, energy_keV, semiangle_mrad, band_limit or 1.0)
        probe = make_probe_modes(window, sampling, energy_keV, semiangle_mrad, aberrations, xp=xp)
    modes = xp.asarray(probe, dtype=xp.complex64)
    if modes.ndim == 2:
        modes = modes[None]
    if tuple(modes.shape[-2:]) != window:
        raise TembenchError(f"prism_scan: the probe window {tuple(modes.shape[-2:])} must be the field {field} "
                            f"divided by the interpolation factor: {window}")
    _check_probe_in_window(modes)
    if transmissions is None:
        rep = duplicate_slices(potentials)
        unique = np.flatnonzero(rep == np.arange(len(rep)))
        if unique.size < len(rep) and unique.size * field[0] * field[1] * 8 <= DEDUP_CACHE_BYTES:
            t_unique = transmission_functions(xp.asarray(potentials[unique]), energy_keV=energy_keV,
                                              sampling_A=sampling, bandlimit_transmission=bandlimit_transmission,
                                              band_limit=band_limit, xp=xp)
            transmissions = t_unique[xp.asarray(np.searchsorted(unique, rep))]
        else:
            transmissions = transmission_functions(xp.asarray(potentials), energy_keV=energy_keV, sampling_A=sampling,
                                                   bandlimit_transmission=bandlimit_transmission,
                                                   band_limit=band_limit, xp=xp)
    modes_k = fft2(modes)
    power = asnumpy(xp.sum(xp.abs(modes_k) ** 2, axis=0))
    select = power > power.max() * 1e-12  # the probe's aperture (its soft edge included)
    smat = SMatrix(transmissions, slice_thickness_A, energy_keV=energy_keV, sampling_A=sampling, window_gpts=window,
                   select=select, propagator=propagator, band_limit=band_limit, xp=xp)
    del transmissions

    wy, wx = window
    n_modes = modes.shape[0]
    pos = np.asarray(positions_A, dtype=np.float64).reshape(-1, 2)
    n_pos = len(pos)
    col = _Collector(n_pos, window, sampling, energy_keV, detectors, return_patterns, out, out_weight,
                     detector_binning, detector_gpts, xp)
    bs = min(n_pos, batch_size or max(1, SCAN_BATCH_BYTES // (8 * n_modes * wy * wx)))
    plan = plan_fft2((bs, n_modes, wy, wx), xp=xp, tag="prism-scan")
    norm = np.float32(1.0 / (wy * wx))
    for start in range(0, n_pos, bs):
        stop = min(start + bs, n_pos)
        chunk = pos[start:stop]
        if len(chunk) < bs:  # pad so every batch reuses one FFT plan
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - len(chunk), axis=0)])
        origins, frac = _window_origins(chunk, sampling, window, field)
        # the modes are centred on window pixel (wy//2, wx//2): moved by origin + sub-pixel rest they sit on ρ
        shifts = origins * np.asarray(sampling) + frac
        smat.exit_waves(smat.coefficients(modes_k, shifts), origins, out=plan.buffer)
        far = plan.forward()
        col.add((far.real**2 + far.imag**2).sum(axis=1) * norm, start, stop)  # (B, wy, wx), FFT order
        if progress is not None:
            progress(stop, n_pos)
    return col.result()
