"""4D-STEM pre-processing on electron events in O(C) and on dense data in O(M·F) (Pelz 2022 Table I).

Every operation takes either :class:`tembench.eer.ElectronEvents` (cost ∝ the number of
electrons C) or a dense array (scan_y, scan_x, k_y, k_x) (cost ∝ pixels M × frames F) and
gives the same result; the tests check they agree exactly. The detector geometry travels in a
:class:`DetectorGrid` so that cropping and binning keep the angular coordinates exact.

- crop / centre: :func:`crop`, :func:`centre_crop`  (a per-pixel lookup table on the events)
- binning: :func:`bin_detector`
- centre of mass: :func:`center_of_mass`
- radial sums / virtual annular detectors: :func:`annular_mask`, :func:`detector_response`
- sum of all frames (PACBED): :func:`frame_sum`; average (vacuum) probe: :func:`mean_pattern`
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from tembench._lazy import lazy_import
from tembench.eer import ElectronEvents, index_dtype_for, offset_dtype_for
from tembench.errors import TembenchError

# numba kernels compile on first use; importing them lazily keeps `tembench list` fast
_kernels = lazy_import("tembench_pelz2022._kernels")


@dataclass(frozen=True)
class DetectorGrid:
    """Detector pixel grid: ``shape`` (ny, nx), ``centre_px`` (y, x) of the unscattered beam in
    pixel units (may be fractional after binning), ``sampling_mrad`` (y, x) angular pixel size."""

    shape: tuple[int, int]
    centre_px: tuple[float, float]
    sampling_mrad: tuple[float, float]

    @classmethod
    def from_geometry(cls, geometry, shape) -> DetectorGrid:
        s = geometry.detector_sampling_mrad
        if s is None:
            raise TembenchError("the measurement has no Geometry.detector_sampling_mrad (angular size of a "
                                "detector pixel, mrad); the 4D-STEM forward model must record it")
        sy, sx = (float(s), float(s)) if np.ndim(s) == 0 else (float(s[0]), float(s[1]))
        ny, nx = int(shape[0]), int(shape[1])
        extra = geometry.extra or {}
        # the forward model records where the unscattered beam falls (stem4d does, also for even
        # binnings, where it lies between pixels); otherwise the contract: pixel (n//2, n//2)
        c = extra.get("detector_centre_px")
        centre = (float(c[0]), float(c[1])) if c is not None else (float(ny // 2), float(nx // 2))
        return cls((ny, nx), centre, (sy, sx))

    @property
    def n_pixels(self) -> int:
        return self.shape[0] * self.shape[1]

    def axes_mrad(self) -> tuple[np.ndarray, np.ndarray]:
        """Angles (y, x) of every pixel row / column relative to the centre (mrad), float64."""
        ay = (np.arange(self.shape[0]) - self.centre_px[0]) * self.sampling_mrad[0]
        ax = (np.arange(self.shape[1]) - self.centre_px[1]) * self.sampling_mrad[1]
        return ay, ax

    def radius_mrad(self) -> np.ndarray:
        ay, ax = self.axes_mrad()
        return np.sqrt(ay[:, None] ** 2 + ax[None, :] ** 2)


def _is_events(x) -> bool:
    return isinstance(x, ElectronEvents)


def _dense4(x) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 4:
        raise TembenchError(f"dense 4D-STEM data must be (scan_y, scan_x, k_y, k_x), got shape {a.shape}")
    return a


# --- index remapping: crop, bin, centre --------------------------------------------------------
def remap(events: ElectronEvents, lut: np.ndarray, new_shape: tuple[int, int],
          numba: bool | None = None) -> ElectronEvents:
    """Map every event's pixel p to ``lut[p]`` (−1 drops it): O(C) plus O(F) new offsets."""
    n_pix = new_shape[0] * new_shape[1]
    offsets, idx = _kernels.remap_indices(events.offsets, events.indices, lut, index_dtype_for(n_pix),
                                          offset_dtype_for, numba=numba)
    monotone = bool(np.all(np.diff(lut[lut >= 0]) > 0)) if lut.size else True
    return ElectronEvents(offsets, idx, events.scan_shape, new_shape,
                          sorted_within_frames=events.sorted_within_frames and monotone)


