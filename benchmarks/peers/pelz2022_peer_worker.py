"""Worker run in a separate process: one method of one implementation on saved 4D-STEM data.

    python pelz2022_peer_worker.py {ours|py4dstem} {ssb|dpc} DATA.npz OUT.npz

The libraries are imported first (``import_s``; their import footprint is not "memory on the
problem"). Prints one JSON line: ``cold_s`` (first call: numba compilation, caches), ``warm_s``
(median of 5 further calls), and memory above the state after import and data load:
``peak_MB`` = peak traced (numpy/Python, tracemalloc) allocations of one warm call plus the peak
proportional set size (PSS) of any child processes the call starts (py4DSTEM's SSB forks an mpire
pool of cpu_count() workers), ``cold_peak_MB`` the traced peak of the cold call, ``tree_pss_MB``
the sampled peak PSS of the whole process tree during a warm call minus its value before. py4DSTEM
runs in its own virtual environment (numpy 1.26); nothing of it is imported by tembench.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
import tracemalloc

import numpy as np


def _rss_MB() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_MB() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out += [int(c) for c in fh.read().split()]
    except OSError:
        pass
    return out + [g for c in out for g in _children(c)]


def _pss_MB(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class _TreeSampler:
    """Peak PSS of this process and its descendants (and of the descendants alone), sampled every 5 ms."""

    def __init__(self):
        self.peak_tree = self.peak_children = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = os.getpid()
        while not self._stop.is_set():
            kids = sum(_pss_MB(c) for c in _children(me))
            self.peak_children = max(self.peak_children, kids)
            self.peak_tree = max(self.peak_tree, kids + _pss_MB(me))
            self._stop.wait(0.005)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def import_ours():
    from tembench.types import Geometry, Measurement  # noqa: F401
    from tembench_pelz2022 import dpc, ssb  # noqa: F401


def import_py4dstem():
    import py4DSTEM  # noqa: F401


def run_ours(method, d):
    from tembench.types import Geometry, Measurement
    from tembench_pelz2022 import dpc, ssb

    geo = Geometry(energy_keV=float(d["energy_keV"]), semiangle_mrad=float(d["semiangle_mrad"]),
                   scan_step_A=(float(d["step_A"]),) * 2, detector_sampling_mrad=(float(d["det_mrad"]),) * 2,
                   aberrations_A={}, defocus_A=[0.0])
    m = Measurement(kind="4dstem", data=d["data"], axes=("scan_y", "scan_x", "k_y", "k_x"), geometry=geo)
    if method == "ssb":
        return ssb.SSB().reconstruct(m, ssb.SSB.Params(normalization="sum"), np).data
    return dpc.DPC().reconstruct(m, dpc.DPC.Params(padding_factor=2.0, n_iter=64), np).data


def run_py4dstem(method, d):
    import py4DSTEM

    dc = py4DSTEM.DataCube(data=d["data"])
    dc.calibration.set_R_pixel_size(float(d["step_A"]))
    dc.calibration.set_R_pixel_units("A")
    dc.calibration.set_Q_pixel_size(float(d["det_mrad"]))
    dc.calibration.set_Q_pixel_units("mrad")
    if method == "ssb":
        r = py4DSTEM.process.phase.SSB(energy=float(d["energy_keV"]) * 1e3, datacube=dc,
                                       semiangle_cutoff=float(d["semiangle_mrad"]), verbose=False, device="cpu")
        r.preprocess(plot_center_of_mass=None, plot_rotation=False, plot_overlap_trotters=False,
                     force_com_rotation=0.0, force_com_transpose=False)
        r.reconstruct(progress_bar=False)
        return np.angle(np.asarray(r.object))
    r = py4DSTEM.process.phase.DPC(datacube=dc, energy=float(d["energy_keV"]) * 1e3, verbose=False, device="cpu")
    r.preprocess(plot_center_of_mass=None, plot_rotation=False, force_com_rotation=0.0, force_com_transpose=False)
    r.reconstruct(max_iter=64, progress_bar=False, gaussian_filter=False, butterworth_filter=False)
    return np.asarray(r.object_phase)


def main(argv):
    impl, method, data_path, out_path = argv
    d = dict(np.load(data_path))
    t0 = time.perf_counter()
    (import_ours if impl == "ours" else import_py4dstem)()
    t_import = time.perf_counter() - t0
    fn = run_ours if impl == "ours" else run_py4dstem
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    phase = fn(method, d)
    cold = time.perf_counter() - t0
    cold_peak = (tracemalloc.get_traced_memory()[1] - base) / 2**20
    tracemalloc.stop()
    warm = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn(method, d)
        warm.append(time.perf_counter() - t0)
    # memory of one warm call: traced allocations, and PSS of the process tree (children included)
    before = _pss_MB(os.getpid())
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    with _TreeSampler() as tree:
        fn(method, d)
    traced = (tracemalloc.get_traced_memory()[1] - base) / 2**20
    tracemalloc.stop()
    np.savez(out_path, phase=np.asarray(phase, dtype=np.float64))
    print(json.dumps({"impl": impl, "method": method, "import_s": t_import, "cold_s": cold,
                      "warm_s": float(np.median(warm)), "warm_min_s": min(warm),
                      "peak_MB": traced + tree.peak_children, "traced_MB": traced,
                      "children_pss_MB": tree.peak_children, "cold_peak_MB": cold_peak,
                      "tree_pss_MB": max(tree.peak_tree - before, 0.0),
                      "max_rss_MB": _peak_MB(), "rss_after_MB": _rss_MB()}))


if __name__ == "__main__":
    main(sys.argv[1:])
