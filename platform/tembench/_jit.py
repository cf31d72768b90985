"""When a numpy twin hands over to its numba kernel: numba only once it pays for its own start.

numba costs a process ≈ 1 s before its first kernel runs (measured in a pool worker on the Ren quick
scenario: ``import numba`` 0.25 s, the CPU target context's first refresh 0.8–0.9 s, then a cache load
per kernel), as much as a small unit's whole reconstruction. For kernel pairs whose numpy twin gives
the **same bits** as the numba kernel (tested pair by pair), the choice is invisible in the results, so
it can be made for speed alone, like renting skis before buying them: a process runs the twins until
it has spent :func:`budget_s` (≈ numba's start) in them, then loads numba and uses the kernels from
then on. Small units never pay numba's start; long runs pay it once, at most one budget late (never
more than twice the best choice made in hindsight). A process whose numba is already running (another
component's kernels started it) uses the kernels at once.

Only bitwise pairs may use this; kernels whose twin agrees to rounding keep the plain
``HAVE_NUMBA`` rule (and ``numba`` stays part of the run identity for them,
:func:`tembench.backend.fft_identity`).

``TEMBENCH_NO_NUMBA=1`` switches numba off; ``TEMBENCH_NUMBA_AFTER_S`` sets the budget (0: numba at
once, as before this module).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from contextlib import contextmanager

#: seconds of twin work after which a process loads numba (its measured start, see the module doc)
DEFAULT_BUDGET_S = 1.0

_spent_s = 0.0


def numba_enabled() -> bool:
    """numba is installed and not switched off (``TEMBENCH_NO_NUMBA``)."""
    if os.environ.get("TEMBENCH_NO_NUMBA", "") not in ("", "0"):
        return False
    return importlib.util.find_spec("numba") is not None


def budget_s() -> float:
    """Twin seconds a process spends before it loads numba (``TEMBENCH_NUMBA_AFTER_S``, default 1.0)."""
    raw = os.environ.get("TEMBENCH_NUMBA_AFTER_S", "")
    try:
        return max(float(raw), 0.0) if raw else DEFAULT_BUDGET_S
    except ValueError:
        return DEFAULT_BUDGET_S


def numba_running() -> bool:
    """numba's CPU target context exists in this process (some kernel has been compiled or loaded)."""
    nb = sys.modules.get("numba")
    if nb is None:
        return False
    try:
        target = sys.modules["numba.core.registry"].cpu_target
    except (KeyError, AttributeError):
        return False
    return "_toplevel_target_context" in getattr(target, "__dict__", {})


def use_compiled(use_numba: bool | None = None) -> bool:
    """Whether a bitwise kernel pair should run its numba kernel now.

    ``use_numba``: True / False force the choice (True still needs numba installed); None decides by
    the budget: numba when it is already running here or once the twins have used up :func:`budget_s`.
    """
    if use_numba is not None:
        return bool(use_numba) and numba_enabled()
    if not numba_enabled():
        return False
    return _spent_s >= budget_s() or numba_running()


def spent_s() -> float:
    """Seconds this process has spent in twins that had a numba kernel to hand over to."""
    return _spent_s


def charge(seconds: float) -> None:
    """Add ``seconds`` of twin work to this process's account."""
    global _spent_s
    _spent_s += max(float(seconds), 0.0)


@contextmanager
def twin_timer():
    """Times the block and charges it (use around a twin call that :func:`use_compiled` declined)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        charge(time.perf_counter() - t0)


def _reset_for_tests(spent: float = 0.0) -> None:
    global _spent_s
    _spent_s = float(spent)


__all__ = ["DEFAULT_BUDGET_S", "budget_s", "charge", "numba_enabled", "numba_running", "spent_s", "twin_timer",
           "use_compiled"]
