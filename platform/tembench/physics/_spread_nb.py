"""numba kernels of :mod:`tembench.physics._spread`, imported on first use (``import numba`` and its first
kernel cost a process ≈ 1 s, which a unit that never spreads atoms should not pay)."""

from __future__ import annotations

import math

import numba as _nb  # type: ignore[import-not-found]
import numpy as np


# serial on purpose: deterministic sums (atoms are added in input order) and no thread contention
# with the FFTs; ≈ 2 ns per deposit
@_nb.njit(cache=True, nogil=True)
def _spread_nb(uy, ux, slot, grid, coef):  # pragma: no cover - compiled
    # grid: float32 view (p, M_y, 2 M_x) of the complex planes
    nb_, my, mx2 = grid.shape
    mx = mx2 // 2
    nd, width = coef.shape
    hw = 0.5 * width
    wy = np.empty(width, np.float64)
    wx = np.empty(width, np.float64)
    wyf = np.empty(width, np.float32)
    wxf = np.empty(width, np.float32)
    iy = np.empty(width, np.int64)
    ix = np.empty(width, np.int64)
    for j in range(uy.size):
        sy = uy[j] - hw
        sx = ux[j] - hw
        y0 = math.ceil(sy)
        x0 = math.ceil(sx)
        ty = 2.0 * (y0 - sy) - 1.0
        tx = 2.0 * (x0 - sx) - 1.0
        for a in range(width):
            wy[a] = coef[0, a]
            wx[a] = coef[0, a]
        for d in range(1, nd):
            for a in range(width):
                wy[a] = wy[a] * ty + coef[d, a]
                wx[a] = wx[a] * tx + coef[d, a]
        for a in range(width):
            wyf[a] = wy[a]
            wxf[a] = wx[a]
        g = grid[slot[j] >> 1]
        part = slot[j] & 1
        y0i = int(y0)
        x0i = int(x0)
        if y0i >= 0 and y0i + width <= my and x0i >= 0 and x0i + width <= mx:
            for a in range(width):
                va = wyf[a]
                row = g[y0i + a]
                c0 = 2 * x0i + part
                for b in range(width):
                    row[c0 + 2 * b] += va * wxf[b]
        else:  # the footprint wraps around the periodic cell
            for a in range(width):
                iy[a] = (y0i + a) % my
                ix[a] = 2 * ((x0i + a) % mx) + part
            for a in range(width):
                va = wyf[a]
                row = g[iy[a]]
                for b in range(width):
                    row[ix[b]] += va * wxf[b]
    return grid


@_nb.njit(cache=True, nogil=True)
def _accumulate_nb(z, mult, out, src_y, src_x, first):  # pragma: no cover - compiled
    # zeroing z here, row by row while it is in cache, saves a separate pass over the grid
    nb_, ny, nx = out.shape
    my = z.shape[1]
    used = np.zeros(my, np.bool_)
    for r in range(ny):
        used[src_y[r]] = True
    for s in range(nb_):
        for r in range(ny):
            zs = z[s, src_y[r]]
            ms = mult[r]
            o = out[s, r]
            if first:
                for c in range(nx):
                    o[c] = zs[src_x[c]] * ms[c]
            else:
                for c in range(nx):
                    o[c] += zs[src_x[c]] * ms[c]
            zs[:] = 0
        for r in range(my):
            if not used[r]:
                z[s, r, :] = 0
    return out


@_nb.njit(cache=True, nogil=True)
def _split_pairs_nb(res, out, dest):  # pragma: no cover - compiled
    ny, nx = res.shape[1], res.shape[2]
    for i in range(dest.size):
        part = i & 1
        plane = res[i >> 1]
        o = out[dest[i]]
        for r in range(ny):
            src = plane[r]
            dst = o[r]
            if part == 0:
                for c in range(nx):
                    dst[c] = src[c].real
            else:
                for c in range(nx):
                    dst[c] = src[c].imag
    return out
