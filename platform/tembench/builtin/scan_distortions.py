"""Scan distortions of STEM data (Friedrich 2023 §2.2.2–2.2.3, Table 2.1–2.2).

All three act on the scan grid: axes ``(scan_y, scan_x)`` of 4D-STEM data (every detector
pixel is carried along, so whole diffraction patterns move together) or ``(y, x)`` of a
scanned image (``adf_image`` …). Any other leading axis (tilt, frame, defocus) is an
independent acquisition and gets independent random draws. Scan lines run along x (fast
axis); lines follow each other along y (slow axis).
"""

from __future__ import annotations

import itertools
from typing import Literal

import numpy as np
from pydantic import Field

from tembench import NoiseModel, Params, hookimpl
from tembench._lazy import lazy_import
from tembench.builtin.noise import is_probe_measurement
from tembench.errors import TembenchError
from tembench.types import Measurement

ndimage = lazy_import("scipy.ndimage")  # loaded on first use (fast start-up)

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


def scan_axes(m: Measurement, who: str) -> tuple[int, int]:
    """Indices of the (slow y, fast x) scan axes of ``m``."""
    if "scan_y" in m.axes and "scan_x" in m.axes:
        return m.axes.index("scan_y"), m.axes.index("scan_x")
    if "y" in m.axes and "x" in m.axes and is_probe_measurement(m):
        return m.axes.index("y"), m.axes.index("x")
    raise TembenchError(f"{who} distorts a scanned (STEM) acquisition; measurement {m.kind!r} with axes {m.axes} "
                        "has no scan axes (scan_y, scan_x) and is not a scanned image. Plane-wave HRTEM "
                        "images have no scan to distort.")


def _frames(shape: tuple[int, ...], axes: tuple[str, ...], ay: int, ax: int):
    """Yield (index tuple into the array, frame key) for every independent acquisition (non-scan, non-k index)."""
    other = [i for i, a in enumerate(axes) if i not in (ay, ax) and not a.startswith("k_")]
    for idx in itertools.product(*(range(shape[i]) for i in other)):
        sl = [slice(None)] * len(shape)
        for i, v in zip(other, idx):
            sl[i] = v
        yield tuple(sl), other, idx


