"""SSB reduction over both double-overlap lunes and the triple overlap (numba, with a numpy twin).

For a weak phase object the scan transform of the normalised data is, pixel by pixel,
G(k, K) = iΦ(K) γ(k, K) + noise with γ = A*(k)A(k−K) − A(k)A*(k+K), A = aperture·e^{−iχ}.
With the quadratic aberration χ_q(k) = kᵀQk and θ(K) = KᵀQK:

* lune D−: γ = e^{2ik·QK} e^{−iθ};  lune D+: γ = −e^{2ik·QK} e^{iθ}, |γ| = 1;
* triple overlap (|k|, |k−K|, |k+K| < k0): γ = e^{2ik·QK}(e^{−iθ} − e^{iθ}), |γ|² = 4 sin²θ. It is
  zero in focus (why eq 3 uses the lunes only) but carries up to 4× a lune pixel's signal power
  when the probe is defocused.

The least-squares (maximum-likelihood for uniform pixel noise) estimate is Φ = −i Σ γ* G / Σ|γ|².
This kernel returns its pieces per K, so the caller can also compare the two sidebands (an
independent noise estimate): ``Dm`` = Σ_{D−} (−i) e^{iθ} e^{−2ik·QK} G (→ Φ·N−), ``Dp`` = Σ_{D+} i e^{−iθ}
e^{−2ik·QK} G (→ Φ·N+), ``T`` = Σ_{triple} e^{−2ik·QK} G (→ 2 sinθ Φ·N_t) and the pixel counts
N−, N+, N_t. Pixels are classified by their centres (uniform detector grid ky0 + iy·dky, kx0 + ix·dkx).
"""

from __future__ import annotations

import numpy as np

from tembench_pelz2022._kernels import HAVE_NUMBA, use_numba

if HAVE_NUMBA:
    import numba as _nb


def reduce_numpy(G, ky0, dky, nky, kx0, dkx, nkx, KY, KX, k0, Q, chunk=64):
    """Numpy twin of :func:`reduce` (same results to rounding)."""
    n1, n2, _ = G.shape
    kyv = ky0 + dky * np.arange(nky)
    kxv = kx0 + dkx * np.arange(nkx)
    ky = np.repeat(kyv, nkx)
    kx = np.tile(kxv, nky)
    kk = ky * ky + kx * kx
    inside = kk < k0 * k0
    ky, kx, kk = ky[inside], kx[inside], kk[inside]
    Gi = G[:, :, inside]
    sums = np.zeros((3, n1, n2), dtype=np.complex128)
    counts = np.zeros((3, n1, n2), dtype=np.int64)
    k02 = k0 * k0
    for a in range(0, n1, chunk):
        KYc, KXc = KY[a:a + chunk, :, None], KX[a:a + chunk, :, None]
        KK = KYc * KYc + KXc * KXc
        dot = KYc * ky + KXc * kx
        dm = kk + KK - 2 * dot < k02
        dp = kk + KK + 2 * dot < k02
        masks = (dm & ~dp, dp & ~dm, dm & dp)
        vy = Q[0, 0] * KYc + Q[0, 1] * KXc
        vx = Q[1, 0] * KYc + Q[1, 1] * KXc
        theta = (KYc * vy + KXc * vx)[..., 0]
        g = Gi[a:a + chunk] * np.exp(-2j * (ky * vy + kx * vx))
        s = [np.where(m, g, 0).sum(-1) for m in masks]
        sums[0, a:a + chunk] = -1j * np.exp(1j * theta) * s[0]
        sums[1, a:a + chunk] = 1j * np.exp(-1j * theta) * s[1]
        sums[2, a:a + chunk] = s[2]
        for i, m in enumerate(masks):
            counts[i, a:a + chunk] = m.sum(-1)
    return sums, counts