def crop(x, grid: DetectorGrid, window: tuple[int, int, int, int]):
    """Keep detector rows y0:y1 and columns x0:x1; returns (data, grid)."""
    y0, y1, x0, x1 = (int(v) for v in window)
    ny, nx = grid.shape
    if not (0 <= y0 < y1 <= ny and 0 <= x0 < x1 <= nx):
        raise TembenchError(f"crop window {window} is not inside the {ny}x{nx} detector")
    new_grid = DetectorGrid((y1 - y0, x1 - x0), (grid.centre_px[0] - y0, grid.centre_px[1] - x0), grid.sampling_mrad)
    if _is_events(x):
        lut = np.full(grid.n_pixels, -1, dtype=np.int64)
        iy, ix = np.meshgrid(np.arange(y0, y1), np.arange(x0, x1), indexing="ij")
        lut[(iy * nx + ix).ravel()] = np.arange((y1 - y0) * (x1 - x0))
        return remap(x, lut, new_grid.shape), new_grid
    return _dense4(x)[:, :, y0:y1, x0:x1], new_grid


def centre_crop(x, grid: DetectorGrid, half_width_px: int):
    """Crop a (2h+1)² window centred on the pixel nearest the beam centre (clipped to the detector)."""
    h = int(half_width_px)
    cy, cx = (int(round(c)) for c in grid.centre_px)
    ny, nx = grid.shape
    window = (max(cy - h, 0), min(cy + h + 1, ny), max(cx - h, 0), min(cx + h + 1, nx))
    return crop(x, grid, window)


def bin_detector(x, grid: DetectorGrid, factor: int | tuple[int, int]):
    """Sum ``factor``×``factor`` pixel blocks (trailing rows/columns that do not fill a block are dropped)."""
    fy, fx = (int(factor), int(factor)) if np.ndim(factor) == 0 else (int(factor[0]), int(factor[1]))
    if fy < 1 or fx < 1:
        raise TembenchError(f"bin factor must be ≥ 1, got {factor}")
    ny, nx = grid.shape
    by, bx = ny // fy, nx // fx
    if by < 1 or bx < 1:
        raise TembenchError(f"bin factor {factor} is larger than the {ny}x{nx} detector")
    new_grid = DetectorGrid((by, bx), ((grid.centre_px[0] - (fy - 1) / 2) / fy, (grid.centre_px[1] - (fx - 1) / 2) / fx),
                            (grid.sampling_mrad[0] * fy, grid.sampling_mrad[1] * fx))
    if fy == fx == 1:
        return x, grid
    if _is_events(x):
        iy = np.arange(ny) // fy
        ix = np.arange(nx) // fx
        lut = (iy[:, None] * bx + ix[None, :])
        lut = np.where((iy[:, None] < by) & (ix[None, :] < bx), lut, -1).ravel()
        return remap(x, lut, new_grid.shape), new_grid
    d = _dense4(x)
    # f² strided adds stream the data once; a reshape-sum over axes (3, 5) is several times slower
    out = np.zeros((*d.shape[:2], by, bx), dtype=d.dtype)
    for i in range(fy):
        for j in range(fx):
            out += d[:, :, i:by * fy:fy, j:bx * fx:fx]
    return out, new_grid


# --- reductions ----------------------------------------------------------------------------------
def detector_response(x, weights, numba: bool | None = None) -> np.ndarray:
    """Σ_k I(k, R)·w_j(k) for detector weights ``weights`` (ny, nx) or (ny, nx, d); returns (scan_y, scan_x[, d]).

    Events: per-frame sums of the weights gathered at the events (O(C·d)); integer weights
    give exact integer sums. Dense: one matrix product (O(M·F·d)).
    """
    w = np.asarray(weights)
    single = w.ndim == 2
    if _is_events(x):
        if w.shape[:2] != x.detector_shape:
            raise TembenchError(f"detector weights of shape {w.shape[:2]} do not match the detector {x.detector_shape}")
        if single and w.dtype == bool:  # a virtual detector mask: counts on it, int64
            return _kernels.csr_mask_sums(x.offsets, x.indices, w, numba=numba).reshape(x.scan_shape)
        table = w.reshape(x.n_pixels, -1)
        out = _kernels.csr_table_sums(x.offsets, x.indices, table, numba=numba)
        shape = x.scan_shape
    else:
        d = _dense4(x)
        if w.shape[:2] != d.shape[2:]:
            raise TembenchError(f"detector weights of shape {w.shape[:2]} do not match the detector {d.shape[2:]}")
        flat = d.reshape(d.shape[0] * d.shape[1], -1)
        out = flat @ w.reshape(flat.shape[1], -1).astype(flat.dtype, copy=False)
        shape = d.shape[:2]
    out = out.reshape(*shape, -1)
    return out[..., 0] if single else out


