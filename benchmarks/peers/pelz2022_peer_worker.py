"""Worker run in a separate process: one method of one implementation on saved 4D-STEM data.

    python pelz2022_peer_worker.py {ours|py4dstem} {ssb|dpc} DATA.npz OUT.npz

Prints one JSON line: cold and warm wall time (s), the peak of traced (numpy/Python) memory
during the cold call (MB, tracemalloc: allocations of this process only — py4DSTEM's SSB also
forks an mpire worker pool whose memory is not counted) and the resident-set high-water mark. py4DSTEM runs in its own virtual environment (numpy
1.26); nothing of it is imported by tembench.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import tracemalloc

import numpy as np


def _rss_MB() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_MB() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    fn = run_ours if impl == "ours" else run_py4dstem
    tracemalloc.start()
    t0 = time.perf_counter()
    phase = fn(method, d)
    cold = time.perf_counter() - t0
    _, peak_traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak = peak_traced / 2**20
    warm = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn(method, d)
        warm.append(time.perf_counter() - t0)
    np.savez(out_path, phase=np.asarray(phase, dtype=np.float64))
    print(json.dumps({"impl": impl, "method": method, "cold_s": cold, "warm_s": min(warm), "peak_MB": peak,
                      "max_rss_MB": _peak_MB(), "rss_after_MB": _rss_MB()}))


if __name__ == "__main__":
    main(sys.argv[1:])
