"""Fused CPU kernels (numba, optional) with numpy fallbacks of identical results.

numba is used when importable (it comes with abTEM in the dev extra) unless
``TEMBENCH_NO_NUMBA=1``; the paper's implementation uses numba kernels the same way (on the
GPU). Every kernel has a vectorised numpy twin, and the tests check they agree.
"""

from __future__ import annotations

import os

import numpy as np

try:  # optional acceleration
    if os.environ.get("TEMBENCH_NO_NUMBA", "") not in ("", "0"):
        raise ImportError("disabled by TEMBENCH_NO_NUMBA")
    import numba as _nb  # type: ignore[import-not-found]
except Exception:  # pragma: no cover - depends on the environment
    _nb = None

HAVE_NUMBA = _nb is not None


def use_numba(flag: bool | None = None) -> bool:
    return HAVE_NUMBA if flag is None else (bool(flag) and HAVE_NUMBA)


# --- CSR table sums: out[f, j] = Σ_{e in frame f} table[indices[e], j] ---------------------------
def _acc_dtype(table) -> type:
    return np.int64 if (np.issubdtype(table.dtype, np.integer) or table.dtype == bool) else np.float64


def segment_sums_numpy(offsets, vals):
    """(F, d) sums of ``vals`` (C, d) over the CSR frames: ``np.add.reduceat`` at the starts of the
    non-empty frames (between two of them only empty frames lie, so each segment is one frame)."""
    out = np.zeros((len(offsets) - 1, vals.shape[1]), dtype=vals.dtype)
    if len(vals) == 0:
        return out
    starts = np.asarray(offsets[:-1])
    nonempty = np.asarray(offsets[1:]) > starts
    out[nonempty] = np.add.reduceat(vals, starts[nonempty].astype(np.intp), axis=0)
    return out


def csr_table_sums_numpy(offsets, indices, table):
    """Per-frame sums of ``table`` rows gathered at the event indices: one gather, then
    :func:`segment_sums_numpy` over the CSR offsets (O(C·d), no frame-id array)."""
    table = np.asarray(table)
    if table.ndim == 1:
        table = table[:, None]
    return segment_sums_numpy(offsets, table.astype(_acc_dtype(table), copy=False)[indices])


if HAVE_NUMBA:
    # serial on purpose: at < 1 ns per event a parallel region costs more than it saves, and its
    # threads contend with BLAS/FFT worker threads on small machines (measured: 0.13 → 8 ms).
    # One-column tables keep the running sum in a register (the packed COM table uses this).
    # Four independent partial sums let the gathers of consecutive events overlap (1.5× faster).
    @_nb.njit(cache=True, nogil=True)
    def _csr_sum1_nb(offsets, indices, table, out):  # pragma: no cover - compiled
        for f in range(out.shape[0]):
            s0 = out[f]
            s1 = s0 - s0
            s2 = s1
            s3 = s1
            e = offsets[f]
            b = offsets[f + 1]
            while e + 4 <= b:
                s0 += table[indices[e]]
                s1 += table[indices[e + 1]]
                s2 += table[indices[e + 2]]
                s3 += table[indices[e + 3]]
                e += 4
            while e < b:
                s0 += table[indices[e]]
                e += 1
            out[f] = (s0 + s1) + (s2 + s3)

    @_nb.njit(cache=True, nogil=True)
    def _csr_table_sums_nb(offsets, indices, table, out):  # pragma: no cover - compiled
        n_frames = out.shape[0]
        d = out.shape[1]
        for f in range(n_frames):
            for e in range(offsets[f], offsets[f + 1]):
                p = indices[e]
                for j in range(d):
                    out[f, j] += table[p, j]

    @_nb.njit(cache=True, nogil=True)
    def _histogram_nb(indices, out):  # pragma: no cover - compiled
        for e in range(indices.shape[0]):
            out[indices[e]] += 1