if HAVE_NUMBA:
    @_nb.njit(cache=True, nogil=True)
    def _disc_pixels_nb(ky0, dky, nky, kx0, dkx, nkx, k0):  # pragma: no cover - compiled
        # the detector pixels inside the bright-field disc (centres), in ascending flat order: flat index, iy, ix,
        # ky, kx, |k|² — the same arithmetic as the per-pixel test it replaces, so the same pixels and values
        k02 = k0 * k0
        n = 0
        idx = np.empty(nky * nkx, np.int64)
        piy = np.empty(nky * nkx, np.int64)
        pix = np.empty(nky * nkx, np.int64)
        pky = np.empty(nky * nkx)
        pkx = np.empty(nky * nkx)
        pkk = np.empty(nky * nkx)
        for iy in range(nky):
            kyy = ky0 + iy * dky
            for ix in range(nkx):
                kxx = kx0 + ix * dkx
                kk = kyy * kyy + kxx * kxx
                if kk < k02:
                    idx[n] = iy * nkx + ix
                    piy[n] = iy
                    pix[n] = ix
                    pky[n] = kyy
                    pkx[n] = kxx
                    pkk[n] = kk
                    n += 1
        return idx[:n], piy[:n], pix[:n], pky[:n], pkx[:n], pkk[:n]

    @_nb.njit(parallel=True, cache=True, nogil=True)
    def _reduce_nb(G, ky0, dky, nky, kx0, dkx, nkx, KY, KX, k0, Q, sums, counts):  # pragma: no cover - compiled
        # per K: only the pixels inside the disc (a list made once), the aberration phase e^{−2ik·QK} from per-row
        # and per-column tables (the same products, in the same order, as a running recurrence over the detector)
        n1, n2 = KY.shape
        k02 = k0 * k0
        idx, piy, pix, pky, pkx, pkk = _disc_pixels_nb(ky0, dky, nky, kx0, dkx, nkx, k0)
        npx = idx.shape[0]
        for a in _nb.prange(n1):
            ey = np.empty(nky, np.complex128)
            ex = np.empty(nkx, np.complex128)
            for b in range(n2):
                Ky = KY[a, b]
                Kx = KX[a, b]
                KK = Ky * Ky + Kx * Kx
                vy = Q[0, 0] * Ky + Q[0, 1] * Kx
                vx = Q[1, 0] * Ky + Q[1, 1] * Kx
                theta = Ky * vy + Kx * vx
                quad = (vy != 0.0) or (vx != 0.0)
                if quad:
                    ry = np.exp(-2j * dky * vy)
                    rx = np.exp(-2j * dkx * vx)
                    e = np.exp(-2j * ky0 * vy)
                    for iy in range(nky):
                        ey[iy] = e
                        e = e * ry
                    e = np.exp(-2j * kx0 * vx)
                    for ix in range(nkx):
                        ex[ix] = e
                        e = e * rx
                sm = 0j
                sp = 0j
                st = 0j
                nm = 0
                np_ = 0
                nt = 0
                for q in range(npx):
                    dot = pky[q] * Ky + pkx[q] * Kx
                    kk = pkk[q]
                    inm = kk + KK - 2.0 * dot < k02
                    inp = kk + KK + 2.0 * dot < k02
                    if inm or inp:
                        g = np.complex128(G[a, b, idx[q]])
                        if quad:
                            g = g * (ey[piy[q]] * ex[pix[q]])
                        if inm and inp:
                            st += g
                            nt += 1
                        elif inm:
                            sm += g
                            nm += 1
                        else:
                            sp += g
                            np_ += 1
                sums[0, a, b] = -1j * np.exp(1j * theta) * sm
                sums[1, a, b] = 1j * np.exp(-1j * theta) * sp
                sums[2, a, b] = st
                counts[0, a, b] = nm
                counts[1, a, b] = np_
                counts[2, a, b] = nt

    # the same kernel single-threaded: many small calls (the rotation search) would wait on the thread pool
    _reduce_serial_nb = _nb.njit(cache=True, nogil=True)(_reduce_nb.py_func)


