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
