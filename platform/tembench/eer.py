"""Electron-event representation (EER) of counted 4D-STEM data (Pelz et al. 2022, §II, Fig. 1).

A counted 4D-STEM scan of F frames (probe positions) on a detector of M pixels is stored as
the linear detector index of every electron, frame after frame, in CSR layout:

    offsets : (F + 1,) uint32 (uint64 past 2³² − 1 events) — frame f owns indices[offsets[f]:offsets[f+1]]
    indices : (C,) uint16 for M ≤ 65 536 pixels, else uint32 — linear index iy·n_kx + ix

A pixel that received n electrons appears n times. Memory grows with the number of counts C
instead of F·M, and many operations (binning, cropping, centre of mass, virtual detectors,
frame sums) cost O(C) on it instead of O(F·M) (Table I; see the ``tembench_pelz2022`` plugin).
Run-length encoding (Fig. 1c) stores, per frame, the gap from the previous electron's index
(the first one relative to 0) instead of the index; it needs the indices sorted within a frame.

Measurement kind ``eer`` (produced by the ``electron_events`` noise model): ``data`` is None,
``axes`` names the logical layout ``(scan_y, scan_x, k_y, k_x)``, ``counted`` is True, and
``extras["events"]`` holds the :class:`ElectronEvents`. The geometry is the source 4D-STEM
measurement's (detector centre at pixel (n_ky//2, n_kx//2), ``detector_sampling_mrad`` …).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tembench.errors import TembenchError

EER_KIND = "eer"
EER_AXES = ("scan_y", "scan_x", "k_y", "k_x")
_UINT32_MAX = np.iinfo(np.uint32).max


def index_dtype_for(n_pixels: int) -> np.dtype:
    """Smallest unsigned dtype for linear detector indices of ``n_pixels`` pixels."""
    if n_pixels <= 1 << 16:
        return np.dtype(np.uint16)
    if n_pixels <= 1 << 32:
        return np.dtype(np.uint32)
    raise TembenchError(f"a detector of {n_pixels} pixels is too large for linear-index EER (max 2³²)")


def offset_dtype_for(n_events: int) -> np.dtype:
    return np.dtype(np.uint32) if n_events <= _UINT32_MAX else np.dtype(np.uint64)


def _shape2(shape, name: str) -> tuple[int, int]:
    t = tuple(int(s) for s in shape)
    if len(t) != 2 or min(t) < 1:
        raise TembenchError(f"ElectronEvents: {name} must be two positive sizes, got {shape!r}")
    return t


@dataclass
class ElectronEvents:
    """Linear-index electron events of a scan, CSR-like (see the module docstring).

    ``sorted_within_frames`` records whether every frame's indices are ascending (true after
    :meth:`from_dense`; operations that remap indices, e.g. binning, may clear it).
    """

    offsets: np.ndarray
    indices: np.ndarray
    scan_shape: tuple[int, int]
    detector_shape: tuple[int, int]
    sorted_within_frames: bool = False

    def __post_init__(self) -> None:
        self.scan_shape = _shape2(self.scan_shape, "scan_shape")
        self.detector_shape = _shape2(self.detector_shape, "detector_shape")
        self.offsets = np.asarray(self.offsets)
        self.indices = np.asarray(self.indices)
        if self.offsets.ndim != 1 or len(self.offsets) != self.n_frames + 1:
            raise TembenchError(f"ElectronEvents: offsets must have n_frames + 1 = {self.n_frames + 1} "
                                f"entries, got shape {self.offsets.shape}")
        if self.offsets[0] != 0 or int(self.offsets[-1]) != len(self.indices):
            raise TembenchError(f"ElectronEvents: offsets must start at 0 and end at the number of events "
                                f"({len(self.indices)}), got {int(self.offsets[0])} … {int(self.offsets[-1])}")
        if self.n_frames > 1 and np.any(np.diff(self.offsets.astype(np.int64)) < 0):
            raise TembenchError("ElectronEvents: offsets must be non-decreasing")
        if not np.issubdtype(self.indices.dtype, np.unsignedinteger):
            if len(self.indices) and int(self.indices.min()) < 0:
                raise TembenchError("ElectronEvents: detector indices must be ≥ 0")
            self.indices = self.indices.astype(index_dtype_for(self.n_pixels))
        if len(self.indices) and int(self.indices.max()) >= self.n_pixels:
            raise TembenchError(f"ElectronEvents: a detector index ≥ n_pixels = {self.n_pixels} "
                                f"(detector {self.detector_shape})")

    # --- sizes ------------------------------------------------------------------------------
    @property
    def n_frames(self) -> int:
        return self.scan_shape[0] * self.scan_shape[1]

    @property
    def n_pixels(self) -> int:
        return self.detector_shape[0] * self.detector_shape[1]

    @property
    def n_events(self) -> int:
        return int(len(self.indices))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The dense shape (scan_y, scan_x, k_y, k_x) these events stand for."""
        return (*self.scan_shape, *self.detector_shape)

    @property
    def nbytes(self) -> int:
        return int(self.offsets.nbytes + self.indices.nbytes)

    @property
    def counts_per_frame(self) -> np.ndarray:
        """(F,) int64 electrons per frame."""
        return np.diff(self.offsets.astype(np.int64))

    @property
    def electrons_per_pixel(self) -> float:
        """Mean counts per detector pixel per frame (the sparsity C / (F·M))."""
        return self.n_events / float(self.n_frames * self.n_pixels)

    def frame_ids(self) -> np.ndarray:
        """(C,) int64 frame index of every event (O(C))."""
        return np.repeat(np.arange(self.n_frames, dtype=np.int64), self.counts_per_frame)

    def dense_nbytes(self, dtype=np.float32) -> int:
        return self.n_frames * self.n_pixels * np.dtype(dtype).itemsize

    # --- conversions ---------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, counts, chunk_frames: int | None = None) -> ElectronEvents:
        """Lossless conversion of dense counts (scan_y, scan_x, k_y, k_x) of non-negative integers.

        Float input must hold whole numbers (Poisson counts as float32 are fine). Works frame
        chunk by frame chunk, so the extra memory is bounded by one chunk.
        """
        counts = np.asarray(counts)
        if counts.ndim != 4:
            raise TembenchError(f"ElectronEvents.from_dense needs 4-D counts (scan_y, scan_x, k_y, k_x), "
                                f"got shape {counts.shape}")
        sy, sx, ky, kx = counts.shape
        n_frames, n_pix = sy * sx, ky * kx
        flat = counts.reshape(n_frames, n_pix)
        if chunk_frames is None:
            chunk_frames = max(1, (1 << 23) // max(n_pix, 1))
        idx_dtype = index_dtype_for(n_pix)
        per_frame = np.zeros(n_frames, dtype=np.int64)
        parts = []
        for start in range(0, n_frames, chunk_frames):
            block = flat[start:start + chunk_frames]
            nz = np.flatnonzero(block)
            vals = block.reshape(-1)[nz]
            if vals.size:
                if np.issubdtype(vals.dtype, np.floating):
                    if not np.all(np.isfinite(vals)) or np.any(vals != np.rint(vals)):
                        raise TembenchError("ElectronEvents.from_dense: counts must be whole numbers; this "
                                            "looks like an intensity, not electron counts. Apply "
                                            "poisson_dose before converting to electron events.")
                if np.any(vals < 0):
                    raise TembenchError("ElectronEvents.from_dense: counts must be ≥ 0")
            reps = vals.astype(np.int64)
            frame = nz // n_pix
            per_frame[start:start + len(block)] = np.bincount(frame, weights=reps, minlength=len(block)).astype(np.int64)
            parts.append(np.repeat((nz % n_pix).astype(idx_dtype), reps))
        indices = np.concatenate(parts) if parts else np.zeros(0, idx_dtype)
        offsets = np.zeros(n_frames + 1, dtype=offset_dtype_for(len(indices)))
        np.cumsum(per_frame, out=offsets[1:])
        return cls(offsets, indices, (sy, sx), (ky, kx), sorted_within_frames=True)

    def to_dense(self, dtype=np.float32, chunk_frames: int | None = None) -> np.ndarray:
        """Dense counts (scan_y, scan_x, k_y, k_x) of ``dtype``; exact for counts < 2²⁴ in float32."""
        out = np.zeros((self.n_frames, self.n_pixels), dtype=dtype)
        if chunk_frames is None:
            chunk_frames = max(1, (1 << 23) // max(self.n_pixels, 1))
        off = self.offsets.astype(np.int64)
        for start in range(0, self.n_frames, chunk_frames):
            stop = min(start + chunk_frames, self.n_frames)
            a, b = off[start], off[stop]
            if a == b:
                continue
            local = np.repeat(np.arange(stop - start, dtype=np.int64), np.diff(off[start:stop + 1]))
            flat = local * self.n_pixels + self.indices[a:b]
            out[start:stop] = np.bincount(flat, minlength=(stop - start) * self.n_pixels).reshape(
                stop - start, self.n_pixels)
        return out.reshape(self.shape)

    def sorted(self) -> ElectronEvents:
        """A copy with indices ascending within each frame (O(C log C); no-op if already sorted)."""
        if self.sorted_within_frames:
            return self
        key = self.frame_ids() * self.n_pixels + self.indices
        order = np.argsort(key, kind="stable")
        return ElectronEvents(self.offsets.copy(), self.indices[order], self.scan_shape, self.detector_shape,
                              sorted_within_frames=True)

    def to_rle(self) -> RunLengthEvents:
        """Run-length encoding: per frame, the index gap to the previous electron (first gap from 0)."""
        ev = self.sorted()
        idx = ev.indices.astype(np.int64)
        gaps = np.empty_like(idx)
        if len(idx):
            gaps[0] = idx[0]
            gaps[1:] = idx[1:] - idx[:-1]
            starts = ev.offsets[:-1].astype(np.int64)
            nonempty = starts[starts < len(idx)]
            gaps[nonempty] = idx[nonempty]  # every frame restarts from index 0
        return RunLengthEvents(ev.offsets.copy(), gaps.astype(ev.indices.dtype), self.scan_shape,
                               self.detector_shape)

    def equals(self, other: ElectronEvents) -> bool:
        """Same frames, same detector, and the same multiset of indices in every frame."""
        if (self.scan_shape, self.detector_shape) != (other.scan_shape, other.detector_shape):
            return False
        if not np.array_equal(self.offsets.astype(np.int64), other.offsets.astype(np.int64)):
            return False
        a, b = self.sorted(), other.sorted()
        return bool(np.array_equal(a.indices, b.indices))

    def subset_frames(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(offsets relative to the block, indices) of frames [start, stop) without copying the indices."""
        a, b = int(self.offsets[start]), int(self.offsets[stop])
        return self.offsets[start:stop + 1].astype(np.int64) - a, self.indices[a:b]


@dataclass
class RunLengthEvents:
    """Run-length encoded events (Pelz Fig. 1c): CSR offsets as in :class:`ElectronEvents`, ``gaps``
    the distance of each electron's linear index from the previous one in its frame."""

    offsets: np.ndarray
    gaps: np.ndarray
    scan_shape: tuple[int, int]
    detector_shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return int(self.offsets.nbytes + self.gaps.nbytes)

    def to_events(self) -> ElectronEvents:
        """Decode to linear indices in O(C): a running sum of the gaps restarted in every frame."""
        g = self.gaps.astype(np.int64)
        run = np.cumsum(g)
        starts = self.offsets[:-1].astype(np.int64)
        counts = np.diff(self.offsets.astype(np.int64))
        # subtract the running total reached before each frame's first event
        before = np.zeros(len(starts), dtype=np.int64)
        nonempty = counts > 0
        s = starts[nonempty]
        before[nonempty] = np.where(s > 0, run[np.maximum(s - 1, 0)], 0)
        idx = run - np.repeat(before, counts)
        n_pix = self.detector_shape[0] * self.detector_shape[1]
        return ElectronEvents(self.offsets.copy(), idx.astype(index_dtype_for(n_pix)), self.scan_shape,
                              self.detector_shape, sorted_within_frames=True)


def events_of(measurement) -> ElectronEvents:
    """The :class:`ElectronEvents` of an ``eer`` measurement, with a clear error otherwise."""
    ev = measurement.extras.get("events") if getattr(measurement, "extras", None) else None
    if not isinstance(ev, ElectronEvents):
        raise TembenchError(f"measurement of kind {measurement.kind!r} carries no electron events in "
                            "extras['events']; produce it with the `electron_events` noise model")
    return ev
