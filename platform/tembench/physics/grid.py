"""Real- and reciprocal-space sampling grids (FFT order), and checks of grid parameters."""

from __future__ import annotations

import math

import numpy as np

from tembench.errors import TembenchError


def as_pair(value, name: str = "value") -> tuple[float, float]:
    """(y, x) pair from a scalar or a 2-sequence."""
    if np.ndim(value) == 0:
        v = float(value)
        return v, v
    arr = np.asarray(value, dtype=float).reshape(-1)
    if arr.size != 2:
        raise TembenchError(f"{name} must be a scalar or a (y, x) pair, got {value!r}")
    return float(arr[0]), float(arr[1])


def check_gpts(gpts) -> tuple[int, int]:
    if np.ndim(gpts) == 0:
        gpts = (int(gpts), int(gpts))
    ny, nx = (int(g) for g in gpts)
    if ny < 1 or nx < 1:
        raise TembenchError(f"gpts must be positive grid sizes (ny, nx); got {gpts!r}")
    return ny, nx


def check_sampling(sampling_A) -> tuple[float, float]:
    sy, sx = as_pair(sampling_A, "sampling_A")
    if not (sy > 0 and sx > 0 and math.isfinite(sy) and math.isfinite(sx)):
        raise TembenchError(f"sampling_A must be positive pixel sizes in Å; got {sampling_A!r}")
    return sy, sx


def spatial_frequencies(gpts, sampling_A, xp=np, dtype=np.float32):
    """Spatial frequencies (ky, kx) in 1/Å in FFT order, shaped (ny, 1) and (1, nx)."""
    ny, nx = check_gpts(gpts)
    sy, sx = check_sampling(sampling_A)
    ky = np.fft.fftfreq(ny, d=sy).astype(dtype)[:, None]
    kx = np.fft.fftfreq(nx, d=sx).astype(dtype)[None, :]
    return xp.asarray(ky), xp.asarray(kx)


def polar_frequencies(gpts, sampling_A, xp=np, dtype=np.float64):
    """|k| (1/Å) and azimuth φ = atan2(ky, kx) (rad) on the 2D grid, FFT order."""
    ky, kx = spatial_frequencies(gpts, sampling_A, xp=xp, dtype=dtype)
    k = xp.sqrt(ky**2 + kx**2)
    phi = xp.arctan2(ky + 0 * kx, kx + 0 * ky)
    return k, phi


def nyquist_A_inv(sampling_A) -> tuple[float, float]:
    sy, sx = check_sampling(sampling_A)
    return 0.5 / sy, 0.5 / sx


def fft_friendly(n: int, primes=(2, 3, 5, 7)) -> int:
    """Smallest integer ≥ n whose prime factors are all in ``primes`` (fast FFT sizes)."""
    n = max(1, int(n))
    while True:
        m = n
        for p in primes:
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def gpts_for_extent(extent_A, sampling_A, friendly: bool = True) -> tuple[int, int]:
    """Grid size covering ``extent_A`` (y, x) at most at ``sampling_A``; FFT-friendly if asked."""
    ey, ex = as_pair(extent_A, "extent_A")
    sy, sx = check_sampling(sampling_A)
    ny, nx = int(math.ceil(ey / sy - 1e-9)), int(math.ceil(ex / sx - 1e-9))
    if friendly:
        ny, nx = fft_friendly(ny), fft_friendly(nx)
    return max(ny, 1), max(nx, 1)
