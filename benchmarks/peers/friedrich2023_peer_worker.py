"""Atomap worker (runs under the Atomap venv's python): per-atom 2D Gaussian refinement on saved images.

Usage: ``python friedrich2023_peer_worker.py in.npz`` -> JSON on stdout. ``in.npz`` holds ``images``
(k, ny, nx) in counts, ``x0_px``/``y0_px`` (n,) starting positions in pixels. For every image the
same starts are refined with ``refine_atom_positions_using_2d_gaussian`` (1 thread; threads pinned
by the driver's environment). Returns fitted x, y (px), amplitude, sigma_x, sigma_y per image and the
wall time of each fit (first = cold: includes HyperSpy/Atomap first-call overheads), and the peak
RSS above the baseline after imports and loading (``peak_rss_MB``: VmHWM reset via
/proc/self/clear_refs, the same accounting as ``friedrich2023_ours_worker.py``).
"""
import json
import sys
import time

import numpy as np


def _status_kB(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def _reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def main(path):
    import atomap.api as am
    d = np.load(path)
    imgs, x0, y0 = d["images"], d["x0_px"], d["y0_px"]
    out = {"x": [], "y": [], "A": [], "sx": [], "sy": [], "t_s": []}
    ok = _reset_hwm()
    base = _status_kB("VmRSS")
    for img in imgs:
        sub = am.Sublattice(np.stack([x0, y0], 1), image=img.astype(np.float64))
        t = time.perf_counter()
        sub.refine_atom_positions_using_2d_gaussian(mask_radius=float(d["mask_radius_px"]), show_progressbar=False)
        out["t_s"].append(time.perf_counter() - t)
        out["x"].append(list(map(float, sub.x_position)))
        out["y"].append(list(map(float, sub.y_position)))
        out["A"].append([float(a.amplitude_gaussian) for a in sub.atom_list])
        out["sx"].append([float(a.sigma_x) for a in sub.atom_list])
        out["sy"].append([float(a.sigma_y) for a in sub.atom_list])
    out["peak_rss_MB"] = (_status_kB("VmHWM") - base) / 1024 if ok else float("nan")
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
