"""Fused CPU kernels of riCOM (numba, optional) with numpy twins of identical arithmetic.

- :func:`scatter` — the streaming update: every frame adds its kernel-sized patch
  ``img[s + m] += U_y(m)·g_y(s) + U_x(m)·g_x(s)`` (cropped at the scan edges);
- :func:`integer_moments` — Σ iy·I, Σ ix·I, Σ I of integer frames (uint8/uint16/…) in int64, exact,
  without the float copy :func:`tembench_pelz2022._kernels.dense_moments` needs for integer data; optionally
  the dark-field counts Σ_mask I in the same pass (the live riCOM's 180° branch).

numba is taken from the Pelz plugin's switch (``TEMBENCH_NO_NUMBA``), so both plugins agree.
"""

from __future__ import annotations

import numpy as np

from tembench_pelz2022._kernels import HAVE_NUMBA, use_numba

if HAVE_NUMBA:
    import numba as _nb

    @_nb.njit(cache=True, nogil=True, fastmath=False)
    def _scatter_nb(img, uy, ux, ys, xs, gy, gx):  # pragma: no cover - compiled
        H, W = img.shape
        n = uy.shape[0]
        c = n // 2
        for f in range(ys.shape[0]):
            wy = gy[f]
            wx = gx[f]
            y0 = ys[f] - c
            x0 = xs[f] - c
            i0 = max(0, -y0)
            i1 = min(n, H - y0)
            j0 = max(0, -x0)
            j1 = min(n, W - x0)
            for i in range(i0, i1):
                row = y0 + i
                for j in range(j0, j1):
                    img[row, x0 + j] += uy[i, j] * wy + ux[i, j] * wx

    @_nb.njit(cache=True, nogil=True)
    def _moments_int_nb(d3, out):  # pragma: no cover - compiled
        # column sums by whole-row vector adds (int32: exact for ≤ 2¹⁵ rows of 16-bit counts), row sums by a
        # reduction; the first moments from the ≤ 2·256 sums afterwards (one pass over the data, no float copy)
        n_frames, ny, nx = d3.shape
        col = np.zeros(nx, np.int32)
        for f in range(n_frames):
            col[:] = 0
            sy = 0
            s = 0
            for iy in range(ny):
                row = np.int32(0)
                for ix in range(nx):
                    v = np.int32(d3[f, iy, ix])
                    col[ix] += v
                    row += v
                s += row
                sy += np.int64(row) * iy
            sx = 0
            for ix in range(nx):
                sx += np.int64(col[ix]) * ix
            out[f, 0] = sy
            out[f, 1] = sx
            out[f, 2] = s

    @_nb.njit(cache=True, nogil=True)
    def _moments_int_masked_nb(d3, w, out):  # pragma: no cover - compiled
        # _moments_int_nb plus Σ I·w per frame (w 0/1 int32, the dark-field mask) in the same row loop: a
        # multiply-add that vectorises with the rest (0.74× the unmasked rate, 72 vs 97 kHz on 256² uint16 frames,
        # still 1.5× a numpy sum of the frames; three runs per row or a second pass over the row were slower)
        n_frames, ny, nx = d3.shape
        col = np.zeros(nx, np.int32)
        for f in range(n_frames):
            col[:] = 0
            sy = 0
            s = 0
            sd = 0
            for iy in range(ny):
                row = np.int32(0)
                dark = np.int32(0)
                for ix in range(nx):
                    v = np.int32(d3[f, iy, ix])
                    col[ix] += v
                    row += v
                    dark += v * w[iy, ix]
                s += row
                sd += dark
                sy += np.int64(row) * iy
            sx = 0
            for ix in range(nx):
                sx += np.int64(col[ix]) * ix
            out[f, 0] = sy
            out[f, 1] = sx
            out[f, 2] = s
            out[f, 3] = sd


def scatter_numpy(img, uy, ux, ys, xs, gy, gx) -> None:
    """In-place streaming update, one frame at a time (numpy twin of the numba kernel; same order of sums)."""
    H, W = img.shape
    n = uy.shape[0]
    c = n // 2
    for f in range(len(ys)):
        y0, x0 = int(ys[f]) - c, int(xs[f]) - c
        i0, i1 = max(0, -y0), min(n, H - y0)
        j0, j1 = max(0, -x0), min(n, W - x0)
        if i0 >= i1 or j0 >= j1:
            continue
        img[y0 + i0:y0 + i1, x0 + j0:x0 + j1] += uy[i0:i1, j0:j1] * gy[f] + ux[i0:i1, j0:j1] * gx[f]


def scatter(img, uy, ux, ys, xs, gy, gx, numba: bool | None = None) -> None:
    """``img[ys+m, xs+m] += uy(m)·gy + ux(m)·gx`` for every frame (float64 img and kernels, int64 ys/xs)."""
    ys = np.ascontiguousarray(ys, np.int64)
    xs = np.ascontiguousarray(xs, np.int64)
    gy = np.ascontiguousarray(gy, np.float64)
    gx = np.ascontiguousarray(gx, np.float64)
    if use_numba(numba):
        _scatter_nb(img, uy, ux, ys, xs, gy, gx)
    else:
        scatter_numpy(img, uy, ux, ys, xs, gy, gx)


def integer_moments(d3, numba: bool | None = None, mask=None) -> np.ndarray:
    """(F, 3) float64 (Σ iy·I, Σ ix·I, Σ I) of integer (F, ny, nx) frames, summed exactly in int64; with ``mask``
    ((ny, nx) bool, e.g. :func:`tembench_pelz2022.dpc.dark_field_mask`) (F, 4), the fourth column Σ_mask I, in the
    same pass over the data."""
    small = d3.dtype.itemsize <= 2 and d3.shape[1] < 2 ** 15 and d3.shape[2] < 2 ** 15  # int32 row/column sums exact
    n_frames, ny, nx = d3.shape
    if use_numba(numba) and d3.flags.c_contiguous and small:
        out = np.empty((n_frames, 3 if mask is None else 4), np.int64)
        if mask is None:
            _moments_int_nb(d3, out)
        else:
            _moments_int_masked_nb(d3, np.ascontiguousarray(mask, dtype=bool).astype(np.int32), out)
        return out.astype(np.float64)
    rows = d3.sum(axis=2, dtype=np.int64)  # (F, ny)
    cols = d3.sum(axis=1, dtype=np.int64)  # (F, nx)
    out = np.empty((n_frames, 3 if mask is None else 4), np.int64)
    out[:, 0] = rows @ np.arange(ny, dtype=np.int64)
    out[:, 1] = cols @ np.arange(nx, dtype=np.int64)
    out[:, 2] = rows.sum(axis=1)
    if mask is not None:
        out[:, 3] = d3.reshape(n_frames, -1)[:, np.flatnonzero(np.asarray(mask, bool))].sum(axis=1, dtype=np.int64)
    return out.astype(np.float64)