def _scan_first(sub: np.ndarray, axes_left: list[int], ay: int, ax: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Move the scan axes of a frame to the front; returns the view and their positions in ``sub``."""
    pos_y = ay - sum(1 for i in axes_left if i < ay)
    pos_x = ax - sum(1 for i in axes_left if i < ax)
    return np.moveaxis(sub, (pos_y, pos_x), (0, 1)), (pos_y, pos_x)


def companion_images(m: Measurement) -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
    """Scan images recorded together with ``m`` (extras['virtual_images'] of a 4D-STEM scan) with their axes.

    They share the scan grid, so scan distortions must move them exactly as they move the data.
    """
    out = {}
    vi = m.extras.get("virtual_images")
    if isinstance(vi, dict):
        axes = tuple(a for a in m.axes if not a.startswith("k_"))
        shape = tuple(n for a, n in zip(m.axes, np.shape(m.data)) if not a.startswith("k_"))
        for name, arr in vi.items():
            if isinstance(arr, np.ndarray) and arr.shape == shape:
                out[name] = (arr, axes)
    return out


def _with_companions(m: Measurement, fn) -> tuple[np.ndarray, dict]:
    """Apply ``fn(array, axes)`` to the data and to every companion image; returns (data, new extras)."""
    data = fn(m.data, m.axes)
    extras = dict(m.extras)
    comp = companion_images(m)
    if comp:
        vi = dict(extras["virtual_images"])
        for name, (arr, axes) in comp.items():
            vi[name] = fn(arr, axes).astype(arr.dtype)
        extras["virtual_images"] = vi
    return data, extras


def ar1_series(n: int, phi: float, sigma: float, rng: np.random.Generator, stationary_start: bool) -> np.ndarray:
    """Δ_j = φ Δ_{j−1} + a_j, a_j ~ N(0, σ²) (eqs 2.14/2.15); Δ_1 = a_1 or a_1/√(1−φ²) (stationary)."""
    a = rng.normal(0.0, sigma, n) if sigma > 0 else np.zeros(n)
    out = np.empty(n)
    if n == 0:
        return out
    out[0] = a[0] / np.sqrt(1.0 - phi**2) if stationary_start else a[0]
    for j in range(1, n):
        out[j] = phi * out[j - 1] + a[j]
    return out


def _index(i: np.ndarray, n: int, boundary: str) -> np.ndarray:
    return np.mod(i, n) if boundary == "wrap" else np.clip(i, 0, n - 1)


def resample_scan_lines(frame: np.ndarray, y_pos: np.ndarray, x_shift: np.ndarray, boundary: str) -> np.ndarray:
    """Bilinear re-interpolation of scan lines: out[j, i] = frame(y_pos[j], i + x_shift[j]).

    ``frame`` has the scan axes first, (ny, nx, ...); trailing axes (detector pixels) move with
    their probe position. Positions outside the grid take the nearest edge (``nearest``) or
    wrap around (``wrap``).
    """
    ny, nx = frame.shape[:2]
    out = np.empty(frame.shape, dtype=np.result_type(frame.dtype, np.float32))
    cols = np.arange(nx)
    for j in range(ny):
        y0 = int(np.floor(y_pos[j]))
        wy = y_pos[j] - y0
        x0 = int(np.floor(x_shift[j]))
        wx = x_shift[j] - x0
        r0, r1 = _index(np.array([y0, y0 + 1]), ny, boundary)
        c0 = _index(cols + x0, nx, boundary)
        c1 = _index(cols + x0 + 1, nx, boundary)
        top = (1 - wx) * frame[r0][c0] + wx * frame[r0][c1]
        bot = (1 - wx) * frame[r1][c0] + wx * frame[r1][c1]
        out[j] = (1 - wy) * top + wy * bot
    return out


class ScanJitter(NoiseModel):
    """Scan-line jitter: x-jitter line shifts and y-jitter line offsets as AR(1) series (Friedrich eqs 2.14–2.15).

    Line j is recorded at y_j + Δ^y_j with every pixel shifted by Δ^x_j, where
    Δ^x_j = φ_x Δ^x_{j−1} + a^x_j (Δ^x_1 = a^x_1) and Δ^y_j = φ_y Δ^y_{j−1} + a^y_j
    (Δ^y_1 = a^y_1/√(1−φ_y²)), a ~ N(0, σ²). Shifts are in scan pixels; the distorted data are
    made by linear interpolation over the displaced scan lines. Applies to scanned images and
    to every frame of a 4D-STEM scan (the shift map is on the scan grid). Defaults: Table 2.2.
    """

    name = "scan_jitter"
    accepts = ("*",)

    class Params(Params):
        phi_x: float = Field(0.5, ge=0, lt=1, description="AR(1) coupling of x-jitter line shifts φ_x")
        sigma_x_px: float = Field(0.5, ge=0, description="innovation std of x-jitter σ_x in scan pixels")
        phi_y: float = Field(0.5, ge=0, lt=1, description="AR(1) coupling of y-jitter line offsets φ_y")
        sigma_y_px: float = Field(0.25, ge=0, description="innovation std of y-jitter σ_y in scan pixels")
        boundary: Literal["nearest", "wrap"] = Field("nearest", description="values beyond the scan edge: "
                                                     "nearest edge pixel, or periodic wrap")
        record_shifts: bool = Field(False, description="store the true shifts (ground truth!) in "
                                    "measurement.extras['truth_scan_jitter_px'] for quantifiers")

    def apply(self, measurement: Measurement, params: Params, rng: np.random.Generator) -> Measurement:
        m = measurement
        ay, ax = scan_axes(m, self.name)
        ny = m.data.shape[ay]
        shifts = {}
        for _, _, key in _frames(m.data.shape, m.axes, ay, ax):  # one AR(1) pair per acquisition
            dx = ar1_series(ny, params.phi_x, params.sigma_x_px, rng, stationary_start=False)
            dy = ar1_series(ny, params.phi_y, params.sigma_y_px, rng, stationary_start=True)
            shifts[key] = (dy, dx)

        def jitter(arr, axes):
            by, bx = axes.index(m.axes[ay]), axes.index(m.axes[ax])
            out = np.empty(arr.shape, dtype=np.result_type(arr.dtype, np.float32))
            for sl, other, key in _frames(arr.shape, axes, by, bx):
                sub, (py, px) = _scan_first(arr[sl], other, by, bx)
                dy, dx = shifts[key]
                res = resample_scan_lines(sub, np.arange(ny) + dy, dx, params.boundary)
                out[sl] = np.moveaxis(res, (0, 1), (py, px))
            return out

        data, extras = _with_companions(m, jitter)
        if params.record_shifts:
            # (n_frames, ny, 2): (Δy, Δx) per line, in frame order
            extras["truth_scan_jitter_px"] = np.asarray([np.stack(v, axis=1) for v in shifts.values()])
        record = {"component": self.name, "params": params.model_dump()}
        return m.replace(data=data, extras=extras, provenance=[*m.provenance, record])


def fast_scan_kernel(n: int, dwell_time_us: float, response_time_us: float, model: str) -> np.ndarray:
    """Discrete point spread along the scan line, w[0..n-1] (sums to 1), causal (tail trails the probe).

    Pixel n collects the detector response between n·t_d and (n+1)·t_d after an electron:
    exponential h(t) = exp(−t/τ) (eq 2.17, β = 1/τ) or half-Lorentzian
    h(t) = α/(4π²t² + α²) with HWHM α/2π = τ (eq 2.18), integrated over each dwell window.
    """
    edges = np.arange(n + 1) * dwell_time_us
    if model == "exponential":
        cdf = 1.0 - np.exp(-edges / response_time_us)
    elif model == "half_lorentzian":
        alpha = 2 * np.pi * response_time_us
        cdf = np.arctan(2 * np.pi * edges / alpha) / (np.pi / 2)
    else:
        raise TembenchError(f"fast_scan_smear: unknown model {model!r}; choose exponential or half_lorentzian")
    w = np.diff(cdf)
    return w / w.sum()


class FastScanSmear(NoiseModel):
    """Fast-scan smear: convolution along the fast scan direction with the detector's decay (Friedrich eqs 2.16–2.18).

    I_d = I ⊗ h(x): an exponential (eq 2.17) or half-Lorentzian (eq 2.18) response of time
    constant ``response_time_us`` sampled at the pixel ``dwell_time_us`` (Table 2.2: 0.5 µs),
    so a bright pixel leaves a tail on the pixels scanned after it (eq 2.17 writes the kernel
    for x ≤ 0, i.e. for a scan running toward −x; here lines run toward +x). The kernel is
    normalised (intensity is conserved up to the tail cut at the line end) and each line
    starts afresh (flyback longer than the decay). The default response time is an
    assumption (the thesis gives only the dwell time); detectors range 0.1–several µs.
    """

    name = "fast_scan_smear"
    accepts = ("*",)

    class Params(Params):
        model: Literal["exponential", "half_lorentzian"] = Field("half_lorentzian", description="point-spread "
                                                                 "shape: eq 2.17 or eq 2.18")
        dwell_time_us: float = Field(0.5, gt=0, description="pixel dwell time in µs (Table 2.2)")
        response_time_us: float = Field(0.5, gt=0, description="detector decay time τ in µs (exponential: 1/β; "
                                        "half-Lorentzian: half width at half maximum)")

    def apply(self, measurement: Measurement, params: Params, rng: np.random.Generator) -> Measurement:
        m = measurement
        ay, ax = scan_axes(m, self.name)
        nx = m.data.shape[ax]
        w = fast_scan_kernel(nx, params.dwell_time_us, params.response_time_us, params.model)
        fast_name = m.axes[ax]

        def smear(arr, axes):
            a = axes.index(fast_name)
            data = np.asarray(arr, dtype=np.float64)
            if params.model == "exponential":
                # exact IIR form of the exponential kernel: y_n = (1−r) x_n + r y_{n−1}
                from scipy.signal import lfilter

                r = np.exp(-params.dwell_time_us / params.response_time_us)
                out = lfilter([1.0 - r], [1.0, -r], data, axis=a)
                return (out / (1.0 - r**nx)).astype(np.float32)  # same normalisation as the truncated kernel
            from scipy.signal import fftconvolve

            shape = [1] * data.ndim
            shape[a] = nx
            out = fftconvolve(data, w.reshape(shape), mode="full", axes=a)
            return np.take(out, np.arange(nx), axis=a).astype(np.float32)

        data, extras = _with_companions(m, smear)
        record = {"component": self.name, "params": params.model_dump(),
                  "kernel_fraction_first_pixel": float(w[0])}
        return m.replace(data=data, extras=extras, provenance=[*m.provenance, record])


class SourceSizeBroadening(NoiseModel):
    """Finite source size: convolution over the scan grid with a normalised 2D Gaussian of given FWHM (Friedrich Table 2.1).

    The effective source is an incoherent Gaussian spread of probe positions, so every
    detector pixel's scan image (ADF image, or each k-pixel of 4D-STEM data) is convolved
    with exp(−r²/2σ²), σ = FWHM / 2√(2 ln 2), using the scan step (Geometry.scan_step_A,
    else sampling_A) to convert Å to pixels. Table 2.1: FWHM 0.7 Å (bulk, dislocation),
    0.75 Å (particle). For plane-wave HRTEM, spatial coherence is a forward-model parameter.
    """

    name = "source_size"
    accepts = ("*",)

    class Params(Params):
        fwhm_A: float = Field(0.7, ge=0, description="FWHM of the Gaussian source image in Å")
        boundary: Literal["nearest", "wrap", "reflect"] = Field("wrap", description="edge handling of the "
                                                                 "convolution (wrap for periodic samples)")

    def apply(self, measurement: Measurement, params: Params, rng: np.random.Generator) -> Measurement:
        m = measurement
        ay, ax = scan_axes(m, self.name)
        step = m.geometry.scan_step_A or m.geometry.sampling_A
        if step is None:
            raise TembenchError("source_size: the measurement has no Geometry.scan_step_A (or sampling_A), so "
                                "fwhm_A cannot be converted to scan pixels.")
        sy, sx = (float(step), float(step)) if np.ndim(step) == 0 else (float(step[0]), float(step[1]))
        sig_y, sig_x = params.fwhm_A * FWHM_TO_SIGMA / sy, params.fwhm_A * FWHM_TO_SIGMA / sx
        names = (m.axes[ay], m.axes[ax])

        def blur(arr, axes):
            sigma = [0.0] * arr.ndim
            sigma[axes.index(names[0])], sigma[axes.index(names[1])] = sig_y, sig_x
            data = np.asarray(arr, dtype=np.float64)
            if params.fwhm_A > 0:
                data = ndimage.gaussian_filter(data, sigma=sigma, mode=params.boundary, truncate=5.0)
            return data.astype(np.float32)

        data, extras = _with_companions(m, blur)
        record = {"component": self.name, "params": params.model_dump(), "sigma_px": [sig_y, sig_x]}
        return m.replace(data=data, extras=extras, provenance=[*m.provenance, record])


@hookimpl
def tembench_register_noise_models():
    return [ScanJitter, FastScanSmear, SourceSizeBroadening]
