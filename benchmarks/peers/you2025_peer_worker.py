"""Worker run in a separate process: multislice ptychography of saved 4D-STEM data by one implementation.

    python you2025_peer_worker.py {ours|py4dstem} DATA.npz OUT.npz [OPTIONS_JSON]

OPTIONS_JSON: msp parameters for ours; ``seed`` (both: ours' MSPParams.seed, py4DSTEM's numpy global seed
before preprocess — its extra probe modes start with random phase ramps — and ``seed_random``);
``quality_only`` (skip the memory runs).

Both implementations get the same patterns, positions, defocus, slices, slice thickness, probe modes,
minibatch size and iteration count (the initial probe: py4DSTEM's from the aperture ``semiangle_cutoff``,
ours from the mean pattern's bright-field disc as Alg. 1); positions are not refined; the probe is
refined from the first iteration; no regularising filters (py4DSTEM: Gaussian/Butterworth/kz/TV filters,
positivity and baseline fixing off); real potential (py4DSTEM ``object_type="potential"``, ours
``reconstruct_absorption: false``). Prints one JSON line: setup/preprocess time, reconstruction time,
time per iteration (an untraced run; wall and CPU time of this process), and memory above the state after
import and data load of runs of 2 iterations: ``peak_MB`` = ``traced_MB`` = tracemalloc's peak (numpy and Python allocations, pyFFTW
buffers included), ``rss_peak_MB`` = the kernel's resident high-water mark above the RSS before the run
(reset through ``/proc/self/clear_refs``; includes FFT library scratch and allocator slack). One thread:
neither code starts child processes.
py4DSTEM runs in its own virtual environment (numpy 1.26); nothing of it is imported by tembench.
"""

from __future__ import annotations

import gc
import json
import sys
import time
import tracemalloc

import numpy as np


def _status_kB(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_hwm() -> bool:
    """Reset the kernel's resident high-water mark (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


OURS_OPTIONS: dict = {}


def run_ours(d):
    from tembench.types import Geometry
    from tembench_you2025.msp import MSPParams, reconstruct_msp

    t0 = time.perf_counter()
    geo = Geometry(energy_keV=float(d["energy_keV"]), semiangle_mrad=float(d["semiangle_mrad"]),
                   detector_sampling_mrad=(float(d["det_mrad"]),) * 2, aberrations_A={"C10": -float(d["defocus_A"])},
                   defocus_A=[float(d["defocus_A"])])
    p = MSPParams(n_slices=int(d["n_slices"]), slice_thickness_A=float(d["slice_A"]),
                  n_iterations=int(d["n_iter"]), batch_size=int(d["batch"]), n_probe_modes=int(d["n_modes"]),
                  start_probe_iter=0, start_position_iter=None, reconstruct_absorption=False,
                  **{"seed": 0, **OURS_OPTIONS})
    pats = d["data"].reshape(-1, *d["data"].shape[-2:])
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = reconstruct_msp(pats, d["positions_A"], geo, p, xp=np)
    total = time.perf_counter() - t0
    sl_y, sl_x, origin = r.scan_region(d["positions_A"])
    proj = r.projection()[sl_y, sl_x]
    return proj, setup, total, {"origin_A": origin, "final_loss_relative": r.history["loss_relative"][-1]}


def run_py4dstem(d):
    import py4DSTEM

    # preprocess draws the extra probe modes' random phase ramps from numpy's global generator: seed it
    np.random.seed(int(OURS_OPTIONS.get("seed", 0)))
    t0 = time.perf_counter()
    dc = py4DSTEM.DataCube(data=d["data"])
    dc.calibration.set_R_pixel_size(float(d["step_A"]))
    dc.calibration.set_R_pixel_units("A")
    dc.calibration.set_Q_pixel_size(float(d["det_mrad"]))
    dc.calibration.set_Q_pixel_units("mrad")
    r = py4DSTEM.process.phase.MixedstateMultislicePtychography(
        energy=float(d["energy_keV"]) * 1e3, num_slices=int(d["n_slices"]), slice_thicknesses=float(d["slice_A"]),
        num_probes=int(d["n_modes"]), datacube=dc, semiangle_cutoff=float(d["semiangle_mrad"]),
        polar_parameters={"C10": -float(d["defocus_A"])}, object_type="potential", verbose=False, device="cpu")
    r.preprocess(plot_center_of_mass=False, plot_rotation=False, plot_probe_overlaps=False, force_com_rotation=0.0,
                 force_com_transpose=False, fit_function="constant")
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    r.reconstruct(num_iter=int(d["n_iter"]), max_batch_size=int(d["batch"]), progress_bar=False, reset=True,
                  seed_random=int(OURS_OPTIONS.get("seed", 0)), gaussian_filter=False, butterworth_filter=False,
                  kz_regularization_filter=False,
                  tv_denoise=False, tv_denoise_chambolle=False, object_positivity=False, fix_potential_baseline=False,
                  fix_positions=True, fix_probe=False)
    total = time.perf_counter() - t0
    obj = np.asarray(r.object).sum(axis=0)  # projected potential (its units), (x, y) = our (y, x)
    pos_px = np.asarray(r._positions_px)  # initial positions in object pixels
    lo = np.ceil(pos_px.min(axis=0) - 1e-6).astype(int)
    hi = np.floor(pos_px.max(axis=0) + 1e-6).astype(int) + 1
    return obj[lo[0]:hi[0], lo[1]:hi[1]], setup, total, {"final_error": float(r.error)}


def main(argv):
    impl, data_path, out_path = argv[:3]
    if len(argv) > 3:
        OURS_OPTIONS.update(json.loads(argv[3]))
    quality_only = bool(OURS_OPTIONS.pop("quality_only", False))
    d = dict(np.load(data_path))
    fn = run_ours if impl == "ours" else run_py4dstem
    if impl == "ours":
        import tembench_you2025.msp  # noqa: F401  (import footprint is not memory on the problem)
    else:
        import py4DSTEM  # noqa: F401
    # 1) timed run, untraced (tracemalloc would slow both codes unevenly)
    c0 = time.process_time()
    proj, setup, total, info = fn(d)
    cpu = time.process_time() - c0 - setup
    np.savez(out_path, projection=np.asarray(proj, dtype=np.float64))
    if quality_only:
        print(json.dumps({"impl": impl, "per_iteration_s": total / int(d["n_iter"]), "options": OURS_OPTIONS}))
        return
    # 2) memory: a run of 2 iterations (the peak is reached in the first), twice: the resident high-water
    #    mark above the RSS before it (everything, FFT internals included), then traced by tracemalloc
    #    (numpy/Python allocations only)
    d2 = {**d, "n_iter": np.array(min(2, int(d["n_iter"])))}
    gc.collect()
    rss_before = _status_kB("VmRSS")
    hwm_ok = _reset_hwm()
    fn(d2)
    rss_peak = (_status_kB("VmHWM") - rss_before) / 1024 if hwm_ok else float("nan")
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    fn(d2)
    traced = (tracemalloc.get_traced_memory()[1] - base) / 2**20
    tracemalloc.stop()
    n_iter = int(d["n_iter"])
    print(json.dumps({"impl": impl, "setup_s": setup, "reconstruct_s": total, "per_iteration_s": total / n_iter,
                      "cpu_per_iteration_s": cpu / n_iter, "options": OURS_OPTIONS,
                      "peak_MB": traced, "traced_MB": traced, "rss_peak_MB": rss_peak, **info}))


if __name__ == "__main__":
    main(sys.argv[1:])
