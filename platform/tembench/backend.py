"""Array backend: numpy on the CPU, cupy on the GPU, one code path for both.

Numeric code takes an array module ``xp`` (as abTEM's ``get_array_module``) and never imports
numpy or cupy for its array work directly. FFTs go through :func:`fft2` / :func:`ifft2`, which
use ``scipy.fft`` with worker threads on the CPU and ``cupy.fft`` on the GPU.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import numpy as np
import scipy.fft

from tembench.errors import DeviceError

try:  # cupy is optional: the `gpu` extra
    import cupy as _cp  # type: ignore[import-not-found]
except Exception:  # ImportError, or a CUDA runtime that fails to initialise
    _cp = None

DEVICES = ("cpu", "gpu")


def cupy_available() -> bool:
    return _cp is not None


def get_array_module(device_or_array: Any = "cpu") -> ModuleType:
    """Return numpy or cupy for ``"cpu"``/``"gpu"`` or for an existing array.

    Raises :class:`DeviceError` for ``"gpu"`` when cupy is not installed.
    """
    if isinstance(device_or_array, str):
        device = device_or_array.lower()
        if device == "cpu":
            return np
        if device == "gpu":
            if _cp is None:
                raise DeviceError(
                    "device 'gpu' was requested but cupy is not installed or no CUDA device "
                    "could be initialised. Install the GPU extra (`pip install -e .[gpu]`) on a "
                    "machine with an NVIDIA GPU, or set `device: cpu` in the scenario."
                )
            return _cp
        raise DeviceError(f"unknown device {device_or_array!r}; choose one of {DEVICES}")
    if _cp is not None and isinstance(device_or_array, _cp.ndarray):
        return _cp
    return np


def asnumpy(array: Any) -> np.ndarray:
    """Copy an array of either backend to host memory (no copy for numpy input)."""
    if _cp is not None and isinstance(array, _cp.ndarray):
        return _cp.asnumpy(array)
    return np.asarray(array)


def fft_workers() -> int:
    """Threads for CPU FFTs: TEMBENCH_FFT_WORKERS, else all cores."""
    env = os.environ.get("TEMBENCH_FFT_WORKERS")
    if env:
        return max(1, int(env))
    return os.cpu_count() or 1


def fft2(x, axes=(-2, -1), overwrite_x: bool = False):
    """2D FFT over ``axes`` on either backend, threaded on the CPU."""
    if _cp is not None and isinstance(x, _cp.ndarray):
        return _cp.fft.fft2(x, axes=axes)
    return scipy.fft.fft2(x, axes=axes, workers=fft_workers(), overwrite_x=overwrite_x)


def ifft2(x, axes=(-2, -1), overwrite_x: bool = False):
    """Inverse 2D FFT over ``axes`` on either backend, threaded on the CPU."""
    if _cp is not None and isinstance(x, _cp.ndarray):
        return _cp.fft.ifft2(x, axes=axes)
    return scipy.fft.ifft2(x, axes=axes, workers=fft_workers(), overwrite_x=overwrite_x)


def fftn(x, axes=None):
    if _cp is not None and isinstance(x, _cp.ndarray):
        return _cp.fft.fftn(x, axes=axes)
    return scipy.fft.fftn(x, axes=axes, workers=fft_workers())


def ifftn(x, axes=None):
    if _cp is not None and isinstance(x, _cp.ndarray):
        return _cp.fft.ifftn(x, axes=axes)
    return scipy.fft.ifftn(x, axes=axes, workers=fft_workers())


# --- planned in-place FFTs (optional pyFFTW on the CPU) --------------------------------------
try:  # pyFFTW is optional; measured 1.5-1.8x faster than scipy.fft for 96²-512² complex64
    import pyfftw as _pyfftw  # type: ignore[import-not-found]
except Exception:  # pragma: no cover - depends on the environment
    _pyfftw = None

_PLANS: dict = {}


def pyfftw_available() -> bool:
    return _pyfftw is not None


def fft_library() -> str:
    """CPU FFT library for planned transforms: TEMBENCH_FFT ('pyfftw' | 'scipy'), else pyfftw if present."""
    want = os.environ.get("TEMBENCH_FFT", "auto").lower()
    if want == "scipy" or _pyfftw is None:
        return "scipy"
    return "pyfftw"


class FFT2Plan:
    """In-place 2D FFT over the last two axes of a fixed-shape complex buffer.

    Fill ``plan.buffer``, call :meth:`forward` / :meth:`inverse` (the inverse is normalised by
    1/(ny·nx) like numpy), and read ``plan.buffer`` again: with the scipy/cupy fallback the
    attribute is rebound to the result instead of being written in place, so always re-read it.
    """

    def __init__(self, shape, xp=np, dtype=np.complex64, threads: int | None = None):
        self.shape = tuple(int(s) for s in shape)
        self.xp = xp
        self.dtype = np.dtype(dtype)
        n_planes = int(np.prod(self.shape[:-2])) if len(self.shape) > 2 else 1
        # One thread unless TEMBENCH_FFT_WORKERS says otherwise: measured on 2 cores, threaded FFTW
        # was no faster for single planes up to 512² and 2-4x slower for batches once the machine is
        # busy (callers parallelise over probes/tilts/points instead).
        env = os.environ.get("TEMBENCH_FFT_WORKERS")
        self.threads = threads if threads is not None else (max(1, int(env)) if env else 1)
        self.library = "cupy" if (xp is not np) else fft_library()
        if self.library == "pyfftw" and self.shape[-1] * self.shape[-2] * n_planes < 4096:
            self.library = "scipy"  # planning (FFTW_MEASURE) costs more than such small transforms
        axes = (len(self.shape) - 2, len(self.shape) - 1)
        if self.library == "pyfftw":
            self.buffer = _pyfftw.empty_aligned(self.shape, dtype=self.dtype)
            flags = (os.environ.get("TEMBENCH_FFTW_EFFORT", "FFTW_MEASURE"), "FFTW_DESTROY_INPUT")
            self._fwd = _pyfftw.FFTW(self.buffer, self.buffer, axes=axes, direction="FFTW_FORWARD",
                                     flags=flags, threads=self.threads)
            self._bwd = _pyfftw.FFTW(self.buffer, self.buffer, axes=axes, direction="FFTW_BACKWARD",
                                     flags=flags, threads=self.threads, normalise_idft=True)
            self.buffer[...] = 0
        else:
            self.buffer = xp.zeros(self.shape, dtype=self.dtype)

    def forward(self):
        if self.library == "pyfftw":
            self._fwd.execute()  # the raw call: no argument handling (nothing to normalise forward)
        elif self.library == "scipy":
            self.buffer = scipy.fft.fft2(self.buffer, overwrite_x=True, workers=self.threads)
        else:
            self.buffer = fft2(self.buffer, overwrite_x=True)
        return self.buffer

    def inverse(self):
        if self.library == "pyfftw":
            self._bwd()
        elif self.library == "scipy":
            self.buffer = scipy.fft.ifft2(self.buffer, overwrite_x=True, workers=self.threads)
        else:
            self.buffer = ifft2(self.buffer, overwrite_x=True)
        return self.buffer

    def inverse_unnormalized(self):
        """Inverse FFT without the 1/(ny·nx) factor: fold it into a multiplier applied anyway."""
        if self.library == "pyfftw":
            self._bwd.execute()
        elif self.library == "scipy":
            self.buffer = scipy.fft.ifft2(self.buffer, overwrite_x=True, workers=self.threads, norm="forward")
        else:
            self.buffer = self.xp.fft.ifft2(self.buffer, norm="forward")
        return self.buffer


class PrunedFFT2Plan(FFT2Plan):
    """An :class:`FFT2Plan` that can also skip the columns a band limit zeroes.

    When a spectrum is multiplied by a mask that is zero for every kx outside the first
    ``keep[0]`` and last ``keep[1]`` columns (FFT order; e.g. the 2/3 anti-aliasing limit), the
    forward transform needs its column (y) FFTs only there, and the inverse of the masked spectrum
    likewise: :meth:`forward_pruned` / :meth:`inverse_pruned` (unnormalised) do the row FFTs on every
    row and the column FFTs on the kept columns only (≈ 5/6 of the work at a 2/3 limit). After
    :meth:`forward_pruned` the skipped columns hold row-transformed values, not spectra: multiply by
    the mask before reading them. Without pyFFTW both fall back to full transforms.
    """

    def __init__(self, shape, keep, xp=np, dtype=np.complex64, threads: int | None = None):
        super().__init__(shape, xp=xp, dtype=dtype, threads=threads)
        nx = self.shape[-1]
        left, right = (int(k) for k in keep)
        self.keep = (left, right)
        self.pruned = self.library == "pyfftw" and 0 < left and 0 <= right and left + right < nx
        if not self.pruned:
            return
        nd = len(self.shape)
        flags = (os.environ.get("TEMBENCH_FFTW_EFFORT", "FFTW_MEASURE"), "FFTW_DESTROY_INPUT", "FFTW_UNALIGNED")
        saved = self.buffer.copy()  # planning with FFTW_MEASURE overwrites the buffer

        def plans(view, axis, flags=flags):
            f = _pyfftw.FFTW(view, view, axes=(axis,), direction="FFTW_FORWARD", flags=flags, threads=self.threads)
            b = _pyfftw.FFTW(view, view, axes=(axis,), direction="FFTW_BACKWARD", flags=flags,
                             threads=self.threads)
            return f, b

        self._rows = plans(self.buffer, nd - 1, flags[:2])  # the whole (aligned) buffer
        blocks = [self.buffer[..., :left]] + ([self.buffer[..., nx - right:]] if right else [])
        self._cols = [plans(v, nd - 2) for v in blocks]
        self.buffer[...] = saved

    def forward_pruned(self):
        if not self.pruned:
            return self.forward()
        self._rows[0].execute()
        for f, _ in self._cols:
            f.execute()
        return self.buffer

    def inverse_pruned(self):
        """Unnormalised inverse of a spectrum that is zero outside the kept columns."""
        if not self.pruned:
            return self.inverse_unnormalized()
        for _, b in self._cols:
            b.execute()
        self._rows[1].execute()
        return self.buffer


def plan_pruned_fft2(shape, keep, xp=np, threads: int | None = None, tag: str = "") -> PrunedFFT2Plan:
    """A cached :class:`PrunedFFT2Plan` (complex64) for ``shape`` keeping ``keep`` = (left, right) columns."""
    import threading

    key = ("pruned", tuple(int(s) for s in shape), tuple(int(k) for k in keep), threads, xp.__name__,
           fft_library(), threading.get_ident(), tag)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 64:
            _PLANS.clear()
        plan = _PLANS[key] = PrunedFFT2Plan(shape, keep, xp=xp, threads=threads)
    return plan


def plan_fft2(shape, xp=np, dtype=np.complex64, threads: int | None = None, tag: str = "") -> FFT2Plan:
    """A cached :class:`FFT2Plan` for ``shape`` (one per shape, dtype, threads, library and ``tag``).

    Use distinct tags for buffers that must coexist (e.g. the wave and a transmission function).
    """
    import threading

    # one plan (and buffer) per thread: plans are reused across calls, buffers must not be shared
    key = (tuple(int(s) for s in shape), np.dtype(dtype).str, threads, xp.__name__, fft_library(),
           threading.get_ident(), tag)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 64:
            _PLANS.clear()
        plan = _PLANS[key] = FFT2Plan(shape, xp=xp, dtype=dtype, threads=threads)
    return plan


class IRFFT2Plan:
    """Planned inverse real 2D FFT over the last two axes: Hermitian half spectrum → real (normalised)."""

    def __init__(self, shape, threads: int | None = None):
        self.shape = tuple(int(s) for s in shape)  # real output shape (..., ny, nx)
        half = self.shape[:-1] + (self.shape[-1] // 2 + 1,)
        env = os.environ.get("TEMBENCH_FFT_WORKERS")
        self.threads = threads if threads is not None else (max(1, int(env)) if env else 1)
        self.library = fft_library() if int(np.prod(self.shape)) >= 4096 else "scipy"
        if self.library == "pyfftw":
            self.spectrum = _pyfftw.empty_aligned(half, dtype=np.complex64)
            self.output = _pyfftw.empty_aligned(self.shape, dtype=np.float32)
            flags = (os.environ.get("TEMBENCH_FFTW_EFFORT", "FFTW_MEASURE"), "FFTW_DESTROY_INPUT")
            self._plan = _pyfftw.FFTW(self.spectrum, self.output, axes=(-2, -1), direction="FFTW_BACKWARD",
                                      flags=flags, threads=self.threads, normalise_idft=True)
        else:
            self.spectrum = np.zeros(half, dtype=np.complex64)

    def __call__(self):
        """Transform ``self.spectrum`` (destroyed) and return the real result (a reused buffer)."""
        if self.library == "pyfftw":
            self._plan()
            return self.output
        return scipy.fft.irfft2(self.spectrum, s=self.shape[-2:], axes=(-2, -1), workers=self.threads)


def plan_irfft2(shape, threads: int | None = None, tag: str = "") -> IRFFT2Plan:
    """A cached :class:`IRFFT2Plan` (CPU) for real output ``shape``, one per thread and ``tag``."""
    import threading

    key = ("irfft2", tuple(int(s) for s in shape), threads, fft_library(), threading.get_ident(), tag)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 64:
            _PLANS.clear()
        plan = _PLANS[key] = IRFFT2Plan(shape, threads=threads)
    return plan