def csr_table_sums(offsets, indices, table, numba: bool | None = None):
    """(F, d) per-frame sums of ``table`` (M, d) (or (M,) → (F, 1)) at the events; int64 for integer tables."""
    table = np.asarray(table)
    if table.ndim == 1:
        table = table[:, None]
    if not use_numba(numba):
        return csr_table_sums_numpy(offsets, indices, table)
    acc = _acc_dtype(table)
    out = np.zeros((len(offsets) - 1, table.shape[1]), dtype=acc)
    if table.shape[1] == 1:
        # small integer tables stay small in cache; the sum is int64 either way
        t = table[:, 0]
        if t.dtype == bool:
            t = t.view(np.uint8)
        elif acc is np.float64 and t.dtype != np.float64:
            t = t.astype(np.float64)
        _csr_sum1_nb(offsets, indices, np.ascontiguousarray(t), out[:, 0])
    else:
        _csr_table_sums_nb(offsets, indices, np.ascontiguousarray(table, dtype=acc), out)
    return out


if HAVE_NUMBA:
    @_nb.njit(cache=True, nogil=True)
    def _csr_mask_words_nb(offsets, words, tail, table, out, bp):  # pragma: no cover - compiled
        # Block prefix sums instead of per-frame loops: words holds the 16-bit indices four to a
        # uint64 (one load per four events), bp[k] = Σ table over the first 8k events (int32; the
        # caller checks C < 2³¹ and a 0/1 table). A frame's sum is P(end) − P(start) with P(x) =
        # bp[x >> 3] + the first x & 7 lookups of block x >> 3 (masked, branch-free); tail holds
        # the last C mod 8 indices zero-padded, as two words.
        nb8 = words.shape[0] >> 1
        lo = np.uint64(0xFFFF)
        s16 = np.uint64(16)
        s32 = np.uint64(32)
        s48 = np.uint64(48)
        acc = np.int32(0)
        bp[0] = 0
        for k in range(nb8):
            a = words[2 * k]
            b = words[2 * k + 1]
            acc += ((np.int32(table[a & lo]) + np.int32(table[(a >> s16) & lo]))
                    + (np.int32(table[(a >> s32) & lo]) + np.int32(table[a >> s48]))) + \
                   ((np.int32(table[b & lo]) + np.int32(table[(b >> s16) & lo]))
                    + (np.int32(table[(b >> s32) & lo]) + np.int32(table[b >> s48])))
            bp[k + 1] = acc
        prev = np.int64(0)
        for f in range(out.shape[0]):
            x = np.int64(offsets[f + 1])
            k = x >> 3
            r = x & 7
            if k < nb8:
                a = words[2 * k]
                b = words[2 * k + 1]
            else:
                a = tail[0]
                b = tail[1]
            t = np.int64(bp[k]) + ((np.int32(table[a & lo]) * (r > 0) + np.int32(table[(a >> s16) & lo]) * (r > 1))
                                   + (np.int32(table[(a >> s32) & lo]) * (r > 2) + np.int32(table[a >> s48]) * (r > 3))
                                   + (np.int32(table[b & lo]) * (r > 4) + np.int32(table[(b >> s16) & lo]) * (r > 5))
                                   + np.int32(table[(b >> s32) & lo]) * (r > 6))
            out[f] = t - prev
            prev = t


if HAVE_NUMBA:
    @_nb.njit(cache=True, nogil=True)
    def _csr_mask16_nb(offsets, indices, table, out):  # pragma: no cover - compiled
        # per-frame counts on a 0/1 uint8 table: 16 lookups per step into four int32 partial sums
        # (the caller checks C < 2³¹); measured 0.14–0.16 ns/event against 0.16–0.20 for the
        # 4-way int64 kernel _csr_sum1_nb at 40–160 events per frame
        for f in range(out.shape[0]):
            s0 = np.int32(0)
            s1 = np.int32(0)
            s2 = np.int32(0)
            s3 = np.int32(0)
            e = np.int64(offsets[f])
            b = np.int64(offsets[f + 1])
            while e + 16 <= b:
                s0 += ((np.int32(table[indices[e]]) + np.int32(table[indices[e + 4]]))
                       + (np.int32(table[indices[e + 8]]) + np.int32(table[indices[e + 12]])))
                s1 += ((np.int32(table[indices[e + 1]]) + np.int32(table[indices[e + 5]]))
                       + (np.int32(table[indices[e + 9]]) + np.int32(table[indices[e + 13]])))
                s2 += ((np.int32(table[indices[e + 2]]) + np.int32(table[indices[e + 6]]))
                       + (np.int32(table[indices[e + 10]]) + np.int32(table[indices[e + 14]])))
                s3 += ((np.int32(table[indices[e + 3]]) + np.int32(table[indices[e + 7]]))
                       + (np.int32(table[indices[e + 11]]) + np.int32(table[indices[e + 15]])))
                e += 16
            while e + 4 <= b:
                s0 += np.int32(table[indices[e]])
                s1 += np.int32(table[indices[e + 1]])
                s2 += np.int32(table[indices[e + 2]])
                s3 += np.int32(table[indices[e + 3]])
                e += 4
            while e < b:
                s0 += np.int32(table[indices[e]])
                e += 1
            out[f] = (s0 + s1) + (s2 + s3)


