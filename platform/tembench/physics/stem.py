"""Scanned-probe multislice: 4D-STEM with batch cropping and mixed-state probes (You 2025 eqs 7–10),
virtual detectors, streaming output, and the amplitude-loss gradient w.r.t. the potential and probe.

Geometry
--------
* The object is a slice stack (n, NY, NX) over a periodic field of view with pixel (sy, sx) Å.
* Each probe position ρ = (y, x) Å gets a window of ``window_gpts`` (wy, wx) pixels cropped from
  every slice (You eq 8; periodic wrap). The window's pixel (wy//2, wx//2) sits on the whole pixel
  nearest ρ; the sub-pixel rest is a Fourier phase ramp on the probe.
* A diffraction pattern is |F{ψ_exit}|²/(wy·wx) summed over probe modes (eq 10): the fraction of
  the probe's electrons per pixel (Σ = 1 when nothing is lost). Patterns are fftshifted (the
  unscattered beam at pixel (k_y//2, k_x//2)), optionally binned b×b and cropped. Detector pixel:
  λ/(w·s) rad per native pixel.
* Probe modes: complex (M, wy, wx) in real space centred on pixel (wy//2, wx//2); Σ_i ‖ψ_i‖² = 1
  for a normalised probe (the modes carry their own power).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from tembench.backend import plan_pruned_fft2, asnumpy, fft2, get_array_module, ifft2
from tembench.errors import TembenchError
from tembench.physics.constants import interaction_constant, wavelength_A
from tembench.physics.grid import check_gpts, check_sampling, spatial_frequencies
from tembench.physics.multislice import (
    _thicknesses,
    intensity_amplitude_loss,
    propagator_cache,
    transmission_functions,
    transmission_gradient,
)
from tembench.physics.optics import fourier_shift_phase, probe_fourier
from tembench.physics.propagation import DEFAULT_BAND_LIMIT

# Per-batch working memory: small for scans (the FFT buffer stays in cache; measured 0.22 ms per
# 216² FFT pair alone vs 0.32 ms in batches of 16); for gradients the kept waves count too (chunks of
# 2-16 MB measured alike for 96² windows x 2 modes x 4 slices, 32 MB 15 % slower, 64 patterns at once 1.6x).
BATCH_BYTES = 2 * 2**20
GRADIENT_BATCH_BYTES = 4 * 2**20

STANDARD_DETECTORS_MRAD = {"bf": (0.0, None), "abf": (None, None), "adf": (None, 200.0), "haadf": (60.0, 200.0)}


def scan_shape(start_A, end_A, step_A, endpoint: bool = False) -> tuple[int, int]:
    """(n_y, n_x) of :func:`scan_positions`, without building the raster (pre-run estimates)."""
    sy0, sx0 = (float(v) for v in np.broadcast_to(np.asarray(start_A, float), (2,)))
    ey, ex = (float(v) for v in np.broadcast_to(np.asarray(end_A, float), (2,)))
    dy, dx = (float(v) for v in np.broadcast_to(np.asarray(step_A, float), (2,)))
    if dy <= 0 or dx <= 0:
        raise TembenchError(f"scan_step_A must be > 0 Å; got {step_A}")
    if endpoint:
        ny = int(math.floor((ey - sy0) / dy + 1e-9)) + 1
        nx = int(math.floor((ex - sx0) / dx + 1e-9)) + 1
    else:  # positions start + i·step < end
        ny = int(math.ceil((ey - sy0) / dy - 1e-9))
        nx = int(math.ceil((ex - sx0) / dx - 1e-9))
    return max(ny, 1), max(nx, 1)


def scan_positions(start_A, end_A, step_A, endpoint: bool = False) -> np.ndarray:
    """Raster of probe positions (n_y, n_x, 2) as (y, x) Å from ``start_A`` to ``end_A`` with ``step_A``."""
    ny, nx = scan_shape(start_A, end_A, step_A, endpoint)
    sy0, sx0 = (float(v) for v in np.broadcast_to(np.asarray(start_A, float), (2,)))
    dy, dx = (float(v) for v in np.broadcast_to(np.asarray(step_A, float), (2,)))
    y = sy0 + dy * np.arange(ny)
    x = sx0 + dx * np.arange(nx)
    return np.stack(np.meshgrid(y, x, indexing="ij"), axis=-1)


def max_scattering_angle_mrad(sampling_A, energy_keV: float, band_limit: float = DEFAULT_BAND_LIMIT) -> float:
    """Largest angle kept by the band limit on a grid of pixel ``sampling_A``, mrad."""
    sy, sx = check_sampling(sampling_A)
    return band_limit / (2 * max(sy, sx)) * wavelength_A(energy_keV) * 1e3


def check_sampling_for_aperture(sampling_A, energy_keV: float, semiangle_mrad: float | None,
                                band_limit: float = DEFAULT_BAND_LIMIT) -> None:
    """Raise if the probe aperture extends beyond the band limit (the probe would alias)."""
    if semiangle_mrad is None:
        return
    amax = max_scattering_angle_mrad(sampling_A, energy_keV, band_limit)
    if semiangle_mrad > amax:
        lam = wavelength_A(energy_keV)
        need = band_limit * lam * 1e3 / (2 * semiangle_mrad)
        raise TembenchError(
            f"sampling_A {sampling_A} Å is too coarse for a {semiangle_mrad} mrad probe at {energy_keV} keV: "
            f"the band limit keeps angles up to {amax:.1f} mrad. Use sampling_A <= {need:.4f} Å "
            "(ideally half that, so scattering outside the bright field is kept)."
        )


def window_gpts_for(detector_sampling_mrad, sampling_A, energy_keV: float) -> tuple[int, int]:
    """Window size whose native Fourier pixel is ``detector_sampling_mrad`` (y, x): w = λ/(s·Δα)."""
    from tembench.physics.grid import fft_friendly

    dy, dx = (float(v) for v in np.broadcast_to(np.asarray(detector_sampling_mrad, float), (2,)))
    sy, sx = check_sampling(sampling_A)
    lam = wavelength_A(energy_keV)
    return fft_friendly(int(round(lam / (sy * dy * 1e-3)))), fft_friendly(int(round(lam / (sx * dx * 1e-3))))


def make_probe_modes(window_gpts, sampling_A, energy_keV: float, semiangle_mrad: float | None,
                     aberrations: dict | None = None, n_modes: int = 1, defocus_spread_A: float = 0.0,
                     source_size_A: float = 0.0, xp=np):
    """Probe modes (M, wy, wx) centred on the window: M = 1 is the coherent probe.

    With ``defocus_spread_A`` > 0 and M > 1 the modes are the coherent probes at Gauss–Hermite
    defocus offsets (rms ``defocus_spread_A``), each scaled by √weight, so Σ|F ψ_i|² is the
    partially coherent intensity (You 2025 eq 10). ``source_size_A`` > 0 instead uses laterally
    shifted copies (Gaussian source of that rms) — a simple incoherent source model.
    """
    wy, wx = check_gpts(window_gpts)
    centre = ((wy // 2) * check_sampling(sampling_A)[0], (wx // 2) * check_sampling(sampling_A)[1])
    ky, kx = spatial_frequencies((wy, wx), sampling_A, xp=xp, dtype=np.float64)
    ramp = fourier_shift_phase(ky, kx, centre)
    base = dict(aberrations or {})
    if n_modes <= 1 or (defocus_spread_A <= 0 and source_size_A <= 0):
        pk = probe_fourier((wy, wx), sampling_A, energy_keV, semiangle_mrad, base, xp=xp)
        return ifft2(pk * ramp)[None].astype(xp.complex64)
    nodes, weights = np.polynomial.hermite_e.hermegauss(int(n_modes))
    weights = weights / weights.sum()
    modes = []
    for node, w in zip(nodes, weights):
        ab = dict(base)
        if defocus_spread_A > 0:
            from tembench.physics.optics import normalize_aberrations

            ab = normalize_aberrations(ab)
            ab["C10"] = ab.get("C10", 0.0) - node * defocus_spread_A
            shift = centre
        else:
            shift = (centre[0], centre[1] + node * source_size_A)
        pk = probe_fourier((wy, wx), sampling_A, energy_keV, semiangle_mrad, ab, xp=xp)
        modes.append(ifft2(pk * fourier_shift_phase(ky, kx, shift)) * math.sqrt(w))
    return xp.stack(modes).astype(xp.complex64)


def detector_masks(window_gpts, sampling_A, energy_keV: float, detectors: dict) -> tuple[list[str], np.ndarray]:
    """Annular virtual detectors (n_det, wy, wx) float32 in FFT order from {name: (inner, outer) mrad}.

    ``outer`` None means everything the grid holds.
    """
    names = list(detectors)
    lam = wavelength_A(energy_keV)
    ky, kx = spatial_frequencies(window_gpts, sampling_A, xp=np, dtype=np.float64)
    alpha = np.sqrt(ky**2 + kx**2) * lam * 1e3
    masks = np.zeros((len(names),) + alpha.shape, np.float32)
    for i, name in enumerate(names):
        inner, outer = detectors[name]
        inner = 0.0 if inner is None else float(inner)
        outer = np.inf if outer is None else float(outer)
        if outer <= inner:
            raise TembenchError(f"detector {name!r}: outer angle {outer} mrad must exceed inner {inner} mrad")
        masks[i] = (alpha >= inner) & (alpha < outer)
    return names, masks


def _bin_crop_indices(w: int, binning: int, n_out: int | None) -> tuple[np.ndarray, int]:
    """Indices (fftshifted window) of the n_out·binning pixels kept, zero frequency in bin n_out//2."""
    n_out = w // binning if n_out is None else int(n_out)
    if n_out < 1 or n_out * binning > w:
        raise TembenchError(
            f"detector of {n_out} pixels x binning {binning} does not fit the {w}-pixel window; "
            "reduce detector_gpts/binning or enlarge the window"
        )
    start = w // 2 - (n_out // 2) * binning - binning // 2
    return (start + np.arange(n_out * binning)) % w, n_out


