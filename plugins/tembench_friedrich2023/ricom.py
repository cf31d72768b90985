"""riCOM — real-time integrated centre of mass (Friedrich 2023 ch. 3; Yu et al., M&M 28, 1526 (2022)).

Physics. The COM shift of each pattern is the gradient of the probe-blurred phase, g = ∇O (eq 3.2;
g in rad/Å from the COM in mrad: g = 2π·10⁻³·COM/λ, as the Pelz plugin's DPC). The radially averaged
path integral from infinity (eq 3.3) is the 2D Green's-function integral

    O(r_p) = (a/2π) Σ_r (r_p − r)/|r_p − r|² · g(r),     a = step_y·step_x (Å²),

which follows from O = G ∗ ∇²O with G = ln|r|/2π and one integration by parts; riCOM (eq 3.4)
restricts the sum to an n×n window: a cross-correlation of the COM field with the kernel
k_n(m) = (a/2π)·(−m)/|m|². We store it as the *update patch* U(m) = (a/2π)·m/|m|², m = image
pixel − frame position (Å), so that a frame at s adds ``U(m)·g(s)`` to pixel s + m (Fig. 3.1b) and
the image is ``U_y ∗ g_y + U_x ∗ g_x`` (a convolution, zero outside the scan). Both forms are here:
:func:`ricom_image` (batch, FFT) and :class:`RiCOM` (streaming, per frame, memory O(kernel + image)).

Frequency response. Along q = (q, 0) the continuous n×n kernel transforms to
Û_x(q) = −(2i/π)∫₀^R sin(qx)·atan(R/x) dx (R = n/2 for the discrete window, see
:func:`kernel_response_continuous`); with atan → π/2 (a strip infinite across the path) this is the
thesis's line-integration approximation (eq 3.7): |Û| ≈ (1 − cos(qR))/q. As n → ∞ the kernel becomes
the Fourier integrator −i q/|q|², i.e. iCOM (the infinite-kernel limit; ``kernel_size=None``).

Filters (eqs 3.8–3.9): a radially symmetric filter f commutes into the kernel, k ⊗ f, computed on a
grid the size of the scan and cropped back to n×n (:func:`filtered_kernel`); the cut-offs k_min/k_max
are in cycles/Å (the thesis's "px⁻¹" values are FFT indices k = k_per_A · N · step_A).

Orientation: COM_scan = R(θ)·T·COM_det as in the Pelz plugin; the rotation is a parameter or, when not
given, estimated from the COM field seen so far with the Pelz estimator
(:func:`tembench_pelz2022.dpc.resolve_orientation`): minimum curl, and the 180° branch by the sign of the
integrated phase's correlation with the dark-field counts (beyond 1.2 α, :func:`tembench_pelz2022.dpc.dark_field_mask`),
which the live class sums per scan position as patterns arrive (one more image-sized plane), the phase's positive
skew being the fallback without a dark-field signal — as the ``ricom`` reconstructor and the Pelz ``icom``. While the rotation is unknown the streaming image
is kept as two (four with an unknown transpose) partial images, linear in the rotation's cos/sin, so the
estimate can change at any time without revisiting a frame (the thesis's GUI changes it live, too).
"""

from __future__ import annotations

import math

import numpy as np

from tembench.errors import TembenchError
from tembench_friedrich2023 import ricom_kernels
from tembench_pelz2022 import _kernels as pelz_kernels
from tembench_pelz2022.common import rotation_matrix
from tembench_pelz2022.dpc import dark_field_mask, icom, resolve_orientation
from tembench_pelz2022.eer_ops import DetectorGrid, center_of_mass

__all__ = ["ricom_kernel", "filtered_kernel", "make_kernel", "ricom_image", "kernel_response",
           "kernel_response_continuous", "line_integration_weight", "orientation_matrix", "RiCOM"]