def annular_mask(grid: DetectorGrid, inner_mrad: float, outer_mrad: float) -> np.ndarray:
    """Boolean virtual annular detector inner ≤ θ < outer (mrad) on the pixel centres."""
    if not (0 <= inner_mrad < outer_mrad):
        raise TembenchError(f"annular detector needs 0 ≤ inner < outer (mrad), got {inner_mrad}, {outer_mrad}")
    r = grid.radius_mrad()
    return (r >= inner_mrad) & (r < outer_mrad)


_PACK_LIMIT = 1 << 32  # Σ ix must stay below this for the packed table


@functools.lru_cache(maxsize=16)
def _packed_yx_table(ny: int, nx: int) -> np.ndarray:
    """(ny·nx,) int64 table (iy << 32) | ix: one gather and one add per event give Σy and Σx at once."""
    t = (np.arange(ny, dtype=np.int64)[:, None] << 32) | np.arange(nx, dtype=np.int64)[None, :]
    t = t.ravel()
    t.flags.writeable = False
    return t


def _event_yx_sums(ev: ElectronEvents, numba: bool | None) -> np.ndarray:
    """(scan_y, scan_x, 3) float64 (Σ iy, Σ ix, counts) per frame (exact integers), O(C)."""
    ny, nx = ev.detector_shape
    if ev.indices.dtype.itemsize <= 2:
        # 16-bit indices: Σp and Σ⌊p/nx⌋ by multiply-shift, no table (vectorises; ~0.1 ns/event)
        return _kernels.csr_index_sums(ev.offsets, ev.indices, nx, numba=numba).reshape(*ev.scan_shape, 3)
    counts = ev.counts_per_frame
    n_max = int(counts.max()) if len(counts) else 0
    out = np.empty((ev.n_frames, 3), np.float64)
    if n_max * max(nx - 1, 1) < _PACK_LIMIT and 2 * n_max * max(ny - 1, 1) < _PACK_LIMIT:
        s = _kernels.csr_table_sums(ev.offsets, ev.indices, _packed_yx_table(ny, nx), numba=numba)[:, 0]
        out[:, 0] = s >> 32
        out[:, 1] = s & 0xFFFFFFFF
    else:  # a frame so full that Σ ix could carry into Σ iy: two columns
        table = np.empty((ny, nx, 2), dtype=np.int64)
        table[..., 0] = np.arange(ny)[:, None]
        table[..., 1] = np.arange(nx)[None, :]
        out[:, :2] = _kernels.csr_table_sums(ev.offsets, ev.indices, table.reshape(-1, 2), numba=numba)
    out[:, 2] = counts
    return out.reshape(*ev.scan_shape, 3)


def center_of_mass(x, grid: DetectorGrid, normalize: str = "frame", numba: bool | None = None):
    """Centre of mass of every pattern relative to the grid centre, in mrad: (com_y, com_x, counts).

    ``normalize="frame"`` divides by each pattern's own total (frames with no counts give 0);
    ``"mean"`` divides by the mean total over the scan (linear in the data; better at < 1
    electron per pattern). Sums are exact integers for counted data on either representation.
    Events: Σ iy and Σ ix from the index stream (16-bit indices) or one packed int64 table,
    the counts from the CSR offsets. Dense: one pass over the data (numba) or one matrix product.
    """
    ny, nx = grid.shape
    if normalize not in ("frame", "mean"):
        raise TembenchError(f"center_of_mass: normalize must be 'frame' or 'mean', got {normalize!r}")
    if _is_events(x):
        if x.detector_shape != (ny, nx):
            raise TembenchError(f"detector grid {grid.shape} does not match the events' detector {x.detector_shape}")
        if x.indices.dtype.itemsize <= 2 and x.n_frames:
            # 16-bit indices: sums and normalisation in one fused pass (same arithmetic as below)
            com_y, com_x, counts = _kernels.com_events(x.offsets, x.indices, nx, normalize, grid.centre_px,
                                                       grid.sampling_mrad, numba=numba)
            return com_y.reshape(x.scan_shape), com_x.reshape(x.scan_shape), counts.reshape(x.scan_shape)
        sums = _event_yx_sums(x, numba)
    else:
        d = _dense4(x)
        if d.shape[2:] != (ny, nx):
            raise TembenchError(f"detector grid {grid.shape} does not match the data's detector {d.shape[2:]}")
        d3 = d.reshape(-1, ny, nx)
        if d3.dtype not in (np.float32, np.float64):
            d3 = d3.astype(np.float64)
        # float32 data: exact integer sums while they stay < 2²⁴ (counted data)
        sums = _kernels.dense_moments(d3, numba=numba).astype(np.float64).reshape(*d.shape[:2], 3)
    shape = sums.shape[:2]
    com_y, com_x, counts = _kernels.com_finish(sums.reshape(-1, 3), normalize, grid.centre_px, grid.sampling_mrad,
                                               numba=numba)
    return com_y.reshape(shape), com_x.reshape(shape), counts.reshape(shape)


