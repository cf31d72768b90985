"""Held-out evaluation of ADF restoration: NCC with the clean image, SCS and peak-intensity precision and bias.

The held-out images are multislice simulations (``stem4d``, ``output: image``) shipped in
``data/restore_multislice_v1.npz`` with role ``heldout``: never used for training or for the
surrogate's calibration. Each is broadened by the source (0.7 Å FWHM), then degraded with the
platform's noise chain at Friedrich Table 2.2 settings (scan jitter φ 0.5, σ_x 0.08 Å,
σ_y 0.04 Å; scintillator–PMT at the dose; half-Lorentzian fast-scan smear, 0.5 µs dwell,
0.25 µs response), ``n_real`` realisations per dose.

Column position: the intensity centroid within 0.7 Å of the column (``centroid_mae_A`` = mean
distance from the centroid of the noise-free image), or, with ``fit=True``, the StatSTEM-style
Gaussian fit (``position_mae_A`` from the true position; slow: seconds per image).

SCS estimator: the integrated intensity of each column's Voronoi cell (nearest column; periodic
for the periodic crystals) × pixel area, divided by α (electrons per unit intensity) — in Å²,
like StatSTEM's SCS but without a Gaussian fit. Peak intensity: the mean within 0.3 Å of the
column. Only columns ≥ 4 px from the image edge are scored. Precision = std over realisations /
true value (mean over columns); bias = (mean over realisations − true) / true (mean over
columns); truth = the same estimator on the noise-free, source-broadened image.
"""

from __future__ import annotations

import numpy as np

from tembench_friedrich2023 import nn_restore_data as D

TABLE_2_2 = {
    "source_fwhm_A": 0.7,
    "jitter": {"phi_x": 0.5, "sigma_x_A": 0.08, "phi_y": 0.5, "sigma_y_A": 0.04},
    "smear": {"model": "half_lorentzian", "dwell_time_us": 0.5, "response_time_us": 0.25},
}
EDGE_PX = 4


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel() - np.mean(a)
    b = np.asarray(b, np.float64).ravel() - np.mean(b)
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def heldout_case(key: str, path=D.REFERENCES) -> dict:
    """Clean image (fraction of electrons), step, columns (y, x Å), periodicity of a held-out reference."""
    z = np.load(path, allow_pickle=False)
    if str(z[f"{key}/role"]) != "heldout":
        raise ValueError(f"{key} is not a held-out reference")
    img = z[f"{key}/image"].astype(np.float64)
    step = float(z[f"{key}/step_A"])
    cols = z[f"{key}/columns"][:, :2].copy()
    periodic = key.startswith(("pt_bulk", "srtio3"))
    if periodic:  # the scan covers whole cells: tile 2x2 for more columns away from the edges
        L = np.array(img.shape) * step
        img = np.tile(img, (2, 2))
        cols = np.concatenate([cols + L * np.array([ty, tx]) for ty in (0, 1) for tx in (0, 1)])
    return {"key": key, "clean": img, "step_A": step, "columns": cols, "periodic": periodic}


def voronoi_labels(columns_yx_A: np.ndarray, shape, step_A: float, periodic: bool) -> np.ndarray:
    from scipy.spatial import cKDTree

    ny, nx = shape
    yy, xx = np.meshgrid(np.arange(ny) * step_A, np.arange(nx) * step_A, indexing="ij")
    pts = np.column_stack([yy.ravel(), xx.ravel()])
    if periodic:
        tree = cKDTree(np.mod(columns_yx_A, [ny * step_A, nx * step_A]), boxsize=[ny * step_A, nx * step_A])
    else:
        tree = cKDTree(columns_yx_A)
    return tree.query(pts)[1].reshape(shape)


def interior(columns_yx_A: np.ndarray, shape, step_A: float) -> np.ndarray:
    lo = EDGE_PX * step_A
    hi = (np.asarray(shape) - 1 - EDGE_PX) * step_A
    return np.all((columns_yx_A >= lo) & (columns_yx_A <= hi), axis=1)


