"""Scan distortions of STEM data (Friedrich 2023 §2.2.2–2.2.3, Table 2.1–2.2).

All three act on the scan grid: axes ``(scan_y, scan_x)`` of 4D-STEM data (every detector
pixel is carried along, so whole diffraction patterns move together) or ``(y, x)`` of a
scanned image (``adf_image`` …). Any other leading axis (tilt, frame, defocus) is an
independent acquisition and gets independent random draws. Scan lines run along x (fast
axis); lines follow each other along y (slow axis).

Order in a noise chain (Friedrich 2023 Ch. 2): ``source_size`` → ``scan_jitter`` →
``poisson_dose`` or ``scintillator_pmt`` → ``fast_scan_smear``. Source size and jitter move the
probe, so they act on the noise-free intensities before electrons are counted; interpolating
or blurring counts instead averages neighbouring noise away (a flat low-dose image drops from
variance/mean ≈ 1 to ≈ 0.5 under the Table 2.2 jitter read in scan pixels) and erases the
single-electron peaks of Fig. 2.3. Both refuse counted input unless ``allow_noisy_input: true``
(for data that is noisy already, e.g. an experimental image). The smear is the detector's
response to the detected electrons, so it comes after the counting.
"""

from __future__ import annotations

import itertools
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

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


def noise_chain_names(m: Measurement) -> list[str]:
    """Names of the components recorded in ``m.provenance`` (own records and the runner's stamps), in order."""
    return [str(p.get("component") or p.get("name")) for p in m.provenance if p.get("component") or p.get("name")]


def refuse_noisy_input(m: Measurement, who: str, allow: bool) -> bool:
    """Refuse a probe-position distortion of already counted (noisy) data unless ``allow``; returns m.counted."""
    if m.counted and not allow:
        raise TembenchError(
            f"{who}: measurement {m.kind!r} is already counted (noise chain so far: {noise_chain_names(m)}). "
            f"{who} moves or blurs probe positions, which happens before electrons are detected; applied to "
            "noisy counts it averages the shot and detector noise away (variance/mean of a flat low-dose image "
            "≈ 0.5 instead of ≈ 1) and erases the single-electron peaks. Order the chain as Friedrich 2023 "
            "Ch. 2: source_size → scan_jitter → poisson_dose / scintillator_pmt → fast_scan_smear. Only for "
            "data that is noisy already (e.g. an experimental image) set allow_noisy_input: true.")
    return m.counted


def scan_step_yx(m: Measurement, who: str) -> tuple[float, float]:
    """Scan step (y, x) in Å: Geometry.scan_step_A, else sampling_A (scanned images)."""
    step = m.geometry.scan_step_A or m.geometry.sampling_A
    if step is None:
        raise TembenchError(f"{who}: the measurement has no Geometry.scan_step_A (or sampling_A), so lengths in Å "
                            "cannot be converted to scan pixels.")
    return (float(step), float(step)) if np.ndim(step) == 0 else (float(step[0]), float(step[1]))


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


