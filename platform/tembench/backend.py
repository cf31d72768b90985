"""Array backend: numpy on the CPU, cupy on the GPU, one code path for both.

Numeric code takes an array module ``xp`` (as abTEM's ``get_array_module``) and never imports
numpy or cupy for its array work directly. FFTs go through :func:`fft2` / :func:`ifft2`, which
use ``scipy.fft`` with worker threads on the CPU and ``cupy.fft`` on the GPU.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
from types import ModuleType
from typing import Any

import numpy as np

from tembench import _jit
from tembench._lazy import _Deferred, lazy_import
from tembench.errors import DeviceError

scipy = lazy_import("scipy")  # scipy.fft costs ~0.1-0.3 s to import: on first transform

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
# pyFFTW is optional; measured 1.5-1.8x faster than scipy.fft for 96²-512² complex64. It is deferred
# to the first plan, and its ``interfaces`` subpackage (numpy/scipy/dask drop-ins we never call, which
# import scipy.fftpack and dask.array: 0.38 s of the 0.49 s ``import pyfftw``, measured) is deferred
# further, to its first use by anyone.
try:
    _pyfftw = lazy_import("pyfftw", defer_submodules=("pyfftw.interfaces",))
except ImportError:  # pragma: no cover - depends on the environment
    _pyfftw = None


@functools.lru_cache(maxsize=1)
def _pyfftw_version() -> str:
    """pyFFTW's version from its installed metadata (the run identity asks for it before any plan, and
    importing pyFFTW only to read ``__version__`` would cost its import in every process)."""
    if _pyfftw is None:
        return "none"
    if not isinstance(_pyfftw, _Deferred):  # imported already
        return str(_pyfftw.__version__)
    try:
        return importlib.metadata.version("pyFFTW")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a source checkout on the path
        return str(_pyfftw.__version__)

_PLANS: dict = {}


def pyfftw_available() -> bool:
    return _pyfftw is not None


def fft_library() -> str:
    """CPU FFT library for planned transforms: TEMBENCH_FFT ('pyfftw' | 'scipy'), else pyfftw if present."""
    want = os.environ.get("TEMBENCH_FFT", "auto").lower()
    if want == "scipy" or _pyfftw is None:
        return "scipy"
    return "pyfftw"


def planned_fft_threads() -> int:
    """Threads of a planned (pyFFTW) transform: TEMBENCH_FFT_WORKERS, else 1.

    One thread unless asked: measured on 2 cores, threaded FFTW was no faster for single planes up
    to 512² and 2-4x slower for batches once the machine is busy (callers parallelise over
    probes/tilts/points instead). The count is part of :func:`fft_identity`: FFTW splits a
    transform differently for another number of threads, which changes the rounding.
    """
    env = os.environ.get("TEMBENCH_FFT_WORKERS")
    return max(1, int(env)) if env else 1


# How pyFFTW plans are made. FFTW_MEASURE picks among algorithms by timing them, so two processes
# (or one process on a busy and on an idle machine) can pick different algorithms for the same
# transform and round differently: the same scenario and seed gave different tables (issue 9).
# The default, "wisdom", times each transform once per machine and stores the choice in a wisdom
# file that every later plan on this machine reuses (FFTW_WISDOM_ONLY): as fast as FFTW_MEASURE,
# and bit-reproducible. FFTW_ESTIMATE is deterministic too but 1.5-5x slower per 2D transform
# (measured, 96²-384²). FFTW_MEASURE / FFTW_PATIENT / FFTW_EXHAUSTIVE time every new plan again:
# opt-in, and :func:`fft_identity` reports them as not deterministic.
FFTW_EFFORTS = ("wisdom", "FFTW_ESTIMATE", "FFTW_MEASURE", "FFTW_PATIENT", "FFTW_EXHAUSTIVE")
DETERMINISTIC_EFFORTS = ("wisdom", "FFTW_ESTIMATE")


def fftw_effort() -> str:
    """Planner mode for pyFFTW: TEMBENCH_FFTW_EFFORT, one of :data:`FFTW_EFFORTS` (default "wisdom")."""
    want = os.environ.get("TEMBENCH_FFTW_EFFORT", "").strip() or "wisdom"
    for e in FFTW_EFFORTS:
        if want.upper() in (e.upper(), e.upper().removeprefix("FFTW_")):
            return e
    raise ValueError(f"TEMBENCH_FFTW_EFFORT={want!r} is not a planner mode; choose one of {FFTW_EFFORTS} "
                     "(unset for the default, 'wisdom': measured once per machine, then reproducible)")


@functools.lru_cache(maxsize=1)
def _machine_key() -> str:
    """Short hash of what decides which FFTW codelets exist and how fast they are: CPU model and
    flags, architecture, FFTW build. Machines that share it can share one wisdom file. Read once
    per process: every plan lookup asks for the wisdom path (reading /proc/cpuinfo cost ~0.5 ms)."""
    import hashlib
    import platform

    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    cpu += line
                if line.strip() == "":
                    break  # the first processor's block is enough
    except OSError:  # pragma: no cover - not Linux
        cpu = platform.processor()
    text = f"{platform.machine()}|{cpu}|pyfftw {_pyfftw_version()}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def fftw_wisdom_path() -> str:
    """The wisdom file of :func:`fftw_effort` "wisdom": TEMBENCH_FFTW_WISDOM, else one per machine
    kind under ``$XDG_CACHE_HOME/tembench`` (``~/.cache/tembench``)."""
    env = os.environ.get("TEMBENCH_FFTW_WISDOM")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "tembench", f"fftw-wisdom-{_machine_key()}.json")


class _WisdomFile:
    """A JSON file {"id", "machine", "wisdom"}: FFTW's exported wisdom plus a random id made when the
    file is created. Entries are only ever added (a transform already in it is never planned
    again), so the id names every plan the file will give; a deleted file gets a new id, and with it
    a new :func:`fft_identity`. Writers hold an exclusive lock on ``<file>.lock`` and replace the
    file atomically."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _lock(self):
        import contextlib

        @contextlib.contextmanager
        def held():
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(self.path + ".lock", "a+") as fh:
                try:
                    import fcntl
                except ImportError:  # pragma: no cover - Windows: one process at a time is assumed
                    yield
                    return
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)

        return held()

    def read(self) -> dict | None:
        import json

        try:
            with open(self.path) as fh:
                data = json.load(fh)
            if isinstance(data, dict) and isinstance(data.get("id"), str) and len(data.get("wisdom", ())) == 3:
                return data
        except (OSError, ValueError):
            pass
        return None

    def write(self, data: dict) -> None:
        import json
        import tempfile

        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path) or ".", prefix=".wisdom-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def ensure(self) -> dict:
        """The file's content, creating an empty one (with a new id) if there is none."""
        data = self.read()
        if data is not None:
            return data
        import uuid

        with self._lock():
            data = self.read()
            if data is None:
                data = {"id": uuid.uuid4().hex[:16], "machine": _machine_key(), "wisdom": ["", "", ""]}
                self.write(data)
        return data