@dataclass
class StemResult:
    """Output of :func:`stem_scan`."""

    patterns: np.ndarray | None
    images: dict[str, np.ndarray] = field(default_factory=dict)
    detector_sampling_mrad: tuple[float, float] = (0.0, 0.0)
    window_gpts: tuple[int, int] = (0, 0)


def _window_origins(positions_A, sampling_A, window_gpts, field_gpts):
    """Window origins (N, 2) (pixel, wrapped into the field) and the remaining shifts (N, 2) Å.

    The probe modes are centred on window pixel (wy//2, wx//2); the origin puts that pixel on the
    whole pixel nearest each position and the rest is a sub-pixel Fourier shift. When the window
    is the whole field, cropping is a circular roll that no intensity sees, so the origin is 0 and
    the whole shift goes into the phase ramp.
    """
    sy, sx = sampling_A
    wy, wx = window_gpts
    p = np.asarray(positions_A, dtype=np.float64).reshape(-1, 2)
    centre = np.array([(wy // 2) * sy, (wx // 2) * sx])
    if tuple(window_gpts) == tuple(field_gpts):
        return np.zeros((len(p), 2), np.int64), p - centre
    px = p / np.array([sy, sx])
    whole = np.round(px).astype(np.int64)
    frac = (px - whole) * np.array([sy, sx])
    origins = np.stack([(whole[:, 0] - wy // 2) % field_gpts[0], (whole[:, 1] - wx // 2) % field_gpts[1]], axis=1)
    return origins, frac


def _check_probe_in_window(modes, what="probe"):
    xp = get_array_module(modes)
    inten = xp.sum(xp.abs(modes) ** 2, axis=0)
    total = float(xp.sum(inten))
    wy, wx = inten.shape
    by, bx = max(1, wy // 16), max(1, wx // 16)
    border = total - float(xp.sum(inten[by:-by, bx:-bx]))
    # an in-focus probe's Airy tails put ~0.3 % there on small windows; defocused probes far more
    if total > 0 and border / total > 1e-2:
        raise TembenchError(
            f"the {what} is larger than its window: {100 * border / total:.2f} % of its intensity lies in the "
            f"outer 1/16 of the {wy}x{wx}-pixel window (it would wrap around). Enlarge window_gpts, reduce "
            "the defocus, or refine detector_sampling_mrad (a finer detector sampling means a larger window)."
        )


class _Scanner:
    """Shared set-up of a scan: transmissions, probe spectrum, propagators, FFT plans."""

    def __init__(self, potentials, slice_thickness_A, energy_keV, sampling_A, probe, window_gpts, propagator,
                 band_limit, bandlimit_transmission, xp, transmissions=None):
        self.xp = xp
        self.sampling = check_sampling(sampling_A)
        self.energy = float(energy_keV)
        stack = potentials if transmissions is None else transmissions
        self.n_slices = stack.shape[0]
        self.field_gpts = tuple(stack.shape[-2:])
        self.dz = _thicknesses(slice_thickness_A, self.n_slices)
        self.sigma = interaction_constant(energy_keV)
        self.potentials = potentials
        if transmissions is None:
            transmissions = transmission_functions(xp.asarray(potentials), energy_keV=energy_keV,
                                                   sampling_A=self.sampling,
                                                   bandlimit_transmission=bandlimit_transmission,
                                                   band_limit=band_limit, xp=xp)
        self.t = transmissions
        modes = xp.asarray(probe, dtype=xp.complex64)
        if modes.ndim == 2:
            modes = modes[None]
        self.window = tuple(modes.shape[-2:])
        if window_gpts is not None and tuple(check_gpts(window_gpts)) != self.window:
            raise TembenchError(f"probe shape {self.window} differs from window_gpts {tuple(window_gpts)}")
        if self.window[0] > self.field_gpts[0] or self.window[1] > self.field_gpts[1]:
            raise TembenchError(
                f"probe window {self.window} is larger than the field of view {self.field_gpts} pixels; "
                "enlarge the sample cell/field of view or use a smaller window"
            )
        self.n_modes = modes.shape[0]
        self.modes_k = fft2(modes)  # spectra; shifting = multiplying by a ramp
        ky, kx = spatial_frequencies(self.window, self.sampling, xp=xp, dtype=np.float64)
        self.ky, self.kx = ky, kx
        self.props = propagator_cache(self.window, self.sampling, energy_keV, propagator, band_limit, (0.0, 0.0), xp)
        self.full = self.window == self.field_gpts
        if not self.full:
            # wrap-pad once so that every window is a plain (zero-copy) slice, also across the edges
            wy, wx = self.window
            self.t = xp.concatenate([self.t, self.t[:, :wy]], axis=1)
            self.t = xp.concatenate([self.t, self.t[:, :, :wx]], axis=2)

    def batch_size(self, keep_waves: bool) -> int:
        if keep_waves:
            per = self.n_modes * self.window[0] * self.window[1] * 8 * (self.n_slices + 3)
            return max(1, int(GRADIENT_BATCH_BYTES // per))
        return max(1, int(BATCH_BYTES // (self.n_modes * self.window[0] * self.window[1] * 8)))

    def plan(self, shape):
        """The planned FFT of the forward pass: (B, M, wy, wx), pruned to the band limit's columns."""
        return plan_pruned_fft2(shape, self.props.kept_columns(), xp=self.xp)

    def incident(self, frac):
        """Shifted probe modes (B, M, wy, wx) and the phase ramps; the waves are in a planned FFT buffer
        (the one :meth:`forward` uses), so they are valid until the next forward call."""
        xp = self.xp
        ramp = fourier_shift_phase(self.ky, self.kx, xp.asarray(frac))  # (B, wy, wx)
        plan = self.plan((len(frac), self.n_modes) + self.window)
        xp.multiply(ramp[:, None], self.modes_k[None], out=plan.buffer)
        return plan.inverse(), ramp

    def _transmit(self, buf, m, origins, conj=False):
        """buf (B, M, wy, wx) *= the window of slice m at each origin."""
        xp = self.xp
        if self.full:
            t = self.t[m].conj() if conj else self.t[m]
            xp.multiply(buf, t, out=buf)
            return
        wy, wx = self.window
        for b, (oy, ox) in enumerate(origins):
            t = self.t[m, oy:oy + wy, ox:ox + wx]
            xp.multiply(buf[b], t.conj() if conj else t, out=buf[b])

    def forward(self, psi, origins, keep_waves=False):
        xp = self.xp
        plan = self.plan(psi.shape)
        if psi is not plan.buffer:  # :meth:`incident` leaves the waves in this buffer already
            plan.buffer[...] = psi
        waves = xp.empty((self.n_slices,) + psi.shape, xp.complex64) if keep_waves else None
        inv_n = 1.0 / (self.window[0] * self.window[1])
        last = self.n_slices - 1
        for m in range(self.n_slices):
            if keep_waves:
                waves[m] = plan.buffer
            self._transmit(plan.buffer, m, origins)
            buf = plan.forward_pruned()  # column FFTs only where the band-limited propagator is non-zero
            if m == last:
                # far field of the exit wave = FFT(IFFT(P·X)) = P·X: the last inverse/forward pair cancels
                xp.multiply(buf, self.props(self.dz[m]), out=buf)
                return buf, waves
            xp.multiply(buf, self.props.scaled(self.dz[m], inv_n), out=buf)  # inverse FFT's 1/N folded in
            plan.inverse_pruned()
        return plan.forward(), waves  # no slices: the far field of the incident wave

    def fold(self, grad_pad):
        """Fold the wrap-padded gradient back onto the periodic field (adjoint of the padding)."""
        if self.full:
            return grad_pad
        ny, nx = self.field_gpts
        wy, wx = self.window
        g = grad_pad[:, :ny].copy()
        g[:, :wy] += grad_pad[:, ny:ny + wy]
        out = g[:, :, :nx].copy()
        out[:, :, :wx] += g[:, :, nx:nx + wx]
        return out


class _Collector:
    """What a scan keeps of each batch's far-field intensities: virtual-detector images and the
    fftshifted, binned and cropped patterns (in memory, streamed into ``out``, or added with a
    weight). Shared by :func:`stem_scan` and :func:`tembench.physics.prism.prism_scan`."""

    def __init__(self, n_pos, window, sampling, energy_keV, detectors, return_patterns, out, out_weight,
                 detector_binning, detector_gpts, xp):
        self.xp, self.n_pos, self.window, self.sampling = xp, n_pos, tuple(window), sampling
        wy, wx = self.window
        self.names, masks = detector_masks(self.window, sampling, energy_keV, detectors or {})
        self.masks_x = xp.asarray(masks.reshape(len(self.names), wy * wx))
        gy = gx = None
        if detector_gpts is not None:
            gy, gx = check_gpts(detector_gpts)
        self.iy_k, self.ny_out = _bin_crop_indices(wy, detector_binning, gy)
        self.ix_k, self.nx_out = _bin_crop_indices(wx, detector_binning, gx)
        self.binning, self.out, self.out_weight = detector_binning, out, out_weight
        self.keep = return_patterns or out is not None
        shape = (n_pos, self.ny_out, self.nx_out)
        self.patterns = np.zeros(shape, np.float32) if (return_patterns and out is None) else None
        if out is not None and tuple(out.shape) != shape:
            raise TembenchError(f"out has shape {tuple(out.shape)}, expected {shape}")
        self.images = {name: np.zeros(n_pos, np.float32) for name in self.names}
        self.lam = wavelength_A(energy_keV)

    def add(self, inten, start, stop):
        """Intensities (B, wy, wx) in FFT order of positions start … stop (B ≥ stop − start: padded)."""
        xp = self.xp
        bs, nb = inten.shape[0], stop - start
        if self.names:
            vals = asnumpy(inten.reshape(bs, -1) @ self.masks_x.T)[:nb]
            for i, name in enumerate(self.names):
                self.images[name][start:stop] = vals[:, i]
        if self.keep:
            shifted = xp.fft.fftshift(inten, axes=(-2, -1))
            sel = shifted[:, xp.asarray(self.iy_k)][:, :, xp.asarray(self.ix_k)]
            b = self.binning
            binned = sel.reshape(bs, self.ny_out, b, self.nx_out, b).sum(axis=(2, 4)) if b > 1 else sel
            host = asnumpy(binned[:nb]).astype(np.float32)
            if self.out is not None and self.out_weight is not None:
                self.out[start:stop] += np.float32(self.out_weight) * host
            elif self.out is not None:
                self.out[start:stop] = host
            else:
                self.patterns[start:stop] = host

    def result(self) -> StemResult:
        wy, wx = self.window
        b, s = self.binning, self.sampling
        det = (self.lam / (wy * s[0]) * 1e3 * b, self.lam / (wx * s[1]) * 1e3 * b)
        return StemResult(patterns=self.patterns, images=self.images, detector_sampling_mrad=det, window_gpts=(wy, wx))


def stem_scan(potentials, slice_thickness_A, *, energy_keV: float, sampling_A, positions_A, probe=None,
              semiangle_mrad: float | None = None, aberrations: dict | None = None, window_gpts=None,
              detectors: dict | None = None, return_patterns: bool = True, out=None, detector_binning: int = 1,
              detector_gpts=None, batch_size: int | None = None, propagator: str = "fresnel",
              band_limit: float | None = DEFAULT_BAND_LIMIT, bandlimit_transmission: bool = True,
              transmissions=None, out_weight: float | None = None, progress=None, xp=None) -> StemResult:
    """4D-STEM multislice scan with batch cropping (You 2025 eqs 8–10).

    Parameters
    ----------
    potentials : (n, NY, NX) V·Å slice stack over a periodic field (or ``transmissions``).
    positions_A : (..., 2) probe positions (y, x) in Å, flattened in C order.
    probe : (wy, wx) or (M, wy, wx) real-space probe modes centred on the window; default: a
        coherent probe from ``semiangle_mrad`` and ``aberrations`` on ``window_gpts``.
    detectors : {name: (inner_mrad, outer_mrad)} virtual annular detectors → ``images[name]``
        (fraction of the probe's electrons on the detector), integrated without storing patterns.
    return_patterns / out : keep the (N, k_y, k_x) float32 patterns in memory, or stream each batch
        into ``out`` (anything that supports ``out[i:j] = batch``: numpy memmap, h5py dataset);
        with ``out_weight`` the batch is added, ``out[i:j] += w·batch`` (frozen-phonon averaging).
    detector_binning, detector_gpts : b×b binning then crop (after binning) of each pattern.
    """
    xp = xp or get_array_module(potentials if potentials is not None else transmissions)
    sampling = check_sampling(sampling_A)
    if probe is None:
        if window_gpts is None:
            raise TembenchError("stem_scan: give a probe or window_gpts (and semiangle_mrad) to build one")
        check_sampling_for_aperture(sampling, energy_keV, semiangle_mrad, band_limit or 1.0)
        probe = make_probe_modes(window_gpts, sampling, energy_keV, semiangle_mrad, aberrations, xp=xp)
    probe = xp.asarray(probe)
    _check_probe_in_window(probe if probe.ndim == 3 else probe[None])
    sc = _Scanner(potentials, slice_thickness_A, energy_keV, sampling, probe, window_gpts, propagator, band_limit,
                  bandlimit_transmission, xp, transmissions)
    wy, wx = sc.window
    pos = np.asarray(positions_A, dtype=np.float64).reshape(-1, 2)
    n_pos = len(pos)
    col = _Collector(n_pos, sc.window, sampling, energy_keV, detectors, return_patterns, out, out_weight,
                     detector_binning, detector_gpts, xp)
    bs = batch_size or sc.batch_size(False)
    bs = min(bs, n_pos)
    if batch_size is None and bs > 1:  # the batch size in [bs/2, bs] that pads the last batch least
        bs = min(range(max(1, bs // 2), bs + 1), key=lambda b: (-(-n_pos // b) * b - n_pos, -b))
    norm = 1.0 / (wy * wx)
    for start in range(0, n_pos, bs):
        stop = min(start + bs, n_pos)
        chunk = pos[start:stop]
        if len(chunk) < bs:  # pad so every batch reuses one FFT plan
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - len(chunk), axis=0)])
        origins, frac = _window_origins(chunk, sampling, sc.window, sc.field_gpts)
        psi, _ = sc.incident(frac)
        far, _ = sc.forward(psi, origins)
        col.add((far.real**2 + far.imag**2).sum(axis=1) * norm, start, stop)  # (B, wy, wx), FFT order
        if progress is not None:
            progress(stop, n_pos)
    return col.result()


def _shift_ramp(ky, kx, shift_A, xp):
    """exp(−2πi k·s) (B, wy, wx) complex64 for shifts (B, 2) Å, as :func:`fourier_shift_phase`, from the
    separable factors (ky (wy, 1), kx (1, wx)): two small exponentials and one complex64 product."""
    s = xp.asarray(shift_A, dtype=xp.float64)
    ey = xp.exp((-2j * math.pi) * (s[:, 0, None, None] * ky)).astype(xp.complex64)
    ex = xp.exp((-2j * math.pi) * (s[:, 1, None, None] * kx)).astype(xp.complex64)
    return ey * ex


def _gradient_chunk(n_pos: int, per_pattern_bytes: int, batch_size: int | None) -> int:
    """Patterns per chunk of :func:`stem_loss_and_gradient`: ``batch_size`` or what fits
    ``GRADIENT_BATCH_BYTES``, evened out so that padding the last chunk (one FFT plan for all) wastes least."""
    bs = int(batch_size) if batch_size else max(1, int(GRADIENT_BATCH_BYTES // per_pattern_bytes))
    bs = max(1, min(bs, n_pos))
    n_chunks = -(-n_pos // bs)
    return -(-n_pos // n_chunks)


def stem_loss_and_gradient(potentials, measured_patterns, slice_thickness_A, *, energy_keV: float, sampling_A,
                           positions_A, probe, propagator: str = "fresnel",
                           band_limit: float | None = DEFAULT_BAND_LIMIT, bandlimit_transmission: bool = False,
                           complex_potential: bool = False, batch_size: int | None = None,
                           return_position_gradient: bool = False, return_position_curvature: bool = False,
                           amplitude_eps: float = 0.0, xp=None):
    """Amplitude loss Σ(√Î − √I)² of 4D-STEM patterns and its gradients (You 2025 Alg. 1).

    ``measured_patterns`` (N, wy, wx) fftshifted at the window's native sampling (no binning);
    ``probe`` (M, wy, wx) modes. Returns ``(loss, grad_potentials (n, NY, NX), grad_probe (M, wy, wx))``
    with grad_probe = 2∂L/∂ψ* of the window-centred real-space modes. The transmission is not
    band-limited by default here, so the gradient is exact for t = exp(iσv).

    ``amplitude_eps`` ε > 0 gives You eq 16, L = Σ(√(Î+ε) − √(I+ε))² (ε in the patterns' units).
    ``return_position_gradient`` appends ∂L/∂ρ (N, 2) float64, (y, x) per Å: the incident wave is
    ψ_b = F⁻¹{P·r_b} with r_b = exp(−2πi k·f_b) and f_b the sub-pixel rest of ρ_b (the whole-pixel
    window origin is piecewise constant), so ∂ψ_b/∂ρ = F⁻¹{P·r_b·(−2πi k)} and, by Parseval,
    ∂L/∂ρ = Re Σ_k conj(F{g_b})·P·r_b·(−2πi k)/(wy·wx) with g_b = 2∂L/∂ψ_b* from the back-propagation.
    ``return_position_curvature`` also appends the Gauss–Newton matrix H_b = 2 Σ_k ∇_ρ√Î ∇_ρ√Îᵀ
    (N, 2, 2) float64, per Å²: two more (linear) multislice passes of ∂ψ_b/∂ρ per batch, for
    Newton-like position steps Δρ = −H⁻¹∂L/∂ρ.

    Work layout: the patterns run in chunks of ``batch_size`` (default: what fits ``GRADIENT_BATCH_BYTES``
    with the waves kept for the back-propagation, so the working set stays in cache; the result does not
    depend on it) through one planned in-place FFT buffer: 2·n_slices FFTs forward (the last inverse/forward
    pair cancels) and 2·n_slices backward per pattern and mode, plus the incident wave's. The slice gradient
    is accumulated as Σ_b window_b(Σ_i conj(ψ_i)·g_i) and multiplied by −iσ·conj(t) once on the field
    (that factor is pointwise on the field, so it commutes with the window sum).
    """
    xp = xp or get_array_module(potentials)
    if bandlimit_transmission:
        raise TembenchError("stem_loss_and_gradient: bandlimit_transmission=True is not supported for gradients")
    potentials = xp.asarray(potentials)
    modes = xp.asarray(probe, dtype=xp.complex64)
    modes = modes[None] if modes.ndim == 2 else modes
    sc = _Scanner(potentials, slice_thickness_A, energy_keV, sampling_A, modes, None, propagator, band_limit,
                  bandlimit_transmission, xp)
    pos = np.asarray(positions_A, dtype=np.float64).reshape(-1, 2)
    n_pos = len(pos)
    wy, wx = sc.window
    meas_all = xp.asarray(measured_patterns, dtype=xp.float32).reshape(n_pos, wy, wx)
    norm = 1.0 / (wy * wx)
    eps = float(amplitude_eps)
    if eps < 0:
        raise TembenchError(f"stem_loss_and_gradient: amplitude_eps must be >= 0, got {amplitude_eps}")
    n_sl, n_m = sc.n_slices, sc.n_modes
    want_pos = return_position_gradient or return_position_curvature
    grad_pos = np.zeros((n_pos, 2), np.float64) if want_pos else None
    curv_pos = np.zeros((n_pos, 2, 2), np.float64) if return_position_curvature else None
    two_pi_k = ((-2j * math.pi) * sc.ky.astype(xp.float32), (-2j * math.pi) * sc.kx.astype(xp.float32))
    per = n_m * wy * wx * 8 * (n_sl + 3)
    bs = _gradient_chunk(n_pos, per, batch_size)
    plan = sc.plan((bs, n_m, wy, wx))
    waves = xp.empty((n_sl, bs, n_m, wy, wx), xp.complex64)
    g_t = xp.empty((bs, wy, wx), xp.complex64)
    tmp = xp.empty((bs, wy, wx), xp.complex64)
    acc = xp.zeros(sc.t.shape, xp.complex64)  # Σ_b window_b(Σ_i conj(ψ_i)·g_i) on the wrap-padded field
    grad_k = xp.zeros(modes.shape, dtype=xp.complex64)
    # propagators: forward with the inverse FFT's 1/N folded in; backward their adjoints (the last slice's
    # far field P·F(tψ) has adjoint F^H(P*·g) = unnormalised inverse of P*·g)
    fwd = [sc.props.scaled(sc.dz[m], norm) for m in range(n_sl)]
    bwd = [xp.conj(sc.props(sc.dz[m])) * (np.float32(1.0) if m == n_sl - 1 else np.float32(norm))
           for m in range(n_sl)]
    t_conj = sc.t.conj()
    loss = 0.0
    for start in range(0, n_pos, bs):
        nb = min(bs, n_pos - start)
        chunk = pos[start:start + nb]
        if nb < bs:  # pad with the last position (its gradient is zeroed) so that one FFT plan serves all
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - nb, axis=0)])
        origins, frac = _window_origins(chunk, sc.sampling, sc.window, sc.field_gpts)
        ramp = _shift_ramp(sc.ky, sc.kx, frac, xp)  # (B, wy, wx)
        buf = plan.buffer
        xp.multiply(ramp[:, None], sc.modes_k[None], out=buf)
        buf = plan.inverse()
        # forward, keeping the wave entering each slice
        for m in range(n_sl):
            xp.conjugate(buf, out=waves[m])  # kept conjugated: the backward pass needs conj(ψ_m)
            sc._transmit(buf, m, origins)
            buf = plan.forward_pruned()
            if m == n_sl - 1:
                xp.multiply(buf, sc.props(sc.dz[m]), out=buf)
            else:
                xp.multiply(buf, fwd[m], out=buf)
                buf = plan.inverse_pruned()
        if n_sl == 0:
            buf = plan.forward()
        far = buf  # (B, M, wy, wx) far field, in the plan's buffer
        inten = (far.real**2 + far.imag**2).sum(axis=1) * np.float32(norm)
        m_b = xp.fft.ifftshift(meas_all[start:start + nb], axes=(-2, -1))
        i_b = inten[:nb]
        lb, dl_di = intensity_amplitude_loss(i_b + eps, m_b + eps) if eps else intensity_amplitude_loss(i_b, m_b)
        loss += lb
        far_saved = far.copy() if return_position_curvature else None
        scale = xp.zeros((bs, wy, wx), xp.float32)
        scale[:nb] = dl_di * np.float32(2.0 * norm)
        xp.multiply(far, scale[:, None], out=far)  # 2∂L/∂Ψ* for I = Σ|Ψ|²/N (zero for the padding)
        # back-propagation through the slices
        for m in range(n_sl - 1, -1, -1):
            # the propagators' band limit zeroes the columns the pruned transforms skip (as forward)
            if m != n_sl - 1:
                buf = plan.forward_pruned()
            xp.multiply(buf, bwd[m], out=buf)
            buf = plan.inverse_pruned()  # unnormalised: 2∂L/∂(t_m ψ_m)* in real space
            w_m = waves[m]  # conj(ψ_m)
            xp.multiply(w_m[:, 0], buf[:, 0], out=g_t)
            for i in range(1, n_m):
                xp.multiply(w_m[:, i], buf[:, i], out=tmp)
                g_t += tmp
            if sc.full:
                acc[m] += g_t[:nb].sum(axis=0)
            else:
                for b in range(nb):
                    oy, ox = origins[b]
                    acc[m, oy:oy + wy, ox:ox + wx] += g_t[b]
            if sc.full:
                xp.multiply(buf, t_conj[m], out=buf)
            else:
                for b in range(bs):
                    oy, ox = origins[b]
                    xp.multiply(buf[b], t_conj[m, oy:oy + wy, ox:ox + wx], out=buf[b])
        if n_sl:
            g_in_k = plan.forward()  # F{2∂L/∂ψ_incident*} (B, M, wy, wx)
        else:  # no slices: far = F(ψ), so F{F^H g} = N·g
            g_in_k = buf
            g_in_k *= np.float32(wy * wx)
        # ψ_b = ifft(fft(p)·r_b) is a unitary circulant of the centred modes p: adjoint ifft(conj(r_b)·fft(g_b))
        grad_k += xp.einsum("byx,bmyx->myx", ramp.conj(), g_in_k)
        if want_pos:
            shifted_k = sc.modes_k[None] * ramp[:, None]  # F{ψ_b} (B, M, wy, wx)
            w = (g_in_k.conj() * shifted_k).sum(axis=1)  # (B, wy, wx)
            for a in range(2):
                grad_pos[start:start + nb, a] = asnumpy((w[:nb] * two_pi_k[a]).sum(axis=(-2, -1)).real) * norm
        if return_position_curvature:
            amp = xp.sqrt(i_b + eps) if eps else xp.sqrt(xp.maximum(i_b, 1e-30))
            d_amp = []
            for a in range(2):
                d_far, _ = sc.forward(ifft2(shifted_k * two_pi_k[a]), origins)
                d_int = (2.0 * norm) * (far_saved.real * d_far.real + far_saved.imag * d_far.imag).sum(axis=1)
                d_amp.append(d_int[:nb] / (2.0 * amp))
            for a in range(2):
                for b in range(a, 2):
                    h = asnumpy(2.0 * (d_amp[a] * d_amp[b]).sum(axis=(-2, -1)).astype(xp.float64))
                    curv_pos[start:start + nb, a, b] = h
                    curv_pos[start:start + nb, b, a] = h
    # chain rule through t = exp(iσv): ∂L/∂v = −iσ·conj(t)·Σ (pointwise on the field, after folding the
    # wrap padding)
    acc = sc.fold(acc)
    t = sc.t[:, :sc.field_gpts[0], :sc.field_gpts[1]]
    grad_v = transmission_gradient(acc, t, sc.sigma, complex_potential)
    out = (loss, grad_v.astype(xp.complex64 if complex_potential else xp.float32), ifft2(grad_k).astype(xp.complex64))
    if want_pos:
        out = out + (grad_pos,)
    if return_position_curvature:
        out = out + (curv_pos,)
    return out