# mean events per frame from which the block-prefix word kernel beats the per-frame one (measured:
# per-frame faster at 41–164, word kernel faster at 410–490 events per frame)
_WORDS_MIN_EVENTS_PER_FRAME = 256


def csr_mask_sums(offsets, indices, mask, numba: bool | None = None) -> np.ndarray:
    """(F,) int64 number of events per frame on the pixels where ``mask`` (M,) bool / 0-1 uint8 is set.

    numba, 16-bit indices, C < 2³¹: frames of ≥ 256 events on average use block prefix sums over
    the flat index stream read four indices per load (:func:`_csr_mask_words_nb`), shorter frames
    a 16-way unrolled per-frame kernel (:func:`_csr_mask16_nb`); ≈ 0.14–0.16 ns/event either way.
    Otherwise the 4-way kernel of :func:`csr_table_sums`. numpy: :func:`csr_table_sums_numpy`.
    """
    if not (mask.dtype == bool and mask.flags.c_contiguous):
        mask = np.ascontiguousarray(mask)
    mask = mask.reshape(-1)
    binary = mask.dtype == bool
    if binary:
        mask = mask.view(np.uint8)
    n_frames = len(offsets) - 1
    if not use_numba(numba):
        return csr_table_sums_numpy(offsets, indices, mask)[:, 0]
    n = len(indices)
    if (indices.dtype == np.uint16 and n < (1 << 31) and mask.dtype == np.uint8
            and (binary or int(mask.max(initial=0)) <= 1)):
        if n_frames > 0 and n >= _WORDS_MIN_EVENTS_PER_FRAME * n_frames:
            idx = np.ascontiguousarray(indices)
            n8 = (n >> 3) << 3
            tail = np.zeros(8, np.uint16)
            tail[:n - n8] = idx[n8:]
            out = np.empty(n_frames, np.int64)
            _csr_mask_words_nb(offsets, idx[:n8].view(np.uint64), tail.view(np.uint64), mask, out,
                               np.empty((n >> 3) + 1, np.int32))
            return out
        out = np.empty(n_frames, np.int64)
        _csr_mask16_nb(offsets, indices, mask, out)
        return out
    out = np.zeros(n_frames, np.int64)
    _csr_sum1_nb(offsets, indices, mask, out)
    return out


if HAVE_NUMBA:
    @_nb.njit(cache=True, nogil=True)
    def _remap_nb(offsets, indices, lut, out_idx, out_offsets):  # pragma: no cover - compiled
        n = 0
        for f in range(offsets.shape[0] - 1):
            for e in range(offsets[f], offsets[f + 1]):
                q = lut[indices[e]]
                if q >= 0:
                    out_idx[n] = q
                    n += 1
            out_offsets[f + 1] = n
        return n

    @_nb.njit(cache=True, nogil=True)
    def _gather_nb(indices, lut, out):  # pragma: no cover - compiled
        for e in range(indices.shape[0]):
            out[e] = lut[indices[e]]


