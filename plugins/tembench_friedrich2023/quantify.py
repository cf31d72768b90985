"""Friedrich 2023 §2.3 components: the ``column_fit`` reconstructor and the ``column_fit`` / ``crlb`` quantifiers.

The fit runs in the reconstructor (timed and cached); its ``extras["columns"]`` carry every fitted
parameter, the SCS and the image's units, and the quantifiers score them against the sample's
atomic columns (atoms projected along z). ``crlb`` aggregates over a point's noise repeats: the
measured spread of positions and SCS against the Cramér–Rao lower bound at the measurement's dose.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import numpy as np
from pathlib import Path

from pydantic import Field, field_validator

from tembench import Params, Quantifier, Reconstruction, Reconstructor
from tembench.errors import TembenchError
from tembench.metrics import Metric
from tembench._lazy import lazy_import

# scipy.sparse / scipy.stats load on first use, so `tembench list` and `validate` stay fast
C = lazy_import("tembench_friedrich2023.columns")
counting = lazy_import("tembench_friedrich2023.counting")
stats = lazy_import("tembench_friedrich2023.stats")


# --- units ---------------------------------------------------------------------------------------
def image_units(measurement) -> tuple[float | None, float]:
    """(electrons per image unit or None, probe-electron fraction per image unit) of an ADF image.

    Follows the noise chain's records: ``poisson_dose`` and ``scintillator_pmt`` (output
    ``electrons``) give electron counts; ``scintillator_pmt`` ``normalized`` gives fractions of the
    probe's electrons (× α electrons); ``anode`` gives electrons × gain. Without a counting step the
    image is the noise-free fraction and the electrons per unit follow from the geometry's dose.
    """
    rec = None
    for r in reversed(measurement.provenance or []):
        if isinstance(r, dict) and "electrons_per_unit_intensity" in r:
            rec = r
            break
    g = measurement.geometry
    if rec is None or not measurement.counted:
        alpha = None
        if rec is not None:
            alpha = float(rec["electrons_per_unit_intensity"])
        elif g.extra.get("electrons_per_unit_intensity") is not None:
            alpha = float(g.extra["electrons_per_unit_intensity"])
        if alpha is None or not math.isfinite(alpha) or alpha <= 0:
            alpha = None
        return alpha, 1.0
    alpha = float(rec["electrons_per_unit_intensity"])
    output = (rec.get("params") or {}).get("output", "electrons")
    if rec.get("component") == "scintillator_pmt" and output == "normalized":
        return alpha, 1.0
    if rec.get("component") == "scintillator_pmt" and output == "anode":
        gain = float(rec["anode_gain_per_electron"])
        return 1.0 / gain, 1.0 / (gain * alpha)
    return 1.0, 1.0 / alpha


# --- ground truth ----------------------------------------------------------------------------------
def true_columns(sample, tol_A: float = 0.3) -> dict[str, np.ndarray]:
    """Atomic columns of ``sample`` along z: atoms within ``tol_A`` laterally form one column.

    Returns x_A, y_A (mean positions), n_atoms, and Z (the most common atomic number).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    xy = sample.positions_A[:, :2]
    if len(xy) == 0:
        return {k: np.zeros(0) for k in ("x_A", "y_A", "n_atoms", "Z")}
    pairs = cKDTree(xy).query_pairs(tol_A, output_type="ndarray")
    n = len(xy)
    g = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n)) if len(pairs) else \
        coo_matrix((n, n))
    nc, lab = connected_components(g, directed=False)
    cnt = np.bincount(lab, minlength=nc)
    x = np.bincount(lab, xy[:, 0], nc) / cnt
    y = np.bincount(lab, xy[:, 1], nc) / cnt
    Z = np.zeros(nc, np.int64)
    for c in range(nc):
        zs = sample.numbers[lab == c]
        Z[c] = np.bincount(zs).argmax()
    return {"x_A": x, "y_A": y, "n_atoms": cnt.astype(np.int64), "Z": Z}


def columns_in_field(cols: dict, sample, grid: C.ImageGrid, border_A: float) -> dict[str, np.ndarray]:
    """Columns (with their periodic images across the cell) whose position lies in the image, ≥ border_A inside."""
    (ylo, xlo) = grid.origin_A
    yhi = ylo + (grid.shape[0] - 1) * grid.sampling_A[0]
    xhi = xlo + (grid.shape[1] - 1) * grid.sampling_A[1]
    out = {k: [] for k in cols}
    cx, cy = float(sample.cell_A[0]), float(sample.cell_A[1])
    for sx in (-1, 0, 1):
        for sy in (-1, 0, 1):
            x, y = cols["x_A"] + sx * cx, cols["y_A"] + sy * cy
            keep = (x >= xlo + border_A) & (x <= xhi - border_A) & (y >= ylo + border_A) & (y <= yhi - border_A)
            for k in cols:
                v = {"x_A": x, "y_A": y}.get(k, cols[k])
                out[k].append(v[keep])
    return {k: np.concatenate(v) for k, v in out.items()}


