"""Reading 4D-STEM / EER measurements: data, detector grid, probe optics and scan grid."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from tembench.eer import ElectronEvents, events_of
from tembench.errors import TembenchError
from tembench.physics import constants, optics
from tembench.types import Measurement, Reconstruction
from tembench_pelz2022.eer_ops import DetectorGrid

ACCEPTS = ("4dstem", "eer")


def load_4d(measurement: Measurement, method: str, check: bool = True):
    """(dense array or ElectronEvents, DetectorGrid) of a ``4dstem`` or ``eer`` measurement.

    Dense data are returned as they are (a memory-mapped array stays mapped: nothing is read
    here but the finite check, which streams the data a bounded number of scan rows at a time).
    ``check=False`` leaves the finite check to the caller (:func:`stream_pass` does it in its pass).
    """
    if measurement.kind == "eer":
        x: np.ndarray | ElectronEvents = events_of(measurement)
        det_shape = x.detector_shape
    elif measurement.kind == "4dstem":
        x = measurement.data if isinstance(measurement.data, np.ndarray) else np.asarray(measurement.data)
        if x.ndim != 4:
            raise TembenchError(f"{method}: 4D-STEM data must be (scan_y, scan_x, k_y, k_x), got shape {x.shape}")
        det_shape = x.shape[2:]
        if check:
            check_finite(x, method)
    else:
        raise TembenchError(f"{method}: accepts measurement kinds {ACCEPTS}, got {measurement.kind!r}")
    return x, DetectorGrid.from_geometry(measurement.geometry, det_shape)


# --- chunked reading (issue 19): a bounded number of scan rows at a time ------------------------
#: bytes of dense data held at once by the chunked readers (whole scan rows; at least one row)
CHUNK_BYTES = 8 * 2**20


def _file_backing(x: np.ndarray) -> tuple[str, int] | None:
    """(path, byte offset) of the file region that holds C-contiguous ``x``, if ``x`` is (a view of) a
    file-backed ``np.memmap`` whose file still holds what the array holds, else None.

    A copy-on-write mapping (``mmap_mode="c"``, what the stage cache and ``stem4d`` return) whose
    private pages were written no longer matches its file: then None (the array is sliced instead).
    """
    if not x.flags.c_contiguous:
        return None
    mm_arr = x
    while mm_arr is not None and getattr(mm_arr, "_mmap", None) is None:
        mm_arr = getattr(mm_arr, "base", None)
        if mm_arr is not None and not isinstance(mm_arr, np.ndarray):
            return None
    if mm_arr is None or not isinstance(mm_arr, np.memmap) or not getattr(mm_arr, "filename", None):
        return None
    try:
        import mmap as _mmap
        base = np.frombuffer(mm_arr._mmap, dtype=np.uint8).ctypes.data
        start = int(mm_arr.offset) - int(mm_arr.offset) % _mmap.ALLOCATIONGRANULARITY
        pos = start + (x.ctypes.data - base)
        if pos < 0 or pos + x.nbytes > os.path.getsize(mm_arr.filename):
            return None
        if mm_arr.mode == "c":
            from tembench.cache import _private_pages_untouched
            if not _private_pages_untouched(mm_arr):
                return None
    except (OSError, ValueError, TypeError, BufferError, AttributeError):
        return None
    return str(mm_arr.filename), int(pos)


def rows_per_chunk(x, max_bytes: int = CHUNK_BYTES) -> int:
    row = max(1, int(np.prod(x.shape[1:], dtype=np.int64)) * x.dtype.itemsize)
    return max(1, min(int(x.shape[0]), int(max_bytes) // row))


def scan_row_chunks(x: np.ndarray, max_bytes: int = CHUNK_BYTES):
    """Yield ``(row0, row1, block)`` over dense (scan_y, scan_x, k_y, k_x) data, whole scan rows at a time
    (at most ``max_bytes`` of data, at least one row).

    An in-RAM array yields views. A file-backed memory map (``stem4d``'s ``patterns_path``, a stage-cache
    hit) is read with ``pread`` into one reused buffer, so the file's pages sit in the page cache, never in
    the process's resident memory: the peak RAM of a reduction over the data does not grow with its size.
    The caller must not keep ``block`` past the next iteration (it is overwritten).
    """
    n = rows_per_chunk(x, max_bytes)
    backing = _file_backing(x)
    if backing is None:
        for r0 in range(0, x.shape[0], n):
            yield r0, min(r0 + n, x.shape[0]), x[r0:r0 + n]
        return
    path, pos = backing
    row_bytes = int(np.prod(x.shape[1:], dtype=np.int64)) * x.dtype.itemsize
    buf = np.empty((n,) + tuple(x.shape[1:]), dtype=x.dtype)
    with open(path, "rb", buffering=0) as fh:
        fd = fh.fileno()
        for r0 in range(0, x.shape[0], n):
            r1 = min(r0 + n, x.shape[0])
            block = buf[:r1 - r0]
            view = memoryview(block.reshape(-1).view(np.uint8))
            done, want, off = 0, (r1 - r0) * row_bytes, pos + r0 * row_bytes
            while done < want:
                got = os.preadv(fd, [view[done:want]], off + done)
                if got <= 0:
                    raise TembenchError(f"{path}: the data file ended {want - done} bytes early (truncated?)")
                done += got
            yield r0, r1, block


@dataclass
class PixelStats:
    """Per detector pixel over every frame (flattened k_y·k_x): the float64 sum and the number of frames in
    which the pixel differs from its first frame."""

    total: np.ndarray
    changes: np.ndarray
    n_frames: int


def stream_pass(x: np.ndarray, method: str, consumer=None, stats: bool = True,
                max_bytes: int = CHUNK_BYTES, fused=None) -> PixelStats | None:
    """One pass over dense data in row chunks: the finite check (raising as :func:`check_finite` does),
    the per-pixel statistics of :func:`find_bad_pixels` (if ``stats``) and ``consumer(row0, row1, block)``
    (e.g. the COM sums), so a reconstructor reads the data once when no pixel is bad.

    ``fused(row0, row1, block, acc)`` replaces ``consumer`` with a kernel that makes the statistics in its own
    read of each frame (frame by frame, while the frame is in cache): ``acc`` = (first frame, float64 total,
    int64 changes) to accumulate into (None when ``stats`` is False); it returns each frame's total, whose
    finiteness is the finite check. Without ``fused`` the statistics are one numba pass per chunk
    (``_kernels.dense_pass``; it was four numpy reductions with temporaries, most of the SSB whole call)."""
    from tembench_pelz2022 import _kernels
    sy, sx = x.shape[:2]
    K = int(np.prod(x.shape[2:], dtype=np.int64))
    finite_dtype = not (x.dtype.kind in "f" or x.dtype.kind == "c")
    total = np.zeros(K, np.float64) if stats else None
    changes = np.zeros(K, np.int64) if stats else None
    first = None
    n = frames = 0
    where = None
    for r0, r1, block in scan_row_chunks(x, max_bytes):
        b = block.reshape(-1, K)
        if stats and first is None:
            first = b[0].copy()
        acc = (first, total, changes) if stats else None
        if fused is not None:
            tot = fused(r0, r1, block, acc)
            ok = finite_dtype or bool(np.isfinite(tot).all())
        elif stats:
            sums = _kernels.dense_pass(b.reshape(-1, *x.shape[2:]), None, acc)
            ok = finite_dtype or bool(np.isfinite(sums[:, 2]).all())
        else:  # a non-finite value makes the sum NaN/inf; a finite sum proves the block finite. Summed in
            # the data's own float type (no float64 cast: half the cost); an overflow only sends the
            # block to the exact per-pixel check below, which then finds nothing
            ok = finite_dtype or np.isfinite(b.sum())
        if not ok:
            bad = ~np.isfinite(block)
            n += int(bad.sum())
            frames += int(bad.any(axis=(2, 3)).sum())
            if where is None:
                a, c, ky, kx = (int(i) for i in np.argwhere(bad)[0])
                where = (a + r0, c, ky, kx, block[a, c, ky, kx].item())
        if consumer is not None and fused is None:
            consumer(r0, r1, block)
    if where is not None:
        y, xx, ky, kx, v = where
        raise TembenchError(f"{method}: the 4D-STEM data hold {n} non-finite value(s) in {frames} frame(s); first at "
                            f"scan (y={y}, x={xx}), detector pixel (ky={ky}, kx={kx}) = {v!r}. "
                            "Replace or mask them (e.g. set dead/hot detector pixels to the frame's local median) "
                            "before reconstructing")
    return PixelStats(total, changes, sy * sx) if stats else None


def check_finite(x: np.ndarray, method: str, max_bytes: int = CHUNK_BYTES) -> None:
    """Refuse data holding NaN or ±inf, naming the first bad frame (scan y, x) and detector pixel.

    One non-finite pixel otherwise turns the whole DPC/iCOM image (and, for inf, SSB) into NaN,
    or makes SSB report a misleading "no signal". Streams the data in row chunks (bounded memory).
    """
    if np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.bool_):
        return
    stream_pass(x, method, stats=False, max_bytes=max_bytes)


# --- bad detector pixels (issue 12 §1): detect over the whole scan, repair frame by frame ----------
#: a pixel whose mean over the scan differs from the 5x5 median of the mean pattern by more than this
#: many times the bright-field level (the largest value of that median-filtered mean pattern) is hot
#: (above) or negative (below); physical patterns never exceed their own bright-field level 3x
OUTLIER_FACTOR = 3.0
#: a pixel that never changes over the scan while the 5x5 median of its neighbours changes in at least
#: this many frames is dead / stuck (for counted data: chance of a live pixel never changing ≈ e^-20)
DEAD_MIN_CHANGES = 20
#: more flagged pixels than this fraction of the detector: refuse (the detector or the thresholds are off)
MAX_BAD_FRACTION = 0.05
#: the 5x5 median must keep the bright-field disc: detection needs a disc radius of at least this (px)
MIN_DISC_RADIUS_PX = 3.0
BAD_KINDS = {1: "hot", 2: "negative", 3: "dead"}


@dataclass(frozen=True)
class BadPixels:
    """Detector pixels found defective over the whole scan (see :func:`find_bad_pixels`)."""

    kind: np.ndarray             # int8 (k_y, k_x): 0 good, 1 hot, 2 negative, 3 dead/stuck
    mean: np.ndarray             # float64 (k_y, k_x): each pixel's mean over the scan
    worst_frame: np.ndarray      # int64 (k_y, k_x, 2): scan (y, x) of the pixel's extreme value
    level: float                 # the bright-field level the thresholds refer to
    checked: bool = True         # False: detection was skipped (``note`` says why)
    note: str = ""
    neighbours: tuple = ()       # ((ky, kx, ys, xs), …): the good pixels each bad one is replaced by

    @property
    def mask(self) -> np.ndarray:
        return self.kind > 0

    def __bool__(self) -> bool:
        return bool(self.kind.any())

    def counts(self) -> dict:
        return {name: int((self.kind == k).sum()) for k, name in BAD_KINDS.items()}

    def listing(self, limit: int = 20) -> list[dict]:
        out = []
        for ky, kx in np.argwhere(self.kind > 0)[:limit]:
            k = int(self.kind[ky, kx])
            d = {"kind": BAD_KINDS[k], "ky": int(ky), "kx": int(kx), "mean": float(self.mean[ky, kx])}
            if k in (1, 2):
                d["scan_y"], d["scan_x"] = (int(v) for v in self.worst_frame[ky, kx])
            out.append(d)
        return out

    def describe(self, limit: int = 3) -> str:
        parts = []
        for d in self.listing(limit):
            s = f"{d['kind']} pixel (ky={d['ky']}, kx={d['kx']}), mean {d['mean']:.4g}"
            if "scan_y" in d:
                s += f", most extreme in frame scan (y={d['scan_y']}, x={d['scan_x']})"
            parts.append(s)
        n = int(self.mask.sum())
        more = f" and {n - len(parts)} more" if n > len(parts) else ""
        return "; ".join(parts) + more

    def report(self) -> dict:
        """What goes into ``Reconstruction.extras``: counts per kind, the mask and the first pixels."""
        return {"bad_pixel_counts": self.counts(), "bad_pixel_mask": self.mask.copy(),
                "bad_pixels": self.listing(), "bad_pixel_level": self.level,
                **({"bad_pixel_note": self.note} if self.note else {})}

    def refuse(self, method: str) -> None:
        """Raise naming the kind, detector pixel and frame of the first bad pixels (if any)."""
        if self:
            c = self.counts()
            raise TembenchError(f"{method}: the detector has {int(self.mask.sum())} bad pixel(s) "
                                f"({', '.join(f'{v} {k}' for k, v in c.items() if v)}): {self.describe()}. "
                                "Use bad_pixels: repair to replace them by the mean of their good neighbours in "
                                "every frame, or fix the data")


def _no_bad_pixels(shape, mean, note: str) -> BadPixels:
    return BadPixels(np.zeros(shape, np.int8), mean, np.zeros(shape + (2,), np.int64), 0.0, False, note)


def find_bad_pixels(x, method: str, disc_radius_px: float | None = None, outlier_factor: float = OUTLIER_FACTOR,
                    max_fraction: float = MAX_BAD_FRACTION, max_bytes: int = CHUNK_BYTES,
                    stats: PixelStats | None = None) -> BadPixels:
    """Hot, negative and dead/stuck detector pixels of dense 4D-STEM data, from one chunked pass.

    Per detector pixel: the mean, minimum and maximum over every frame (and where they occur).
    With m the mean pattern, M its 5x5 median filter and L = max(M) (the bright-field level; the
    median removes clusters of up to 12 defective pixels and keeps a disc of radius >= 3 px):

    - hot:      m - M >  ``outlier_factor`` * L   (a stuck-high pixel, or one frame's huge value)
    - negative: m - M < -``outlier_factor`` * L   (a large negative value in some frame)
    - dead:     the pixel's value never changes over the scan while the 5x5 median of the number of
                frames in which each pixel differs from its first frame is >= ``DEAD_MIN_CHANGES``
                (a live counted pixel whose neighbours change that often never changes with chance ≈ e^-20)
                (the edge pixels of a region that never sees electrons — a beam stop, the zero fill of
                rotated patterns — count as dead too: they are repaired from their live neighbours)

    Refuses (``TembenchError``) when more than ``max_fraction`` of the detector is flagged, or a bad
    pixel has no good pixel within 5x5 to be repaired from. Electron events and data whose disc is
    under 3 px are not checked (``checked=False``, with a note). ``stats``: the statistics of a
    :func:`stream_pass` already made (else one pass is made here, with the finite check).
    """
    if not isinstance(x, np.ndarray) or x.ndim != 4:
        shape = tuple(getattr(x, "detector_shape", (1, 1)))
        return _no_bad_pixels(shape, np.zeros(shape), "electron events: bad-pixel detection covers dense data only")
    sy, sx, ky, kx = x.shape
    K, F = ky * kx, sy * sx
    if stats is None:
        stats = stream_pass(x, method, max_bytes=max_bytes)
    total, changes = stats.total, stats.changes
    mean = (total / F).reshape(ky, kx)
    if disc_radius_px is not None and disc_radius_px < MIN_DISC_RADIUS_PX:
        return _no_bad_pixels((ky, kx), mean, f"bright-field disc radius {disc_radius_px:.1f} px < "
                              f"{MIN_DISC_RADIUS_PX:g} px: bad-pixel detection skipped")
    from scipy import ndimage
    med = ndimage.median_filter(mean, size=5, mode="nearest")
    level = float(med.max())
    if not level > 0:
        return _no_bad_pixels((ky, kx), mean, "the mean pattern holds no signal: bad-pixel detection skipped")
    resid = mean - med
    kind = np.zeros((ky, kx), np.int8)
    kind[resid > outlier_factor * level] = 1
    kind[resid < -outlier_factor * level] = 2
    changes = changes.reshape(ky, kx)
    dead = changes == 0
    if dead.any():  # the 5x5 median of the change counts is needed only where a pixel never changes
        if dead.sum() * 8 < dead.size:  # a few such pixels: their own 5x5 medians (the same as the filter's there)
            pad = np.pad(changes, 2, mode="edge")  # = ndimage mode "nearest"
            ys, xs = np.nonzero(dead)
            win = np.stack([pad[ys + a, xs + b] for a in range(5) for b in range(5)], axis=1)
            dead[ys, xs] = np.median(win, axis=1) >= DEAD_MIN_CHANGES
        else:
            dead &= ndimage.median_filter(changes, size=5, mode="nearest") >= DEAD_MIN_CHANGES
    kind[(kind == 0) & dead] = 3
    worst_frame = np.zeros((ky, kx, 2), np.int64)
    extreme = np.flatnonzero((kind == 1) | (kind == 2))
    if len(extreme):  # a second pass over the few outlying pixels only: the frame of each one's extreme value
        sign = np.where(kind.reshape(-1)[extreme] == 2, -1.0, 1.0)
        best = np.full(len(extreme), -np.inf)
        where = np.zeros(len(extreme), np.int64)
        for r0, _, block in scan_row_chunks(x, max_bytes):
            cols = block.reshape(-1, K)[:, extreme].astype(np.float64) * sign
            f = cols.argmax(axis=0)
            v = cols[f, np.arange(len(extreme))]
            upd = v > best
            best[upd], where[upd] = v[upd], f[upd] + r0 * sx
        worst_frame.reshape(-1, 2)[extreme] = np.stack([where // sx, where % sx], axis=-1)
    bad = np.argwhere(kind > 0)
    found = BadPixels(kind, mean, worst_frame, level)
    if len(bad) > max_fraction * K:
        raise TembenchError(f"{method}: {len(bad)} of {K} detector pixels ({100 * len(bad) / K:.1f} % > "
                            f"{100 * max_fraction:g} %) look defective ({found.describe()}); the detector or the "
                            "data are broken, or the bad-pixel thresholds do not fit them (bad_pixels: ignore "
                            "skips the check)")
    neighbours = []
    for y, xx in bad:
        for r in (1, 2):
            y0, y1, x0, x1 = max(y - r, 0), min(y + r + 1, ky), max(xx - r, 0), min(xx + r + 1, kx)
            ys, xs = np.nonzero(kind[y0:y1, x0:x1] == 0)
            if len(ys):
                neighbours.append((int(y), int(xx), ys + y0, xs + x0))
                break
        else:
            raise TembenchError(f"{method}: bad detector pixel (ky={y}, kx={xx}) has no good pixel within 5x5 to be "
                                f"repaired from ({found.describe()})")
    return BadPixels(kind, mean, worst_frame, level, True, "", tuple(neighbours))


def repair_block(block: np.ndarray, bad: BadPixels, in_place: bool = False) -> np.ndarray:
    """``block`` (…, k_y, k_x) with every bad pixel replaced, frame by frame, by the mean of its good neighbours
    (3x3, else 5x5): a copy (integer data become float64), or ``block`` itself when ``in_place`` and it is
    floating point. Returns ``block`` unchanged if no pixel is bad."""
    if not bad.neighbours:
        return block
    if in_place and block.dtype.kind == "f" and block.flags.writeable:
        out = block
    else:
        out = np.array(block, dtype=block.dtype if block.dtype.kind == "f" else np.float64)
    for y, xx, ys, xs in bad.neighbours:
        out[..., y, xx] = out[..., ys, xs].mean(axis=-1)
    return out


def repaired(x, bad: BadPixels):
    """Dense data with the bad pixels repaired (a full copy, only when there are any) — for in-RAM users like SSB."""
    if not bad.neighbours or not isinstance(x, np.ndarray):
        return x
    return repair_block(x, bad)


def clean_row_chunks(x: np.ndarray, bad: BadPixels | None = None, max_bytes: int = CHUNK_BYTES):
    """:func:`scan_row_chunks` with the bad pixels repaired in each block (in place in the pread buffer of a
    memory-mapped file, in a copy of the block for in-RAM data: the input is never changed)."""
    for r0, r1, block in scan_row_chunks(x, max_bytes):
        if bad is not None:
            block = repair_block(block, bad, in_place=not np.may_share_memory(block, x))
        yield r0, r1, block


def dense_pass(x: np.ndarray, grid, semiangle_mrad: float | None, policy: str, method: str, consumer,
               max_bytes: int = CHUNK_BYTES, fused: bool = False) -> BadPixels | None:
    """Feed ``consumer(row0, row1, block)`` every row block of dense data with the finite check and the
    bad-pixel statistics made in the same pass; when bad pixels are found and repaired, feed it again with
    the repaired blocks (the second pass overwrites what the first gave). Returns the bad-pixel result.
    ``fused=True``: ``consumer(row0, row1, block, acc)`` makes the statistics itself (see :func:`stream_pass`;
    ``acc`` is None in the repair pass)."""
    stats = stream_pass(x, method, None if fused else consumer, stats=policy != "ignore", max_bytes=max_bytes,
                        fused=consumer if fused else None)
    bad = bad_pixel_check(x, grid, semiangle_mrad, policy, method, stats=stats)
    if bad is not None and bad.neighbours:
        for r0, r1, block in clean_row_chunks(x, bad, max_bytes):
            if fused:
                consumer(r0, r1, block, None)
            else:
                consumer(r0, r1, block)
    return bad


def expected_disc_radius_px(grid, semiangle_mrad: float | None) -> float | None:
    if semiangle_mrad is None:
        return None
    sy, sx = grid.sampling_mrad
    return float(semiangle_mrad) / math.sqrt(float(sy) * float(sx))


def bad_pixel_check(x, grid, semiangle_mrad: float | None, policy: str, method: str,
                    stats: PixelStats | None = None) -> BadPixels | None:
    """The ``bad_pixels`` parameter of the Pelz reconstructors: ``"repair"`` (detect, repair, report),
    ``"refuse"`` (detect, raise naming pixel and frame) or ``"ignore"`` (None: no check)."""
    if policy == "ignore":
        return None
    if policy not in ("repair", "refuse"):
        raise TembenchError(f"{method}: bad_pixels must be 'repair', 'refuse' or 'ignore', got {policy!r}")
    bad = find_bad_pixels(x, method, expected_disc_radius_px(grid, semiangle_mrad), stats=stats)
    if policy == "refuse":
        bad.refuse(method)
    return bad


def check_disc_calibration(x, grid, semiangle_mrad: float, method: str, tolerance: float = 2.0) -> None:
    """Refuse dense data whose measured bright-field disc radius (px) disagrees with semiangle / sampling.

    A 10x wrong detector calibration otherwise passes silently. Skipped when the expected disc does not
    fit inside the detector or is under 2 px (the measurement would not be reliable).
    """
    if not isinstance(x, np.ndarray) or x.ndim != 4:
        return
    sy, sx = grid.sampling_mrad
    expected = semiangle_mrad / math.sqrt(float(sy) * float(sx))
    from scipy.ndimage import uniform_filter

    # the disc level: the median of the brightest disc-sized set of pixels of the 3x3-smoothed mean pattern
    # (the single brightest pixel of a low-dose mean pattern is a noise excursion: 3 e/pattern read a
    # 7 px radius for a 15.9 px disc with the maximum as the level)
    mean = uniform_filter(x.mean(axis=(0, 1), dtype=np.float64), 3, mode="nearest")
    k = int(min(mean.size, max(1, round(0.5 * math.pi * expected**2))))
    # (bounded below by half the smoothed maximum, so that a disc far smaller than expected, or one
    # unrepaired hot pixel, still reads as the small bright thing it is)
    peak = max(float(np.median(np.partition(mean.ravel(), mean.size - k)[mean.size - k:])), 0.5 * float(mean.max()))
    if not peak > 0:
        return
    measured = math.sqrt(float((mean > 0.5 * peak).sum()) / math.pi)
    fits = 0.45 * min(x.shape[2:])
    if expected <= fits:
        bad = not (max(expected, 1.5) / tolerance <= measured <= max(expected, 1.5) * tolerance)
    else:  # the disc should (nearly) fill the detector
        bad = measured * tolerance < fits
    if bad:
        raise TembenchError(f"{method}: the measured bright-field disc radius is {measured:.1f} px, but "
                            f"semiangle {semiangle_mrad:g} mrad / detector sampling {math.sqrt(sy * sx):.4g} mrad/px "
                            f"gives {expected:.1f} px; check Geometry.detector_sampling_mrad and semiangle_mrad")


def scan_shape_of(x) -> tuple[int, int]:
    return x.scan_shape if isinstance(x, ElectronEvents) else tuple(np.shape(x)[:2])


@dataclass(frozen=True)
class ProbeOptics:
    energy_keV: float
    wavelength_A: float
    semiangle_mrad: float
    aberrations: dict  # canonical C_nm (Å) / phi_nm (rad), C10 = −defocus

    @property
    def k0_A_inv(self) -> float:
        """Bright-field disc radius α/λ (1/Å)."""
        return self.semiangle_mrad * 1e-3 / self.wavelength_A


def probe_optics(geometry, method: str, aberrations: dict | None = None, defocus_A: float | None = None) -> ProbeOptics:
    """Probe optics from the geometry; ``aberrations`` / ``defocus_A`` override what it records.

    The geometry's ``aberrations_A`` are used as they are (C10 = −Δf); if they hold no C10 the
    first of ``defocus_A`` gives it.
    """
    if geometry.energy_keV is None or geometry.semiangle_mrad is None:
        raise TembenchError(f"{method} needs Geometry.energy_keV and Geometry.semiangle_mrad (probe convergence "
                            "semiangle, mrad) from the 4D-STEM forward model")
    ab = optics.normalize_aberrations(geometry.aberrations_A if aberrations is None else aberrations)
    if "C10" not in ab and aberrations is None and geometry.defocus_A:
        ab["C10"] = optics.defocus_to_C10(geometry.defocus_A[0])
    if defocus_A is not None:
        ab["C10"] = optics.defocus_to_C10(defocus_A)
    return ProbeOptics(float(geometry.energy_keV), constants.wavelength_A(geometry.energy_keV),
                       float(geometry.semiangle_mrad), ab)


def scan_step(geometry, method: str) -> tuple[float, float]:
    s = geometry.scan_step_A
    if s is None:
        raise TembenchError(f"{method} needs Geometry.scan_step_A (probe step, Å)")
    sy, sx = (float(s), float(s)) if np.ndim(s) == 0 else (float(s[0]), float(s[1]))
    if not (sy > 0 and sx > 0):
        raise TembenchError(f"{method}: scan_step_A must be positive, got {s}")
    return sy, sx


def scan_origin(geometry) -> tuple[float, float]:
    p = geometry.scan_positions_A
    if p is None or len(p) == 0:
        return (0.0, 0.0)
    p = np.asarray(p, dtype=float).reshape(-1, 2)
    return float(p[0, 0]), float(p[0, 1])


def rotation_matrix(angle_deg: float) -> np.ndarray:
    """R(θ) acting on (y, x) vectors: a counter-clockwise rotation by θ in the (x, y) plane."""
    t = math.radians(angle_deg)
    c, s = math.cos(t), math.sin(t)
    # in (x, y): [[c, −s], [s, c]]; reordered to (y, x)
    return np.array([[c, s], [-s, c]], dtype=np.float64)


def phase_image(phase: np.ndarray, geometry, method: str, **extras) -> Reconstruction:
    """A phase reconstruction on the scan grid: sampling = scan step, origin = first probe position."""
    return Reconstruction(kind="image", data=np.asarray(phase, dtype=np.float32), sampling_A=scan_step(geometry, method),
                          quantity="phase_rad", origin_A=scan_origin(geometry), extras=extras)
