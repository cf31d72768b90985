"""Synthetic training pairs for the ADF restoration network: a calibrated column surrogate + the platform's noise chain.

Clean images. Full multislice (``stem4d``, ``output: image``) costs 10–60 s per 40×40 image on
one core, too slow for thousands of training pairs. The training images are therefore a
*calibrated incoherent-imaging surrogate*: ADF image = Σ_columns SCS_c · (|P|² ⊗ G_σc)(r − r_c),
with |P|² the probe intensity of the platform's own optics (``physics.stem.make_probe_modes``,
Table 2.1 aberrations), G_σ a Gaussian object function per column, plus a small wide (1 Å)
Gaussian share for thermal-diffuse background. SCS_c(n) and σ_c(n) are fitted to multislice
images of Pt [001] at 2, 5, 10 and 20 atoms per column (``REFERENCE_SET`` "calibration" in
:mod:`nn_train_restore`); other elements scale as (Z/78)^1.7 (a Rutherford-like approximation,
stated, not calibrated). Column positions and atom counts come from the built-in samples
(``pt_bulk``, ``srtio3``, ``pt_nanoparticle``, ``pt_edge_dislocation``).

Degradation (Friedrich 2023 §2.2, in the thesis order), through the registry's noise models:
``source_size`` (part of the clean target: the thesis convolves its simulations with the source
image before distorting them) → ``scan_jitter`` → ``scintillator_pmt`` (Poisson + PMT, output in
electrons) → ``fast_scan_smear``. The target is α · (source-size-broadened clean image): the
expected detector signal without distortion, in the raw image's units (electrons per pixel).
Parameters are mapped onto each model's *current* Params (px vs Å names) by :func:`fit_params`.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"
REFERENCES = DATA / "restore_multislice_v1.npz"
Z_PT = 78
Z_EXPONENT = 1.7
WIDE_SIGMA_A = 1.0
PROFILE_DR_A = 0.025
PROFILE_RMAX_A = 4.5   # profiles are cut here (≈1 % of the probe's tail) and renormalised
SIGMA_GRID_A = np.arange(0.0, 0.6001, 0.02)

# training recipe (ranges are sampled uniformly, dose log-uniformly); Table 2.2 values sit inside
RECIPE = {
    "patch_px": 64,
    "scan_step_A": [0.12, 0.35],
    "source_fwhm_A": [0.6, 0.8],
    "dose_e_per_A2": [5.0e2, 5.0e5],
    # Table 2.2: φ 0.5, σ_x 0.5 px, σ_y 0.25 px at 0.16 Å pixels = 0.08 Å, 0.04 Å; sampled up to 2x that
    "jitter": {"phi_x": [0.3, 0.7], "sigma_x_A": [0.0, 0.16], "phi_y": [0.3, 0.7], "sigma_y_A": [0.0, 0.08]},
    "smear": {"model": "half_lorentzian", "dwell_time_us": 0.5, "response_time_us": [0.05, 0.5]},
    "scenes": {"pt_bulk": 0.3, "srtio3": 0.25, "pt_nanoparticle": 0.25, "pt_edge_dislocation": 0.2},
    "pt_bulk_atoms_per_column": [2, 40],
    "srtio3_cells": [2, 30],
    "column_count_jitter": 0.5,
    "nanoparticle_diameter_cells": [3, 8],
    "dislocation_thickness_cells": [1, 4],
}


# --- probe and column profiles ---------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def profile_table(energy_keV: float = 300.0, semiangle_mrad: float = 21.1, c10_A: float = -88.74,
                  c30_A: float = 4.0e5, c50_A: float = 1.0e8) -> tuple[np.ndarray, np.ndarray]:
    """Radial profiles (len(SIGMA_GRID_A), n_r) of |P|² ⊗ G_σ, each with unit 2D integral (Å⁻²)."""
    from tembench.physics.stem import make_probe_modes

    s, n = 0.025, 512
    probe = make_probe_modes((n, n), s, energy_keV, semiangle_mrad, {"C10": c10_A, "C30": c30_A, "C50": c50_A})[0]
    intensity = np.abs(np.asarray(probe)) ** 2
    intensity = np.fft.ifftshift(intensity / (intensity.sum() * s * s))
    ft = np.fft.fft2(intensity)
    k = np.fft.fftfreq(n, s)
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    c = (np.arange(n) - n // 2) * s
    r = np.fft.ifftshift(np.hypot(c[:, None], c[None, :]))
    rb = np.arange(0.0, PROFILE_RMAX_A, PROFILE_DR_A)
    idx = np.minimum((r / PROFILE_DR_A + 0.5).astype(int), len(rb) - 1).ravel()
    counts = np.bincount(idx, minlength=len(rb))
    rows = []
    for sig in SIGMA_GRID_A:
        q = np.fft.ifft2(ft * np.exp(-2 * np.pi**2 * sig**2 * k2)).real.ravel()
        prof = np.bincount(idx, q, minlength=len(rb)) / np.maximum(counts, 1)
        filled = counts > 0
        rows.append(np.interp(rb, rb[filled], prof[filled]))
    table = np.asarray(rows)
    table[:, -1] = 0.0
    norm = (2 * np.pi * rb * table * PROFILE_DR_A).sum(axis=1, keepdims=True)
    return rb, table / norm


def column_profiles(r_A: np.ndarray, sigma_A: np.ndarray, wide: np.ndarray) -> np.ndarray:
    """Unit-integral column profile at distances r_A (m, P) for per-column σ (m,) and wide share (m,)."""
    m = r_A.shape[0]
    cols = np.repeat(np.arange(m), r_A.shape[1])
    return _profile_values(r_A.ravel(), sigma_A[cols], wide[cols]).reshape(r_A.shape)


def _profile_values(r: np.ndarray, sigma: np.ndarray, wide: np.ndarray) -> np.ndarray:
    """Bilinear lookup of the profile table at (σ, r), plus the wide Gaussian share; zero beyond the cut."""
    rb, table = profile_table()
    j = np.clip(sigma / (SIGMA_GRID_A[1] - SIGMA_GRID_A[0]), 0, len(SIGMA_GRID_A) - 1.001)
    j0 = np.floor(j).astype(int)
    fj = j - j0
    pos = np.clip(r / PROFILE_DR_A, 0, len(rb) - 1.001)
    i0 = np.floor(pos).astype(int)
    fi = pos - i0
    core = ((1 - fj) * ((1 - fi) * table[j0, i0] + fi * table[j0, i0 + 1])
            + fj * ((1 - fi) * table[j0 + 1, i0] + fi * table[j0 + 1, i0 + 1]))
    gw = np.exp(-r**2 / (2 * WIDE_SIGMA_A**2)) / (2 * np.pi * WIDE_SIGMA_A**2)
    gw = np.where(r < rb[-1], gw, 0.0)
    return (1 - wide) * core + wide * gw


def render(columns_yx_A: np.ndarray, scs_A2: np.ndarray, sigma_A: np.ndarray, wide: np.ndarray,
           shape: tuple[int, int], step_A: float, chunk: int = 256) -> np.ndarray:
    """Point-sampled ADF image (fraction of probe electrons) at scan positions (i·step, j·step)."""
    ny, nx = shape
    cut = PROFILE_RMAX_A
    yy, xx = np.meshgrid(np.arange(ny) * step_A, np.arange(nx) * step_A, indexing="ij")
    p = np.stack([yy.ravel(), xx.ravel()], axis=1)
    out = np.zeros(ny * nx)
    for a in range(0, len(columns_yx_A), chunk):
        c = columns_yx_A[a:a + chunk]
        r = np.sqrt(((p[None, :, :] - c[:, None, :]) ** 2).sum(-1))
        ic, ip = np.nonzero(r < cut)
        vals = _profile_values(r[ic, ip], sigma_A[a:a + chunk][ic], wide[a:a + chunk][ic])
        out += np.bincount(ip, vals * scs_A2[a:a + chunk][ic], minlength=ny * nx)
    return out.reshape(ny, nx)


# --- calibration against multislice ---------------------------------------------------------------
def fit_reference(image: np.ndarray, step_A: float, columns: np.ndarray) -> dict:
    """Fit σ and the wide share of a periodic Pt image; SCS per column from the image mean. Returns the fit."""
    from scipy.optimize import least_squares

    ny, nx = image.shape
    L = (ny * step_A, nx * step_A)
    scs = float(image.mean() * L[0] * L[1] / len(columns))
    yy, xx = np.meshgrid(np.arange(ny) * step_A, np.arange(nx) * step_A, indexing="ij")
    p = np.stack([yy.ravel(), xx.ravel()], axis=1)
    shifts = [(ty * L[0], tx * L[1]) for ty in (-2, -1, 0, 1, 2) for tx in (-2, -1, 0, 1, 2)]
    cyx = np.concatenate([columns[:, :2] + np.asarray(s) for s in shifts])
    r = np.sqrt(((p[None] - cyx[:, None]) ** 2).sum(-1))
    m = len(cyx)

    def model(x):
        prof = column_profiles(r, np.full(m, x[0]), np.full(m, x[1]))
        return scs * prof.sum(0).reshape(ny, nx)

    res = least_squares(lambda x: (model(x) - image).ravel(), [0.15, 0.05], bounds=([0.0, 0.0], [0.58, 0.9]))
    resid = model(res.x) - image
    return {"scs_A2": scs, "sigma_A": float(res.x[0]), "wide": float(res.x[1]),
            "rel_rms": float(np.sqrt((resid**2).mean()) / image.std())}


@functools.lru_cache(maxsize=2)
def calibration(path: str = str(REFERENCES)) -> dict:
    """Fit every calibration image; returns {'atoms': [...], 'scs_A2': [...], 'sigma_A': [...], 'wide': [...], ...}."""
    z = np.load(path, allow_pickle=False)
    rows = []
    for key in sorted({k.split("/")[0] for k in z.files}):
        if str(z[f"{key}/role"]) != "calibration":
            continue
        cols = z[f"{key}/columns"]
        fit = fit_reference(z[f"{key}/image"].astype(np.float64), float(z[f"{key}/step_A"]), cols)
        fit["atoms"] = float(np.median(cols[:, 2]))
        fit["key"] = key
        rows.append(fit)
    rows.sort(key=lambda f: f["atoms"])
    return {k: [f[k] for f in rows] for k in ("key", "atoms", "scs_A2", "sigma_A", "wide", "rel_rms")}


def column_model(atoms: np.ndarray, z_mean: np.ndarray, cal: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(SCS Å², σ Å, wide share) per column from the Pt calibration; log–log interpolation, power-law extrapolation."""
    n = np.clip(np.asarray(atoms, float), 0.5, None)
    ln, ls = np.log(cal["atoms"]), np.log(cal["scs_A2"])
    slope_lo = (ls[1] - ls[0]) / (ln[1] - ln[0])
    slope_hi = (ls[-1] - ls[-2]) / (ln[-1] - ln[-2])
    x = np.log(n)
    y = np.interp(x, ln, ls)
    y = np.where(x < ln[0], ls[0] + slope_lo * (x - ln[0]), y)
    y = np.where(x > ln[-1], ls[-1] + slope_hi * (x - ln[-1]), y)
    scs = np.exp(y) * (np.asarray(z_mean, float) / Z_PT) ** Z_EXPONENT
    sigma = np.interp(x, ln, cal["sigma_A"])
    wide = np.interp(x, ln, cal["wide"])
    return scs, sigma, wide


