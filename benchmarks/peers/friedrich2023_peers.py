"""Ours (tembench_friedrich2023.columns.fit_columns) vs Atomap 0.4.2 on the same simulated ADF images.

Run: ``python benchmarks/peers/friedrich2023_peers.py [--side 18] [--repeats 30]``.
Image: Pt [001]-like square lattice of Gaussian columns (1.96 Å spacing, ρ = 0.40 Å, heights
0.5–1.5, ±0.05 Å jitter), 0.25 Å pixels, constant background 0.1, Poisson noise at ``dose`` counts
per unit height. Both methods start from true + N(0, 0.1 Å) positions (same starts). Ours: all
columns at once, per-column width, least squares. Atomap: ``refine_atom_positions_using_2d_gaussian``
(per-atom, mask radius 0.98 Å = half the spacing, neighbours not fitted jointly), run in its own
venv by ``friedrich2023_peer_worker.py`` with OMP/MKL/OPENBLAS threads = 1; ours also pinned to 1
thread (threadpoolctl). Times are fit-only wall times (Atomap: cold = first image incl. first-call
overheads, warm = median of the rest). SCS: ours 2πhσ², Atomap's Gaussian2D A (HyperSpy's A is already the
integral 2π·height·σxσy; px² → Å²) (Atomap has no background term, so its SCS absorbs background).
Precision: std over ``repeats`` noise realisations of the fitted x position / √CRLB(x) from our
``crlb`` at the true model (Poisson, same dose), median over the inner columns.
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


def run(side=18, repeats=30, dose=1e4, seed=0):
    from threadpoolctl import threadpool_limits
    from tembench_friedrich2023 import columns as C
    true, grid, x0, y0 = scene(side, dose=dose, seed=seed)
    step = grid.sampling_A[0]
    rng = np.random.default_rng(seed + 1)
    clean = true.image(grid) * dose
    imgs = np.stack([rng.poisson(clean).astype(np.float64) for _ in range(repeats)])
    n = len(x0)
    # ours
    ours = {"x": [], "y": [], "scs": [], "t": []}
    with threadpool_limits(1):
        for im in imgs:
            t = time.perf_counter()
            r = C.fit_columns(im / dose, grid, x0, y0)
            ours["t"].append(time.perf_counter() - t)
            m = r.model if hasattr(r, "model") else r
            ours["x"].append(m.x_A); ours["y"].append(m.y_A); ours["scs"].append(m.scs)
        cr = C.crlb(true, grid, dose)
    # atomap
    py = ensure_venv()
    if py is None:
        raise RuntimeError("Atomap venv unavailable")
    with tempfile.TemporaryDirectory() as td:
        f = Path(td) / "in.npz"
        np.savez(f, images=imgs, x0_px=x0 / step, y0_px=y0 / step, mask_radius_px=0.98 / step)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                   PYTHONWARNINGS="ignore")
        t = time.perf_counter()
        p = subprocess.run([str(py), str(WORKER), str(f)], capture_output=True, text=True, env=env)
        t_proc = time.perf_counter() - t
        if p.returncode:
            raise RuntimeError(p.stderr[-2000:])
        at = json.loads(p.stdout)
    ax = np.array(at["x"]) * step; ay = np.array(at["y"]) * step
    ascs = np.array(at["A"]) * step ** 2 / dose   # HyperSpy Gaussian2D A is the integrated volume (= 2π·height·σxσy)
    ox, oy, oscs = map(np.array, (ours["x"], ours["y"], ours["scs"]))
    tscs = true.scs
    lo, hi = 1.5 + 1.96, 1.5 + (side - 2) * 1.96   # inner columns (no edge effects)
    inner = (true.x_A > lo) & (true.x_A < hi) & (true.y_A > lo) & (true.y_A < hi)
    def mae(a, b): return float(np.mean(np.hypot(*(a - b)) [..., inner]))
    res = {
        "load": os.getloadavg(), "n_columns": n, "repeats": repeats, "dose_per_unit_height": dose,
        "ours_cold_s": ours["t"][0], "ours_warm_s": float(np.median(ours["t"][1:])),
        "atomap_cold_s": at["t_s"][0], "atomap_warm_s": float(np.median(at["t_s"][1:])),
        "atomap_process_s": t_proc,
        "pos_mae_ours_truth_A": float(np.mean(np.hypot(ox - true.x_A, oy - true.y_A)[:, inner])),
        "pos_mae_atomap_truth_A": float(np.mean(np.hypot(ax - true.x_A, ay - true.y_A)[:, inner])),
        "pos_mae_ours_atomap_A": float(np.mean(np.hypot(ox - ax, oy - ay)[:, inner])),
        "scs_ratio_atomap_over_ours_median": float(np.median((ascs / oscs)[:, inner])),
        "scs_relerr_ours_truth_median": float(np.median(np.abs(oscs / tscs - 1)[:, inner])),
        "scs_relerr_atomap_truth_median": float(np.median(np.abs(ascs / tscs - 1)[:, inner])),
        "scs_corr_atomap_ours": float(np.corrcoef(ascs.mean(0)[inner], oscs.mean(0)[inner])[0, 1]),
        "prec_x_ours_over_crlb": float(np.median((ox.std(0) / np.sqrt(cr.var_x_A2))[inner])),
        "prec_x_atomap_over_crlb": float(np.median((ax.std(0) / np.sqrt(cr.var_x_A2))[inner])),
        "prec_scs_ours_over_crlb": float(np.median((oscs.std(0) / np.sqrt(cr.var_scs))[inner])),
        "prec_scs_atomap_over_crlb": float(np.median((ascs.std(0) / np.sqrt(cr.var_scs))[inner])),
    }
    res["ours_cols_per_s"] = n / res["ours_warm_s"]
    res["atomap_cols_per_s"] = n / res["atomap_warm_s"]
    res["speed_ratio"] = res["ours_cols_per_s"] / res["atomap_cols_per_s"]
    return res


def table(r):
    rows = [("columns/s (warm, 1 thread)", f"{r['ours_cols_per_s']:.0f}", f"{r['atomap_cols_per_s']:.0f}"),
            (f"fit time {r['n_columns']} cols cold / warm (s)", f"{r['ours_cold_s']:.2f} / {r['ours_warm_s']:.2f}",
             f"{r['atomap_cold_s']:.2f} / {r['atomap_warm_s']:.2f}"),
            ("position MAE vs truth (Å)", f"{r['pos_mae_ours_truth_A']:.4f}", f"{r['pos_mae_atomap_truth_A']:.4f}"),
            ("SCS median |rel. err| vs truth", f"{r['scs_relerr_ours_truth_median']:.3f}", f"{r['scs_relerr_atomap_truth_median']:.3f}"),
            ("x precision / √CRLB (median)", f"{r['prec_x_ours_over_crlb']:.2f}", f"{r['prec_x_atomap_over_crlb']:.2f}"),
            ("SCS precision / √CRLB (median)", f"{r['prec_scs_ours_over_crlb']:.2f}", f"{r['prec_scs_atomap_over_crlb']:.2f}")]
    s = "| quantity | ours | Atomap 0.4.2 |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    s += (f"\n\nours/Atomap columns/s = {r['speed_ratio']:.1f}x; position MAE ours-Atomap {r['pos_mae_ours_atomap_A']:.4f} Å; "
          f"SCS Atomap/ours median {r['scs_ratio_atomap_over_ours_median']:.3f}, corr {r['scs_corr_atomap_ours']:.3f}; "
          f"{r['repeats']} Poisson repeats at {r['dose_per_unit_height']:.0e} counts/unit height; load {tuple(round(v, 2) for v in r['load'])}")
    return s


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", type=int, default=18)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--dose", type=float, default=1e4)
    a = ap.parse_args()
    r = run(a.side, a.repeats, a.dose)
    print(json.dumps(r, indent=1))
    print(table(r))
