"""Atom counting from scattering cross-sections (Friedrich 2023 §2.3.2; StatSTEM, De Backer et al. 2013).

Two routes:

* **Gaussian mixture** of the SCS values: K components with a common width (homoscedastic),
  free means and weights, fitted by EM (best of several starts); the order K
  is chosen by the integrated classification likelihood

      ICL(K) = BIC(K) + 2 EN(K),  BIC = −2 ln L + d ln n,  EN = −Σ_i Σ_k τ_ik ln τ_ik,

  with d = 2K free parameters (K means, K − 1 weights, 1 variance) and τ the posterior
  probabilities. The component of rank r (by mean) holds ``offset + r`` atoms; the offset is 1 by
  default or is fitted to a library of simulated SCS.
* **Library matching**: each SCS is assigned the atom count whose simulated SCS is closest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tembench.errors import TembenchError


@dataclass
class MixtureSelection:
    """Order selection over K = 1 … k_max; arrays indexed by K − 1."""

    k: np.ndarray
    icl: np.ndarray
    bic: np.ndarray
    log_likelihood: np.ndarray
    k_icl: int
    k_bic: int
    means: np.ndarray           # sorted component means of the selected model
    sigma: float                # common component width
    weights: np.ndarray
    labels: np.ndarray          # rank (0 … K−1) of each value's component
    counts: np.ndarray          # offset + rank
    offset: int


def _em_tied(v: np.ndarray, mu: np.ndarray, max_iter: int, tol: float):
    """EM of a 1D K-component mixture with one common variance, from means ``mu``."""
    k = len(mu)
    var = max(float(np.var(v)) / k ** 2, 1e-12 * float(np.var(v)) + 1e-300)
    w = np.full(k, 1.0 / k)
    floor = 1e-10 * float(np.var(v)) + 1e-300
    ll_old = -np.inf
    for _ in range(max_iter):
        logp = np.log(w)[None, :] - 0.5 * (v[:, None] - mu[None, :]) ** 2 / var - 0.5 * np.log(2 * np.pi * var)
        mx = logp.max(1, keepdims=True)
        lse = mx[:, 0] + np.log(np.exp(logp - mx).sum(1))
        ll = float(lse.sum())
        tau = np.exp(logp - lse[:, None])
        nk = tau.sum(0) + 1e-300
        w = nk / len(v)
        mu = (tau * v[:, None]).sum(0) / nk
        var = max(float((tau * (v[:, None] - mu[None, :]) ** 2).sum()) / len(v), floor)
        if ll - ll_old < tol * abs(ll) + 1e-12:
            break
        ll_old = ll
    logp = np.log(np.maximum(w, 1e-300))[None, :] - 0.5 * (v[:, None] - mu[None, :]) ** 2 / var \
        - 0.5 * np.log(2 * np.pi * var)
    mx = logp.max(1, keepdims=True)
    lse = mx[:, 0] + np.log(np.exp(logp - mx).sum(1))
    return mu, var, w, float(lse.sum()), np.exp(logp - lse[:, None])


def _fit_mixture(v: np.ndarray, k: int, seed: int, n_init: int, max_iter: int = 1000, tol: float = 1e-9):
    """Best of ``n_init`` EM runs (first from equally spaced quantiles, then random data points)."""
    rng = np.random.default_rng(seed)
    best = None
    for i in range(max(1, n_init)):
        mu0 = (np.quantile(v, (np.arange(k) + 0.5) / k) if i == 0 else np.sort(rng.choice(v, k, replace=False)))
        res = _em_tied(v, mu0.astype(np.float64), max_iter, tol)
        if best is None or res[3] > best[3]:
            best = res
    mu, var, w, ll, tau = best
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -float(np.sum(np.where(tau > 0, tau * np.log(tau), 0.0)))
    return (mu, var, w), ll, ent


def mixture_counts(scs, k_max: int = 10, criterion: str = "icl", offset: int | None = 1,
                   library: tuple[np.ndarray, np.ndarray] | None = None, seed: int = 0,
                   n_init: int = 3) -> MixtureSelection:
    """Gaussian-mixture atom counting with ICL (or BIC) order selection (see module docstring).

    ``library`` (n_atoms, scs): when given and ``offset`` is None, the offset minimises the squared
    distance between the sorted component means and the library SCS of offset + rank.
    """
    v = np.asarray(scs, np.float64).ravel()
    v = v[np.isfinite(v)]
    n = len(v)
    if n < 2:
        raise TembenchError(f"mixture_counts needs at least 2 finite SCS values, got {n}")
    if criterion not in ("icl", "bic"):
        raise TembenchError(f"mixture_counts: criterion {criterion!r} is not 'icl' or 'bic'")
    k_max = int(max(1, min(k_max, n - 1)))
    ks = np.arange(1, k_max + 1)
    icl, bic, lls, fits = [], [], [], []
    for k in ks:
        fit, ll, ent = _fit_mixture(v, int(k), seed, n_init)
        d = 2 * k
        b = -2.0 * ll + d * np.log(n)
        bic.append(b)
        icl.append(b + 2.0 * ent)
        lls.append(ll)
        fits.append(fit)
    icl, bic, lls = np.array(icl), np.array(bic), np.array(lls)
    k_icl, k_bic = int(ks[np.argmin(icl)]), int(ks[np.argmin(bic)])
    k_sel = k_icl if criterion == "icl" else k_bic
    mu, var, w = fits[k_sel - 1]
    order = np.argsort(mu)
    rank_of = np.empty_like(order)
    rank_of[order] = np.arange(len(order))
    x = np.asarray(scs, np.float64).ravel()
    labels = np.full(len(x), -1)
    fin = np.isfinite(x)
    logp = np.log(np.maximum(w, 1e-300))[None, :] - 0.5 * (x[fin, None] - mu[None, :]) ** 2 / var
    labels[fin] = rank_of[np.argmax(logp, axis=1)]
    means = mu[order]
    if offset is None:
        if library is None:
            raise TembenchError("mixture_counts: give an offset (atoms in the dimmest component) or a library")
        offset = library_offset(means, *library)
    counts = np.where(labels >= 0, labels + offset, -1)
    return MixtureSelection(ks, icl, bic, lls, k_icl, k_bic, means, float(np.sqrt(var)), w[order], labels, counts,
                            int(offset))


def library_offset(means, lib_n, lib_scs) -> int:
    """Atom count of the dimmest component that best aligns sorted means with the (interpolated) library."""
    n_all, s_all = interpolate_library(lib_n, lib_scs)
    k = len(means)
    best, best_cost = int(n_all[0]), np.inf
    for start in range(len(n_all) - k + 1):
        c = float(np.sum((np.asarray(means) - s_all[start:start + k]) ** 2))
        if c < best_cost:
            best, best_cost = int(n_all[start]), c
    return best


def interpolate_library(lib_n, lib_scs):
    """Library at every integer count between its smallest and largest (linear in n); sorted by n."""
    n = np.asarray(lib_n, np.float64).ravel()
    s = np.asarray(lib_scs, np.float64).ravel()
    if len(n) != len(s) or len(n) == 0:
        raise TembenchError(f"SCS library: {len(n)} counts but {len(s)} SCS values")
    order = np.argsort(n)
    n, s = n[order], s[order]
    if np.any(np.diff(n) == 0):
        raise TembenchError("SCS library: duplicate atom counts; average them first (load_scs_library does)")
    grid = np.arange(int(np.ceil(n[0])), int(np.floor(n[-1])) + 1)
    return grid, np.interp(grid, n, s)


def library_counts(scs, lib_n, lib_scs, interpolate: bool = True) -> np.ndarray:
    """Atom count per column: the library entry with the closest SCS (−1 for non-finite SCS)."""
    if interpolate:
        n_all, s_all = interpolate_library(lib_n, lib_scs)
    else:
        n_all, s_all = np.asarray(lib_n), np.asarray(lib_scs, np.float64)
    x = np.asarray(scs, np.float64).ravel()
    out = np.full(len(x), -1, np.int64)
    fin = np.isfinite(x)
    out[fin] = np.asarray(n_all)[np.argmin(np.abs(x[fin, None] - s_all[None, :]), axis=1)]
    return out


def library_scs_of(n_atoms, lib_n, lib_scs) -> np.ndarray:
    """Library SCS at given atom counts (linear interpolation; NaN outside the library's range)."""
    n = np.asarray(lib_n, np.float64)
    s = np.asarray(lib_scs, np.float64)
    o = np.argsort(n)
    q = np.asarray(n_atoms, np.float64)
    out = np.interp(q, n[o], s[o])
    out[(q < n[o][0]) | (q > n[o][-1])] = np.nan
    return out


def counting_accuracy(counts, true_counts) -> dict[str, float]:
    """Fraction counted exactly right and mean absolute error (atoms) over columns with a count."""
    c = np.asarray(counts)
    t = np.asarray(true_counts)
    ok = (c >= 0) & (t >= 0)
    if not ok.any():
        return {"count_exact_frac": float("nan"), "count_mae_atoms": float("nan"), "count_bias_atoms": float("nan")}
    d = c[ok].astype(np.float64) - t[ok]
    return {"count_exact_frac": float(np.mean(d == 0)), "count_mae_atoms": float(np.mean(np.abs(d))),
            "count_bias_atoms": float(np.mean(d))}


def load_scs_library(source, n_column: str = "n_atoms_true_median", scs_column: str = "scs_normalized_median",
                     n_scale: float = 1.0, scs_scale: float = 1.0, query: str | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """An SCS library (n_atoms, scs), averaged over rows with the same count.

    ``source``: a pandas DataFrame; a CSV/parquet file; a tembench run folder (its results table);
    an (n, 2) array; or a dict {n_atoms: scs}. Columns are matched exactly or by suffix (a metric
    may be prefixed with its quantifier's key). The defaults read a run scored by the
    ``column_fit`` quantifier: per row the median true atoms per column and the median fitted SCS
    normalised to the probe (fraction × Å²) — e.g. ``scenarios/friedrich_pt_thickness.yaml`` with
    the ``column_fit`` reconstructor and quantifier, noise-free or at high dose; the library's SCS
    kind (Gaussian volume or Voronoi) must be the one the counting run uses. Without column fits,
    a perfect crystal's mean image value works as a Voronoi SCS: for Pt [001]
    (``image_statistics.mean_value`` of ``direct_image`` with ``normalize: false``) every pixel
    belongs to one column's cell of area a²/4 and a column holds one atom per unit cell, so
    ``load_scs_library(run, "sample.thickness_cells", "mean_value", scs_scale=3.924**2/4)``.
    ``n_scale``/``scs_scale`` convert units; ``query`` filters rows first (``DataFrame.query``).
    """
    import pandas as pd

    if isinstance(source, dict):
        n = np.array(list(source.keys()), np.float64)
        s = np.array(list(source.values()), np.float64)
        return _average(n * n_scale, s * scs_scale)
    if isinstance(source, np.ndarray) or (isinstance(source, (list, tuple)) and not isinstance(source, str)):
        arr = np.asarray(source, np.float64)
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise TembenchError(f"SCS library array must be (n, 2): (n_atoms, scs), got shape {arr.shape}")
        return _average(arr[:, 0] * n_scale, arr[:, 1] * scs_scale)
    if isinstance(source, pd.DataFrame):
        table = source
    else:
        p = Path(source)
        if p.is_dir():
            from tembench.store import load_table

            table = load_table(p)
        elif p.suffix == ".parquet":
            table = pd.read_parquet(p)
        elif p.suffix in (".csv", ".txt"):
            table = pd.read_csv(p)
        else:
            raise TembenchError(f"SCS library {str(p)!r}: not a run folder, .csv or .parquet file")
    if query:
        table = table.query(query)
    if "status" in table.columns:
        table = table[table["status"] == "ok"]
    nc, sc = _column(table, n_column), _column(table, scs_column)
    return _average(table[nc].to_numpy(np.float64) * n_scale, table[sc].to_numpy(np.float64) * scs_scale)


def _column(table, name: str) -> str:
    if name in table.columns:
        return name
    hits = [c for c in table.columns if str(c).endswith("." + name)]
    if len(hits) == 1:
        return hits[0]
    raise TembenchError(f"SCS library: no column {name!r} (or one ending in '.{name}') in "
                        f"{sorted(map(str, table.columns))}" if not hits else
                        f"SCS library: column {name!r} is ambiguous: {hits}")


def _average(n, s):
    ok = np.isfinite(n) & np.isfinite(s)
    n, s = n[ok], s[ok]
    if len(n) == 0:
        raise TembenchError("SCS library: no finite (n_atoms, scs) rows")
    un = np.unique(n)
    return un, np.array([s[n == u].mean() for u in un])
