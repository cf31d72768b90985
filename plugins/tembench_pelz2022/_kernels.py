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
def csr_table_sums_numpy(offsets, indices, table):
    """Per-frame sums of ``table`` rows gathered at the event indices (cumulative-sum trick, O(C·d))."""
    table = np.asarray(table)
    acc = np.int64 if np.issubdtype(table.dtype, np.integer) or table.dtype == bool else np.float64
    vals = table[indices].astype(acc, copy=False)
    if vals.ndim == 1:
        vals = vals[:, None]
    run = np.zeros((len(vals) + 1, vals.shape[1]), dtype=acc)
    np.cumsum(vals, axis=0, out=run[1:])
    off = offsets.astype(np.int64)
    return run[off[1:]] - run[off[:-1]]


if HAVE_NUMBA:
    # serial on purpose: at ~1 ns per event a parallel region costs more than it saves, and its
    # threads contend with BLAS/FFT worker threads on small machines (measured: 0.13 → 8 ms)
    @_nb.njit(cache=True, nogil=True)
    def _csr_table_sums_nb(offsets, indices, table, out):  # pragma: no cover - compiled
        n_frames = out.shape[0]
        d = out.shape[1]
        for f in range(n_frames):
            for e in range(offsets[f], offsets[f + 1]):
                p = indices[e]
                for j in range(d):
                    out[f, j] += table[p, j]


def csr_table_sums(offsets, indices, table, numba: bool | None = None):
    """(F, d) per-frame sums of ``table`` (M, d) (or (M,) → (F, 1)) at the events; int64 for integer tables."""
    table = np.asarray(table)
    if table.ndim == 1:
        table = table[:, None]
    if not use_numba(numba):
        return csr_table_sums_numpy(offsets, indices, table)
    acc = np.int64 if (np.issubdtype(table.dtype, np.integer) or table.dtype == bool) else np.float64
    out = np.zeros((len(offsets) - 1, table.shape[1]), dtype=acc)
    _csr_table_sums_nb(offsets, indices, np.ascontiguousarray(table, dtype=acc), out)
    return out


# --- SSB reduction (eq 3) with double-overlap masks and a separable quadratic aberration --------
def ssb_reduce_numpy(G, ky0, dky, nky, kx0, dkx, nkx, KY, KX, k0, Q, chunk=64):
    """Φ(K) from G(K, k) (K-major, k = flattened uniform detector grid); see :func:`ssb_reduce`."""
    n1, n2, nk = G.shape
    kyv = ky0 + dky * np.arange(nky)
    kxv = kx0 + dkx * np.arange(nkx)
    ky = np.repeat(kyv, nkx)
    kx = np.tile(kxv, nky)
    kk = ky * ky + kx * kx
    inside = kk < k0 * k0
    ky, kx, kk = ky[inside], kx[inside], kk[inside]
    Gi = G[:, :, inside]
    out = np.zeros((n1, n2), dtype=np.complex128)
    count = np.zeros((n1, n2), dtype=np.int64)
    k02 = k0 * k0
    for a in range(0, n1, chunk):
        KYc, KXc = KY[a:a + chunk, :, None], KX[a:a + chunk, :, None]
        KK = KYc * KYc + KXc * KXc
        dot = KYc * ky + KXc * kx
        dm = kk + KK - 2 * dot < k02
        dp = kk + KK + 2 * dot < k02
        mm = dm & ~dp
        mp = dp & ~dm
        vy = Q[0, 0] * KYc + Q[0, 1] * KXc
        vx = Q[1, 0] * KYc + Q[1, 1] * KXc
        theta = (KYc * vy + KXc * vx)[..., 0]
        e = np.exp(-2j * (ky * vy + kx * vx))
        g = Gi[a:a + chunk] * e
        sm = np.where(mm, g, 0).sum(-1)
        sp = np.where(mp, g, 0).sum(-1)
        n = mm.sum(-1) + mp.sum(-1)
        val = -1j * np.exp(1j * theta) * sm + 1j * np.exp(-1j * theta) * sp
        out[a:a + chunk] = np.where(n > 0, val / np.maximum(n, 1), 0)
        count[a:a + chunk] = n
    return out, count


