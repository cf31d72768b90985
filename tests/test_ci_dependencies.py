"""The optional fast paths that tests exercise must be present in CI, or their tests silently
skip or fall back: numba (the Ren and Pelz kernels; their numba-vs-numpy equality tests skip
without it) and pyFFTW (the deterministic wisdom planner that tests/core/test_determinism.py
proves; without it every run uses scipy.fft). Locally a missing one is a skip, under CI a failure
(``tests/_deps.py``)."""

from __future__ import annotations

import pytest
from _deps import in_ci


@pytest.mark.parametrize("module, flag", [("tembench_pelz2022._kernels", "HAVE_NUMBA"),
                                          ("tembench_ren2020.prox", "HAVE_NUMBA")])
def test_numba_kernels_are_active(module, flag):
    import importlib

    if not getattr(importlib.import_module(module), flag):
        message = f"{module}: numba kernels are off, so their equality tests skip (numba is a core dependency)"
        (pytest.fail if in_ci() else pytest.skip)(message)


def test_pyfftw_planner_is_in_use():
    from tembench import backend

    if backend.fft_library() != "pyfftw":
        message = "pyFFTW is not in use: the deterministic wisdom planner is untested (install the dev extra)"
        (pytest.fail if in_ci() else pytest.skip)(message)


def test_scipys_in_place_transpose_product_is_there():
    """Ren's rotate-and-bin adjoint adds mᵀg into the volume in place through scipy's private ``csc_matvecs``
    (the order, so the bits, of the numba kernel it replaced); without it the fallback forms mᵀg first."""
    from tembench_ren2020 import model

    if model._csc_matvecs is None:
        message = "scipy.sparse._sparsetools.csc_matvecs is gone: Ren's adjoint falls back to a temporary mᵀg"
        (pytest.fail if in_ci() else pytest.skip)(message)
