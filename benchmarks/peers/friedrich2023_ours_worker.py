"""Our column fit as a worker process, the mirror of ``friedrich2023_peer_worker.py`` (Atomap).

Usage: ``python friedrich2023_ours_worker.py in.npz`` -> JSON on stdout. Same input file, same
starting positions, one thread (threadpoolctl + the driver's OMP/MKL/OPENBLAS = 1), and the same
memory accounting as the Atomap worker: after imports and loading the images the kernel's resident
high-water mark is reset (``/proc/self/clear_refs``), and the peak RSS above that baseline over
all fits is reported (``peak_rss_MB``).
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
    from threadpoolctl import threadpool_limits

    from tembench_friedrich2023 import columns as C

    d = np.load(path)
    imgs, x0, y0 = d["images"], d["x0_px"], d["y0_px"]
    step, scale = float(d["step_A"]), float(d["counts_per_unit"])
    grid = C.ImageGrid(imgs.shape[1:], (step, step))
    out = {"x": [], "y": [], "scs": [], "t_s": []}
    ok = _reset_hwm()
    base = _status_kB("VmRSS")
    with threadpool_limits(1):
        for img in imgs:
            t = time.perf_counter()
            r = C.fit_columns(img / scale, grid, x0 * step, y0 * step)
            out["t_s"].append(time.perf_counter() - t)
            out["x"].append(r.model.x_A.tolist())
            out["y"].append(r.model.y_A.tolist())
            out["scs"].append(r.model.scs.tolist())
    out["peak_rss_MB"] = (_status_kB("VmHWM") - base) / 1024 if ok else float("nan")
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