def column_values(image: np.ndarray, case: dict, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column: integrated intensity × pixel area (units·Å²), peak mean (units), centroid (y, x) Å.

    The centroid is the intensity-weighted mean position within 0.7 Å of the true column, after
    subtracting the lowest value of that disc (a cheap stand-in for a fitted position).
    """
    n = len(case["columns"])
    scs = np.bincount(labels.ravel(), image.ravel(), minlength=n) * case["step_A"] ** 2
    ny, nx = image.shape
    yy, xx = np.meshgrid(np.arange(ny) * case["step_A"], np.arange(nx) * case["step_A"], indexing="ij")
    c = case["columns"]
    d2 = (yy.ravel()[None] - c[:, :1]) ** 2 + (xx.ravel()[None] - c[:, 1:]) ** 2
    near = d2 < 0.3**2
    peak = (near * image.ravel()[None]).sum(1) / np.maximum(near.sum(1), 1)
    disc = d2 < 0.7**2
    vals = np.where(disc, image.ravel()[None], np.inf)
    w = np.where(disc, image.ravel()[None] - vals.min(1, keepdims=True), 0.0)
    w = np.clip(w, 0, None)
    tot = np.maximum(w.sum(1), 1e-30)
    centroid = np.column_stack([(w * yy.ravel()[None]).sum(1) / tot, (w * xx.ravel()[None]).sum(1) / tot])
    return scs, peak, centroid


def fitted_columns(image: np.ndarray, case: dict) -> tuple[np.ndarray, np.ndarray]:
    """StatSTEM-style fit (eq 2.19, lsq, per-column widths) started at the true positions: (SCS eq 2.20, (y, x) Å)."""
    from tembench_friedrich2023.columns import ImageGrid, fit_columns

    grid = ImageGrid(image.shape, (case["step_A"], case["step_A"]))
    c = case["columns"]
    res = fit_columns(np.asarray(image, np.float64), grid, x_A=c[:, 1], y_A=c[:, 0], max_iter=20)
    m = res.model
    return 2 * np.pi * np.asarray(m.height) * np.asarray(m.sigma_A) ** 2, np.column_stack([m.y_A, m.x_A])


def evaluate_case(case: dict, restore_fn, doses=(5.0e2, 5.0e3, 5.0e4), n_real: int = 10, seed: int = 12345,
                  settings: dict | None = None, fit: bool = False) -> dict:
    """Metrics raw vs restored per dose for one held-out case; ``restore_fn(image) -> image``.

    ``fit``: also fit every image with the StatSTEM-style model (columns.fit_columns) and report
    the fitted SCS precision/bias and the column-position error (thesis eqs 2.20–2.21).
    """
    st = dict(TABLE_2_2 if settings is None else settings)
    clean, step = case["clean"], case["step_A"]
    labels = voronoi_labels(case["columns"], clean.shape, step, case["periodic"])
    inner = interior(case["columns"], clean.shape, step)
    rng = np.random.default_rng(seed)
    out = {}
    for dose in doses:
        res = {n: {"ncc": [], "scs": [], "peak": [], "mean": [], "fscs": [], "pos": [], "cpos": []}
               for n in ("raw", "restored")}
        truth = None
        fit_truth = None
        for _ in range(n_real):
            noisy, target, rec = D.degrade(clean, step, {**st, "dose_e_per_A2": dose}, rng)
            alpha = rec["alpha"]
            if truth is None:
                truth = column_values(target / alpha, case, labels)
                if fit:
                    fit_truth = fitted_columns(target / alpha, case)[0]
            restored = restore_fn(noisy)
            for name, img in (("raw", noisy), ("restored", restored)):
                img = np.asarray(img, np.float64)
                s, p, cen = column_values(img / alpha, case, labels)
                res[name]["ncc"].append(ncc(img, target))
                res[name]["scs"].append(s)
                res[name]["peak"].append(p)
                res[name]["cpos"].append(np.hypot(*(cen - truth[2]).T))
                res[name]["mean"].append(img.mean() / target.mean())
                if fit:
                    f_scs, f_pos = fitted_columns(img / alpha, case)
                    res[name]["fscs"].append(f_scs)
                    res[name]["pos"].append(np.hypot(*(f_pos - case["columns"]).T))
        row = {}
        for name in ("raw", "restored"):
            scs = np.asarray(res[name]["scs"])[:, inner]
            peak = np.asarray(res[name]["peak"])[:, inner]
            ts, tp = truth[0][inner], truth[1][inner]
            row[name] = {
                "ncc": float(np.mean(res[name]["ncc"])),
                "scs_rel_std": float(np.mean(scs.std(0, ddof=1) / ts)),
                "scs_bias": float(np.mean(scs.mean(0) / ts - 1)),
                "scs_mape": float(np.mean(np.abs(scs / ts - 1))),
                "peak_rel_std": float(np.mean(peak.std(0, ddof=1) / tp)),
                "peak_bias": float(np.mean(peak.mean(0) / tp - 1)),
                "mean_ratio": float(np.mean(res[name]["mean"])),
                "centroid_mae_A": float(np.mean(np.asarray(res[name]["cpos"])[:, inner])),
            }
            if fit:
                fs = np.asarray(res[name]["fscs"])[:, inner]
                tf = fit_truth[inner]
                row[name].update({
                    "fit_scs_rel_std": float(np.mean(fs.std(0, ddof=1) / tf)),
                    "fit_scs_bias": float(np.mean(fs.mean(0) / tf - 1)),
                    "fit_scs_mape": float(np.mean(np.abs(fs / tf - 1))),
                    "position_mae_A": float(np.mean(np.asarray(res[name]["pos"])[:, inner])),
                })
        row["n_columns"] = int(inner.sum())
        out[f"{dose:g}"] = row
    return out