def reduce(G, ky0, dky, nky, kx0, dkx, nkx, KY, KX, k0, Q, numba: bool | None = None, parallel: bool = True):
    """(sums (3, n1, n2) complex128 = Dm, Dp, T; counts (3, n1, n2) int64 = N−, N+, N_t); see the module docstring.

    ``G`` (n1, n2, nky·nkx) is K-major with the flattened detector last; ``KY``, ``KX`` (n1, n2) the
    scan frequencies in the detector frame (1/Å); ``k0`` = α/λ; ``Q`` the 2×2 quadratic-aberration
    matrix in the detector frame (rad·Å²). ``parallel=False``: one thread (for many small calls).
    """
    Q = np.asarray(Q, dtype=np.float64)
    KY = np.asarray(KY, dtype=np.float64)
    KX = np.asarray(KX, dtype=np.float64)
    if not use_numba(numba):
        return reduce_numpy(G, ky0, dky, nky, kx0, dkx, nkx, KY, KX, k0, Q)
    sums = np.zeros((3,) + KY.shape, dtype=np.complex128)
    counts = np.zeros((3,) + KY.shape, dtype=np.int64)
    (_reduce_nb if parallel else _reduce_serial_nb)(G, float(ky0), float(dky), int(nky), float(kx0), float(dkx), int(nkx), KY, KX, float(k0), Q,
               sums, counts)
    return sums, counts


def theta_of(KY, KX, Q) -> np.ndarray:
    """θ(K) = KᵀQK (rad) for every K."""
    return Q[0, 0] * KY * KY + (Q[0, 1] + Q[1, 0]) * KY * KX + Q[1, 1] * KX * KX


# --- crop + bin of a block of dense frames in one pass (the SSB input) ---------------------------------
def crop_bin_numpy(block, y0, x0, f, nby, nbx, out):
    """out[..., i, j] = Σ block[..., y0 + f·i + a, x0 + f·j + b] over a, b < f (float32)."""
    w = block[:, :, y0:y0 + f * nby, x0:x0 + f * nbx].astype(np.float32)
    out[...] = w.reshape(w.shape[0], w.shape[1], nby, f, nbx, f).sum(axis=(3, 5))
    return out