# --- kernels ---------------------------------------------------------------------------------------
def _check_size(kernel_size) -> int:
    n = int(kernel_size)
    if n != kernel_size or n < 3 or n % 2 == 0:
        raise TembenchError(f"riCOM kernel_size must be an odd integer ≥ 3 (a window centred on the probe "
                            f"position, eq 3.4), got {kernel_size!r}")
    return n


def _step2(step_A) -> tuple[float, float]:
    sy, sx = (float(step_A), float(step_A)) if np.ndim(step_A) == 0 else (float(step_A[0]), float(step_A[1]))
    if not (sy > 0 and sx > 0):
        raise TembenchError(f"riCOM: scan step must be positive (Å), got {step_A}")
    return sy, sx


def ricom_kernel(kernel_size: int, step_A=1.0) -> tuple[np.ndarray, np.ndarray]:
    """Update patch (U_y, U_x), each (n, n) float64: U(m) = (a/2π)·m/|m|² (1/Å·Å² → multiplies g in rad/Å
    to give rad), m = (i·step_y, j·step_x), i, j ∈ [−(n−1)/2, (n−1)/2]; U(0) = 0 (eq 3.4)."""
    n = _check_size(kernel_size)
    sy, sx = _step2(step_A)
    c = n // 2
    my = (np.arange(n) - c)[:, None] * sy
    mx = (np.arange(n) - c)[None, :] * sx
    r2 = my * my + mx * mx
    r2[c, c] = np.inf
    f = sy * sx / (2 * np.pi)
    return f * my / r2, f * mx / r2


def _embed(u: np.ndarray, shape) -> np.ndarray:
    """(n, n) centred patch placed on a periodic grid with its centre at index (0, 0)."""
    n = u.shape[0]
    c = n // 2
    if shape[0] < n or shape[1] < n:
        raise TembenchError(f"riCOM: grid {tuple(shape)} smaller than the kernel ({n}×{n})")
    out = np.zeros(shape, np.float64)
    idx_y = (np.arange(n) - c) % shape[0]
    idx_x = (np.arange(n) - c) % shape[1]
    out[np.ix_(idx_y, idx_x)] = u
    return out


def _crop(a: np.ndarray, n: int) -> np.ndarray:
    c = n // 2
    idx_y = (np.arange(n) - c) % a.shape[0]
    idx_x = (np.arange(n) - c) % a.shape[1]
    return a[np.ix_(idx_y, idx_x)]


def band_mask(shape, step_A, k_min_per_A: float | None, k_max_per_A: float | None) -> np.ndarray:
    """F(k) of eq 3.9 on an FFT grid: 1 where k_min ≤ |k| ≤ k_max (|k| in cycles/Å), else 0."""
    sy, sx = _step2(step_A)
    ky = np.fft.fftfreq(shape[0], d=sy)[:, None]
    kx = np.fft.fftfreq(shape[1], d=sx)[None, :]
    k = np.sqrt(ky * ky + kx * kx)
    m = np.ones(shape, bool)
    if k_min_per_A is not None:
        m &= k >= k_min_per_A
    if k_max_per_A is not None:
        m &= k <= k_max_per_A
    return m.astype(np.float64)


def filtered_kernel(kernel_size: int, step_A=1.0, k_min_per_A: float | None = None,
                    k_max_per_A: float | None = None, grid_shape=None) -> tuple[np.ndarray, np.ndarray]:
    """Kernel with a built-in high/low/band-pass filter (eqs 3.8–3.9): crop_n(U ⊗ f), f = F⁻¹{1[k_min ≤ |k| ≤
    k_max]} on ``grid_shape`` (default: the smallest square grid holding the kernel twice, 2n−1; pass the scan
    shape to follow the thesis, which filters on the COM-map grid). k_min only = high-pass, k_max only = low-pass."""
    uy, ux = ricom_kernel(kernel_size, step_A)
    n = uy.shape[0]
    if k_min_per_A is not None and k_max_per_A is not None and not (k_max_per_A > k_min_per_A >= 0):
        raise TembenchError(f"riCOM band-pass: need 0 ≤ k_min < k_max (cycles/Å), got {k_min_per_A}, {k_max_per_A}")
    if k_min_per_A is None and k_max_per_A is None:
        return uy, ux
    shape = (2 * n - 1, 2 * n - 1) if grid_shape is None else (max(int(grid_shape[0]), n), max(int(grid_shape[1]), n))
    F = band_mask(shape, step_A, k_min_per_A, k_max_per_A)
    out = []
    for u in (uy, ux):
        v = np.real(np.fft.ifft2(np.fft.fft2(_embed(u, shape)) * F))
        out.append(np.ascontiguousarray(_crop(v, n)))
    return out[0], out[1]