def remap_indices(offsets, indices, lut, index_dtype, offset_dtype_of, numba: bool | None = None):
    """(new offsets, new indices) with every event's pixel p replaced by ``lut[p]``; events with
    ``lut[p] < 0`` are dropped. O(C), one pass; ``offset_dtype_of(n_kept)`` gives the offsets' dtype."""
    lut = np.asarray(lut)
    if lut.size == 0 or lut.min() >= 0:
        # nothing dropped: one gather through a table of the output dtype, offsets unchanged
        small = lut.astype(index_dtype)
        if use_numba(numba):
            out = np.empty(len(indices), dtype=index_dtype)
            _gather_nb(indices, small, out)
            return offsets.copy(), out
        return offsets.copy(), small[indices]
    if use_numba(numba):
        small = lut.astype(np.int32) if lut.max() < (1 << 31) else lut.astype(np.int64)
        out_idx = np.empty(len(indices), dtype=index_dtype)
        off = np.zeros(len(offsets), dtype=np.int64)
        n = _remap_nb(offsets, indices, small, out_idx, off)
        return off.astype(offset_dtype_of(n)), out_idx[:n].copy()
    new = lut[indices]
    keep = new >= 0
    idx = new[keep].astype(index_dtype)
    kept_before = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum(keep, out=kept_before[1:])
    return kept_before[offsets.astype(np.int64)].astype(offset_dtype_of(len(idx))), idx


