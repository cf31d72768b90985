"""numba kernels of the TV prox (:mod:`tembench_ren2020.prox`), imported only when a process uses them.

Each is the fused form of the array version in :mod:`tembench_ren2020.prox`, with the same floating-point
operations in the same order, so the two give the same bits (tested); which one runs is a matter of speed
(:mod:`tembench._jit`).
"""

from __future__ import annotations

import math

import numba as _nb  # type: ignore[import-not-found]
import numpy as np


# serial on purpose: with prange, a busy 2-core machine made a pass 40× slower (7 ms vs 0.2 ms)
# while its threads waited for each other. Measured at 96³, 15 iterations: 28–32 ms vs 126–130 ms for the
# array version (session 11, load ≈ 1.5).
@_nb.njit(cache=True, nogil=True)
def _primal_plane_nb(x, q, i, positivity, out):  # pragma: no cover - compiled
    ny, nx = out.shape
    zero = np.float32(0.0)
    for j in range(ny):
        for k in range(nx):
            s = x[i, j, k] + q[0, i, j, k] + q[1, i, j, k] + q[2, i, j, k]
            if i > 0:
                s -= q[0, i - 1, j, k]
            if j > 0:
                s -= q[1, i, j - 1, k]
            if k > 0:
                s -= q[2, i, j, k - 1]
            if positivity and s < zero:
                s = zero
            out[j, k] = s


@_nb.njit(cache=True, nogil=True)
def _primal_nb(x, q, positivity, out):  # pragma: no cover - compiled
    for i in range(x.shape[0]):
        _primal_plane_nb(x, q, i, positivity, out[i])


@_nb.njit(cache=True, nogil=True)
def _fgp_step_nb(x, q, p, step, inv_lam, gamma, positivity, planes):  # pragma: no cover - compiled
    # = a full primal pass, then the dual step and momentum: plane i + 1 of the primal is formed (from the old duals) before
    # the duals of plane i are overwritten, which is all the dual step of plane i reads
    nz, ny, nx = x.shape
    one = np.float32(1.0)
    cur = 0
    _primal_plane_nb(x, q, 0, positivity, planes[0])
    for i in range(nz):
        nxt = 1 - cur
        if i < nz - 1:
            _primal_plane_nb(x, q, i + 1, positivity, planes[nxt])
        vc = planes[cur]
        vn = planes[nxt]
        for j in range(ny):
            for k in range(nx):
                c = vc[j, k]
                a0 = q[0, i, j, k]
                a1 = q[1, i, j, k]
                a2 = q[2, i, j, k]
                if i < nz - 1:
                    a0 += (vn[j, k] - c) * step
                if j < ny - 1:
                    a1 += (vc[j + 1, k] - c) * step
                if k < nx - 1:
                    a2 += (vc[j, k + 1] - c) * step
                nrm = np.float32(math.sqrt(a0 * a0 + a1 * a1 + a2 * a2)) * inv_lam
                if nrm > one:
                    a0 /= nrm
                    a1 /= nrm
                    a2 /= nrm
                q[0, i, j, k] = a0 + gamma * (a0 - p[0, i, j, k])
                q[1, i, j, k] = a1 + gamma * (a1 - p[1, i, j, k])
                q[2, i, j, k] = a2 + gamma * (a2 - p[2, i, j, k])
                p[0, i, j, k] = a0
                p[1, i, j, k] = a1
                p[2, i, j, k] = a2
        cur = nxt
