"""Ours (tembench_friedrich2023.columns.fit_columns) vs Atomap 0.4.2 on the same ADF images.

Run: ``python benchmarks/peers/friedrich2023_peers.py [--cases gauss,gauss_high,multislice]
[--side 18] [--tiles 4] [--repeats 30]``; prints one table per case.

Cases:

* ``gauss`` / ``gauss_high``: Pt [001]-like square lattice of Gaussian columns (1.96 Å spacing,
  ρ = 0.40 Å, heights 0.5–1.5, ±0.05 Å jitter), 0.25 Å pixels, background 0.1, Poisson noise at
  ``dose`` (1e4) / 100 × ``dose`` counts per unit height; CRLB at the true model.
* ``multislice`` / ``multislice_high``: our ``stem4d`` multislice HAADF image of Pt [001]
  (7 atoms per column, Table 2.1 optics: the held-out restoration reference in
  ``data/restore_multislice_v1.npz``), tiled ``tiles`` × ``tiles`` (periodic) and rolled by half a
  column spacing so no column is cut by the edge; 5e4 / 5e6 e/Å². Truth: the atoms' positions;
  CRLB and SCS truth at the non-negative Poisson-ML Gaussian fit of the noise-free counts (the
  rule of the ``crlb`` quantifier).

Equal work: both codes get the same noisy images, the same columns and the same starting
positions (true + N(0, 0.1 Å)), each in its own worker process with OMP/MKL/OPENBLAS threads = 1
(ours also threadpoolctl 1): ours ``friedrich2023_ours_worker.py`` (all columns jointly, per-column
width, least squares), Atomap ``friedrich2023_peer_worker.py`` in its own venv
(``refine_atom_positions_using_2d_gaussian``, mask radius = half the column spacing, each atom
alone in its mask). Times are fit-only wall times (cold = first image, warm = median of the
rest). Peak memory: the same accounting in both workers — the kernel's resident high-water mark
(VmHWM) is reset after imports and loading the images, and the peak RSS above that baseline over
all fits is reported. SCS: ours 2πhσ², Atomap's Gaussian2D A (HyperSpy's A is the integral
2π·height·σxσy; px² → Å²); Atomap fits no background, so its SCS absorbs background. Precision:
std over repeats of the fitted x / √CRLB(x), median over the inner columns.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VENV = Path.home() / ".cache/tembench/peers/atomap-0.4.2"
WORKER = Path(__file__).with_name("friedrich2023_peer_worker.py")
OURS_WORKER = Path(__file__).with_name("friedrich2023_ours_worker.py")


def ensure_venv() -> Path | None:
    py = VENV / "bin/python"
    if not py.exists():
        try:
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
            subprocess.run([str(py), "-m", "pip", "install", "-q", "atomap==0.4.2"], check=True)
        except Exception:
            return None
    return py


def scene(side=18, spacing=1.96, step=0.25, sigma=0.40, dose=1e4, seed=0, offset=0.1):
    from tembench_friedrich2023 import columns as C
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.arange(side) * spacing + 1.5, np.arange(side) * spacing + 1.5)
    n = side * side
    x, y = xs.ravel() + rng.normal(0, 0.05, n), ys.ravel() + rng.normal(0, 0.05, n)
    true = C.ColumnModel(x, y, rng.uniform(0.5, 1.5, n), np.full(n, sigma), [0.1])
    npx = int(((side - 1) * spacing + 3.0) / step) + 1
    grid = C.ImageGrid((npx, npx), (step, step))
    x0, y0 = x + rng.normal(0, offset, n), y + rng.normal(0, offset, n)
    return true, grid, x0, y0


def multislice_scene(tiles=4, dose_e_per_A2=5e4, seed=0, offset=0.1, key="pt_bulk_t7"):
    """Our stem4d multislice HAADF image of Pt [001] (7 atoms/column, Table 2.1 optics; the held-out
    restoration reference shipped in data/restore_multislice_v1.npz, 4×4 columns, periodic) tiled
    ``tiles``×``tiles``. The CRLB's model is the non-negative Poisson-ML fit of the noise-free counts
    from the true columns (the rule of the ``crlb`` quantifier); truth positions are the atoms'."""
    from tembench_friedrich2023 import columns as C
    from tembench_friedrich2023.restore_metrics import heldout_case

    case = heldout_case(key)                        # tiled 2×2 already
    clean1, step = case["clean"][: case["clean"].shape[0] // 2, : case["clean"].shape[1] // 2], case["step_A"]
    cols1 = case["columns"][:16]
    L = np.array(clean1.shape) * step
    # roll by half a column spacing (exact: the image is periodic) so no column is cut by the edge
    sh = int(round(0.5 * 1.96 / step))
    img = np.roll(np.tile(clean1, (tiles, tiles)), (sh, sh), axis=(0, 1))
    cols = np.concatenate([cols1 + L * np.array([ty, tx]) for ty in range(tiles) for tx in range(tiles)])
    cols = np.mod(cols + sh * step, L * tiles)
    y, x = cols[:, 0], cols[:, 1]
    grid = C.ImageGrid(img.shape, (step, step))
    scale = dose_e_per_A2 * step * step             # electrons per probe position = counts per unit fraction
    clean = img * scale
    # least squares first (fast on noise-free data), then the Poisson-ML refinement the crlb quantifier uses
    start = C.fit_columns(clean, grid, x, y, max_iter=50).model
    ref = C.fit_columns(clean, grid, init=start, loss="poisson", nonnegative=True, max_iter=30).model   # counts
    true_xy = (x, y)
    rng = np.random.default_rng(seed)
    n = len(x)
    x0, y0 = x + rng.normal(0, offset, n), y + rng.normal(0, offset, n)
    return {"name": f"multislice Pt[001] 7 at/col, {dose_e_per_A2:.0e} e/Å²", "clean": clean, "grid": grid,
            "scale": scale, "x0": x0, "y0": y0, "true_xy": true_xy, "true_scs": ref.scs / scale,
            "crlb_model": ref, "crlb_scale": 1.0, "spacing": 1.96}


def gauss_scene(side=18, dose=1e4, seed=0):
    true, grid, x0, y0 = scene(side, dose=dose, seed=seed)
    return {"name": f"Gaussians, {dose:.0e} counts/unit height", "clean": true.image(grid) * dose, "grid": grid,
            "scale": dose, "x0": x0, "y0": y0, "true_xy": (true.x_A, true.y_A), "true_scs": true.scs,
            "crlb_model": true, "crlb_scale": dose, "spacing": 1.96}


def _worker(py, script, f):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    t = time.perf_counter()
    p = subprocess.run([str(py), str(script), str(f)], capture_output=True, text=True, env=env)
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    return json.loads(p.stdout), time.perf_counter() - t


def run_case(sc, repeats=30, seed=0):
    """Ours and Atomap on the same noisy images from the same starts, each in its own worker process."""
    from tembench_friedrich2023 import columns as C
    grid = sc["grid"]
    step = grid.sampling_A[0]
    rng = np.random.default_rng(seed + 1)
    imgs = np.stack([rng.poisson(sc["clean"]).astype(np.float64) for _ in range(repeats)])
    n = len(sc["x0"])
    py = ensure_venv()
    if py is None:
        raise RuntimeError("Atomap venv unavailable")
    with tempfile.TemporaryDirectory() as td:
        f = Path(td) / "in.npz"
        np.savez(f, images=imgs, x0_px=sc["x0"] / step, y0_px=sc["y0"] / step, mask_radius_px=0.5 * sc["spacing"] / step,
                 step_A=step, counts_per_unit=sc["scale"])
        ours, t_ours_proc = _worker(sys.executable, OURS_WORKER, f)
        at, t_proc = _worker(py, WORKER, f)
    cr = C.crlb(sc["crlb_model"], grid, sc["crlb_scale"])
    var_scs = cr.var_scs / (1.0 if sc["crlb_scale"] != 1.0 else sc["scale"] ** 2)
    ax = np.array(at["x"]) * step; ay = np.array(at["y"]) * step
    ascs = np.array(at["A"]) * step ** 2 / sc["scale"]   # HyperSpy Gaussian2D A is the integrated volume
    ox, oy, oscs = (np.array(ours[k]) for k in ("x", "y", "scs"))
    tx, ty = sc["true_xy"]
    tscs = sc["true_scs"]
    sp = sc["spacing"]
    ext = np.array(grid.shape) * step
    inner = (tx > sp + 1.0) & (tx < ext[1] - sp - 1.0) & (ty > sp + 1.0) & (ty < ext[0] - sp - 1.0)
    res = {
        "case": sc["name"], "load": os.getloadavg(), "n_columns": n, "n_inner": int(inner.sum()), "repeats": repeats,
        "dose_per_unit_height": sc["scale"],
        "ours_cold_s": ours["t_s"][0], "ours_warm_s": float(np.median(ours["t_s"][1:])),
        "atomap_cold_s": at["t_s"][0], "atomap_warm_s": float(np.median(at["t_s"][1:])),
        "ours_process_s": t_ours_proc, "atomap_process_s": t_proc,
        "ours_peak_rss_MB": ours["peak_rss_MB"], "atomap_peak_rss_MB": at["peak_rss_MB"],
        "pos_mae_ours_truth_A": float(np.mean(np.hypot(ox - tx, oy - ty)[:, inner])),
        "pos_mae_atomap_truth_A": float(np.mean(np.hypot(ax - tx, ay - ty)[:, inner])),
        "pos_mae_ours_atomap_A": float(np.mean(np.hypot(ox - ax, oy - ay)[:, inner])),
        "scs_ratio_atomap_over_ours_median": float(np.median((ascs / oscs)[:, inner])),
        "scs_relerr_ours_truth_median": float(np.median(np.abs(oscs / tscs - 1)[:, inner])),
        "scs_relerr_atomap_truth_median": float(np.median(np.abs(ascs / tscs - 1)[:, inner])),
        "scs_corr_atomap_ours": float(np.corrcoef(ascs.mean(0)[inner], oscs.mean(0)[inner])[0, 1]),
        "prec_x_ours_over_crlb": float(np.median((ox.std(0, ddof=1) / np.sqrt(cr.var_x_A2))[inner])),
        "prec_x_atomap_over_crlb": float(np.median((ax.std(0, ddof=1) / np.sqrt(cr.var_x_A2))[inner])),
        "prec_scs_ours_over_crlb": float(np.median((oscs.std(0, ddof=1) / np.sqrt(var_scs))[inner])),
        "prec_scs_atomap_over_crlb": float(np.median((ascs.std(0, ddof=1) / np.sqrt(var_scs))[inner])),
    }
    res["ours_cols_per_s"] = n / res["ours_warm_s"]
    res["atomap_cols_per_s"] = n / res["atomap_warm_s"]
    res["speed_ratio"] = res["ours_cols_per_s"] / res["atomap_cols_per_s"]
    return res


def run(side=18, repeats=30, dose=1e4, seed=0):
    """The synthetic-Gaussian case (kept for benchmarks/test_friedrich_atomap.py)."""
    return run_case(gauss_scene(side, dose, seed), repeats, seed)


def table(r):
    rows = [("columns/s (warm, 1 thread)", f"{r['ours_cols_per_s']:.0f}", f"{r['atomap_cols_per_s']:.0f}"),
            (f"fit time {r['n_columns']} cols cold / warm (s)", f"{r['ours_cold_s']:.2f} / {r['ours_warm_s']:.2f}",
             f"{r['atomap_cold_s']:.2f} / {r['atomap_warm_s']:.2f}"),
            ("peak RSS over the fits (MB)", f"{r['ours_peak_rss_MB']:.1f}", f"{r['atomap_peak_rss_MB']:.1f}"),
            ("position MAE vs truth (Å)", f"{r['pos_mae_ours_truth_A']:.4f}", f"{r['pos_mae_atomap_truth_A']:.4f}"),
            ("SCS median |rel. err| vs truth", f"{r['scs_relerr_ours_truth_median']:.3f}", f"{r['scs_relerr_atomap_truth_median']:.3f}"),
            ("x precision / √CRLB (median)", f"{r['prec_x_ours_over_crlb']:.2f}", f"{r['prec_x_atomap_over_crlb']:.2f}"),
            ("SCS precision / √CRLB (median)", f"{r['prec_scs_ours_over_crlb']:.2f}", f"{r['prec_scs_atomap_over_crlb']:.2f}")]
    s = f"**{r.get('case', '')}**\n\n| quantity | ours | Atomap 0.4.2 |\n|---|---|---|\n" + "\n".join(
        f"| {a} | {b} | {c} |" for a, b, c in rows)
    s += (f"\n\nours/Atomap columns/s = {r['speed_ratio']:.1f}x; position MAE ours-Atomap {r['pos_mae_ours_atomap_A']:.4f} Å; "
          f"SCS Atomap/ours median {r['scs_ratio_atomap_over_ours_median']:.3f}, corr {r['scs_corr_atomap_ours']:.3f}; "
          f"{r['repeats']} Poisson repeats, {r['n_inner']} inner columns scored, {r['dose_per_unit_height']:.3g} counts/unit; "
          f"load {tuple(round(v, 2) for v in r['load'])}")
    return s


CASES = {
    "gauss": lambda a: gauss_scene(a.side, a.dose),
    "gauss_high": lambda a: gauss_scene(a.side, 100 * a.dose),
    "multislice": lambda a: multislice_scene(a.tiles, 5e4),
    "multislice_high": lambda a: multislice_scene(a.tiles, 5e6),
}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", type=int, default=18)
    ap.add_argument("--tiles", type=int, default=4, help="multislice: tiles of the 4×4-column image")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--dose", type=float, default=1e4)
    ap.add_argument("--cases", default="gauss,gauss_high,multislice", help=f"comma list of {sorted(CASES)}")
    a = ap.parse_args()
    for name in a.cases.split(","):
        r = run_case(CASES[name](a), a.repeats)
        print(json.dumps(r, indent=1), file=sys.stderr)
        print(table(r), flush=True)
        print()