def frame_sum(x) -> np.ndarray:
    """Sum of all frames (PACBED), (ny, nx); int64 counts for events."""
    if _is_events(x):
        return _kernels.histogram(x.indices, x.n_pixels).reshape(x.detector_shape)
    d = _dense4(x)
    return d.reshape(-1, d.shape[2] * d.shape[3]).sum(axis=0, dtype=np.float64).reshape(d.shape[2:])


def mean_pattern(x, frame_mask=None) -> np.ndarray:
    """Average pattern over the frames selected by ``frame_mask`` (scan_y, scan_x) bool (default all):
    with a vacuum mask this is the average vacuum probe. float64 (ny, nx)."""
    if frame_mask is None:
        n = x.n_frames if _is_events(x) else int(np.prod(_dense4(x).shape[:2]))
        return frame_sum(x).astype(np.float64) / max(n, 1)
    m = np.asarray(frame_mask, dtype=bool).ravel()
    n = int(m.sum())
    if n == 0:
        raise TembenchError("mean_pattern: the frame mask selects no frame")
    if _is_events(x):
        if m.size != x.n_frames:
            raise TembenchError(f"frame mask has {m.size} entries for {x.n_frames} frames")
        keep = np.repeat(m, x.counts_per_frame)
        return np.bincount(x.indices[keep], minlength=x.n_pixels).reshape(x.detector_shape) / n
    d = _dense4(x)
    flat = d.reshape(-1, d.shape[2] * d.shape[3])
    return (flat[m].sum(axis=0, dtype=np.float64) / n).reshape(d.shape[2:])


def vacuum_frames(x, grid: DetectorGrid, semiangle_mrad: float, quantile: float = 0.9) -> np.ndarray:
    """Frames whose dark-field signal (outside 1.2 α) is in the lowest 1 − ``quantile`` fraction: a
    vacuum estimate for :func:`mean_pattern` when no vacuum region is known."""
    outer = float(np.max(grid.radius_mrad())) + 1.0
    df = detector_response(x, annular_mask(grid, 1.2 * semiangle_mrad, outer))
    return df <= np.quantile(df, 1 - quantile)


# --- helpers for methods that need a small dense detector (SSB) ------------------------------------
def bright_field_crop_bin(x, grid: DetectorGrid, semiangle_mrad: float, max_pixels: int = 32,
                          margin: float = 1.1, bin_factor: int | None = None):
    """Centre-crop to the bright-field disc (× ``margin``) and bin so the result has ≤ ``max_pixels``
    per side; returns (data, grid, bin factor). Works in O(C) on events."""
    rad_px = max(semiangle_mrad * margin / min(grid.sampling_mrad), 1.0)
    half = int(math.ceil(rad_px))
    if bin_factor is None:
        bin_factor = max(1, int(math.ceil((2 * half + 1) / max_pixels)))
    # make the window a whole number of bins with the centre pixel in the middle bin
    n_bins = max(1, int(math.ceil((2 * half + 1) / bin_factor)))
    if n_bins % 2 == 0:
        n_bins += 1
    width = n_bins * bin_factor
    cy, cx = (int(round(c)) for c in grid.centre_px)
    y0, x0 = cy - width // 2, cx - width // 2
    ny, nx = grid.shape
    if y0 < 0 or x0 < 0 or y0 + width > ny or x0 + width > nx:
        # the disc reaches the detector edge: keep the largest centred window that fits
        h = min(cy, cx, ny - 1 - cy, nx - 1 - cx)
        n_bins = max(1, (2 * h + 1) // bin_factor)
        if n_bins % 2 == 0:
            n_bins -= 1
        n_bins = max(n_bins, 1)
        width = n_bins * bin_factor
        y0, x0 = cy - width // 2, cx - width // 2
    x, g = crop(x, grid, (y0, y0 + width, x0, x0 + width))
    x, g = bin_detector(x, g, bin_factor)
    return x, g, bin_factor