def match_columns(true_x, true_y, fit_x, fit_y, radius_A: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching within ``radius_A`` (max pairs, then min squared distance): (i_true, i_fit)."""
    from tembench.analysis.atom_tracing import match_sites

    t = np.stack([true_x, true_y, np.zeros(len(true_x))], 1)
    q = np.stack([fit_x, fit_y, np.zeros(len(fit_x))], 1)
    return match_sites(t, q, radius_A)


# --- shipped data ----------------------------------------------------------------------------------
DATA = Path(__file__).parent / "data"
_DATA_PREFIX = ("plugins", "tembench_friedrich2023", "data")


def resolve_library_path(path: str) -> Path:
    """A library file or run folder: absolute as given; relative to the package's ``data/`` folder.

    A relative path never depends on the working directory (the same scenario must give the same
    table wherever it is run from): ``scs_library_pt001.csv`` is the shipped library; the
    repository spelling ``plugins/tembench_friedrich2023/data/<name>`` is read from the package data
    too. Anything else needs an absolute path.
    """
    p = Path(path).expanduser()
    if p.is_absolute():
        if not p.exists():
            raise ValueError(f"library_path {path!r} does not exist")
        return p
    rel = Path(*p.parts[len(_DATA_PREFIX):]) if p.parts[:len(_DATA_PREFIX)] == _DATA_PREFIX else p
    if str(rel) not in ("", ".") and (DATA / rel).exists():
        return DATA / rel
    shipped = sorted(q.name for q in DATA.glob("scs_library_*.csv"))
    raise ValueError(f"library_path {path!r}: a relative path is looked up in the plugin's data folder ({DATA}), "
                     f"which ships {shipped or '(nothing)'}; give one of those names, or an absolute path to your "
                     "own library (csv / parquet / run folder). The working directory is not searched.")


# --- the fit ----------------------------------------------------------------------------------------
class ColumnFitParams(Params):
    positions_A: list[tuple[float, float]] | None = Field(
        None, description="initial column positions (x, y) Å in the sample frame; None: peak finding")
    min_distance_A: float = Field(0.8, gt=0, description="peak finding: minimum distance between columns (Å); "
                                  "also the half-width of the maximum filter, so a faint column within this of a "
                                  "bright one's shoulder is missed")
    smooth_A: float = Field(0.3, ge=0, description="peak finding: Gaussian smoothing σ (Å) before the maxima")
    threshold_rel: float = Field(0.1, ge=0, lt=1, description="peak finding: minimum peak (above the image "
                                 "minimum) relative to the highest")
    peak_border_A: float = Field(0.0, ge=0, description="peak finding: drop peaks closer than this to the edge (Å)")
    sigma_init_A: float | None = Field(None, gt=0, description="starting width ρ (Å); None: 0.3 × nearest-neighbour "
                                       "distance")
    common_width: bool = Field(False, description="one width ρ for all columns (else one per column, eq 2.19)")
    background: Literal["constant", "planar"] = Field("constant", description="ζ, or ζ + a plane")
    loss: Literal["lsq", "poisson"] = Field("lsq", description="lsq: least squares as StatSTEM; poisson: maximum "
                                            "likelihood (the image in electron counts)")
    window_sigmas: float = Field(5.0, ge=3, le=10, description="Gaussians are evaluated within ± this many ρ")
    max_iter: int = Field(100, ge=1, le=10000, description="Levenberg–Marquardt iterations at most")
    max_shift_A: float | None = Field(None, gt=0, description="a column moves at most this far from its start "
                                      "(Å); None: half the nearest-neighbour distance")
    voronoi_max_radius_A: float | None = Field(None, gt=0, description="Voronoi SCS: ignore pixels farther than "
                                               "this from every column (Å)")
    voronoi_subtract_background: bool = Field(True, description="Voronoi SCS: subtract the fitted background first")
    electrons_per_unit: float | None = Field(None, gt=0, description="electrons per image unit (overrides what "
                                             "the noise chain records; used by the CRLB and loss=poisson)")


def image_grid_of(measurement) -> C.ImageGrid:
    g = measurement.geometry
    data = np.asarray(measurement.data)
    if g.scan_step_A is None:
        raise TembenchError("column_fit: an adf_image needs geometry.scan_step_A (the pixel size)")
    origin = (0.0, 0.0)
    if g.scan_positions_A is not None and len(g.scan_positions_A):
        origin = tuple(float(v) for v in np.asarray(g.scan_positions_A)[0])
    return C.ImageGrid(data.shape, tuple(float(s) for s in g.scan_step_A), origin)


def fit_image(image: np.ndarray, grid: C.ImageGrid, p: ColumnFitParams, electrons_per_unit: float | None,
              fraction_per_unit: float) -> dict[str, Any]:
    """Fit eq 2.19 to an image and return the ``columns`` extras dict (arrays + scalars)."""
    img = np.asarray(image, np.float64)
    if p.positions_A is not None:
        pos = np.asarray(p.positions_A, np.float64).reshape(-1, 2)
        x0, y0 = pos[:, 0], pos[:, 1]
    else:
        x0, y0 = C.find_columns(img, grid, p.min_distance_A, p.smooth_A, p.threshold_rel, p.peak_border_A)
    if len(x0) == 0:
        raise TembenchError("column_fit: no columns found; lower threshold_rel / min_distance_A or give positions_A")
    fit_img = img
    if p.loss == "poisson":
        if electrons_per_unit is None:
            raise TembenchError("column_fit(loss='poisson') needs the image in electrons: a counted measurement "
                                "(poisson_dose) or electrons_per_unit")
        fit_img = img * electrons_per_unit
    res = C.fit_columns(fit_img, grid, x0, y0, sigma_init_A=p.sigma_init_A, common_width=p.common_width,
                        background=p.background, loss=p.loss, window_sigmas=p.window_sigmas, max_iter=p.max_iter,
                        max_shift_A=p.max_shift_A)
    m = res.model
    if p.loss == "poisson":   # back to image units
        m = C.ColumnModel(m.x_A, m.y_A, m.height / electrons_per_unit, m.sigma_A,
                          m.background / electrons_per_unit, m.common_width)
    scs_g = m.scs
    scs_v = C.scs_voronoi(img, grid, m, p.voronoi_max_radius_A, p.voronoi_subtract_background)
    nan = float("nan")
    return {
        "x_A": m.x_A, "y_A": m.y_A, "height": m.height, "sigma_A": m.sigma_A, "background": m.background,
        "scs_gauss": scs_g, "scs_voronoi": scs_v,
        "scs_gauss_normalized": scs_g * fraction_per_unit, "scs_voronoi_normalized": scs_v * fraction_per_unit,
        "x0_A": x0, "y0_A": y0,
        "common_width": bool(m.common_width), "loss": p.loss, "window_sigmas": float(p.window_sigmas),
        "electrons_per_unit": nan if electrons_per_unit is None else float(electrons_per_unit),
        "fraction_per_unit": float(fraction_per_unit),
        "n_iter": int(res.n_iter), "converged": bool(res.converged), "cost": float(res.cost),
        "fit_time_s": float(res.time_s), "cost_history": np.asarray(res.history),
    }


def model_of(cols: dict) -> C.ColumnModel:
    return C.ColumnModel(cols["x_A"], cols["y_A"], cols["height"], cols["sigma_A"], cols["background"],
                         bool(cols["common_width"]))


class ColumnFit(Reconstructor):
    """StatSTEM-style column fitting of an ADF-STEM image (Friedrich 2023 eqs 2.19–2.20).

    A sum of round 2D Gaussians (height, width per column or common, position) on a constant or
    planar background, fitted to the whole image at once by Levenberg–Marquardt on the sparse
    Jacobian (least squares, or Poisson maximum likelihood), from given positions or the maxima of
    the smoothed image. The reconstruction is the fitted model image (image units); ``extras
    ["columns"]`` holds per column x_A, y_A, height, sigma_A and the SCS as the Gaussian volume
    2πηρ² (``scs_gauss``) and the Voronoi-cell integral (``scs_voronoi``), in image units × Å² and
    normalised to the probe's electrons (``*_normalized``, fraction × Å²), plus the image's
    electrons per unit (for the CRLB).
    """

    name = "column_fit"
    accepts = ("adf_image",)
    produces = "image"
    version = "1"
    Params = ColumnFitParams

    def reconstruct(self, measurement, params, xp) -> Reconstruction:
        data = np.asarray(measurement.data, np.float64)
        if data.ndim != 2:
            raise TembenchError(f"column_fit needs one 2D image, got shape {data.shape} (axes {measurement.axes})")
        grid = image_grid_of(measurement)
        e_per, frac = image_units(measurement)
        if params.electrons_per_unit is not None:
            e_per = params.electrons_per_unit
        cols = fit_image(data, grid, params, e_per, frac)
        model = model_of(cols).image(grid, params.window_sigmas)
        return Reconstruction(kind="image", data=model, sampling_A=grid.sampling_A, origin_A=grid.origin_A,
                              quantity="intensity", history={"cost": list(map(float, cols["cost_history"]))},
                              extras={"columns": cols})


def _columns_of(reconstruction, measurement, fit: dict | None) -> tuple[dict, C.ImageGrid]:
    """The reconstruction's fitted columns, or a fit of its image with ``fit`` params if it has none."""
    grid = C.ImageGrid(np.shape(reconstruction.data), tuple(reconstruction.sampling_A[-2:]),
                       tuple(reconstruction.origin_A[-2:]))
    cols = reconstruction.extras.get("columns") if reconstruction.extras else None
    if cols is not None:
        return cols, grid
    if fit is None:
        return None, grid
    p = ColumnFitParams(**fit)
    return fit_image(reconstruction.data, grid, p, p.electrons_per_unit, 1.0), grid


class _ScoringParams(Params):
    match_radius_A: float = Field(0.7, gt=0, description="a fitted column matches a true one within this (Å)")
    border_A: float = Field(1.0, ge=0, description="score only true columns at least this far inside the image (Å)")
    column_tol_A: float = Field(0.3, gt=0, description="atoms closer than this laterally form one column (Å)")
    scs: Literal["gauss", "voronoi"] = Field("gauss", description="SCS as the Gaussian volume or the Voronoi integral")
    confidence: float = Field(0.95, gt=0, lt=1, description="confidence level of the intervals (eqs 2.23–2.24)")


def _matched(cols, grid, sample, p) -> dict[str, np.ndarray]:
    truth = columns_in_field(true_columns(sample, p.column_tol_A), sample, grid, p.border_A)
    it, iq = match_columns(truth["x_A"], truth["y_A"], cols["x_A"], cols["y_A"], p.match_radius_A)
    return {"truth": truth, "it": it, "iq": iq}


class ColumnFitScore(Quantifier):
    """Column positions, SCS and atom counts vs the sample's columns (Friedrich 2023 eqs 2.21–2.23, Fig. 2.9).

    True columns are the sample's atoms projected along z (atoms within ``column_tol_A`` form a
    column), with periodic images, inside the image by ``border_A``; fitted columns are matched one
    to one within ``match_radius_A``. Reports the position MAE (eq 2.21) with its t interval
    (eq 2.23) over columns, found/false-positive columns, the SCS (normalised to the probe when the
    units are known), the SCS MAPE (eq 2.22) against a library of simulated SCS at the true counts,
    and atom counts by library matching and/or a Gaussian mixture with ICL order selection (BIC
    reported). Reconstructions without fitted columns (not from ``column_fit``) are fitted here
    with the ``fit`` parameters (column_fit's), or skipped when ``fit`` is null; their SCS are in
    the reconstruction's own units (not normalised to the probe), so compare them with a library
    only if those units are the probe fraction.
    """

    name = "column_fit"
    accepts = ("image",)
    # 2: library_path relative to the plugin's data folder, never the working directory
    version = "2"
    metrics = {
        "position_mae_A": Metric("Å", "lower", (0.0, None), headline=True,
                                 description="eq 2.21: mean Euclidean distance of matched fitted to true columns"),
        "position_rmse_A": Metric("Å", "lower", (0.0, None), description="RMS distance of matched columns"),
        "position_mae_ci_*_A": Metric("Å", None, (0.0, None), diagnostic=True,
                                      description="eq 2.23 t interval of the position MAE over columns"),
        "position_bias_*_A": Metric("Å", None, diagnostic=True, description="mean fitted − true coordinate"),
        "pct_columns_found": Metric("%", "higher", (0.0, 100.0), description="true columns with a fitted match"),
        "n_false_positives": Metric("", "lower", (0, None), description="fitted columns inside the border with "
                                    "no true column"),
        "scs_mape_pct": Metric("%", "lower", (0.0, None), headline=True,
                               description="eq 2.22: SCS error relative to the library SCS at the true count"),
        "scs_mape_ci_*_pct": Metric("%", None, (0.0, None), diagnostic=True, description="eq 2.23 interval"),
        "*count_exact_frac": Metric("", "higher", (0.0, 1.0), headline=True,
                                    description="fraction of matched columns counted exactly right"),
        "*count_mae_atoms": Metric("atoms", "lower", (0.0, None), description="mean |count − true count|"),
        "*count_bias_atoms": Metric("atoms", None, diagnostic=True, description="mean count − true count"),
        "gmm_k_*": Metric("", None, (1, None), diagnostic=True, description="mixture order chosen by ICL / BIC"),
        "scs_normalized_median": Metric("fraction·Å²", None, (0.0, None), comparable=False,
                                        description="median SCS of matched columns, normalised to the probe"),
        "sigma_median_A": Metric("Å", None, (0.0, None), diagnostic=True, description="median fitted width ρ"),
        "n_atoms_true_median": Metric("atoms", None, (0, None), diagnostic=True, description="ground truth"),
        "n_columns_*": Metric("", None, (0, None), diagnostic=True, description="column counts"),
        "n_matched": Metric("", None, (0, None), diagnostic=True, description="matched columns"),
        "fit_*": Metric("", None, diagnostic=True, description="fit convergence, iterations, time (s)"),
    }

    class Params(_ScoringParams):
        counting: Literal["auto", "none", "gmm", "library", "both"] = Field(
            "auto", description="atom counting: auto = library if one is given, else gmm")
        library: list[tuple[float, float]] | None = Field(None, description="SCS library [(n_atoms, scs)] in the "
                                                          "normalised units (fraction of the probe × Å²)")
        library_path: str | None = Field(None, description="SCS library from a run folder / csv / parquet: absolute, "
                                         "or relative to the plugin's data folder (e.g. scs_library_pt001.csv)")
        library_n_column: str = Field("n_atoms_true_median", description="library_path: column of atoms per column")
        library_scs_column: str = Field("scs_normalized_median", description="library_path: column of the SCS")
        library_scs_scale: float = Field(1.0, gt=0, description="multiply the library's SCS column by this")
        gmm_max_components: int = Field(10, ge=1, le=60)
        gmm_criterion: Literal["icl", "bic"] = "icl"
        gmm_offset: int | None = Field(None, ge=0, description="atoms in the dimmest mixture component; None: "
                                       "aligned to the library if one is given, else 1")
        fit: dict[str, Any] | None = Field(default_factory=dict, description="column_fit parameters for "
                                           "reconstructions without fitted columns; null to skip those")

        @field_validator("library_path")
        @classmethod
        def _library_exists(cls, v):
            if v is not None:
                resolve_library_path(v)   # refused at validation, before anything runs
            return v

    def _library(self, p):
        if p.library is not None:
            return counting.load_scs_library(np.asarray(p.library, float), scs_scale=p.library_scs_scale)
        if p.library_path is not None:
            return counting.load_scs_library(resolve_library_path(p.library_path), p.library_n_column, p.library_scs_column,
                                             scs_scale=p.library_scs_scale)
        return None

    def score(self, reconstruction, measurement, sample, params):
        p = params
        cols, grid = _columns_of(reconstruction, measurement, p.fit)
        if cols is None:
            return {}
        mt = _matched(cols, grid, sample, p)
        truth, it, iq = mt["truth"], mt["it"], mt["iq"]
        n_true = len(truth["x_A"])
        if n_true == 0:
            raise TembenchError("column_fit: no true column lies inside the image by border_A; lower border_A or "
                                "check the reconstruction's origin_A/sampling_A")
        fx, fy = cols["x_A"], cols["y_A"]
        ylo, xlo = grid.origin_A
        yhi = ylo + (grid.shape[0] - 1) * grid.sampling_A[0]
        xhi = xlo + (grid.shape[1] - 1) * grid.sampling_A[1]
        b = p.border_A
        inside = (fx >= xlo + b) & (fx <= xhi - b) & (fy >= ylo + b) & (fy <= yhi - b)
        matched = np.zeros(len(fx), bool)
        matched[iq] = True
        err = stats.position_errors(fx[iq], fy[iq], truth["x_A"][it], truth["y_A"][it])
        nan = float("nan")
        out: dict[str, Any] = {
            "n_columns_true": n_true, "n_columns_fitted": int(inside.sum()), "n_matched": len(it),
            "pct_columns_found": 100.0 * len(it) / n_true, "n_false_positives": int((inside & ~matched).sum()),
            "position_mae_A": float(err.mean()) if len(err) else nan,
            "position_rmse_A": float(np.sqrt(np.mean(err ** 2))) if len(err) else nan,
            "position_bias_x_A": float(np.mean(fx[iq] - truth["x_A"][it])) if len(err) else nan,
            "position_bias_y_A": float(np.mean(fy[iq] - truth["y_A"][it])) if len(err) else nan,
            "position_mae_ci_low_A": nan, "position_mae_ci_high_A": nan,
            "fit_converged": bool(cols["converged"]), "fit_iterations": int(cols["n_iter"]),
            "fit_time_s": float(cols["fit_time_s"]),
        }
        if len(err) >= 2:
            _, lo, hi = stats.mean_ci(err, p.confidence)
            out["position_mae_ci_low_A"], out["position_mae_ci_high_A"] = lo, hi
        key = "scs_gauss_normalized" if p.scs == "gauss" else "scs_voronoi_normalized"
        scs = np.asarray(cols[key], np.float64)[iq]
        n_at = truth["n_atoms"][it]
        out["scs_normalized_median"] = float(np.median(scs)) if len(scs) else nan
        out["sigma_median_A"] = float(np.median(np.asarray(cols["sigma_A"])[iq])) if len(iq) else nan
        out["n_atoms_true_median"] = float(np.median(n_at)) if len(n_at) else nan
        lib = self._library(p)
        mode = p.counting if p.counting != "auto" else ("library" if lib is not None else "gmm")
        counts = np.full(len(scs), -1)
        if lib is not None:
            ref = counting.library_scs_of(n_at, *lib)
            ape = stats.ape(scs, ref)
            ape = ape[np.isfinite(ape)]
            out["scs_mape_pct"] = float(ape.mean()) if len(ape) else nan
            if len(ape) >= 2:
                _, lo, hi = stats.mean_ci(ape, p.confidence)
                out["scs_mape_ci_low_pct"], out["scs_mape_ci_high_pct"] = lo, hi
        if mode in ("library", "both"):
            if lib is None:
                raise TembenchError("column_fit: counting by library needs `library` or `library_path`")
            counts = counting.library_counts(scs, *lib)
            out.update({f"library_{k}": v for k, v in counting.counting_accuracy(counts, n_at).items()})
        if mode in ("gmm", "both") and len(scs) >= 5:
            offset = p.gmm_offset if p.gmm_offset is not None else (None if lib is not None else 1)
            sel = counting.mixture_counts(scs, p.gmm_max_components, p.gmm_criterion, offset=offset, library=lib)
            out.update({f"gmm_{k}": v for k, v in counting.counting_accuracy(sel.counts, n_at).items()})
            out.update(gmm_k_icl=sel.k_icl, gmm_k_bic=sel.k_bic, gmm_icl_curve=sel.icl, gmm_bic_curve=sel.bic,
                       gmm_counts=sel.counts)
            if mode == "gmm":
                counts = sel.counts
        out.update({
            "true_x_A": truth["x_A"][it], "true_y_A": truth["y_A"][it], "fit_x_A": fx[iq], "fit_y_A": fy[iq],
            "n_atoms_true": n_at, "scs_matched": scs, "counts": counts, "position_error_A": err,
        })
        return out


def reference_model(cols: dict, measurement, grid: C.ImageGrid, alpha: float,
                    max_iter: int = 100) -> tuple[C.ColumnModel, bool, bool]:
    """The model at which the CRLB of a measurement is evaluated, in electrons: (model, refitted, restored).

    The bound is a property of the measured counts, so it is evaluated at the Poisson maximum-likelihood
    fit of the *measured* image (eqs 2.25–2.27 at the ML estimate of the true parameters), whichever
    estimator is being judged:

    - a ``column_fit(loss='poisson')`` fit of the raw image is that model already (reused when its
      heights and background are ≥ 0);
    - a least-squares fit is refitted by Poisson ML from its own columns: at low dose a least-squares
      fit may end with a negative background (negative expected counts, no Poisson model), while the
      ML fit keeps λ > 0 everywhere by construction (its cost is +∞ otherwise). The reference fit
      also keeps every height and the background ≥ 0 (``nonnegative``): at a few counts per pixel an
      unconstrained fit can give a column a negative height, compensated by its neighbours, whose
      model dips below zero just outside the fit's window;
    - a fit of a restored image (``cnn_restore`` kept the measured image in
      ``extras["unrestored_data"]``) is judged against the bound of the measured image: the restored
      image's own fitted columns are wider and would give a looser bound. The raw image is refitted by
      Poisson ML starting from the restored fit's columns.

    The median over repeats (``aggregate``) of bounds at per-repeat ML estimates approximates the bound
    at the true parameters (the error is second order in the estimates' spread).
    """
    from tembench_friedrich2023.restore import UNRESTORED

    extras = getattr(measurement, "extras", None) or {}
    restored = UNRESTORED in extras
    raw = np.asarray(extras[UNRESTORED] if restored else measurement.data, np.float64)
    m = model_of(cols)
    m_e = C.ColumnModel(m.x_A, m.y_A, m.height * alpha, m.sigma_A, np.asarray(m.background) * alpha,
                        m.common_width)
    if (not restored and cols.get("loss") == "poisson" and np.all(m_e.height >= 0)
            and m_e.background[0] >= 0):
        return m_e, False, False
    if raw.shape != tuple(grid.shape):
        raise TembenchError(f"crlb: the measured image {raw.shape} and the fit's grid {tuple(grid.shape)} differ")
    res = C.fit_columns(raw * alpha, grid, init=m_e, loss="poisson", window_sigmas=float(cols["window_sigmas"]),
                        max_iter=max_iter, nonnegative=True)
    return res.model, True, restored


def reference_bound(ref, grid, window_sigmas: float):
    """CRLB of the reference model (in electrons) over its live columns: ``(bound or None, live mask)``.

    A column of height 0 adds nothing to λ and carries no information on its position or width. When
    the Fisher matrix is singular all the same (a weak column the fit left on top of a strong one,
    or heights so small that rounding breaks the Cholesky factorisation), the weakest columns leave the
    model, at a growing threshold (0, 1e-6, 1e-2 of the highest column) until it inverts; if it never does, the bound is None (NaN in that repeat —
    the repeat and its row are kept)."""
    live = ref.height > 0
    for floor in (0.0, 1e-6, 1e-2):
        live = ref.height > floor * float(np.max(ref.height, initial=0.0))
        if not live.any():
            return None, live
        sub = C.ColumnModel(ref.x_A[live], ref.y_A[live], ref.height[live], ref.sigma_A[live],
                            ref.background, ref.common_width)
        try:
            return C.crlb(sub, grid, 1.0, window_sigmas), live   # ref is in electrons: λ = ref
        except TembenchError:
            continue
    return None, live


class CRLBPrecision(Quantifier):
    """Precision over noise repeats vs the Cramér–Rao lower bound (Friedrich 2023 eqs 2.25–2.29, Fig. 2.7).

    Per repeat (``score``): the fitted columns matched to the sample's columns, and the CRLB of
    every column's x, y and SCS from the Fisher information of the Gaussian model under Poisson
    counting at the measurement's dose (full model with neighbours and background), evaluated at
    the Poisson-ML fit of the *measured* image (:func:`reference_model`): the bound is a property
    of the measurement, the same for every estimator of it — a least-squares fit (whose background
    can be negative at low dose) and a fit of a CNN-restored image are judged against it. Over the repeats (``aggregate``): the standard deviation of
    each true column's fitted x, y, SCS divided by √CRLB (CRLB: median over repeats), reported as
    the median over columns and pooled with a χ² interval (eq 2.24), the position MAE (eq 2.21)
    with its t interval (eq 2.23), and per-column curves. 1 = efficient; the thesis sees < 1 only
    after restoration (which adds prior information). Needs the ``column_fit`` reconstructor and a
    counted measurement (or ``electrons_per_unit``); other reconstructions are skipped.
    """

    name = "crlb"
    accepts = ("image",)
    # 2: the bound at the Poisson-ML fit of the measured (unrestored) image, not at the judged fit
    version = "3"  # 3: near-zero-height columns leave the bound's model instead of a singular Fisher matrix erroring the row
    metrics = {
        "crlb_position_median_pm": Metric("pm", None, (0.0, None), diagnostic=True,
                                          description="√CRLB of a column coordinate, median over columns"),
        "crlb_scs_rel_median_pct": Metric("%", None, (0.0, None), diagnostic=True,
                                          description="√CRLB of the SCS relative to the SCS, median over columns"),
        "precision_ratio_*": Metric("", "lower", (0.0, None), headline=True,
                                    description="std over repeats / √CRLB (1 = efficient); median over columns, "
                                                "or pooled with a χ² interval (eq 2.24)"),
        "std_position_median_pm": Metric("pm", "lower", (0.0, None), description="std of a coordinate over repeats"),
        "std_scs_rel_median_pct": Metric("%", "lower", (0.0, None), description="std of the SCS over repeats"),
        "position_mae_A": Metric("Å", "lower", (0.0, None), description="eq 2.21 over repeats × columns"),
        "position_mae_ci_*_A": Metric("Å", None, (0.0, None), diagnostic=True, description="eq 2.23 interval"),
        "electrons_per_unit": Metric("e", None, (0.0, None), diagnostic=True, description="electrons per image unit"),
        "n_*": Metric("", None, (0, None), diagnostic=True, description="columns and repeats scored; columns whose "
                      "reference height is 0 (no bound in that repeat)"),
        "crlb_reference_refit": Metric("", None, diagnostic=True, description="the bound's model is a Poisson-ML "
                                       "refit of the measured image (else the judged Poisson fit itself)"),
        "crlb_input_restored": Metric("", None, diagnostic=True, description="the judged fit is of a restored image; "
                                      "the bound is the measured (raw) image's"),
    }
    aggregates: ClassVar[bool] = True

    class Params(_ScoringParams):
        scs: Literal["gauss"] = Field("gauss", description="the bound is that of the Gaussian volume (eq 2.28)")
        min_repeats: int = Field(3, ge=2, description="a column needs this many matched repeats to be scored")
        window_sigmas: float = Field(6.0, ge=3, le=10, description="Gaussian window of the Fisher matrix (ρ)")

    def score(self, reconstruction, measurement, sample, params):
        p = params
        cols, grid = _columns_of(reconstruction, measurement, None)
        if cols is None:
            return {}
        alpha = float(cols.get("electrons_per_unit", float("nan")))
        mt = _matched(cols, grid, sample, p)
        truth, it, iq = mt["truth"], mt["it"], mt["iq"]
        nt = len(truth["x_A"])
        full = {k: np.full(nt, np.nan) for k in ("x_A", "y_A", "scs", "crlb_x_A2", "crlb_y_A2", "crlb_scs")}
        full["x_A"][it] = cols["x_A"][iq]
        full["y_A"][it] = cols["y_A"][iq]
        full["scs"][it] = np.asarray(cols["scs_gauss"])[iq]
        refit, restored, n_dead = False, False, 0
        if math.isfinite(alpha) and alpha > 0 and len(cols["x_A"]):
            ref, refit, restored = reference_model(cols, measurement, grid, alpha)
            # a column of height 0 adds nothing to λ and carries no information on its position or
            # width: it leaves the model (the same λ) and its bound is NaN in this repeat
            cr, live = reference_bound(ref, grid, p.window_sigmas)
            n_dead = int((~live).sum())
            if cr is not None:
                v = {k: np.full(len(ref), np.nan) for k in ("x", "y", "scs")}
                v["x"][live], v["y"][live], v["scs"][live] = cr.var_x_A2, cr.var_y_A2, cr.var_scs
                # the reference fit starts at the estimator's columns and keeps their order
                full["crlb_x_A2"][it] = v["x"][iq]
                full["crlb_y_A2"][it] = v["y"][iq]
                full["crlb_scs"][it] = v["scs"][iq] / alpha ** 2     # SCS in image units × Å², as cols
        pos = np.sqrt(0.5 * (full["crlb_x_A2"] + full["crlb_y_A2"]))
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = np.sqrt(full["crlb_scs"]) / np.abs(full["scs"])
        return {
            **full, "true_x_A": truth["x_A"], "true_y_A": truth["y_A"], "n_atoms_true": truth["n_atoms"],
            "crlb_position_median_pm": float(np.nanmedian(pos) * 100) if np.isfinite(pos).any() else float("nan"),
            "crlb_scs_rel_median_pct": float(np.nanmedian(rel) * 100) if np.isfinite(rel).any() else float("nan"),
            "electrons_per_unit": alpha, "n_columns_matched": len(it),
            "crlb_reference_refit": refit, "crlb_input_restored": restored, "n_columns_zero_height": n_dead,
        }

    def aggregate(self, repeats: list[dict], sample, params) -> dict[str, Any]:
        p = params
        reps = [r for r in repeats if r and "x_A" in r]
        nan = float("nan")
        if len(reps) < 2:
            return {"n_repeats_scored": len(reps)}
        nt = min(len(np.asarray(r["x_A"])) for r in reps)
        S = {k: np.stack([np.asarray(r[k], np.float64)[:nt] for r in reps]) for k in
             ("x_A", "y_A", "scs", "crlb_x_A2", "crlb_y_A2", "crlb_scs")}
        tx = np.asarray(reps[0]["true_x_A"], np.float64)[:nt]
        ty = np.asarray(reps[0]["true_y_A"], np.float64)[:nt]
        n_ok = np.sum(np.isfinite(S["x_A"]), 0)
        use = n_ok >= p.min_repeats
        out: dict[str, Any] = {"n_repeats_scored": len(reps), "n_columns_scored": int(use.sum())}
        if not use.any():
            return out
        with np.errstate(invalid="ignore"):
            var = {k: np.nanvar(S[k][:, use], axis=0, ddof=1) for k in ("x_A", "y_A", "scs")}
            cr = {k: np.nanmedian(S[k][:, use], axis=0) for k in ("crlb_x_A2", "crlb_y_A2", "crlb_scs")}
        dof = n_ok[use] - 1
        v_pos, c_pos = 0.5 * (var["x_A"] + var["y_A"]), 0.5 * (cr["crlb_x_A2"] + cr["crlb_y_A2"])
        kinds = {"x": (var["x_A"], cr["crlb_x_A2"], dof), "y": (var["y_A"], cr["crlb_y_A2"], dof),
                 "position": (v_pos, c_pos, 2 * dof), "scs": (var["scs"], cr["crlb_scs"], dof)}
        for k, (v, c, d) in kinds.items():
            ok = np.isfinite(v) & np.isfinite(c) & (c > 0)
            if not ok.any():
                out[f"precision_ratio_{k}"] = nan
                continue
            r2 = v[ok] / c[ok]
            out[f"precision_ratio_{k}"] = float(np.median(np.sqrt(r2)))
            # pooled: Σ dof·s²/CRLB over columns ~ ratio² χ²(Σ dof) if the columns were independent
            dtot = int(d[ok].sum())
            pooled = float(np.sum(d[ok] * r2) / dtot)
            s2, lo, hi = stats.variance_ci_from(pooled, dtot, p.confidence)
            out[f"precision_ratio_{k}_pooled"] = math.sqrt(s2)
            out[f"precision_ratio_{k}_ci_low"] = math.sqrt(lo)
            out[f"precision_ratio_{k}_ci_high"] = math.sqrt(hi)
        out["std_position_median_pm"] = float(np.nanmedian(np.sqrt(v_pos)) * 100)
        out["crlb_position_median_pm"] = float(np.nanmedian(np.sqrt(c_pos)) * 100)
        mean_scs = np.nanmean(S["scs"][:, use], axis=0)
        out["std_scs_rel_median_pct"] = float(np.nanmedian(np.sqrt(var["scs"]) / np.abs(mean_scs)) * 100)
        out["crlb_scs_rel_median_pct"] = float(np.nanmedian(np.sqrt(cr["crlb_scs"]) / np.abs(mean_scs)) * 100)
        err = stats.position_errors(S["x_A"][:, use], S["y_A"][:, use], tx[use][None], ty[use][None])
        err = err[np.isfinite(err)]
        out["position_mae_A"] = float(err.mean())
        if len(err) >= 2:
            _, lo, hi = stats.mean_ci(err, p.confidence)
            out["position_mae_ci_low_A"], out["position_mae_ci_high_A"] = lo, hi
        n_at = np.asarray(reps[0].get("n_atoms_true", np.full(nt, -1)))[:nt][use]
        out.update({
            "curve_n_atoms": n_at, "curve_true_x_A": tx[use], "curve_true_y_A": ty[use],
            "curve_std_x_A": np.sqrt(var["x_A"]), "curve_std_y_A": np.sqrt(var["y_A"]),
            "curve_sqrt_crlb_x_A": np.sqrt(cr["crlb_x_A2"]), "curve_sqrt_crlb_y_A": np.sqrt(cr["crlb_y_A2"]),
            "curve_std_scs": np.sqrt(var["scs"]), "curve_sqrt_crlb_scs": np.sqrt(cr["crlb_scs"]),
            "curve_mean_scs": mean_scs,
        })
        return out
