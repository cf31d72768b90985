"""Error metrics and confidence intervals of Friedrich 2023 eqs 2.21–2.24.

The thesis writes the level as α = 0.95 and the quantile as t_{1−α/2}; the intended (and here
implemented) interval is the usual two-sided one at confidence ``confidence`` (0.95): the
t quantile at 1 − (1 − confidence)/2 and the χ² quantiles at (1 ∓ confidence)/2.
"""

from __future__ import annotations

import numpy as np
from scipy import stats as _st

from tembench.errors import TembenchError


def position_errors(x_fit, y_fit, x_true, y_true) -> np.ndarray:
    """Euclidean position errors √((x_a − x_b)² + (y_a − y_b)²), elementwise (the terms of eq 2.21)."""
    return np.hypot(np.asarray(x_fit, float) - np.asarray(x_true, float),
                    np.asarray(y_fit, float) - np.asarray(y_true, float))


def mae_xy(x_fit, y_fit, x_true, y_true) -> float:
    """Eq 2.21: mean Euclidean position error over all repeats × columns (NaN entries ignored)."""
    return float(np.nanmean(position_errors(x_fit, y_fit, x_true, y_true)))


def ape(scs_fit, scs_true) -> np.ndarray:
    """Absolute percentage errors 100 |a − b| / b (the terms of eq 2.22)."""
    a, b = np.asarray(scs_fit, float), np.asarray(scs_true, float)
    return 100.0 * np.abs(a - b) / np.abs(b)


def mape(scs_fit, scs_true) -> float:
    """Eq 2.22: mean absolute percentage error of SCS (%), NaN entries ignored."""
    return float(np.nanmean(ape(scs_fit, scs_true)))


def _clean(x) -> np.ndarray:
    v = np.asarray(x, np.float64).ravel()
    v = v[np.isfinite(v)]
    if len(v) < 2:
        raise TembenchError(f"a confidence interval needs at least 2 finite values, got {len(v)}")
    return v


def mean_ci(x, confidence: float = 0.95) -> tuple[float, float, float]:
    """Eq 2.23: (mean, low, high) with the Student-t interval mean ± t·s/√N."""
    v = _clean(x)
    n = len(v)
    m, s = float(v.mean()), float(v.std(ddof=1))
    t = float(_st.t.ppf(0.5 + 0.5 * confidence, n - 1))
    half = t * s / np.sqrt(n)
    return m, float(m - half), float(m + half)


def variance_ci(x, confidence: float = 0.95) -> tuple[float, float, float]:
    """Eq 2.24: (s², low, high) = s², (N−1)s²/χ²_{upper}, (N−1)s²/χ²_{lower} with N − 1 degrees of freedom."""
    v = _clean(x)
    return variance_ci_from(float(v.var(ddof=1)), len(v) - 1, confidence)


def variance_ci_from(s2: float, dof: int, confidence: float = 0.95) -> tuple[float, float, float]:
    """χ² interval of a variance estimate ``s2`` with ``dof`` degrees of freedom."""
    if dof < 1:
        raise TembenchError("variance_ci needs at least one degree of freedom")
    lo_q, hi_q = 0.5 - 0.5 * confidence, 0.5 + 0.5 * confidence
    return s2, dof * s2 / float(_st.chi2.ppf(hi_q, dof)), dof * s2 / float(_st.chi2.ppf(lo_q, dof))


def std_ci(x, confidence: float = 0.95) -> tuple[float, float, float]:
    """(s, low, high): square root of :func:`variance_ci`."""
    s2, lo, hi = variance_ci(x, confidence)
    return float(np.sqrt(s2)), float(np.sqrt(lo)), float(np.sqrt(hi))