if HAVE_NUMBA:
    # no "nnan"/"ninf": a NaN/inf must reach the frame total (the finite check reads it there)
    @_nb.njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
    def _crop_bin_stats_nb(d3, y0, x0, f, nby, nbx, out3, stats, first, total, changes, frame_tot, zero):  # pragma: no cover
        # Frames in groups of four, each frame read once, row by row: the row sums (frame totals), the
        # per-pixel statistics (one float64 add and one int64 add per pixel per four frames: the
        # accumulators, larger than L1 for a 128² detector, are swept a quarter as often) and, for
        # rows inside the window, the f-row bin into tmp while the row is in cache. out3[row, x, pixel]
        # (frame = row·sx + x) may be any strided view (scan-major, or the row-major layout SSB uses).
        n_frames, ny, nx = d3.shape
        sx = out3.shape[1]
        w = f * nbx
        ye = y0 + f * nby
        tmp = np.empty((4, w), np.float32)
        for n0 in range(0, n_frames, 4):
            m = min(4, n_frames - n0)
            for k in range(m):
                frame_tot[n0 + k] = zero
            s0 = zero
            s1 = zero
            s2 = zero
            s3 = zero
            for iy in range(ny):
                if m == 4:
                    r0 = zero
                    r1 = zero
                    r2 = zero
                    r3 = zero
                    if stats:
                        for ix in range(nx):
                            a = d3[n0, iy, ix]
                            b = d3[n0 + 1, iy, ix]
                            c = d3[n0 + 2, iy, ix]
                            e = d3[n0 + 3, iy, ix]
                            r0 += a
                            r1 += b
                            r2 += c
                            r3 += e
                            total[iy, ix] += (np.float64(a) + np.float64(b)) + (np.float64(c) + np.float64(e))
                            fv = first[iy, ix]
                            changes[iy, ix] += (np.int64(a != fv) + np.int64(b != fv)) + (np.int64(c != fv) + np.int64(e != fv))
                    else:
                        for ix in range(nx):
                            r0 += d3[n0, iy, ix]
                            r1 += d3[n0 + 1, iy, ix]
                            r2 += d3[n0 + 2, iy, ix]
                            r3 += d3[n0 + 3, iy, ix]
                    s0 += r0
                    s1 += r1
                    s2 += r2
                    s3 += r3
                else:
                    for k in range(m):
                        r = zero
                        for ix in range(nx):
                            v = d3[n0 + k, iy, ix]
                            r += v
                            if stats:
                                total[iy, ix] += v
                                changes[iy, ix] += v != first[iy, ix]
                        frame_tot[n0 + k] += r
                if iy >= y0 and iy < ye:  # the window: f rows summed into tmp (contiguous, vectorised), then f columns
                    q = (iy - y0) % f
                    for k in range(m):
                        src = d3[n0 + k, iy, x0:x0 + w]  # a slice: indices known ≥ 0, so the loop vectorises
                        t = tmp[k]
                        if q == 0:
                            for c in range(w):
                                t[c] = np.float32(src[c])
                        else:
                            for c in range(w):
                                t[c] += np.float32(src[c])
                    if q == f - 1:
                        i = (iy - y0) // f
                        for k in range(m):
                            t = tmp[k]
                            fr = n0 + k
                            o = out3[fr // sx, fr % sx]
                            for j in range(nbx):
                                acc = t[f * j]
                                for b in range(1, f):
                                    acc += t[f * j + b]
                                o[i * nbx + j] = acc
            if m == 4:
                frame_tot[n0] = s0
                frame_tot[n0 + 1] = s1
                frame_tot[n0 + 2] = s2
                frame_tot[n0 + 3] = s3


def crop_bin_stats(block, y0: int, x0: int, f: int, nby: int, nbx: int, out, acc=None, numba: bool | None = None):
    """The f × f binned crop (y0, x0, f·nby × f·nbx) of every frame of ``block`` (rows, scan_x, k_y, k_x) into ``out`` and, in the same read of
    each frame, its total (returned, (frames,) float: a NaN/inf pixel makes it non-finite — the finite check)
    and, if ``acc`` = (first, total, changes) ((k_y·k_x,) first frame, float64 and int64 accumulators), each
    pixel's value added to ``total`` and 1 to ``changes`` where it differs from ``first`` (in place).
    ``out``: (rows, scan_x, nby, nbx), or (rows, scan_x, nby·nbx) with any strides — e.g. ``rm[r0:r1].transpose(0, 2, 1)``
    of a row-major (scan_y, nby·nbx, scan_x) array, the layout :func:`ssb.fused_crop_bin` fills (its FFT is faster).
    The one pass over the raw data that SSB makes (``ssb.fused_crop_bin``); numpy twin: the same results."""
    r, sx, ny, nx = block.shape
    d3 = block.reshape(r * sx, ny, nx)
    out3 = out.reshape(r, sx, nby * nbx) if out.ndim == 4 else out
    if use_numba(numba) and d3.flags.c_contiguous and r * sx:
        float_data = d3.dtype in (np.float32, np.float64)
        zero = d3.dtype.type(0) if float_data else np.float64(0)
        tot = np.empty(r * sx, dtype=d3.dtype if float_data else np.float64)
        if acc is None:
            _crop_bin_stats_nb(d3, int(y0), int(x0), int(f), int(nby), int(nbx), out3, False, np.zeros((1, 1), d3.dtype),
                               np.zeros((1, 1)), np.zeros((1, 1), np.int64), tot, zero)
        else:
            first, total, changes = acc
            _crop_bin_stats_nb(d3, int(y0), int(x0), int(f), int(nby), int(nbx), out3, True,
                               np.ascontiguousarray(first, dtype=d3.dtype).reshape(ny, nx), total.reshape(ny, nx),
                               changes.reshape(ny, nx), tot, zero)
        return tot
    out3[...] = crop_bin_numpy(block, y0, x0, f, nby, nbx, np.empty((r, sx, nby, nbx), np.float32)).reshape(r, sx, -1)
    b = d3.reshape(r * sx, ny * nx)
    if acc is not None:
        first, total, changes = acc
        total.reshape(-1)[...] += b.sum(axis=0, dtype=np.float64)
        changes.reshape(-1)[...] += (b != np.asarray(first).reshape(-1)).sum(axis=0)
    return b.sum(axis=1, dtype=d3.dtype if d3.dtype.kind == "f" else np.float64)