if HAVE_NUMBA:
    @_nb.njit(parallel=True, cache=False, nogil=True)
    def _ssb_reduce_nb(G, ky0, dky, nky, kx0, dkx, nkx, KY, KX, k0, Q, out, count):  # pragma: no cover - compiled
        n1, n2 = out.shape
        k02 = k0 * k0
        for a in _nb.prange(n1):
            for b in range(n2):
                Ky = KY[a, b]
                Kx = KX[a, b]
                KK = Ky * Ky + Kx * Kx
                vy = Q[0, 0] * Ky + Q[0, 1] * Kx
                vx = Q[1, 0] * Ky + Q[1, 1] * Kx
                theta = Ky * vy + Kx * vx
                quad = (vy != 0.0) or (vx != 0.0)
                ry = np.exp(-2j * dky * vy)
                rx = np.exp(-2j * dkx * vx)
                ey = np.exp(-2j * ky0 * vy)
                ex0 = np.exp(-2j * kx0 * vx)
                sm_r = 0.0
                sm_i = 0.0
                sp_r = 0.0
                sp_i = 0.0
                n = 0
                for iy in range(nky):
                    kyy = ky0 + iy * dky
                    ex = ex0
                    base = iy * nkx
                    for ix in range(nkx):
                        kxx = kx0 + ix * dkx
                        kk = kyy * kyy + kxx * kxx
                        if kk < k02:
                            dot = kyy * Ky + kxx * Kx
                            inm = kk + KK - 2.0 * dot < k02
                            inp = kk + KK + 2.0 * dot < k02
                            if inm != inp:
                                g = np.complex128(G[a, b, base + ix])
                                if quad:
                                    g = g * (ey * ex)
                                if inm:
                                    sm_r += g.real
                                    sm_i += g.imag
                                else:
                                    sp_r += g.real
                                    sp_i += g.imag
                                n += 1
                        if quad:
                            ex = ex * rx
                    if quad:
                        ey = ey * ry
                if n > 0:
                    sm = complex(sm_r, sm_i)
                    sp = complex(sp_r, sp_i)
                    val = -1j * np.exp(1j * theta) * sm + 1j * np.exp(-1j * theta) * sp
                    out[a, b] = val / n
                count[a, b] = n


def ssb_reduce(G, ky0, dky, nky, kx0, dkx, nkx, KY, KX, k0, Q, numba: bool | None = None):
    """Single-sideband reduction: (Φ(K) = (P(K) + conj Q(K)) / N(K) complex128, N(K) int64), (n1, n2) each.

    ``G`` (n1, n2, nky·nkx) is the scan-Fourier transform of the normalised data, K-major with
    the flattened uniform detector grid k = (ky0 + iy·dky, kx0 + ix·dkx) (1/Å) last; ``KY``,
    ``KX`` (n1, n2) the scan frequencies of each K in the detector frame (1/Å); ``k0`` = α/λ;
    ``Q`` the 2×2 quadratic-aberration matrix with χ_q(k) = kᵀQk (rad·Å²). Only pixels with
    |k| < k0 in exactly one of the two shifted discs |k ∓ K| < k0 contribute (both double-overlap
    lunes; the triple overlap carries no phase contrast).
    """
    Q = np.asarray(Q, dtype=np.float64)
    KY = np.asarray(KY, dtype=np.float64)
    KX = np.asarray(KX, dtype=np.float64)
    if not use_numba(numba):
        return ssb_reduce_numpy(G, ky0, dky, nky, kx0, dkx, nkx, KY, KX, k0, Q)
    out = np.zeros(KY.shape, dtype=np.complex128)
    count = np.zeros(KY.shape, dtype=np.int64)
    _ssb_reduce_nb(G, float(ky0), float(dky), int(nky), float(kx0), float(dkx), int(nkx), KY, KX, float(k0), Q,
                   out, count)
    return out, count