def make_kernel(kernel_size: int, step_A=1.0, k_min_per_A: float | None = None, k_max_per_A: float | None = None,
                grid_shape=None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`ricom_kernel`, or :func:`filtered_kernel` when a cut-off is given."""
    if k_min_per_A is None and k_max_per_A is None:
        return ricom_kernel(kernel_size, step_A)
    return filtered_kernel(kernel_size, step_A, k_min_per_A, k_max_per_A, grid_shape)


# --- frequency response ----------------------------------------------------------------------------
def kernel_response(uy: np.ndarray, ux: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """DFT (Û_y, Û_x) of the patch on a periodic grid ``shape``: riCOM^(q) = Û_y ĝ_y + Û_x ĝ_x."""
    return np.fft.fft2(_embed(uy, shape)), np.fft.fft2(_embed(ux, shape))


def kernel_response_continuous(q_per_px: np.ndarray, kernel_size: int) -> np.ndarray:
    """|Û_x(q, 0)| of the continuous square window of the unit-step kernel, (2/π)∫₀^R sin(qx)·atan(R/x) dx,
    R = n/2 (the n samples cover [−n/2, n/2]); q in rad/px. Quadrature (Gauss–Legendre, 400 nodes)."""
    R = kernel_size / 2.0
    x, w = np.polynomial.legendre.leggauss(400)
    x = (x + 1) * R / 2
    w = w * R / 2
    q = np.atleast_1d(np.asarray(q_per_px, float))
    return (2 / np.pi) * (np.sin(q[:, None] * x[None, :]) * np.arctan(R / x)[None, :]) @ w


def line_integration_weight(k, N: int, kernel_size: int) -> np.ndarray:
    """Eq 3.7: N/(2kπ)·[1 − cos((n−1)/2 · 2kπ/N)], k the FFT index along one axis of an N-pixel image."""
    k = np.asarray(k, float)
    q = 2 * np.pi * k / N
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(k == 0, 0.0, (1 - np.cos((kernel_size - 1) / 2 * q)) / q)


# --- batch reconstruction --------------------------------------------------------------------------
def ricom_image(gy: np.ndarray, gx: np.ndarray, uy: np.ndarray, ux: np.ndarray) -> np.ndarray:
    """Batch riCOM: U_y ∗ g_y + U_x ∗ g_x on the scan grid (linear convolution, zero outside the scan; FFT).
    ``gy, gx`` in the scan frame (rad/Å), kernels from :func:`make_kernel`. Equals :class:`RiCOM`'s stream."""
    from scipy.signal import fftconvolve

    gy = np.asarray(gy, np.float64)
    gx = np.asarray(gx, np.float64)
    return fftconvolve(gy, uy, mode="same") + fftconvolve(gx, ux, mode="same")


def orientation_matrix(rotation_deg: float, transpose: bool = False) -> np.ndarray:
    """M with g_scan = M·g_det ((y, x) vectors): R(θ)·T, the Pelz plugin's convention."""
    R = rotation_matrix(rotation_deg)
    return R @ np.array([[0.0, 1.0], [1.0, 0.0]]) if transpose else R


# --- streaming -------------------------------------------------------------------------------------
class RiCOM:
    """Live riCOM: feed frames or electron-event chunks in any order, read :attr:`image` at any time.

    Memory: the image (and, with an unknown rotation, 1–3 more image-sized partial sums), the stored COM
    field (2 images, for the rotation estimate), with an unknown rotation the dark-field counts per position
    (1 image, for the 180° branch; needs ``semiangle_mrad``, which :meth:`from_geometry` takes from the
    geometry) and the kernel — never the data. Each call computes the
    COM of its patterns (the Pelz plugin's COM arithmetic), turns it into the phase gradient and adds one
    n×n patch per pattern (numba when available).

    ``kernel_size=None`` is the infinite-kernel limit, iCOM: :attr:`image` integrates the stored COM field
    in Fourier space (Pelz ``icom``).
    """

    def __init__(self, scan_shape, kernel_size: int | None = 21, detector_shape=None, step_A=1.0,
                 wavelength_A: float | None = None, detector_sampling_mrad=None, centre_px=None,
                 rotation_deg: float | None = None, transpose: bool | None = False,
                 k_min_per_A: float | None = None, k_max_per_A: float | None = None, filter_grid_shape=None,
                 numba: bool | None = None, icom_padding_factor: float = 1.0, semiangle_mrad: float | None = None):
        self.scan_shape = (int(scan_shape[0]), int(scan_shape[1]))
        if min(self.scan_shape) < 1:
            raise TembenchError(f"RiCOM: scan_shape must be positive, got {scan_shape}")
        self.step_A = _step2(step_A)
        self.kernel_size = None if kernel_size is None else _check_size(kernel_size)
        self.numba = numba
        self.icom_padding_factor = float(icom_padding_factor)
        self.grid = None
        if detector_shape is not None:
            ny, nx = int(detector_shape[0]), int(detector_shape[1])
            s = 1.0 if detector_sampling_mrad is None else detector_sampling_mrad
            s = (float(s), float(s)) if np.ndim(s) == 0 else (float(s[0]), float(s[1]))
            c = (float(ny // 2), float(nx // 2)) if centre_px is None else (float(centre_px[0]), float(centre_px[1]))
            self.grid = DetectorGrid((ny, nx), c, s)
        calibrated = wavelength_A is not None and detector_sampling_mrad is not None
        # g (rad/Å) = 2π·10⁻³·COM(mrad)/λ; uncalibrated: COM in detector pixels, the image in arbitrary units
        self.gradient_per_com = 2 * np.pi * 1e-3 / float(wavelength_A) if calibrated else 1.0
        self.quantity = "phase_rad" if calibrated else "arbitrary"
        self.rotation_deg = None if rotation_deg is None else float(rotation_deg)
        self.transpose = transpose
        if self.rotation_deg is not None and self.transpose is None:
            self.transpose = False
        if self.kernel_size is not None:
            fg = self.scan_shape if filter_grid_shape is None else filter_grid_shape
            self.uy, self.ux = make_kernel(self.kernel_size, self.step_A, k_min_per_A, k_max_per_A, fg)
            self._neg_ux = -self.ux
        else:
            if k_min_per_A is not None or k_max_per_A is not None:
                raise TembenchError("RiCOM: filters are built into a finite kernel; kernel_size=None (iCOM) takes none")
            self.uy = self.ux = None
        self.com_y = np.zeros(self.scan_shape, np.float64)  # phase gradient, detector frame (rad/Å)
        self.com_x = np.zeros(self.scan_shape, np.float64)
        self.seen = np.zeros(self.scan_shape, bool)
        # the 180° branch of an estimated rotation: counts beyond 1.2 α per position (the detector's units:
        # mrad when calibrated, pixels otherwise); None = no dark-field pixels, the skew decides
        self.semiangle_mrad = None if semiangle_mrad is None else float(semiangle_mrad)
        self._dark_mask = None
        self.dark = None
        if self.rotation_deg is None and self.semiangle_mrad is not None and self.grid is not None:
            self._set_dark_mask()
        self._planes = self._new_planes()
        self._next = 0
        self._cache = None
        self.last_orientation: dict | None = None

    # -- state ----------------------------------------------------------------------------------
    def _set_dark_mask(self) -> None:
        self._dark_mask = dark_field_mask(self.grid, self.semiangle_mrad)
        if self._dark_mask is not None:
            self.dark = np.zeros(self.scan_shape, np.float64)

    def _new_planes(self) -> dict:
        if self.kernel_size is None:
            return {}
        if self.rotation_deg is not None:
            return {"fixed": np.zeros(self.scan_shape, np.float64)}
        keys = ("p0", "p1") if self.transpose is False else ("p0", "p1", "p2", "p3")
        if self.transpose is True:
            keys = ("p2", "p3")
        return {k: np.zeros(self.scan_shape, np.float64) for k in keys}

    @property
    def n_frames_seen(self) -> int:
        return int(self.seen.sum())

    @property
    def nbytes(self) -> int:
        """Bytes held: image planes, COM field, coverage map and kernel (independent of the data size)."""
        k = 0 if self.uy is None else self.uy.nbytes + self.ux.nbytes * 2
        dk = (0 if self.dark is None else self.dark.nbytes) + (0 if self._dark_mask is None else self._dark_mask.nbytes)
        return int(sum(p.nbytes for p in self._planes.values()) + self.com_y.nbytes * 2 + self.seen.nbytes + k + dk)

    def reset(self) -> None:
        self.com_y[:] = 0
        self.com_x[:] = 0
        self.seen[:] = False
        if self.dark is not None:
            self.dark[:] = 0
        self._planes = self._new_planes()
        self._next = 0
        self._cache = None

    # -- input ----------------------------------------------------------------------------------
    def _positions(self, n: int, indices):
        sy, sx = self.scan_shape
        if indices is None:
            flat = np.arange(self._next, self._next + n, dtype=np.int64)
        else:
            a = np.asarray(indices)
            if a.ndim == 2 and a.shape == (n, 2):
                flat = a[:, 0].astype(np.int64) * sx + a[:, 1].astype(np.int64)
                if np.any((a[:, 0] < 0) | (a[:, 0] >= sy) | (a[:, 1] < 0) | (a[:, 1] >= sx)):
                    raise TembenchError(f"RiCOM: a scan position lies outside the scan {self.scan_shape}")
            elif a.ndim <= 1 and a.size == n:
                flat = a.astype(np.int64).ravel()
            else:
                raise TembenchError(f"RiCOM: indices must be {n} flat scan indices or an ({n}, 2) array of "
                                    f"(row, column), got shape {a.shape}")
        if n and (flat.min() < 0 or flat.max() >= sy * sx):
            raise TembenchError(f"RiCOM: scan index out of range for scan {self.scan_shape} "
                                f"(did the stream pass the end of the scan?)")
        if n:
            self._next = int(flat[-1]) + 1
        return flat // sx, flat % sx

    def _need_grid(self, shape):
        if self.grid is None:
            self.grid = DetectorGrid((int(shape[0]), int(shape[1])), (float(shape[0] // 2), float(shape[1] // 2)),
                                     (1.0, 1.0))
            if self.rotation_deg is None and self.semiangle_mrad is not None:
                self._set_dark_mask()
        elif tuple(shape) != tuple(self.grid.shape):
            raise TembenchError(f"RiCOM: patterns of shape {tuple(shape)} do not match the detector "
                                f"{self.grid.shape}")

    def add_frames(self, frames, indices=None) -> None:
        """Add patterns (F, k_y, k_x) or one (k_y, k_x) at ``indices`` (F flat scan indices, or (F, 2)
        rows/columns; default: the raster positions following the last call). The frames are not kept."""
        d = np.asarray(frames)
        if d.ndim == 2:
            d = d[None]
        if d.ndim != 3:
            raise TembenchError(f"RiCOM.add_frames: frames must be (F, k_y, k_x), got shape {d.shape}")
        self._need_grid(d.shape[1:])
        mask = self._dark_mask
        if np.issubdtype(d.dtype, np.integer):  # COM sums and dark-field counts in one pass (exact)
            sums = ricom_kernels.integer_moments(np.ascontiguousarray(d), numba=self.numba, mask=mask)
        else:
            if not np.all(np.isfinite(d)):
                raise TembenchError("RiCOM.add_frames: the patterns contain NaN or inf")
            d = np.ascontiguousarray(d, np.float64)
            sums = (pelz_kernels.dense_moments(d, numba=self.numba) if mask is None
                    else pelz_kernels.dense_pass(d, mask, numba=self.numba)).astype(np.float64)
        com_y, com_x, _ = pelz_kernels.com_finish(np.ascontiguousarray(sums[:, :3]), "frame", self.grid.centre_px,
                                                  self.grid.sampling_mrad, numba=self.numba)
        self._add_com(com_y, com_x, *self._positions(len(d), indices), None if mask is None else sums[:, 3])

    def add_events(self, events, indices=None) -> None:
        """Add electron events: a :class:`tembench.eer.ElectronEvents` chunk (its frames in order) or an
        ``(offsets, detector_indices)`` CSR pair; ``indices`` as in :meth:`add_frames`."""
        from tembench.eer import ElectronEvents

        if not isinstance(events, ElectronEvents):
            if self.grid is None:
                raise TembenchError("RiCOM.add_events: give detector_shape to the constructor for raw CSR events")
            offsets, det = events
            offsets = np.asarray(offsets)
            events = ElectronEvents(offsets, np.asarray(det), (1, len(offsets) - 1), self.grid.shape)
        self._need_grid(events.detector_shape)
        com_y, com_x, _ = center_of_mass(events, self.grid, "frame", numba=self.numba)
        dark = None
        if self._dark_mask is not None:  # the Pelz event mask sums (the same as its dark_field_image)
            dark = pelz_kernels.csr_mask_sums(events.offsets, events.indices, self._dark_mask, numba=self.numba)
        self._add_com(com_y.ravel(), com_x.ravel(), *self._positions(events.n_frames, indices), dark)

    def add_com(self, com_y_mrad, com_x_mrad, indices=None, dark_field=None) -> None:
        """Add COM values (mrad, detector frame, relative to the unscattered beam) computed elsewhere, and
        optionally each pattern's dark-field counts (the 180° branch of an estimated rotation; without them the
        branch is the phase's skew)."""
        cy = np.asarray(com_y_mrad, np.float64).ravel()
        cx = np.asarray(com_x_mrad, np.float64).ravel()
        df = None
        if dark_field is not None and self.rotation_deg is None:
            df = np.asarray(dark_field, np.float64).ravel()
            if df.size != cy.size:
                raise TembenchError(f"RiCOM.add_com: {df.size} dark-field values for {cy.size} COM values")
            if self.dark is None:
                self.dark = np.zeros(self.scan_shape, np.float64)
        self._add_com(cy, cx, *self._positions(len(cy), indices), df)

    def _add_com(self, com_y, com_x, ys, xs, dark=None) -> None:
        gy = com_y * self.gradient_per_com
        gx = com_x * self.gradient_per_com
        if np.any(self.seen[ys, xs]):
            raise TembenchError("RiCOM: a scan position was fed twice (call reset() to start a new frame)")
        self.com_y[ys, xs] = gy
        self.com_x[ys, xs] = gx
        self.seen[ys, xs] = True
        if dark is not None and self.dark is not None:
            self.dark[ys, xs] = dark
        self._cache = None
        if self.kernel_size is None:
            return
        P, nb = self._planes, self.numba
        if "fixed" in P:
            M = orientation_matrix(self.rotation_deg, bool(self.transpose))
            ricom_kernels.scatter(P["fixed"], self.uy, self.ux, ys, xs, M[0, 0] * gy + M[0, 1] * gx,
                                  M[1, 0] * gy + M[1, 1] * gx, nb)
            return
        # image = c·p0 + s·p1 (no transpose) or s·p2 + c·p3 (transposed), R(θ) = [[c, s], [−s, c]]
        if "p0" in P:
            ricom_kernels.scatter(P["p0"], self.uy, self.ux, ys, xs, gy, gx, nb)
            ricom_kernels.scatter(P["p1"], self.uy, self._neg_ux, ys, xs, gx, gy, nb)
        if "p2" in P:
            ricom_kernels.scatter(P["p2"], self.uy, self._neg_ux, ys, xs, gy, gx, nb)
            ricom_kernels.scatter(P["p3"], self.uy, self.ux, ys, xs, gx, gy, nb)

    # -- output ---------------------------------------------------------------------------------
    def orientation(self) -> dict:
        """The orientation in use: given, or estimated from the COM field seen so far (Pelz estimator on the
        scanned rows; minimum curl, transpose by curl fraction, 180° branch by the sign of the integrated phase's
        correlation with the dark-field counts seen so far when that is ≥ 3σ, else by the phase's positive skew;
        ``branch`` says which decided). Positions not yet seen hold the mean dark-field count of those seen, so
        they add nothing to the correlation."""
        if self.rotation_deg is not None:
            return {"rotation_deg": self.rotation_deg, "transpose": bool(self.transpose), "estimated": False}
        rows = np.nonzero(self.seen.any(axis=1))[0]
        if len(rows) < 2:
            return {"rotation_deg": 0.0, "transpose": bool(self.transpose), "estimated": False}
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        dark = None
        if self.dark is not None:
            seen = self.seen[r0:r1]
            dark = np.where(seen, self.dark[r0:r1], self.dark[r0:r1][seen].mean())
        o = resolve_orientation(self.com_y[r0:r1], self.com_x[r0:r1], self.step_A, None, self.transpose,
                                dark_field=dark)
        return {"rotation_deg": float(o["rotation_deg"]), "transpose": bool(o["transpose"]), "estimated": True,
                "curl_fraction": o.get("curl_fraction"), "branch": o.get("branch")}

    @property
    def image(self) -> np.ndarray:
        """The current riCOM image (float64, scan shape; rad when calibrated), a fresh array."""
        if self._cache is not None:
            return self._cache.copy()
        o = self.orientation()
        self.last_orientation = o
        if self.kernel_size is None:
            M = orientation_matrix(o["rotation_deg"], o["transpose"])
            gy = M[0, 0] * self.com_y + M[0, 1] * self.com_x
            gx = M[1, 0] * self.com_y + M[1, 1] * self.com_x
            img = icom(gy, gx, self.step_A, self.icom_padding_factor)
        elif "fixed" in self._planes:
            img = self._planes["fixed"].copy()
        else:
            t = math.radians(o["rotation_deg"])
            c, s = math.cos(t), math.sin(t)
            P = self._planes
            img = s * P["p2"] + c * P["p3"] if o["transpose"] else c * P["p0"] + s * P["p1"]
        self._cache = img
        return img.copy()

    # -- convenience ----------------------------------------------------------------------------
    @classmethod
    def from_geometry(cls, geometry, scan_shape, detector_shape, kernel_size: int | None = 21, **kw) -> RiCOM:
        """A RiCOM calibrated from a measurement's geometry (scan step, energy, detector sampling and centre)."""
        from tembench_pelz2022.common import probe_optics, scan_step

        opt = probe_optics(geometry, "ricom")
        grid = DetectorGrid.from_geometry(geometry, detector_shape)
        kw.setdefault("semiangle_mrad", opt.semiangle_mrad)  # the dark-field mask of the 180° branch
        return cls(scan_shape, kernel_size, detector_shape=detector_shape, step_A=scan_step(geometry, "ricom"),
                   wavelength_A=opt.wavelength_A, detector_sampling_mrad=grid.sampling_mrad,
                   centre_px=grid.centre_px, **kw)
