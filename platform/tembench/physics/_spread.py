"""Atom spreading for fast projected potentials (NUFFT type 1 with an exponential-of-semicircle kernel).

Each atom is deposited on an oversampled periodic grid (M ≥ σ·n points per axis) with the separable
"exponential of semicircle" kernel φ(t) = exp(β(√(1 − (2t/w)²) − 1)), |t| ≤ w/2 grid points
(Barnett, Magland & af Klinteberg, SIAM J. Sci. Comput. 41 (2019) C479, the FINUFFT kernel). The
grid's DFT at the n lowest frequencies is φ̂(k_y/M_y) φ̂(k_x/M_x) S(k) up to aliasing terms of relative
size ≈ exp(−β(1 − ...)) (≈ 1e-5 at σ = 1.25, w = 8, measured against the exact structure factor), so
dividing by φ̂ gives the structure factor S(k) = Σ_j exp(−2πi k·r_j) at a cost of atoms·w² + one FFT
of M_y·M_x per slice and element, instead of atoms × pixels.

The kernels here run serially, atom by atom in input order: the sums are bit-identical run to run.
numba is used when importable (a core dependency) unless ``TEMBENCH_NO_NUMBA=1``; each kernel has a
numpy twin (the tests check they agree).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from tembench import _jit

# numba is a core dependency; the numpy twins serve TEMBENCH_NO_NUMBA=1 and odd installs. The kernels live in
# _spread_nb, imported when first used.
HAVE_NUMBA = _jit.numba_enabled()

# Kernel design: σ = 1.25 keeps the extra FFT work small (M = 320 for n = 256); w = 8 points per axis
# and β = 0.97·π·(1 − 1/(2σ))·w (FINUFFT's choice) give ≈ 1e-5 relative L2 error on Si potentials at
# 0.5 Å and 2e-6 at 0.05 Å sampling (see tests/physics/test_fast_potential.py).
SIGMA = 1.25
WIDTH = 8
BETA = 0.97 * math.pi * (1.0 - 1.0 / (2.0 * SIGMA)) * WIDTH


def oversampled_size(n: int, sigma: float | None = None) -> int:
    """Smallest FFT-friendly (2, 3, 5) grid size ≥ σ·n (and ≥ n + WIDTH, so tiny grids keep σ > 1)."""
    from tembench.physics.grid import fft_friendly

    sigma = SIGMA if sigma is None else sigma
    return fft_friendly(max(int(math.ceil(sigma * n)), n + WIDTH), primes=(2, 3, 5))


# φ at the w points an atom touches, as polynomials of its sub-pixel offset (no exp/sqrt per atom):
# degree w + 2 Chebyshev interpolants, max error 2e-7 of the peak (the kernel's √ edge limits it).


@lru_cache(maxsize=8)
def kernel_polynomials(width: int, beta: float, degree: int | None = None) -> np.ndarray:
    """(degree + 1, width) float64 monomial coefficients (highest power first) of the weights.

    For an atom at u (grid points) the first grid point is m0 = ⌈u − w/2⌉ and, with t = 2(m0 − u + w/2) − 1
    in [−1, 1), point m0 + a gets φ(m0 + a − u) = Σ_d c[d, a] t^(degree − d).
    """
    from numpy.polynomial import chebyshev

    degree = width + 2 if degree is None else degree
    hw = width / 2.0
    coef = np.empty((degree + 1, width))
    for a in range(width):
        def f(t, a=a):
            return _es(((t + 1.0) / 2.0 + a) / hw - 1.0, beta)

        c = chebyshev.cheb2poly(chebyshev.chebinterpolate(f, degree))
        coef[:, a] = np.pad(c, (0, degree + 1 - len(c)))[::-1]
    coef.setflags(write=False)
    return coef


@lru_cache(maxsize=64)
def kernel_ft(freq_index: tuple, m: int, width: int, beta: float) -> np.ndarray:
    """φ̂(k/m) = ∫ φ(t) exp(−2πi t k/m) dt (t in grid points) at integer frequencies k, float64.

    Gauss–Legendre quadrature (200 nodes: converged to 1e-15 for w ≤ 16, the kernel is smooth
    and its ends are exp(−β) ≈ 1e-7 small).
    """
    t, wt = np.polynomial.legendre.leggauss(200)
    t = t * (width / 2.0)
    wt = wt * (width / 2.0)
    phi = np.exp(beta * (np.sqrt(np.maximum(0.0, 1.0 - (2.0 * t / width) ** 2)) - 1.0))
    xi = np.asarray(freq_index, dtype=np.float64) / m
    out = (np.cos(2.0 * np.pi * np.multiply.outer(xi, t)) * (wt * phi)).sum(axis=-1)
    out.setflags(write=False)
    return out


# --- spreading --------------------------------------------------------------------------------
def spread_numpy(uy, ux, slot, grid, width: int, beta: float):
    """Deposit atoms on complex grids: plane ``slot_j // 2``, real part for even ``slot_j``, imaginary for odd.

    grid (p, M_y, M_x) complex64 += φ(m_y − u_y,j) φ(m_x − u_x,j) (periodic; u in grid points) for every
    atom j. One ``np.bincount`` over the flattened indices (float64 sums in atom order).
    """
    nb_, my, mx = grid.shape
    if len(uy) == 0:
        return grid
    coef = kernel_polynomials(width, beta)
    offs = np.arange(width)
    y0, wy = _weights_numpy(np.asarray(uy, dtype=np.float64), coef)
    x0, wx = _weights_numpy(np.asarray(ux, dtype=np.float64), coef)
    iy = (y0[:, None] + offs) % my
    ix = (x0[:, None] + offs) % mx
    slot = np.asarray(slot, dtype=np.int64)
    flat = (((slot // 2)[:, None, None] * my + iy[:, :, None]) * mx + ix[:, None, :]) * 2 + (slot % 2)[:, None, None]
    vals = wy[:, :, None] * wx[:, None, :]
    sums = np.bincount(flat.ravel(), weights=vals.ravel(), minlength=2 * grid.size)
    grid.view(np.float32).reshape(-1)[...] += sums.astype(np.float32)
    return grid


def _weights_numpy(u, coef):
    width = coef.shape[1]
    start = u - width / 2.0
    m0 = np.ceil(start)
    t = 2.0 * (m0 - start) - 1.0
    w = np.zeros((len(u), width))
    for c in coef:  # Horner
        w = w * t[:, None] + c
    return m0.astype(np.int64), w.astype(np.float32)


def _es(z, beta):
    return np.exp(beta * (np.sqrt(np.maximum(0.0, 1.0 - z * z)) - 1.0))


@lru_cache(maxsize=16)
def source_index(n: int, m: int) -> np.ndarray:
    """Index in an m-point spectrum (FFT order) of each of the n frequencies of an n-point one (read-only)."""
    npos = (n + 1) // 2
    out = np.concatenate([np.arange(npos), np.arange(m - (n - npos), m)])
    out.setflags(write=False)
    return out


_source_index = source_index


def accumulate_numpy(z, mult, out, first: bool):
    """out (p, n_y, n_x) (=, or += unless ``first``) mult · z at the n_y × n_x lowest frequencies of z (p, M_y, M_x);
    then z is zeroed (ready for the next deposit)."""
    ny, nx = out.shape[-2:]
    part = z[:, _source_index(ny, z.shape[-2])][:, :, _source_index(nx, z.shape[-1])] * mult
    if first:
        out[...] = part
    else:
        out += part
    z[...] = 0
    return out


def split_pairs_numpy(res, out, dest):
    """out[dest[2i]] = res[i].real, out[dest[2i + 1]] = res[i].imag (for as many dest as given)."""
    out[dest[0::2]] = res.real[: len(dest[0::2])]
    out[dest[1::2]] = res.imag[: len(dest[1::2])]
    return out


def spread(uy, ux, slot, grid, width: int, beta: float, use_numba: bool | None = None):
    """Deposit atoms on the complex planes ``grid`` (p, M_y, M_x) complex64 in place; see :func:`spread_numpy`.

    ``uy``, ``ux``: positions in grid points in [0, M) (float64); ``slot``: 2 × plane + (0 real | 1 imaginary).
    Two real slices share one complex plane, so one complex FFT transforms both (FFTW's complex
    transforms measured 1.25–1.8× faster per slice than its real ones). The numba kernel sums in float32,
    the numpy twin in float64 (they agree to float32 rounding).
    """
    uy = np.ascontiguousarray(uy, dtype=np.float64)
    ux = np.ascontiguousarray(ux, dtype=np.float64)
    slot = np.ascontiguousarray(slot, dtype=np.int64)
    if (HAVE_NUMBA if use_numba is None else use_numba and HAVE_NUMBA):
        view = grid.view(np.float32)
        from tembench.physics._spread_nb import _spread_nb

        _spread_nb(uy, ux, slot, view, kernel_polynomials(int(width), float(beta)))
        return grid
    return spread_numpy(uy, ux, slot, grid, width, beta)


def split_pairs(res, out, dest, use_numba: bool | None = None):
    """Real parts of the complex planes ``res`` to ``out[dest[0::2]]``, imaginary parts to ``out[dest[1::2]]``."""
    if (HAVE_NUMBA if use_numba is None else use_numba and HAVE_NUMBA) and isinstance(out, np.ndarray) \
            and out.dtype == np.float32 and out.flags.c_contiguous:
        from tembench.physics._spread_nb import _split_pairs_nb

        return _split_pairs_nb(res, out, np.ascontiguousarray(dest, dtype=np.int64))
    return split_pairs_numpy(res, out, dest)


def accumulate(z, mult, out, first: bool, use_numba: bool | None = None, src=None):
    """out = (or +=) mult · (the frequencies of the oversampled spectrum z that the output grid keeps); z is
    then zeroed. ``src``: the (rows, columns) of z to read, :func:`source_index` (computed if None)."""
    if (HAVE_NUMBA if use_numba is None else use_numba and HAVE_NUMBA):
        if src is None:
            ny, nx = out.shape[-2:]
            src = (source_index(ny, z.shape[-2]), source_index(nx, z.shape[-1]))
        from tembench.physics._spread_nb import _accumulate_nb

        return _accumulate_nb(z, mult, out, src[0], src[1], bool(first))
    return accumulate_numpy(z, mult, out, first)


__all__ = ["HAVE_NUMBA", "SIGMA", "WIDTH", "BETA", "oversampled_size", "kernel_ft", "kernel_polynomials",
           "spread", "accumulate", "split_pairs", "source_index"]
