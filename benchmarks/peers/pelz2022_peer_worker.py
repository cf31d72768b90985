"""Worker run in a separate process: one method of one implementation on saved 4D-STEM data.

    python pelz2022_peer_worker.py {ours|py4dstem} {ssb|dpc|eer_com} DATA.npz OUT.npz OPTIONS_JSON

Both implementations do the same work, set by ``OPTIONS_JSON`` (see ``pelz2022_peers.py``):

- ``ssb``: ours with ``bin_factor=1`` and the crop window chosen to match py4DSTEM's bright-field
  crop (``crop_margin``) and no bad-pixel detection (py4DSTEM has none), or all our defaults
  (``"ours_default": true``: binning, bad-pixel detection); py4DSTEM
  ``preprocess(crop_around_bf_disk=True)``. ``warm_s`` = the whole call from the raw 4D array to
  the phase; ``step_s`` = the reconstruction step alone: given the scan-Fourier-transformed data
  G(k, K), the reduction over the double-overlap lunes and the inverse transform
  (ours ``SSBData.phase``, py4DSTEM ``SSB.reconstruct``).
- ``dpc``: both start from the COM of the same data with the rotation given; ``n_iter`` iterations
  exactly (py4DSTEM ``backtrack=False, stopping_criterion=0``; ours ``tol=1e-30`` and no bad-pixel
  detection) or each code's defaults (``"default_stop": true``: stopping rules; ours detects and
  repairs bad detector pixels). Iterations used are reported. ``step_s`` = the
  iterative integration alone (ours ``iterative_dpc``, py4DSTEM ``DPC.reconstruct``).
- ``eer_com`` (ours only): the same Poisson counts as dense float32 and as electron events, the
  same detector; COM of both.

Times: median and fastest wall time of ``repeats`` warm calls, and the fastest CPU time of the
process (``time.process_time``, all its threads; with one thread and no workers this is the work
itself, insensitive to other jobs on the cores). Threads: ``"threads": 1`` sets every pool to one thread (the caller also sets the OpenMP/BLAS/numba
environment variables) and py4DSTEM's SSB ``num_jobs=1`` (no forked workers); ``"all"`` leaves the
defaults (py4DSTEM's SSB forks an mpire pool of cpu_count() workers).

Memory (the same accounting for both): ``peak_MB`` = the main process's peak resident set during
one warm whole call above its resident set just before it (the kernel's high-water mark, reset
through ``/proc/self/clear_refs``; after the timings glibc is set to mmap every buffer above one
page and to return freed memory at once, the same for both, so the resident set follows the live
allocations) plus the sampled peak unique set size (USS) of any child processes (0 at one thread).
``traced_MB`` = tracemalloc's peak of a warm call (numpy/Python allocations only; FFT and numba
internals are not traced). Prints one JSON line.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
import time
import tracemalloc

import numpy as np


def _status_kB(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out += [int(c) for c in fh.read().split()]
    except OSError:
        pass
    return out + [g for c in out for g in _children(c)]


def _uss_MB(pid: int) -> float:
    tot = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    tot += int(line.split()[1])
    except OSError:
        pass
    return tot / 1024


class _ChildSampler:
    """Peak summed USS of this process's descendants, sampled every 5 ms."""

    def __init__(self):
        self.peak = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = os.getpid()
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(_uss_MB(c) for c in _children(me)))
            self._stop.wait(0.005)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def exact_rss_accounting() -> None:
    """Make glibc mmap every buffer above one page and return freed memory at once, and release
    what is free now: from here on the resident set follows the live allocations (call after timing)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 4096)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 4096)  # M_TRIM_THRESHOLD
    gc.collect()
    libc.malloc_trim(0)


def peak_memory(fn) -> tuple[float, float]:
    """(main-process peak RSS above the pre-call RSS, peak children USS) in MB during fn()."""
    gc.collect()
    before = _status_kB("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    with _ChildSampler() as kids:
        fn()
    return (_status_kB("VmHWM") - before) / 1024, kids.peak


# --- ours --------------------------------------------------------------------------------------
def _measurement(d):
    from tembench.types import Geometry, Measurement

    geo = Geometry(energy_keV=float(d["energy_keV"]), semiangle_mrad=float(d["semiangle_mrad"]),
                   scan_step_A=(float(d["step_A"]),) * 2, detector_sampling_mrad=(float(d["det_mrad"]),) * 2,
                   aberrations_A={}, defocus_A=[0.0])
    return Measurement(kind="4dstem", data=d["data"], axes=("scan_y", "scan_x", "k_y", "k_x"), geometry=geo)


def _ssb_params(opt):
    from tembench_pelz2022 import ssb

    kw = {"rotation_deg": float(opt.get("rotation_deg", 0.0))}
    if not opt.get("ours_default"):
        kw.update(bin_factor=1, crop_margin=float(opt["crop_margin"]))
        _equal_work_checks(ssb.SSB.Params, kw)
    return ssb.SSB.Params(**kw)


def _equal_work_checks(params_cls, kw: dict) -> None:
    """py4DSTEM has no bad-detector-pixel detection: switch ours off for the equal-work rows (if present)."""
    if "bad_pixels" in params_cls.model_fields:
        kw["bad_pixels"] = "ignore"


def ours_ssb(d, opt):
    from tembench_pelz2022 import ssb

    m = _measurement(d)
    p = _ssb_params(opt)
    rec = [None]

    def whole():
        rec[0] = ssb.SSB().reconstruct(m, p, np)

    def prepared():
        """The SSBData (G computed) exactly as SSB.reconstruct builds it, for timing the reduction alone."""
        from tembench_pelz2022.common import load_4d, probe_optics, scan_step

        x, grid = load_4d(m, "ssb")
        opt_ = probe_optics(m.geometry, "ssb", p.aberrations_A, p.defocus_A)
        return ssb.prepare(x, grid, opt_, scan_step(m.geometry, "ssb"), p.max_detector_px, p.bin_factor,
                           p.crop_margin, p.rotation_deg)

    def step():
        try:
            data = prepared()
            kw = {k: getattr(p, k) for k in ("numba", "normalization") if hasattr(p, k)}
            return lambda: data.phase(**kw)
        except Exception as exc:  # the SSB internals changed: report the whole call only
            print(f"ssb step alone unavailable: {exc!r}", file=sys.stderr)
            return None
    info = lambda: {"detector_px": list(rec[0].extras.get("detector_shape_used", [])) if rec[0] is not None else None,  # noqa: E731
                    "params": p.model_dump()}
    return whole, step, lambda: rec[0].data, info


def ours_dpc(d, opt):
    from tembench_pelz2022 import dpc

    m = _measurement(d)
    n_iter = int(opt.get("n_iter", 64))
    kw = dict(rotation_deg=float(opt.get("rotation_deg", 0.0)), padding_factor=2.0, n_iter=n_iter)
    if not opt.get("default_stop"):
        kw["tol"] = 1e-30  # never stops early: exactly n_iter iterations
        _equal_work_checks(dpc.DPC.Params, kw)
    p = dpc.DPC.Params(**kw)
    rec = [None]

    def whole():
        rec[0] = dpc.DPC().reconstruct(m, p, np)

    def step():
        gy, gx, step_A, _ = dpc._gradients(dpc.DPC(), m, p)
        return lambda: dpc.iterative_dpc(gy, gx, step_A, p.step_size, p.n_iter, p.lambda1_per_A2, p.lambda2_A2,
                                         p.padding_factor, p.tol)

    info = lambda: {"iterations": len(rec[0].history["residual"]), "params": p.model_dump()}  # noqa: E731
    return whole, step, lambda: rec[0].data, info


# --- py4DSTEM ----------------------------------------------------------------------------------
def _datacube(d):
    import py4DSTEM

    dc = py4DSTEM.DataCube(data=d["data"])
    dc.calibration.set_R_pixel_size(float(d["step_A"]))
    dc.calibration.set_R_pixel_units("A")
    dc.calibration.set_Q_pixel_size(float(d["det_mrad"]))
    dc.calibration.set_Q_pixel_units("mrad")
    return dc


def py4dstem_ssb(d, opt):
    import py4DSTEM

    num_jobs = 1 if opt.get("threads") == 1 else None
    rot = -float(opt.get("rotation_deg", 0.0))  # py4DSTEM's rotation sign is the opposite of ours
    state = {}

    def pre():
        r = py4DSTEM.process.phase.SSB(energy=float(d["energy_keV"]) * 1e3, datacube=_datacube(d),
                                       semiangle_cutoff=float(d["semiangle_mrad"]), verbose=False, device="cpu")
        r.preprocess(plot_center_of_mass=None, plot_rotation=False, plot_overlap_trotters=False,
                     force_com_rotation=rot, force_com_transpose=False)
        return r

    def whole():
        r = pre()
        r.reconstruct(progress_bar=False, num_jobs=num_jobs)
        state["r"] = r

    def step():
        r0 = pre()
        return lambda: r0.reconstruct(progress_bar=False, num_jobs=num_jobs)
    info = lambda: {"detector_px": [int(n) for n in state["r"]._intensities_shape], "num_jobs": num_jobs}  # noqa: E731
    return whole, step, lambda: np.angle(np.asarray(state["r"].object)), info


def py4dstem_dpc(d, opt):
    import py4DSTEM

    rot = -float(opt.get("rotation_deg", 0.0))
    n_iter = int(opt.get("n_iter", 64))
    kw = dict(max_iter=n_iter, progress_bar=False, gaussian_filter=False, butterworth_filter=False)
    if not opt.get("default_stop"):
        kw.update(backtrack=False, stopping_criterion=0.0)  # exactly n_iter forward+adjoint updates
    state = {}

    def pre():
        r = py4DSTEM.process.phase.DPC(datacube=_datacube(d), energy=float(d["energy_keV"]) * 1e3, verbose=False,
                                       device="cpu")
        r.preprocess(plot_center_of_mass=None, plot_rotation=False, force_com_rotation=rot, force_com_transpose=False,
                     padding_factor=2)
        return r

    def whole():
        r = pre()
        r.reconstruct(reset=True, **kw)
        state["r"] = r

    def step():
        r0 = pre()
        return lambda: r0.reconstruct(reset=True, **kw)

    def info():
        r = state["r"]
        # accepted updates; with backtracking each rejected step (error rose) also cost a forward pass
        # and halved the step size from 0.5
        halvings = int(round(np.log2(0.5 / float(r._step_size)))) if r._step_size > 0 else 0
        return {"iterations": len(r.error_iterations), "rejected_steps": halvings,
                "step_size_final": float(r._step_size),
                "params": {k: v for k, v in kw.items() if k != "progress_bar"}}

    return whole, step, lambda: np.asarray(state["r"].object_phase), info


# --- event-based COM (ours: events vs dense) ---------------------------------------------------
def eer_com(opt, out_path):
    from tembench.eer import ElectronEvents
    from tembench_pelz2022 import eer_ops
    from tembench_pelz2022.eer_ops import DetectorGrid

    det, scan, e_px = int(opt["det"]), int(opt["scan"]), float(opt["e_per_px"])
    rng = np.random.default_rng(int(opt.get("seed", 0)))
    yy, xx = np.mgrid[:det, :det]
    r = np.hypot(yy - det // 2, xx - det // 2)
    p = (r < det / 4) + 0.05 * (r >= det / 4)
    lam = p / p.sum() * e_px * det * det
    dense = rng.poisson(np.broadcast_to(lam, (scan, scan, det, det))).astype(np.float32)
    ev = ElectronEvents.from_dense(dense)
    grid = DetectorGrid((det, det), (det // 2, det // 2), (1.0, 1.0))
    f_ev = lambda: eer_ops.center_of_mass(ev, grid)  # noqa: E731
    f_dense = lambda: eer_ops.center_of_mass(dense, grid)  # noqa: E731
    res = {"events": int(ev.n_events), "frames": int(ev.n_frames), "detector_px": [det, det],
           "electrons_per_pixel": float(ev.electrons_per_pixel)}
    a, b = f_ev(), f_dense()  # compile / warm up; the two must agree
    res["max_abs_diff_px"] = float(max(np.nanmax(np.abs(a[0] - b[0])), np.nanmax(np.abs(a[1] - b[1]))))
    reps = int(opt.get("repeats", 15))
    for name, f in (("events", f_ev), ("dense", f_dense)):
        ts, cs = [], []
        for _ in range(reps):
            c0, t0 = time.process_time(), time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
            cs.append(time.process_time() - c0)
        res[f"{name}_s"] = float(np.median(ts))
        res[f"{name}_min_s"] = float(min(ts))
        res[f"{name}_cpu_s"] = float(min(cs))
    exact_rss_accounting()
    for name, f in (("events", f_ev), ("dense", f_dense)):
        res[f"{name}_peak_MB"] = peak_memory(f)[0]
    np.savez(out_path, phase=np.zeros(1))
    return res


IMPLS = {("ours", "ssb"): ours_ssb, ("ours", "dpc"): ours_dpc,
         ("py4dstem", "ssb"): py4dstem_ssb, ("py4dstem", "dpc"): py4dstem_dpc}


def main(argv):
    impl, method, data_path, out_path, opt_json = argv
    opt = json.loads(opt_json)
    load0 = open("/proc/loadavg").read().split()[0]
    if method == "eer_com":
        res = eer_com(opt, out_path)
        res.update(impl=impl, method=method, loadavg=[load0, open("/proc/loadavg").read().split()[0]])
        print(json.dumps(res))
        return
    t0 = time.perf_counter()
    if impl == "ours":
        import tembench_pelz2022
        from tembench_pelz2022 import dpc, ssb  # noqa: F401
        src = tembench_pelz2022.__file__
    else:
        import py4DSTEM  # noqa: F401
        src = py4DSTEM.__file__
    t_import = time.perf_counter() - t0
    d = dict(np.load(data_path))
    whole, step, result, info = IMPLS[impl, method](d, opt)
    t0 = time.perf_counter()
    whole()  # cold: numba compilation, FFT plans, caches
    cold = time.perf_counter() - t0
    reps = int(opt.get("repeats", 5))

    def median(f):
        """(median wall, fastest wall, fastest CPU time of the process) over ``reps`` calls."""
        ts, cs = [], []
        for _ in range(reps):
            c0, t0 = time.process_time(), time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
            cs.append(time.process_time() - c0)
        return float(np.median(ts)), float(min(ts)), float(min(cs))

    warm, warm_min, warm_cpu = median(whole)
    step_s = step_min = step_cpu = None
    f_step = step()  # set up on demand (the state before the step), freed after timing
    if f_step is not None:
        step_s, step_min, step_cpu = median(f_step)  # the whole calls above warmed it
    del f_step
    exact_rss_accounting()
    peak, kids = peak_memory(whole)
    traced = None
    if opt.get("traced", True):
        tracemalloc.start()
        whole()
        traced = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    np.savez(out_path, phase=np.asarray(result(), dtype=np.float64))
    res = {"impl": impl, "method": method, "import_s": t_import, "cold_s": cold, "warm_s": warm,
           "warm_min_s": warm_min, "warm_cpu_s": warm_cpu, "step_s": step_s, "step_min_s": step_min,
           "step_cpu_s": step_cpu, "repeats": reps,
           "peak_MB": peak + kids, "main_peak_MB": peak, "children_uss_MB": kids, "traced_MB": traced,
           "threads": opt.get("threads"), "source": src, "loadavg": [load0, open("/proc/loadavg").read().split()[0]]}
    res.update(info())
    print(json.dumps(res, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