_PLAN_LOCK = None  # a threading.RLock, made on first use


def _fftw(a, b, axes, direction: str, extra_flags=(), threads: int = 1, normalise_idft: bool = True):
    """A ``pyfftw.FFTW`` from ``a`` to ``b``, planned in the mode of :func:`fftw_effort`.

    Deterministic modes plan in a wisdom state of their own (the process's other wisdom, e.g.
    abTEM's FFTW_MEASURE plans, is set aside and restored): FFTW_ESTIMATE and FFTW_WISDOM_ONLY would
    otherwise reuse it, and the plan would depend on what else ran in the process.
    """
    global _PLAN_LOCK
    import threading

    effort = fftw_effort()
    kw = dict(axes=axes, direction=direction, threads=threads, normalise_idft=normalise_idft)
    if effort not in DETERMINISTIC_EFFORTS:
        return _pyfftw.FFTW(a, b, flags=(effort, *extra_flags), **kw)
    if _PLAN_LOCK is None:
        _PLAN_LOCK = threading.RLock()
    with _PLAN_LOCK:
        others = _pyfftw.export_wisdom()
        try:
            _pyfftw.forget_wisdom()
            if effort == "FFTW_ESTIMATE":
                return _pyfftw.FFTW(a, b, flags=("FFTW_ESTIMATE", *extra_flags), **kw)
            wf = _WisdomFile(fftw_wisdom_path())
            data = wf.ensure()
            if _import_wisdom(data):
                try:
                    return _pyfftw.FFTW(a, b, flags=("FFTW_MEASURE", "FFTW_WISDOM_ONLY", *extra_flags), **kw)
                except RuntimeError:  # not planned on this machine yet
                    pass
            with wf._lock():  # one process measures a new transform; the others wait and reuse it
                data = wf.read() or data
                _pyfftw.forget_wisdom()
                if _import_wisdom(data):
                    try:
                        return _pyfftw.FFTW(a, b, flags=("FFTW_MEASURE", "FFTW_WISDOM_ONLY", *extra_flags), **kw)
                    except RuntimeError:
                        pass
                plan = _pyfftw.FFTW(a, b, flags=("FFTW_MEASURE", *extra_flags), **kw)
                data = dict(data, wisdom=[w.decode("ascii") for w in _pyfftw.export_wisdom()])
                wf.write(data)
                return plan
        finally:
            _pyfftw.forget_wisdom()
            _pyfftw.import_wisdom(others)