def ar1_rms(n: int, phi: float, sigma: float, stationary_start: bool) -> float:
    """Expected rms of Δ_1..Δ_n from :func:`ar1_series`: sqrt(mean_j Var Δ_j), closed form.

    Stationary start (eq 2.15): Var Δ_j = σ²/(1 − φ²) for every j. Start at a_1 (eq 2.14):
    Var Δ_j = σ² (1 − φ^{2j})/(1 − φ²), so the mean over j = 1..n is
    σ²/(1 − φ²) · [1 − φ²(1 − φ^{2n}) / (n (1 − φ²))] (φ = 0: σ²).
    """
    if n <= 0 or sigma == 0:
        return 0.0
    stat = sigma**2 / (1.0 - phi**2)
    if stationary_start or phi == 0:
        return float(np.sqrt(stat))
    return float(np.sqrt(stat * (1.0 - phi**2 * (1.0 - phi ** (2 * n)) / (n * (1.0 - phi**2)))))


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
    (Δ^y_1 = a^y_1/√(1−φ_y²)), a ~ N(0, σ²). σ is the std of the per-line *innovation* a_j,
    given in Å (``sigma_x_A``, ``sigma_y_A``) and converted to scan pixels with the scan step
    (Geometry.scan_step_A, else sampling_A); the rms displacement is larger, σ/√(1−φ²) for a
    stationary series. Table 2.2 gives σ_x = 0.5, σ_y = 0.25 in image pixels of 0.12 Å
    (particle) to 0.16 Å (dislocation); the defaults are the dislocation's 0.08 / 0.04 Å
    (particle: 0.06 / 0.03 Å). The provenance record holds the rms displacement in Å, expected
    (closed form over the scanned lines) and realised. The distorted data are made by linear
    interpolation over the displaced scan lines, on noise-free intensities: counted input is
    refused (see the module docstring) unless ``allow_noisy_input``. Applies to scanned images
    and to every frame of a 4D-STEM scan (the shift map is on the scan grid).
    """

    name = "scan_jitter"
    version = "2"  # σ in Å (v1: scan pixels); refuses counted input
    accepts = ("*",)

    class Params(Params):
        phi_x: float = Field(0.5, ge=0, lt=1, description="AR(1) coupling of x-jitter line shifts φ_x (Table 2.2)")
        sigma_x_A: float = Field(0.08, ge=0, description="std of the per-line x innovation a^x_j in Å (Table 2.2: "
                                 "0.5 px × 0.16 Å); the rms shift is larger, see the docstring")
        phi_y: float = Field(0.5, ge=0, lt=1, description="AR(1) coupling of y-jitter line offsets φ_y (Table 2.2)")
        sigma_y_A: float = Field(0.04, ge=0, description="std of the per-line y innovation a^y_j in Å (Table 2.2: "
                                 "0.25 px × 0.16 Å)")
        boundary: Literal["nearest", "wrap"] = Field("nearest", description="values beyond the scan edge: "
                                                     "nearest edge pixel, or periodic wrap")
        record_shifts: bool = Field(False, description="store the true shifts (ground truth!) in "
                                    "measurement.extras['truth_scan_jitter_px'] for quantifiers")
        allow_noisy_input: bool = Field(False, description="jitter data that is already counted (e.g. an "
                                        "experimental image); otherwise refused: jitter acts before detection")
        sigma_x_px: float | None = Field(None, exclude=True, description="removed: give sigma_x_A (Å)")
        sigma_y_px: float | None = Field(None, exclude=True, description="removed: give sigma_y_A (Å)")

        @field_validator("sigma_x_px", "sigma_y_px")
        @classmethod
        def _removed(cls, v, info):
            if v is not None:
                new = info.field_name.replace("_px", "_A")
                raise ValueError(
                    f"scan_jitter: {info.field_name} (scan pixels) was replaced by {new} in Å, so the same number "
                    f"means the same jitter at any scan step. Give {new} = {info.field_name} × the pixel size the "
                    f"value was meant for (Friedrich Table 2.2: 0.5 px × 0.16 Å = 0.08 Å for x, 0.25 px × 0.16 Å "
                    f"= 0.04 Å for y), not × a coarser simulation scan step")
            return v

    def apply(self, measurement: Measurement, params: Params, rng: np.random.Generator) -> Measurement:
        m = measurement
        ay, ax = scan_axes(m, self.name)
        counted = refuse_noisy_input(m, self.name, params.allow_noisy_input)
        step_y, step_x = scan_step_yx(m, self.name)
        sig_x_px, sig_y_px = params.sigma_x_A / step_x, params.sigma_y_A / step_y
        ny = m.data.shape[ay]
        shifts = {}
        for _, _, key in _frames(m.data.shape, m.axes, ay, ax):  # one AR(1) pair per acquisition
            dx = ar1_series(ny, params.phi_x, sig_x_px, rng, stationary_start=False)
            dy = ar1_series(ny, params.phi_y, sig_y_px, rng, stationary_start=True)
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
        rx = ar1_rms(ny, params.phi_x, params.sigma_x_A, stationary_start=False)
        ry = ar1_rms(ny, params.phi_y, params.sigma_y_A, stationary_start=True)
        all_dy = np.concatenate([v[0] for v in shifts.values()]) * step_y
        all_dx = np.concatenate([v[1] for v in shifts.values()]) * step_x
        real_x, real_y = float(np.sqrt(np.mean(all_dx**2))), float(np.sqrt(np.mean(all_dy**2)))
        record = {"component": self.name, "params": params.model_dump(), "scan_step_A": [step_y, step_x],
                  "sigma_px": [sig_y_px, sig_x_px],
                  "rms_displacement_A": {"x": rx, "y": ry, "total": float(np.hypot(rx, ry))},
                  "realised_rms_displacement_A": {"x": real_x, "y": real_y, "total": float(np.hypot(real_x, real_y))}}
        if counted:
            record["applied_to_counted_input"] = True
        return m.replace(data=data, extras=extras, provenance=[*m.provenance, record])


def _survival(t: np.ndarray, tau: float, model: str) -> np.ndarray:
    """S(t) = 1 − H(t): fraction of one electron's detector response still to come at time t ≥ 0 after it arrives."""
    if model == "exponential":
        return np.exp(-t / tau)                               # h ∝ exp(−t/τ), eq 2.17 with β = 1/τ
    if model == "half_lorentzian":
        return np.arctan2(tau, t) / (np.pi / 2)               # h ∝ α/(4π²t² + α²), eq 2.18, HWHM α/2π = τ
    raise TembenchError(f"fast_scan_smear: unknown model {model!r}; choose exponential or half_lorentzian")