# --- scenes: column lists from the built-in samples -----------------------------------------------
def project_columns(sample, tol_A: float = 0.2) -> np.ndarray:
    """Atom columns along z: (n, 4) = mean y Å, mean x Å, atom count, mean Z (grouping within tol_A)."""
    from scipy.spatial import cKDTree

    xy = sample.positions_A[:, :2]

    tree = cKDTree(xy)
    pairs = tree.query_pairs(tol_A, output_type="ndarray")
    # union–find over close pairs
    parent = np.arange(len(xy))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(len(xy))])
    _, labels = np.unique(roots, return_inverse=True)
    n = np.bincount(labels)
    y = np.bincount(labels, xy[:, 1]) / n
    x = np.bincount(labels, xy[:, 0]) / n
    z = np.bincount(labels, sample.numbers.astype(float)) / n
    return np.column_stack([y, x, n, z])


@functools.lru_cache(maxsize=64)
def _sample_columns(name: str, params_items: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(columns, cell_A) of a built-in sample built with fixed params (seed 0)."""
    from tembench.registry import get_registry

    cls = get_registry().get("sample", name)
    sample = cls().build(cls.Params(**dict(params_items)), np.random.default_rng(0))
    return project_columns(sample), sample.cell_A.copy()


def sample_columns(name: str, **params) -> tuple[np.ndarray, np.ndarray]:
    cols, cell = _sample_columns(name, tuple(sorted(params.items())))
    return cols.copy(), cell.copy()


def _rotate(yx: np.ndarray, angle: float, centre: np.ndarray) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    d = yx - centre
    return np.column_stack([c * d[:, 0] - s * d[:, 1], s * d[:, 0] + c * d[:, 1]]) + centre


def _tile(cols: np.ndarray, cell_yx: np.ndarray, extent_A: float) -> np.ndarray:
    """Tile a periodic unit of columns over a square of half-width extent_A around the origin."""
    ny = int(math.ceil(extent_A / cell_yx[0])) + 1
    nx = int(math.ceil(extent_A / cell_yx[1])) + 1
    out = [cols + np.array([iy * cell_yx[0], ix * cell_yx[1], 0, 0])
           for iy in range(-ny, ny + 1) for ix in range(-nx, nx + 1)]
    return np.concatenate(out)


def make_scene(kind: str, rng: np.random.Generator, field_A: float) -> np.ndarray:
    """Columns (m, 4): y, x (Å, in a field [0, field_A)²), atoms, mean Z for one random scene."""
    R = RECIPE
    centre = np.array([field_A / 2, field_A / 2])
    if kind in ("pt_bulk", "srtio3"):
        if kind == "pt_bulk":
            unit, cell = sample_columns("pt_bulk", thickness_cells=1, lateral_cells=1)
            t = rng.uniform(*R["pt_bulk_atoms_per_column"])
        else:
            unit, cell = sample_columns("srtio3", repeat=(1, 1, 1))
            t = rng.uniform(*R["srtio3_cells"])
        cols = _tile(unit, np.array([cell[1], cell[0]]), field_A)
        counts = cols[:, 2] * t
        # rough surfaces / wedges: per-column thickness changes, so the net cannot rely on periodicity
        counts = counts * np.exp(rng.normal(0, R["column_count_jitter"] * rng.uniform(0, 1), len(cols)))
        grad = rng.normal(0, 0.3, 2) / max(field_A, 1.0)
        counts = counts * np.clip(1 + cols[:, :2] @ grad, 0.2, 3)
        cols[:, 2] = np.maximum(np.round(counts), 1)
        cols[:, :2] = _rotate(cols[:, :2], rng.uniform(0, math.pi / 2), np.zeros(2)) + centre
        cols[:, :2] += rng.uniform(0, 4, 2)
    elif kind == "pt_nanoparticle":
        d = int(rng.integers(R["nanoparticle_diameter_cells"][0], R["nanoparticle_diameter_cells"][1] + 1))
        cols, cell = sample_columns("pt_nanoparticle", diameter_cells=float(d), padding_A=2.0)
        cols[:, :2] -= cols[:, :2].mean(0)
        cols[:, :2] = _rotate(cols[:, :2], rng.uniform(0, 2 * math.pi), np.zeros(2))
        cols[:, :2] += centre + rng.uniform(-0.35, 0.35, 2) * field_A
    elif kind == "pt_edge_dislocation":
        t = int(rng.integers(R["dislocation_thickness_cells"][0], R["dislocation_thickness_cells"][1] + 1))
        size = float(max(30.0, field_A * 1.5))
        cols, cell = sample_columns("pt_edge_dislocation", size_x_A=size, size_y_A=size, thickness_cells=t,
                                    padding_A=0.0)
        core = cols[:, :2].mean(0)
        cols[:, :2] = _rotate(cols[:, :2] - core, rng.choice([0, 0.5, 1, 1.5]) * math.pi + rng.normal(0, 0.2),
                              np.zeros(2)) + centre + rng.uniform(-0.25, 0.25, 2) * field_A
    else:
        raise ValueError(f"unknown scene {kind!r}")
    keep = np.all((cols[:, :2] > -3.0) & (cols[:, :2] < field_A + 3.0), axis=1)
    return cols[keep]


# --- degradation through the registry -------------------------------------------------------------
def fit_params(cls, wanted: dict, step_A: float) -> dict:
    """Map wanted parameter values onto ``cls.Params`` as it is now: same name, or the _px ↔ _A twin."""
    fields = cls.Params.model_fields
    out = {}
    for key, value in wanted.items():
        # physical units first: a model may keep a deprecated _px field that only raises a migration error
        if key.endswith("_px") and key[:-3] + "_A" in fields:
            out[key[:-3] + "_A"] = value * step_A
        elif key in fields:
            out[key] = value
        elif key.endswith("_A") and key[:-2] + "_px" in fields:
            out[key[:-2] + "_px"] = value / step_A
        # otherwise the model no longer has this knob: leave it at its default
    return out


def adf_measurement(image: np.ndarray, step_A: float, energy_keV: float = 300.0):
    """A noise-free ``adf_image`` Measurement (scan_y, scan_x) as stem4d output: image gives it."""
    from tembench.types import Geometry, Measurement

    geo = Geometry(energy_keV=energy_keV, sampling_A=(step_A, step_A), scan_step_A=(step_A, step_A),
                   semiangle_mrad=21.1)
    return Measurement(kind="adf_image", data=np.asarray(image, np.float32), axes=("scan_y", "scan_x"), geometry=geo)


def noise_model(name: str):
    from tembench.registry import get_registry

    return get_registry().get("noise_model", name)


def apply_model(name: str, m, wanted: dict, rng: np.random.Generator):
    cls = noise_model(name)
    step = float(np.ravel(m.geometry.scan_step_A)[0])
    params = cls.Params(**fit_params(cls, wanted, step))
    return cls().apply(m, params, rng), params.model_dump()


def degrade(clean: np.ndarray, step_A: float, settings: dict, rng: np.random.Generator):
    """(noisy, target, record): the thesis chain on a noise-free image, target = α · source-broadened image."""
    m = adf_measurement(clean, step_A)
    m, p_src = apply_model("source_size", m, {"fwhm_A": settings["source_fwhm_A"], "boundary": "nearest"}, rng)
    broadened = np.asarray(m.data, np.float64)
    m, p_jit = apply_model("scan_jitter", m, settings["jitter"], rng)
    m, p_pmt = apply_model("scintillator_pmt", m, {"dose_e_per_A2": settings["dose_e_per_A2"], "output": "electrons"}, rng)
    alpha = float(m.geometry.extra.get("electrons_per_unit_intensity", settings["dose_e_per_A2"] * step_A**2))
    m, p_sm = apply_model("fast_scan_smear", m, settings["smear"], rng)
    record = {"source_size": p_src, "scan_jitter": p_jit, "scintillator_pmt": p_pmt, "fast_scan_smear": p_sm,
              "alpha": alpha}
    return np.asarray(m.data, np.float32), (alpha * broadened).astype(np.float32), record


def random_settings(rng: np.random.Generator) -> dict:
    R = RECIPE
    u = lambda lohi: float(rng.uniform(*lohi))  # noqa: E731
    return {
        "scan_step_A": u(R["scan_step_A"]),
        "source_fwhm_A": u(R["source_fwhm_A"]),
        "dose_e_per_A2": float(np.exp(rng.uniform(*np.log(R["dose_e_per_A2"])))),
        "jitter": {k: u(v) for k, v in R["jitter"].items()},
        "smear": {"model": R["smear"]["model"], "dwell_time_us": R["smear"]["dwell_time_us"],
                  "response_time_us": u(R["smear"]["response_time_us"])},
    }


def make_pair(rng: np.random.Generator, cal: dict, size: int | None = None):
    """One (noisy, target) training pair of size×size px, in electrons per pixel."""
    size = size or RECIPE["patch_px"]
    st = random_settings(rng)
    kinds = list(RECIPE["scenes"])
    kind = kinds[int(rng.choice(len(kinds), p=np.asarray(list(RECIPE["scenes"].values())) /
                                sum(RECIPE["scenes"].values())))]
    field = size * st["scan_step_A"]
    cols = make_scene(kind, rng, field)
    scs, sig, wide = column_model(cols[:, 2], cols[:, 3], cal)
    clean = render(cols[:, :2], scs, sig, wide, (size, size), st["scan_step_A"])
    noisy, target, _ = degrade(clean, st["scan_step_A"], st, rng)
    return noisy, target, kind


def make_dataset(n: int, seed: int, cal: dict, size: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    xs, ys, kinds = [], [], []
    for _ in range(n):
        x, y, k = make_pair(rng, cal, size)
        xs.append(x)
        ys.append(y)
        kinds.append(k)
    return np.stack(xs), np.stack(ys), kinds
