"""Atom counting (GMM + ICL/BIC, library matching) and the statistics of eqs 2.21–2.24."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tembench.errors import TembenchError
from tembench_friedrich2023 import counting, stats

LIB_N = np.arange(1, 16)
LIB_SCS = 0.9 * LIB_N ** 0.9        # sub-linear like channelling-damped ADF cross-sections


def _synthetic_scs(n=300, lo=3, hi=9, noise=0.1, seed=0):
    rng = np.random.default_rng(seed)
    true = rng.integers(lo, hi + 1, size=n)
    return true, np.interp(true, LIB_N, LIB_SCS) + rng.normal(0, noise, n)


def test_icl_selects_the_number_of_distinct_counts_and_counts_correctly():
    true, scs = _synthetic_scs()
    sel = counting.mixture_counts(scs, k_max=10, offset=3)
    assert sel.k_icl == 7                      # counts 3 … 9
    assert sel.bic.shape == sel.icl.shape == (10,)
    assert np.all(sel.icl >= sel.bic - 1e-9)   # ICL = BIC + 2·entropy ≥ BIC
    acc = counting.counting_accuracy(sel.counts, true)
    assert acc["count_exact_frac"] > 0.97 and acc["count_mae_atoms"] < 0.05
    np.testing.assert_allclose(sel.means, np.interp(np.arange(3, 10), LIB_N, LIB_SCS), atol=0.05)  # ≈ 3 standard errors
    assert sel.sigma == pytest.approx(0.1, rel=0.15)


def test_icl_is_bic_plus_twice_the_classification_entropy():
    _, scs = _synthetic_scs(n=120, noise=0.25, seed=1)
    for k in (2, 4):
        (mu, var, w), ll, ent = counting._fit_mixture(scs, k, seed=0, n_init=3)
        logp = np.log(w) - 0.5 * (scs[:, None] - mu) ** 2 / var - 0.5 * np.log(2 * np.pi * var)
        tau = np.exp(logp - np.logaddexp.reduce(logp, axis=1, keepdims=True))
        assert ll == pytest.approx(np.logaddexp.reduce(logp, axis=1).sum(), rel=1e-10)
        assert ent == pytest.approx(-np.sum(tau * np.log(tau)), rel=1e-8)
    sel = counting.mixture_counts(scs, k_max=6, offset=1)
    (mu, var, w), ll, ent = counting._fit_mixture(scs, 4, seed=0, n_init=3)
    assert sel.bic[3] == pytest.approx(-2 * ll + 8 * np.log(len(scs)), rel=1e-6)
    assert sel.icl[3] == pytest.approx(sel.bic[3] + 2 * ent, rel=1e-6)


def test_library_offset_and_library_matching():
    true, scs = _synthetic_scs(noise=0.08, seed=2)
    sel = counting.mixture_counts(scs, k_max=10, offset=None, library=(LIB_N, LIB_SCS))
    assert sel.offset == 3
    lib_counts = counting.library_counts(scs, LIB_N[::3], LIB_SCS[::3])   # sparse library: interpolated in n
    acc = counting.counting_accuracy(lib_counts, true)
    assert acc["count_exact_frac"] > 0.97
    assert counting.library_counts([np.nan], LIB_N, LIB_SCS)[0] == -1


def test_load_scs_library_from_table_run_folder_dict_and_array(tmp_path):
    table = pd.DataFrame({"sample.thickness_cells": [2, 2, 5, 10], "image_statistics.mean_value": [0.01, 0.03, 0.05, 0.09],
                          "status": ["ok", "ok", "ok", "ok"]})
    n, s = counting.load_scs_library(table, "sample.thickness_cells", "mean_value", scs_scale=2.0)
    np.testing.assert_allclose(n, [2, 5, 10])
    np.testing.assert_allclose(s, [0.04, 0.1, 0.18])
    run = tmp_path / "run"
    run.mkdir()
    table.to_parquet(run / "results.parquet")
    n2, s2 = counting.load_scs_library(run, "sample.thickness_cells", "mean_value", scs_scale=2.0)
    np.testing.assert_allclose(s2, s)
    n3, s3 = counting.load_scs_library({1: 0.5, 2: 0.9})
    np.testing.assert_allclose(s3, [0.5, 0.9])
    n4, s4 = counting.load_scs_library(np.array([[1, 0.5], [2, 0.9]]))
    np.testing.assert_allclose(n4, [1, 2])
    with pytest.raises(TembenchError, match="no column"):
        counting.load_scs_library(table, "n_atoms", "scs")


def test_metrics_of_eqs_2_21_and_2_22():
    assert stats.mae_xy([0, 3], [0, 4], [0, 0], [0, 0]) == pytest.approx(2.5)
    assert stats.mape([110, 90], [100, 100]) == pytest.approx(10.0)


def test_confidence_intervals_cover_at_the_nominal_rate():
    """Eqs 2.23 (t) and 2.24 (χ²): 2000 samples of N = 12 normal values; coverage 95 % ± 1.5 % (3σ)."""
    rng = np.random.default_rng(7)
    mu, sd, n_trials = 3.0, 2.0, 2000
    hit_m = hit_v = 0
    for _ in range(n_trials):
        x = rng.normal(mu, sd, 12)
        _, lo, hi = stats.mean_ci(x, 0.95)
        hit_m += lo <= mu <= hi
        _, lo, hi = stats.variance_ci(x, 0.95)
        hit_v += lo <= sd ** 2 <= hi
    assert abs(hit_m / n_trials - 0.95) < 0.015
    assert abs(hit_v / n_trials - 0.95) < 0.015
    s, lo, hi = stats.std_ci(rng.normal(0, 1, 50))
    assert lo < s < hi
