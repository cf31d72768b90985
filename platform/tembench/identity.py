"""What a number depends on: fingerprints of code, data files, libraries and the FFT backend.

A run's id and every stage's cache key are hashes of everything that can change a number in
the results table, so an edit anywhere under a component — a helper module its package imports,
a data table it reads, the core physics, a numeric library, the FFT backend — gives a new run
folder and recomputes the stages it touches, instead of silently reusing stale results.

* :func:`package_fingerprint` hashes every source and data file of a top-level package
  (``tembench`` for the core and its built-ins, ``tembench_pelz2022`` for a plugin, …).
* :func:`component_fingerprint` = the component's ``version`` + its package's fingerprint +
  the core's fingerprint (a plugin builds on the core's physics).
* :func:`environment_identity` = the Python and numeric-library versions, the planned-FFT
  backend and its settings (:func:`tembench.backend.fft_identity`) and the environment
  variables that select numeric kernels.

Only presentation modules that cannot change a number (:data:`PRESENTATION_ONLY`) are left out
of the core's fingerprint, so re-styling a report does not invalidate a week of cached stages.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import inspect
import os
import sys
from pathlib import Path
from typing import Any

#: file suffixes hashed as part of a package: its code and the data files it reads
HASHED_SUFFIXES = (".py", ".json", ".npz", ".npy", ".txt", ".csv", ".yaml", ".yml", ".cif", ".xyz", ".h5",
                   ".hdf5", ".dat")
#: core modules (relative to platform/tembench/) that only render or print results
PRESENTATION_ONLY = frozenset({"cli.py", "report.py", "metrics.py", "emd.py"})
#: libraries whose version can change a number (distribution names)
NUMERIC_LIBRARIES = ("numpy", "scipy", "pyfftw", "numba", "llvmlite", "cupy", "cupy-cuda12x", "cupy-cuda11x",
                     "scikit-image", "ase", "pandas", "jax", "jaxlib")
#: environment variables that select numeric kernels (BLAS core type, FFT and thread settings)
NUMERIC_ENV = ("OPENBLAS_CORETYPE", "NUMBA_NUM_THREADS", "NUMBA_OPT", "NUMBA_FASTMATH", "TEMBENCH_FFT",
               "TEMBENCH_FFTW_EFFORT", "TEMBENCH_FFTW_WISDOM", "TEMBENCH_FFT_WORKERS", "TEMBENCH_NO_NUMBA",
              "XLA_FLAGS")


def _package_root(module_name: str) -> tuple[str, Path | None]:
    """(top-level package name, its folder) — or (module, None) for a lone module file."""
    top = module_name.split(".")[0]
    mod = sys.modules.get(top)
    if mod is None:
        import importlib

        mod = importlib.import_module(top)
    paths = list(getattr(mod, "__path__", []) or [])
    if paths:
        return top, Path(paths[0])
    return top, None


def _hash_files(root: Path, skip: frozenset[str] = frozenset()) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix not in HASHED_SUFFIXES:
            continue
        rel = path.relative_to(root).as_posix()
        if "__pycache__" in rel or rel in skip or any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        h.update(rel.encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def package_fingerprint(module_name: str) -> str:
    """SHA-256 (16 hex digits) of every source and data file of ``module_name``'s top-level package.

    For the core (``tembench``) the presentation-only modules are skipped. A module that is not
    part of a package (a single-file plugin) is fingerprinted by its own file.
    """
    top, root = _package_root(module_name)
    if root is not None:
        return _hash_files(root, PRESENTATION_ONLY if top == "tembench" else frozenset())[:16]
    mod = sys.modules.get(module_name)
    try:
        data = Path(inspect.getsourcefile(mod)).read_bytes()  # type: ignore[arg-type]
    except (TypeError, OSError):
        data = module_name.encode()
    return hashlib.sha256(data).hexdigest()[:16]


def core_fingerprint() -> str:
    """Fingerprint of the core package (physics, built-ins, runner, data tables)."""
    return package_fingerprint("tembench")


@functools.lru_cache(maxsize=None)
def component_fingerprint(cls: type) -> str:
    """``version:package:core`` — changes with the component's version, any file of its package or of the core.

    A component that reuses another plugin's code names it in ``depends_on`` (top-level package
    names, e.g. ``("tembench_pelz2022",)``): those packages' files are then part of its fingerprint
    too, so an edit there recomputes its cached stages."""
    module = getattr(cls, "__module__", "") or ""
    pkg = package_fingerprint(module) if module else hashlib.sha256(repr(cls).encode()).hexdigest()[:16]
    deps = tuple(getattr(cls, "depends_on", ()) or ())
    if deps:
        pkg = hashlib.sha256("|".join([pkg, *(f"{d}={package_fingerprint(d)}" for d in sorted(deps))]).encode()
                             ).hexdigest()[:16]
    core = core_fingerprint()
    if module.split(".")[0] == "tembench" and not deps:
        return f"{getattr(cls, 'version', '1')}:{core}"
    return f"{getattr(cls, 'version', '1')}:{pkg}:{core}"


def clear_caches() -> None:
    """Forget cached fingerprints (tests that edit files call this; a run computes them once)."""
    for fn in (package_fingerprint, component_fingerprint, _library_versions, _fft_identity):
        getattr(fn, "cache_clear", lambda: None)()  # a test may have replaced one


@functools.lru_cache(maxsize=None)
def _library_versions() -> dict[str, str]:
    out = {}
    for dist in NUMERIC_LIBRARIES:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def environment_identity(device: str = "cpu") -> dict[str, Any]:
    """Everything outside our code that can change a number: Python, numeric libraries, FFT backend
    (for ``device``: cupy's FFTs on the GPU), BLAS threads and kernel-selecting environment variables."""
    env = {k: os.environ[k] for k in NUMERIC_ENV if k in os.environ}
    return {
        "python": sys.version.split()[0],
        "libraries": dict(_library_versions()),
        "fft": dict(_fft_identity(device, tuple(sorted(env.items())))),
        "env": env,
    }


@functools.lru_cache(maxsize=16)
def _fft_identity(device: str, env_items: tuple) -> dict[str, str]:
    # fft_identity reads the machine key and the wisdom file (≈1 ms); stage keys ask for it several
    # times per unit, so it is computed once per process and per set of FFT/thread variables
    from tembench.backend import fft_identity

    return fft_identity(device)