# --- centre-of-mass sums without a table: Σp and Σ⌊p/nx⌋ by multiply-shift (vectorisable) ------------
def row_divisor(nx: int) -> tuple[int, int]:
    """(m, k) with ⌊p/nx⌋ = (p·m) >> k exactly for every 0 ≤ p < 2¹⁶ (16-bit indices, nx ≤ 2¹⁶)."""
    k = 32
    return -(-(1 << k) // int(nx)), k


if HAVE_NUMBA:
    @_nb.njit(cache=True, nogil=True)
    def _csr_index_sums_nb(offsets, indices, m, k, nx, out):  # pragma: no cover - compiled
        for f in range(out.shape[0]):
            sp = 0
            sy = 0
            a = offsets[f]
            b = offsets[f + 1]
            for e in range(a, b):
                p = np.int64(indices[e])
                sp += p
                sy += (p * m) >> k
            out[f, 0] = sy
            out[f, 1] = sp - sy * nx
            out[f, 2] = b - a

    @_nb.njit(cache=True, nogil=True, fastmath=True)
    def _dense_moments_nb(d3, ys, xs, out):  # pragma: no cover - compiled
        n_frames, ny, nx = d3.shape
        zero = ys[0] - ys[0]
        for f in range(n_frames):
            s = zero
            sy = zero
            sx = zero
            for iy in range(ny):
                row = zero
                rx = zero
                for ix in range(nx):
                    v = d3[f, iy, ix]
                    row += v
                    rx += v * xs[ix]
                s += row
                sy += row * ys[iy]
                sx += rx
            out[f, 0] = sy
            out[f, 1] = sx
            out[f, 2] = s


if HAVE_NUMBA:
    # no "nnan"/"ninf": a NaN or inf in a frame must reach that frame's total (the finite check reads it there)
    @_nb.njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
    def _dense_pass_nb(d3, ys, xs, w, out, stats, first, total, changes):  # pragma: no cover - compiled
        n_frames, ny, nx = d3.shape
        zero = ys[0] - ys[0]
        for f in range(n_frames):
            s = zero
            sy = zero
            sx = zero
            sw = zero
            for iy in range(ny):
                row = zero
                rx = zero
                rw = zero
                for ix in range(nx):
                    v = d3[f, iy, ix]
                    row += v
                    rx += v * xs[ix]
                    rw += v * w[iy, ix]
                s += row
                sy += row * ys[iy]
                sx += rx
                sw += rw
            out[f, 0] = sy
            out[f, 1] = sx
            out[f, 2] = s
            out[f, 3] = sw
            if stats:  # the frame is in cache: per-pixel float64 total and "differs from the first frame"
                for iy in range(ny):
                    for ix in range(nx):
                        v = d3[f, iy, ix]
                        total[iy, ix] += v
                        changes[iy, ix] += v != first[iy, ix]


def dense_pass(d, weight=None, stats=None, numba: bool | None = None):
    """One pass over dense (F, ny, nx) float data: (F, 4) Σ I·iy, Σ I·ix, Σ I, Σ I·w per pattern in the data's
    dtype (``weight`` (ny, nx), e.g. a 0/1 dark-field mask; zeros if None), and, if ``stats`` is
    ``(first, total, changes)`` ((ny, nx) first frame, float64 and int64 accumulators), every pixel's value
    added to ``total`` and 1 added to ``changes`` where it differs from ``first`` — in place.
    A NaN/inf in a pattern makes its Σ I non-finite (no fast-math assumption of finite values).
    numpy twin: one matrix product and two reductions."""
    n_frames, ny, nx = d.shape
    dt = d.dtype if d.dtype in (np.float32, np.float64) else np.float64
    w = np.zeros((ny, nx), dt) if weight is None else np.ascontiguousarray(weight, dtype=dt)
    if use_numba(numba) and d.dtype in (np.float32, np.float64) and d.flags.c_contiguous and n_frames:
        out = np.empty((n_frames, 4), dtype=d.dtype)
        if stats is None:
            dummy = np.zeros((1, 1), np.float64)
            _dense_pass_nb(d, np.arange(ny, dtype=dt), np.arange(nx, dtype=dt), w, out, False,
                           np.zeros((1, 1), d.dtype), dummy, np.zeros((1, 1), np.int64))
        else:
            first, total, changes = stats
            _dense_pass_nb(d, np.arange(ny, dtype=dt), np.arange(nx, dtype=dt), w, out, True,
                           np.ascontiguousarray(first, dtype=d.dtype).reshape(ny, nx), total.reshape(ny, nx),
                           changes.reshape(ny, nx))
        return out
    table = np.empty((ny, nx, 4), dtype=dt)
    table[..., 0] = np.arange(ny)[:, None]
    table[..., 1] = np.arange(nx)[None, :]
    table[..., 2] = 1
    table[..., 3] = w
    b = d.reshape(n_frames, ny * nx)
    out = b @ table.reshape(ny * nx, 4)
    if stats is not None:
        first, total, changes = stats
        total.reshape(-1)[...] += b.sum(axis=0, dtype=np.float64)
        changes.reshape(-1)[...] += (b != np.asarray(first).reshape(-1)).sum(axis=0)
    return out


if HAVE_NUMBA:
    @_nb.njit(cache=True, nogil=True)
    def _com_finish_nb(sums, per_frame, mean_denom, cy, cx, sy, sx, com_y, com_x, counts):  # pragma: no cover
        for f in range(sums.shape[0]):
            n = sums[f, 2]
            if per_frame:
                denom = n if n > 0 else np.inf
            else:
                denom = mean_denom
            frac = n / denom
            com_y[f] = (sums[f, 0] / denom - frac * cy) * sy
            com_x[f] = (sums[f, 1] / denom - frac * cx) * sx
            counts[f] = n


def com_finish(sums, normalize: str, centre, sampling, numba: bool | None = None):
    """(com_y, com_x, counts) float64 (F,) from (F, 3) float64 sums (Σ iy, Σ ix, n): per frame
    (Σ/d − (n/d)·c)·s with d = n (``"frame"``, empty frames give 0) or the mean n (``"mean"``)."""
    counts = sums[:, 2]
    mean_denom = max(float(counts.mean()), 1e-300) if normalize == "mean" else 1.0
    if use_numba(numba):
        out = np.empty((3, len(sums)), np.float64)
        _com_finish_nb(sums, normalize == "frame", mean_denom, float(centre[0]), float(centre[1]),
                       float(sampling[0]), float(sampling[1]), out[0], out[1], out[2])
        return out[0], out[1], out[2]
    denom = np.where(counts > 0, counts, np.inf) if normalize == "frame" else np.full_like(counts, mean_denom)
    frac = counts / denom
    com_y = (sums[:, 0] / denom - frac * centre[0]) * sampling[0]
    com_x = (sums[:, 1] / denom - frac * centre[1]) * sampling[1]
    return com_y, com_x, counts.copy()


if HAVE_NUMBA:
    @_nb.njit(cache=True, nogil=True)
    def _com_events_nb(offsets, indices, m, nx, per_frame, mean_denom, cy, cx, sy, sx, out):  # pragma: no cover
        # the sums of _csr_index_sums_nb and the finish of _com_finish_nb in one call. Two loops: the
        # per-frame sums (the inner loop vectorises) first, then the finish over all frames (its
        # divisions vectorise across frames); fused in one loop it is 20 % slower at ~40 events/frame.
        n_frames = out.shape[1]
        for f in range(n_frames):
            sp = 0
            sr = 0
            a = offsets[f]
            b = offsets[f + 1]
            for e in range(a, b):
                p = np.int64(indices[e])
                sp += p
                sr += (p * m) >> 32
            out[0, f] = sr
            out[1, f] = sp - sr * nx
            out[2, f] = b - a
        for f in range(n_frames):
            n = out[2, f]
            if per_frame:
                denom = n if n > 0 else np.inf
            else:
                denom = mean_denom
            frac = n / denom
            out[0, f] = (out[0, f] / denom - frac * cy) * sy
            out[1, f] = (out[1, f] / denom - frac * cx) * sx


def com_events(offsets, indices, nx: int, normalize: str, centre, sampling, numba: bool | None = None):
    """(com_y, com_x, counts) float64 (F,) of 16-bit events: :func:`csr_index_sums` then :func:`com_finish`,
    fused into one numba call when numba is available (the per-call overhead matters at ~40 events per frame)."""
    n_frames = len(offsets) - 1
    if not use_numba(numba):
        return com_finish(csr_index_sums(offsets, indices, nx, numba=False), normalize, centre, sampling, numba=False)
    if indices.dtype.itemsize > 2:
        raise ValueError("com_events needs 16-bit indices")
    m, k = row_divisor(nx)
    # counts.mean() of the unfused path: the float64 sum of the counts is exactly C, so it is C / F
    mean_denom = max(len(indices) / n_frames, 1e-300) if (normalize == "mean" and n_frames) else 1.0
    out = np.empty((3, n_frames), np.float64)
    _com_events_nb(offsets, indices, m, int(nx), normalize == "frame", mean_denom, float(centre[0]),
                   float(centre[1]), float(sampling[0]), float(sampling[1]), out)
    return out[0], out[1], out[2]


def csr_index_sums(offsets, indices, nx: int, numba: bool | None = None) -> np.ndarray:
    """(F, 3) float64 per frame (Σ iy, Σ ix, counts) of 16-bit linear indices p = iy·nx + ix, from Σp
    and Σ⌊p/nx⌋: integer reductions over the index stream, no table lookup (O(C); exact)."""
    if indices.dtype.itemsize > 2:
        raise ValueError("csr_index_sums needs 16-bit indices")
    m, k = row_divisor(nx)
    n_frames = len(offsets) - 1
    if use_numba(numba):
        out = np.empty((n_frames, 3), np.float64)
        _csr_index_sums_nb(offsets, indices, m, k, int(nx), out)
        return out
    p = indices.astype(np.int64)
    sums = segment_sums_numpy(offsets, np.stack([(p * m) >> k, p], axis=1))
    sums[:, 1] -= sums[:, 0] * nx
    out = np.empty((n_frames, 3), np.float64)
    out[:, :2] = sums
    out[:, 2] = np.diff(offsets.astype(np.int64))
    return out


def dense_moments(d, numba: bool | None = None):
    """(F, 3) Σ I·iy, Σ I·ix, Σ I per pattern of dense (F, ny, nx) float data, in the data's dtype
    (one pass over the data; numpy twin: one matrix product)."""
    n_frames, ny, nx = d.shape
    if use_numba(numba) and d.dtype in (np.float32, np.float64) and d.flags.c_contiguous:
        out = np.empty((n_frames, 3), dtype=d.dtype)
        _dense_moments_nb(d, np.arange(ny, dtype=d.dtype), np.arange(nx, dtype=d.dtype), out)
        return out
    table = np.empty((ny, nx, 3), dtype=d.dtype if d.dtype in (np.float32, np.float64) else np.float64)
    table[..., 0] = np.arange(ny)[:, None]
    table[..., 1] = np.arange(nx)[None, :]
    table[..., 2] = 1
    return d.reshape(n_frames, ny * nx) @ table.reshape(ny * nx, 3)


def histogram(indices, n_bins: int, numba: bool | None = None) -> np.ndarray:
    """(n_bins,) int64 number of occurrences of every index (the sum of all frames, O(C))."""
    if not use_numba(numba):
        return np.bincount(indices, minlength=n_bins)
    out = np.zeros(n_bins, dtype=np.int64)
    _histogram_nb(indices, out)
    return out
