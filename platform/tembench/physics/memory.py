"""Up-front memory estimates: an oversized job raises ResourceError before allocating anything.

The limit is ``TEMBENCH_MAX_MEMORY_GB`` if set, else 80 % of the memory the OS reports available.
"""

from __future__ import annotations

import os

from tembench.errors import ResourceError

COMPLEX64 = 8
FLOAT32 = 4


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else psutil, else 8 GiB."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # pragma: no cover - non-Linux
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover
        return 8 * 2**30


def memory_limit_bytes() -> int:
    env = os.environ.get("TEMBENCH_MAX_MEMORY_GB")
    if env:
        return int(float(env) * 2**30)
    return int(0.8 * available_memory_bytes())


def check_memory(nbytes: int, what: str, fix: str, limit: int | None = None) -> int:
    """Raise :class:`ResourceError` if ``nbytes`` exceeds the limit; return nbytes otherwise."""
    limit = memory_limit_bytes() if limit is None else int(limit)
    if nbytes > limit:
        raise ResourceError(
            f"{what} needs about {nbytes / 2**30:.2f} GiB but the limit is {limit / 2**30:.2f} GiB "
            f"(TEMBENCH_MAX_MEMORY_GB or 80 % of available memory). {fix}"
        )
    return int(nbytes)


def hrtem_tilt_series_bytes(gpts, n_slices: int, n_tilts: int, n_defocus: int, n_atoms: int = 0) -> int:
    """Peak bytes of :class:`~tembench.builtin.forward_multislice.HRTEMTiltSeries` for one tilt at a time."""
    ny, nx = gpts
    plane = ny * nx
    potential = n_slices * plane * FLOAT32
    # wave, FFT buffers, transmission, propagators, CTF, image waves and the potential builder's
    # temporaries: 18 complex planes (measured: the traced peak of 115² … 1843² px grids) + 8 MiB
    work = 18 * plane * COMPLEX64 + 8 * 2**20
    images = n_tilts * n_defocus * plane * FLOAT32
    structure = min(n_atoms, 2**20) * (ny + nx) * COMPLEX64
    return potential + work + images + structure


def stem_bytes(field_gpts, n_slices: int, window_gpts, n_modes: int, batch: int | None, n_positions: int,
               pattern_pixels: int, keep_patterns: bool) -> int:
    """Peak bytes of a 4D-STEM scan: transmissions, one batch of waves, and the kept patterns.

    ``batch`` is counted up to the scan's own default batch (``physics.stem.BATCH_BYTES`` of waves;
    ``None`` = that default): ``stem4d`` passes 64 when its ``batch_size`` is unset, while the scan
    then runs batches of 2 MiB of waves (4 patterns of a 256² window) — the 64 made the estimate of
    a 256² window 130 MiB too large (measured: 26 MiB of working memory beyond the patterns).
    """
    from tembench.physics.stem import BATCH_BYTES

    fy, fx = field_gpts
    wy, wx = window_gpts
    default = max(1, int(BATCH_BYTES // max(1, n_modes * wy * wx * COMPLEX64)))
    batch = default if batch is None else min(int(batch), default)
    trans = n_slices * fy * fx * (COMPLEX64 + FLOAT32)
    waves = 4 * batch * n_modes * wy * wx * COMPLEX64
    pats = n_positions * pattern_pixels * FLOAT32 if keep_patterns else 0
    return trans + waves + pats