def _survival_integral(a: np.ndarray, b: np.ndarray, tau: float, model: str) -> np.ndarray:
    """∫_a^b S(t) dt, in a form without cancellation far in the tail."""
    if model == "exponential":
        return tau * (np.exp(-a / tau) - np.exp(-b / tau))
    if model == "half_lorentzian":
        return (2 / np.pi) * (b * np.arctan2(tau, b) - a * np.arctan2(tau, a)
                              + 0.5 * tau * np.log1p((b**2 - a**2) / (a**2 + tau**2)))
    raise TembenchError(f"fast_scan_smear: unknown model {model!r}; choose exponential or half_lorentzian")


def fast_scan_tail(n: int, dwell_time_us: float, response_time_us: float, model: str,
                   arrival: str = "uniform") -> np.ndarray:
    """1 − C_k, k = 0..n−1: fraction of an electron's response not yet recorded k pixels after its own.

    ``pixel_start``: every electron arrives at the start of its pixel's dwell t_d, 1 − C_k = S((k+1)·t_d).
    ``uniform``: arrivals spread uniformly over the dwell (a continuously scanned beam),
    1 − C_k = (1/t_d) ∫_{k t_d}^{(k+1) t_d} S(t) dt.
    """
    td = float(dwell_time_us)
    k = np.arange(n, dtype=np.float64)
    if arrival == "pixel_start":
        return _survival((k + 1) * td, response_time_us, model)
    if arrival == "uniform":
        return _survival_integral(k * td, (k + 1) * td, response_time_us, model) / td
    raise TembenchError(f"fast_scan_smear: unknown arrival {arrival!r}; choose uniform or pixel_start")


def fast_scan_cumulative(n: int, dwell_time_us: float, response_time_us: float, model: str,
                         arrival: str = "uniform") -> np.ndarray:
    """C_k, k = 0..n−1: fraction of an electron's response recorded in its own pixel and the k pixels after it.

    Exponential with τ = t_d: C_0 = 1 − e⁻¹ = 0.632 (``pixel_start``) or e⁻¹ = 0.368 (``uniform``).
    """
    return 1.0 - fast_scan_tail(n, dwell_time_us, response_time_us, model, arrival)


def fast_scan_kernel(n: int, dwell_time_us: float, response_time_us: float, model: str,
                     arrival: str = "uniform") -> np.ndarray:
    """Discrete point spread along the scan line, w[0..n−1], causal (the tail trails the probe).

    w_k is the fraction of one electron's detector response recorded k pixels after its own
    (see :func:`fast_scan_tail`); Σ w = C_{n−1} < 1 — the rest falls beyond n pixels.
    """
    tail = fast_scan_tail(n, dwell_time_us, response_time_us, model, arrival)
    return -np.diff(tail, prepend=1.0)