#: environment variables the plan mode is read from (the memo of :func:`_plan_mode` is keyed on them)
_PLAN_ENV = ("TEMBENCH_FFT", "TEMBENCH_FFTW_EFFORT", "TEMBENCH_FFT_WORKERS", "TEMBENCH_FFTW_WISDOM",
             "XDG_CACHE_HOME", "HOME")
_PLAN_ENV_RAW = tuple(os.environ.encodekey(k) if hasattr(os.environ, "encodekey") else k for k in _PLAN_ENV)
_PLAN_MODE_MEMO: dict = {}


def _plan_mode() -> tuple:
    """What a cached plan depends on besides its shape: a plan made in another mode is not reused.

    Every plan lookup asks for it (tens of thousands of times per unit, before FFTs of a few µs), so it is
    memoised on the environment variables it reads: 1 µs instead of ≈ 30 µs (path handling, measured)."""
    raw = getattr(os.environ, "_data", None)  # CPython's encoded mapping behind os.environ: ≈ 50 ns a read
    if isinstance(raw, dict):
        key = (_pyfftw is None, *(raw.get(k) for k in _PLAN_ENV_RAW))
    else:  # pragma: no cover - another Python
        key = (_pyfftw is None, *(os.environ.get(k) for k in _PLAN_ENV))
    mode = _PLAN_MODE_MEMO.get(key)
    if mode is None:
        if fft_library() != "pyfftw":
            mode = ("scipy",)
        else:
            effort = fftw_effort()
            mode = ("pyfftw", effort, planned_fft_threads(), fftw_wisdom_path() if effort == "wisdom" else "")
        if len(_PLAN_MODE_MEMO) > 64:
            _PLAN_MODE_MEMO.clear()
        _PLAN_MODE_MEMO[key] = mode
    return mode


def _import_wisdom(data: dict) -> bool:
    """Load a wisdom file's entries into FFTW; False when it has none (or another FFTW wrote them)."""
    wisdom = tuple(w.encode("ascii") for w in data.get("wisdom", ("", "", "")))
    if not any(wisdom):
        return False
    ok = _pyfftw.import_wisdom(wisdom)
    return all(ok[i] for i in range(3) if wisdom[i])