class FastScanSmear(NoiseModel):
    """Fast-scan smear: convolution along the fast scan direction with the detector's decay (Friedrich eqs 2.16–2.18).

    I_d = I ⊗ h(x): an exponential (eq 2.17) or half-Lorentzian (eq 2.18) response of time
    constant ``response_time_us`` integrated over pixel dwells of ``dwell_time_us`` (Table 2.2:
    0.5 µs), so a bright pixel leaves a tail on the pixels scanned after it (eq 2.17 writes the
    kernel for x ≤ 0, i.e. for a scan running toward −x; here lines run toward +x). It is the
    detector's response to detected electrons, so it belongs after ``poisson_dose`` /
    ``scintillator_pmt`` in the chain (it then correlates the noise along the line, as Fig. 2.6).

    ``arrival`` (when an electron arrives within its pixel's dwell): ``uniform`` (default) —
    spread over the dwell, as for a continuously scanned beam; with τ = t_d an exponential
    leaves e⁻¹ = 0.368 of the signal in its own pixel. ``pixel_start`` — at the start of the
    dwell, 1 − e⁻¹ = 0.632: the discretised eq 2.16–2.17 (h sampled per pixel, normalised).

    ``line_start`` (the detector state when a line begins): ``settled`` (default) — the beam
    waits at the line start after the flyback for longer than the decay (line-settling delay),
    so the filter starts in the steady response to the first pixel and a flat image stays flat;
    ``blanked`` — no signal before the first pixel (no settling delay): the first columns read
    low, C_0, C_1, … of a flat image (half-Lorentzian, τ = t_d, pixel_start: 0.50, 0.70, 0.80).
    The response beyond the line end is lost. The default response time is an assumption
    (the thesis gives only the dwell time); detectors range 0.1–several µs.
    """

    name = "fast_scan_smear"
    version = "2"  # v1: pixel_start arrivals, line filter started from zero and renormalised
    accepts = ("*",)

    class Params(Params):
        model: Literal["exponential", "half_lorentzian"] = Field("half_lorentzian", description="point-spread "
                                                                 "shape: eq 2.17 or eq 2.18")
        dwell_time_us: float = Field(0.5, gt=0, description="pixel dwell time in µs (Table 2.2)")
        response_time_us: float = Field(0.5, gt=0, description="detector decay time τ in µs (exponential: 1/β; "
                                        "half-Lorentzian: half width at half maximum)")
        arrival: Literal["uniform", "pixel_start"] = Field("uniform", description="electron arrival within the "
                                                            "dwell: uniform (continuous beam) or at the pixel start")
        line_start: Literal["settled", "blanked"] = Field("settled", description="detector state at each line "
                                                          "start: settled on the first pixel (flyback + settling "
                                                          "delay) or zero (blanked, first columns read low)")

    def apply(self, measurement: Measurement, params: Params, rng: np.random.Generator) -> Measurement:
        m = measurement
        ay, ax = scan_axes(m, self.name)
        nx = m.data.shape[ax]
        tail = fast_scan_tail(nx, params.dwell_time_us, params.response_time_us, params.model, params.arrival)
        w = -np.diff(tail, prepend=1.0)
        fast_name = m.axes[ax]

        def smear(arr, axes):
            from scipy.signal import fftconvolve

            a = axes.index(fast_name)
            data = np.asarray(arr, dtype=np.float64)
            shape = [1] * data.ndim
            shape[a] = nx
            out = np.take(fftconvolve(data, w.reshape(shape), mode="full", axes=a), np.arange(nx), axis=a)
            if params.line_start == "settled":
                # the response to the beam parked on the first pixel before the line, not yet decayed
                out = out + tail.reshape(shape) * np.take(data, [0], axis=a)
            return out.astype(np.float32)

        data, extras = _with_companions(m, smear)
        record = {"component": self.name, "params": params.model_dump(),
                  "kernel_fraction_first_pixel": float(w[0]), "noise_correlation_sum_w2": float(np.sum(w**2))}
        return m.replace(data=data, extras=extras, provenance=[*m.provenance, record])


class SourceSizeBroadening(NoiseModel):
    """Finite source size: convolution over the scan grid with a normalised 2D Gaussian of given FWHM (Friedrich Table 2.1).

    The effective source is an incoherent Gaussian spread of probe positions, so every
    detector pixel's scan image (ADF image, or each k-pixel of 4D-STEM data) is convolved
    with exp(−r²/2σ²), σ = FWHM / 2√(2 ln 2), using the scan step (Geometry.scan_step_A,
    else sampling_A) to convert Å to pixels. Table 2.1: FWHM 0.7 Å (bulk, dislocation),
    0.75 Å (particle). It blurs the noise-free intensities, first in the chain; counted input is
    refused unless ``allow_noisy_input``. For plane-wave HRTEM, spatial coherence is a
    forward-model parameter.
    """

    name = "source_size"
    accepts = ("*",)

    class Params(Params):
        fwhm_A: float = Field(0.7, ge=0, description="FWHM of the Gaussian source image in Å (Table 2.1: 0.7 "
                              "bulk / dislocation, 0.75 particle)")
        boundary: Literal["nearest", "wrap", "reflect"] = Field("wrap", description="edge handling of the "
                                                                 "convolution (wrap for periodic samples)")
        allow_noisy_input: bool = Field(False, description="blur data that is already counted (e.g. an "
                                        "experimental image); otherwise refused: the source acts before detection")

    def apply(self, measurement: Measurement, params: Params, rng: np.random.Generator) -> Measurement:
        m = measurement
        ay, ax = scan_axes(m, self.name)
        counted = refuse_noisy_input(m, self.name, params.allow_noisy_input)
        sy, sx = scan_step_yx(m, self.name)
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
        if counted:
            record["applied_to_counted_input"] = True
        return m.replace(data=data, extras=extras, provenance=[*m.provenance, record])


@hookimpl
def tembench_register_noise_models():
    return [ScanJitter, FastScanSmear, SourceSizeBroadening]