def _blas_threads() -> str:
    """Threads of the BLAS numpy uses ("unknown" without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # pragma: no cover
        return "unknown"
    counts = sorted({str(i.get("num_threads")) for i in threadpool_info() if i.get("user_api") == "blas"})
    return ",".join(counts) or "none"


def fft_identity(device: str = "cpu") -> dict[str, str]:
    """Everything about the FFT set-up that can change a number, as strings (the run id hashes it).

    Keys: ``library`` (planned transforms: "pyfftw" | "scipy" | "cupy"), ``pyfftw`` (its version, or
    "none"), ``planner`` (pyFFTW: one of :data:`FFTW_EFFORTS`; else "none"), ``wisdom`` (the wisdom
    file's id in "wisdom" mode, else "none"), ``threads`` (:func:`planned_fft_threads`),
    ``blas_threads`` (BLAS thread count: OpenBLAS complex64 products such as the structure factors
    of the potentials round differently on 1 and 2 threads, measured), ``numba``
    ("on" | "off": the fused kernels and their numpy twins may round differently), and
    ``deterministic`` ("true" | "false": false only for the opt-in timing planners). scipy.fft's
    worker count is not a key: pocketfft gives the same bits for any count (tested).
    """
    lib = "cupy" if str(device).lower() == "gpu" else fft_library()
    planner, wisdom = "none", "none"
    if lib == "pyfftw":
        planner = fftw_effort()
        if planner == "wisdom":
            wisdom = _WisdomFile(fftw_wisdom_path()).ensure()["id"]
    numba_on = _jit.numba_enabled()
    return {
        "library": lib,
        "pyfftw": _pyfftw_version(),
        "planner": planner,
        "wisdom": wisdom,
        "threads": str(planned_fft_threads()),
        "blas_threads": _blas_threads(),
        "numba": "on" if numba_on else "off",
        "deterministic": "true" if (lib != "pyfftw" or planner in DETERMINISTIC_EFFORTS) else "false",
    }


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
        self.threads = threads if threads is not None else planned_fft_threads()
        self.library = "cupy" if (xp is not np) else fft_library()
        if self.library == "pyfftw" and self.shape[-1] * self.shape[-2] * n_planes < 4096:
            self.library = "scipy"  # planning costs more than such small transforms
        axes = (len(self.shape) - 2, len(self.shape) - 1)
        if self.library == "pyfftw":
            self.buffer = _pyfftw.empty_aligned(self.shape, dtype=self.dtype)
            flags = ("FFTW_DESTROY_INPUT",)
            self._fwd = _fftw(self.buffer, self.buffer, axes, "FFTW_FORWARD", flags, self.threads)
            self._bwd = _fftw(self.buffer, self.buffer, axes, "FFTW_BACKWARD", flags, self.threads)
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
        flags = ("FFTW_DESTROY_INPUT", "FFTW_UNALIGNED")
        saved = self.buffer.copy()  # planning with FFTW_MEASURE overwrites the buffer

        def plans(view, axis, flags=flags):
            return (_fftw(view, view, (axis,), "FFTW_FORWARD", flags, self.threads),
                    _fftw(view, view, (axis,), "FFTW_BACKWARD", flags, self.threads, normalise_idft=False))

        self._rows = plans(self.buffer, nd - 1, flags[:1])  # the whole (aligned) buffer
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
           _plan_mode(), threading.get_ident(), tag)
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
    key = (tuple(int(s) for s in shape), np.dtype(dtype).str, threads, xp.__name__, _plan_mode(),
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
        self.threads = threads if threads is not None else planned_fft_threads()
        self.library = fft_library() if int(np.prod(self.shape)) >= 4096 else "scipy"
        if self.library == "pyfftw":
            self.spectrum = _pyfftw.empty_aligned(half, dtype=np.complex64)
            self.output = _pyfftw.empty_aligned(self.shape, dtype=np.float32)
            self._plan = _fftw(self.spectrum, self.output, (-2, -1), "FFTW_BACKWARD", ("FFTW_DESTROY_INPUT",),
                               self.threads)
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

    key = ("irfft2", tuple(int(s) for s in shape), threads, _plan_mode(), threading.get_ident(), tag)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 64:
            _PLANS.clear()
        plan = _PLANS[key] = IRFFT2Plan(shape, threads=threads)
    return plan

