"""Pelz 2022 peers: SSB and DPC of py4DSTEM 0.14.18 vs ours on the same data and the same work, in one run.

    python benchmarks/peers/pelz2022_peers.py [--scan 64] [--det 64] [--dose E_PER_PATTERN]
        [--rotation-deg DEG] [--dpc-iter 64] [--repeats 5] [--threads 1|all] [--eer-det 128]
        [--ref HEAD|worktree] [--out DIR] [--json FILE]

py4DSTEM 0.14.18 pins numpy 1.26, so it runs in its OWN virtual environment, created here on first
use (``$TEMBENCH_PEER_VENV`` or ``~/.cache/tembench/peers/py4dstem-0.14.18``) with
``pip install py4DSTEM==0.14.18``; nothing of it enters tembench's dependencies. Every method runs in
a fresh process (``pelz2022_peer_worker.py``) on the same ``.npz``: a synthetic weak-phase object
(``tembench_pelz2022.synthetic``), optionally Poisson-noisy (``--dose`` electrons per pattern) and
on a detector rotated against the scan (``--rotation-deg``, ours; py4DSTEM is given −θ, its sign;
both are given the rotation, neither estimates it).

Our code is measured at git ``--ref`` (default ``HEAD``: ``platform/tembench`` and
``plugins/tembench_pelz2022`` extracted with ``git archive`` into the work directory and put first on
our workers' ``PYTHONPATH``), so uncommitted work of others in the tree is not measured; the commit
is printed. What is compared (printed with the table):

- SSB, same detector work: py4DSTEM crops the corner-centred patterns to 2r × 2r around the
  bright-field disc (r its measured disc radius, no binning); ours runs unbinned (``bin_factor=1``)
  with the crop window set to 2r + 1 (our windows are odd, centred on the beam): ours does
  ((2r+1)/2r)² ≈ 1.06× py4DSTEM's detector work; our bad-detector-pixel detection is off
  (``bad_pixels="ignore"``: py4DSTEM has none). Both the whole call (raw 4D array → phase) and the
  reconstruction step alone (given G(k, K) = the scan-Fourier-transformed data: the lune reduction
  and the inverse transform). Our default (binned to ≤ ``max_detector_px``) is shown as well,
  labelled as less detector work.
- DPC, same iterations: both from the COM of the same data, rotation given, padding 2, step 0.5,
  exactly ``--dpc-iter`` iterations each (py4DSTEM ``backtrack=False, stopping_criterion=0``; ours
  without bad-pixel detection); and each code's defaults (stopping rule, ours with bad-pixel
  detection and repair), with the iterations each used. DPC calls are short, so the two codes
  alternate over ``--dpc-rounds`` process pairs and each keeps its fastest.
- Event-based COM (ours only; there is no event peer): the same Poisson counts as electron events
  and as dense float32, the same ``--eer-det``² detector, 64² scan, one thread for both.
- Threads: ``--threads 1`` (default) pins OpenMP/BLAS/numba/our FFT workers to one thread and runs
  py4DSTEM's SSB with ``num_jobs=1`` (no forked workers); ``all`` leaves both at their defaults.
- Memory, the same accounting for both: main-process peak RSS of one warm whole call above the RSS
  just before it (kernel high-water mark reset via ``/proc/self/clear_refs``; after the timings glibc
  is set, in both, to mmap every buffer above a page and return freed memory at once, so the resident
  set follows the live allocations), plus forked workers' peak USS.

Ratios are py4DSTEM / ours for time ("× faster") and ours / py4DSTEM for memory, measured in one
run. Times in the table: at one thread the fastest CPU time of the process over ``--repeats`` warm
calls (that is the work itself, insensitive to other jobs on shared cores), with ``--threads all`` the
fastest wall time; medians and wall times are in the JSON; the 1-minute load average at the start of
each code's process is printed per row. Phases are scored by normalised
cross-correlation against the object's phase band-limited to |K| < 2k0 (SSB) or its probe-intensity
blur (DPC); at finite dose the SSB quality comparison proper is ``pelz2022_ssb_quality.py``. Prints the
table and a JSON summary; raises :class:`PeerUnavailable` if the environment cannot be built.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WORKER = HERE / "pelz2022_peer_worker.py"
PY4DSTEM = "py4DSTEM==0.14.18"

ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "NUMBA_NUM_THREADS": "1", "TEMBENCH_FFT_WORKERS": "1"}


class PeerUnavailable(RuntimeError):
    pass


def venv_dir() -> Path:
    return Path(os.environ.get("TEMBENCH_PEER_VENV", Path.home() / ".cache/tembench/peers/py4dstem-0.14.18"))


def ensure_venv() -> Path:
    """Python of the peer environment, created and filled on first use."""
    vd = venv_dir()
    py = vd / "bin" / "python"
    if py.exists() and subprocess.run([py, "-c", "import py4DSTEM"], capture_output=True).returncode == 0:
        return py
    env = {**os.environ, "PIP_CONSTRAINT": ""}  # our constraints are for our environment, not the peer's
    steps = [[sys.executable, "-m", "venv", str(vd)],
             [str(py), "-m", "pip", "install", "--quiet", PY4DSTEM]]
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise PeerUnavailable(f"could not build the py4DSTEM environment ({' '.join(cmd[:3])}…): "
                                  f"{r.stderr.strip()[-500:]}")
    return py


def make_data(path: Path, scan: int = 64, det: int = 64, seed: int = 0, dose: float | None = None,
              rotation_deg: float = 0.0) -> np.ndarray:
    """Save a synthetic weak-phase 4D-STEM dataset (scan² positions, det² pixels); return the object phase.

    ``dose``: Poisson counts at this many electrons per pattern (None: noise-free fractions);
    ``rotation_deg``: detector rotated against the scan (our sign: COM_scan = R(θ) COM_det).
    """
    from tembench_pelz2022 import synthetic

    rng = np.random.default_rng(seed)
    sampling = 0.25
    phi = synthetic.gaussian_atoms_phase((det, det), sampling, max(4, det * det // 340), 0.4, 0.05, rng)
    step_px = max(1, det // scan)
    s = synthetic.simulate(phi, sampling, step_px, 200.0, 25.0, rotation_deg=rotation_deg)
    data = s.measurement.data
    if dose is not None:
        data = rng.poisson(np.clip(data, 0, None) * dose).astype(np.float32)
    g = s.measurement.geometry
    truth = phi[::step_px, ::step_px]
    np.savez(path, data=data, energy_keV=200.0, semiangle_mrad=25.0, step_A=g.scan_step_A[0],
             det_mrad=g.detector_sampling_mrad[0], truth=truth,
             key=json.dumps([scan, det, seed, dose, rotation_deg]))
    return truth


def load_or_make_data(path: Path, scan: int, det: int, seed: int = 0, dose: float | None = None,
                      rotation_deg: float = 0.0) -> np.ndarray:
    """:func:`make_data`, or the object phase of an existing ``path`` made with the same arguments."""
    if path.exists():
        with np.load(path) as z:
            if "key" in z and str(z["key"]) == json.dumps([scan, det, seed, dose, rotation_deg]):
                return z["truth"]
    return make_data(path, scan, det, seed, dose, rotation_deg)


ROOT = HERE.parent.parent
_OURS_PATH: list[str] = []  # PYTHONPATH of our worker: a checkout of the measured commit (see checkout)


def checkout(ref: str, dest: Path) -> str:
    """Extract our core and the Pelz plugin at git ``ref`` into ``dest`` (read-only on the repository) and
    make our workers import them from there; returns the commit measured. ``"worktree"``: the files as they are."""
    _OURS_PATH.clear()
    if ref == "worktree":
        return "worktree (uncommitted changes included) on " + _git("rev-parse", "--short", "HEAD")
    commit = _git("rev-parse", "--short", ref)
    plugin = _git("log", "-1", "--format=%h %cI", commit, "--", "plugins/tembench_pelz2022")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    arch = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "platform/tembench", "plugins/tembench_pelz2022"],
                          capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=arch, check=True)
    _OURS_PATH[:] = [str(dest / "platform"), str(dest / "plugins")]
    return f"{commit} (last plugins/tembench_pelz2022 commit {plugin})"


def _git(*args) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


def _env(impl: str, threads) -> dict:
    env = dict(os.environ)
    if threads == 1:
        env.update(ONE_THREAD)
    if impl == "py4dstem":
        env.pop("PYTHONPATH", None)
    elif _OURS_PATH:
        env["PYTHONPATH"] = os.pathsep.join(_OURS_PATH + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def run(impl: str, method: str, data: Path, out: Path, python: str, options: dict | None = None) -> dict:
    opt = dict(options or {})
    r = subprocess.run([python, str(WORKER), impl, method, str(data), str(out), json.dumps(opt)], capture_output=True,
                       text=True, env=_env(impl, opt.get("threads", 1)), timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"{impl} {method} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _versions(py_peer: str) -> dict:
    import numba
    import scipy

    import tembench

    peer = subprocess.run([py_peer, "-c", "import py4DSTEM, numpy, scipy; print(py4DSTEM.__version__, "
                           "numpy.__version__, scipy.__version__)"], capture_output=True, text=True,
                          env=_env("py4dstem", None)).stdout.split()
    return {"tembench": getattr(tembench, "__version__", "?"), "numpy": np.__version__, "scipy": scipy.__version__,
            "numba": numba.__version__, "py4DSTEM": peer[0] if peer else "?",
            "py4DSTEM_numpy": peer[1] if len(peer) > 1 else "?", "py4DSTEM_scipy": peer[2] if len(peer) > 2 else "?",
            "cpus": os.cpu_count()}


def compare(scan: int = 64, det: int = 64, workdir: str | None = None, dose: float | None = None,
            rotation_deg: float = 0.0, dpc_iter: int = 64, repeats: int = 5, threads=1, eer_det: int | None = 128,
            eer_e_per_px=(0.01, 0.1), ref: str = "HEAD", traced: bool = True, dpc_rounds: int = 3,
            methods=("ssb", "dpc")) -> dict:
    from tembench.builtin.quantifiers import normalized_cross_correlation as ncc
    from tembench.physics.constants import wavelength_A
    from tembench_pelz2022 import synthetic

    py_peer = str(ensure_venv())
    wd = Path(workdir or tempfile.mkdtemp(prefix="pelz2022_peers_"))
    wd.mkdir(parents=True, exist_ok=True)
    data = wd / "data.npz"
    truth = load_or_make_data(data, scan, det, dose=dose, rotation_deg=rotation_deg)
    step_px = max(1, det // scan)
    blur = synthetic.probe_intensity_blur(truth, 0.25 * step_px, 200.0, 25.0) if step_px == 1 else truth
    lowpass = band_limit(truth, 0.25 * step_px, 2 * 25e-3 / wavelength_A(200.0))
    measured = checkout(ref, wd / "ours_src")
    summary: dict = {"ours_measured": measured, "scan": scan, "det": det, "dose_e_per_pattern": dose, "rotation_deg": rotation_deg,
                     "threads": threads, "repeats": repeats, "versions": _versions(py_peer)}
    base = {"rotation_deg": rotation_deg, "threads": threads, "repeats": repeats, "traced": traced}

    def one(tag, impl, method, opt, ref):
        out = wd / f"{tag}_{impl}_{method}.npz"
        r = run(impl, method, data, out, sys.executable if impl == "ours" else py_peer, opt)
        r["ncc"] = ncc(np.load(out)["phase"], ref)
        return r

    # SSB: py4DSTEM first (its crop 2r x 2r sets ours to 2r + 1, unbinned)
    if "ssb" in methods:
        theirs = one("ssb", "py4dstem", "ssb", base, lowpass)
        r_px = theirs["detector_px"][0] // 2
        d_mrad = float(np.load(data)["det_mrad"])
        rad0 = 25.0 / d_mrad
        margin = min(3.0, max(1.0, (r_px - 1e-6) / rad0))
        ours = one("ssb", "ours", "ssb", {**base, "crop_margin": margin}, lowpass)
        ours_default = one("ssb_default", "ours", "ssb", {**base, "ours_default": True}, lowpass)
        summary["ssb"] = {"ours": ours, "py4dstem": theirs, "ours_default": ours_default}

    # DPC: exactly dpc_iter iterations each; then each code's default stopping rule
    # DPC calls are short: alternate the two codes over ``dpc_rounds`` process pairs and keep each code's
    # fastest, so a busy spell on the shared cores does not land on one code only
    for tag, extra in (("dpc", {"n_iter": dpc_iter}), ("dpc_default_stop", {"n_iter": 64, "default_stop": True})):
        if "dpc" not in methods:
            break
        runs = {"ours": [], "py4dstem": []}
        for _ in range(max(1, dpc_rounds)):
            for impl in runs:
                runs[impl].append(one(tag, impl, "dpc", {**base, **extra}, blur))
        summary[tag] = {impl: _fastest(rs) for impl, rs in runs.items()}

    if eer_det:
        summary["eer_com"] = [run("ours", "eer_com", data, wd / "eer.npz", sys.executable,
                                  {"det": eer_det, "scan": 64, "e_per_px": e, "threads": 1, "repeats": 15})
                              for e in eer_e_per_px]
    summary["table"] = table(summary)
    return summary


def band_limit(phase: np.ndarray, step_A: float, k_max_A_inv: float) -> np.ndarray:
    """``phase`` with every spatial frequency |K| ≥ ``k_max_A_inv`` removed (SSB transfers |K| < 2k0)."""
    ky = np.fft.fftfreq(phase.shape[0], d=step_A)[:, None]
    kx = np.fft.fftfreq(phase.shape[1], d=step_A)[None, :]
    return np.real(np.fft.ifft2(np.fft.fft2(phase) * (ky ** 2 + kx ** 2 < k_max_A_inv ** 2)))


def _fastest(runs: list[dict]) -> dict:
    """The last run's record with every time replaced by its minimum over ``runs`` (``rounds`` = len)."""
    r = dict(runs[-1])
    for k in ("warm_s", "warm_min_s", "warm_cpu_s", "step_s", "step_min_s", "step_cpu_s", "cold_s"):
        vals = [x[k] for x in runs if x.get(k) is not None]
        r[k] = min(vals) if vals else None
    r["peak_MB"] = max(x["peak_MB"] for x in runs)
    r["rounds"] = len(runs)
    r["loadavg"] = [runs[0]["loadavg"][0], runs[-1]["loadavg"][-1]]
    return r


def _px(shape) -> str:
    return "×".join(str(n) for n in shape) if shape else "?"


def _bad_pixels(r: dict) -> str:
    v = (r.get("params") or {}).get("bad_pixels")
    return "ours: no bad-pixel check in this version" if v is None else f"ours bad_pixels={v}"


def table(s: dict) -> list[dict]:
    """Rows: method, what was compared, ours, theirs, ratio, load."""
    thr = "1 thread each (py4DSTEM num_jobs=1)" if s["threads"] == 1 else "default threads (py4DSTEM forks cpu_count() workers)"
    mem = "main-process peak RSS above pre-call RSS + workers' USS"
    rows = []

    def add(method, what, ours, theirs, ratio, load, unit):
        rows.append({"method": method, "compared": what, "ours": ours, "theirs": theirs, "ratio": ratio,
                     "load": load, "unit": unit})

    def load(*rs):
        return "/".join(f"{float(x):.1f}" for r in rs for x in r["loadavg"][:1])

    # one thread, no workers: the CPU time of the process is the work (robust to other jobs on the shared
    # cores); otherwise the fastest wall time of N warm calls. Medians are in the JSON.
    T, S = ("warm_cpu_s", "step_cpu_s") if s["threads"] == 1 else ("warm_min_s", "step_min_s")
    if "ssb" in s:
        _ssb_rows(s, add, load, T, S, thr, mem)
    for tag, label in (("dpc", "equal iterations"), ("dpc_default_stop", "each code's defaults")):
        if tag not in s:
            continue
        o, t = s[tag]["ours"], s[tag]["py4dstem"]
        rej = f" (+{t['rejected_steps']} rejected)" if t.get("rejected_steps") else ""
        rounds = f", fastest of {o['rounds']} alternating process pairs" if o.get("rounds", 1) > 1 else ""
        what = (f"{label}: {o['iterations']} vs {t['iterations']}{rej} iterations, {_bad_pixels(o)}, padding 2, "
                f"rotation given, {thr}{rounds}")
        add(f"DPC whole call ({label})", what, o[T], t[T], t[T] / o[T], load(o, t), "s")
        add(f"DPC integration step ({label})", what, o[S], t[S], t[S] / o[S], load(o, t), "s")
        add(f"DPC peak memory ({label})", f"{what}; {mem}", o["peak_MB"], t["peak_MB"],
            o["peak_MB"] / max(t["peak_MB"], 1e-9), load(o, t), "MB")
        add(f"DPC NCC vs blurred phase ({label})", what, o["ncc"], t["ncc"], o["ncc"] / t["ncc"], load(o, t), "")
    for e in s.get("eer_com", []):
        what = (f"ours events vs ours dense float32 (no peer): same {e['events']} events in {e['frames']} frames "
                f"({e['electrons_per_pixel']:.3g} e/px), detector {_px(e['detector_px'])}, 1 thread each")
        add("event-based COM", what, e["events_cpu_s"], e["dense_cpu_s"], e["dense_cpu_s"] / e["events_cpu_s"],
            "/".join(f"{float(x):.1f}" for x in e["loadavg"]), "s")
    return rows


def _ssb_rows(s, add, load, T, S, thr, mem):
    o, t, od = s["ssb"]["ours"], s["ssb"]["py4dstem"], s["ssb"]["ours_default"]
    det = (f"detector {_px(o['detector_px'])} vs {_px(t['detector_px'])} px, normalization="
           f"{o['params'].get('normalization')}, {_bad_pixels(o)}, rotation given, {thr}")
    add("SSB whole call", det, o[T], t[T], t[T] / o[T], load(o, t), "s")
    if o.get(S) and t.get(S):
        add("SSB reconstruction step (given G)", det, o[S], t[S], t[S] / o[S], load(o, t), "s")
    add("SSB peak memory", f"{det}; {mem}", o["peak_MB"], t["peak_MB"], o["peak_MB"] / max(t["peak_MB"], 1e-9),
        load(o, t), "MB")
    add("SSB NCC vs object phase band-limited to 2k0", det, o["ncc"], t["ncc"], o["ncc"] / t["ncc"], load(o, t), "")
    more = "less" if np.prod(od["detector_px"]) < np.prod(t["detector_px"]) else "more"
    dd = (f"OUR DEFAULTS: detector {_px(od['detector_px'])} vs {_px(t['detector_px'])} px ({more} detector work), "
          f"normalization={od['params'].get('normalization')}, {_bad_pixels(od)}, rotation given, {thr}")
    add("SSB whole call, our default", dd, od[T], t[T], t[T] / od[T], load(od, t), "s")
    add("SSB peak memory, our default", f"{dd}; {mem}", od["peak_MB"], t["peak_MB"],
        od["peak_MB"] / max(t["peak_MB"], 1e-9), load(od, t), "MB")
    add("SSB NCC, our default", dd, od["ncc"], t["ncc"], od["ncc"] / t["ncc"], load(od, t), "")


def _fmt(v, unit):
    if unit == "s":
        return f"{v * 1e3:.3g} ms" if v < 1 else f"{v:.3g} s"
    if unit == "MB":
        return f"{v:.1f} MB"
    return f"{v:.3f}"


def format_table(rows: list[dict]) -> str:
    lines = ["| method | what was compared | ours | theirs | ratio | load |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio']:.2f}× faster" if r["unit"] == "s" else (f"{r['ratio']:.3f}× (ours/theirs)"
                                                                      if r["unit"] == "MB" else f"{r['ratio']:.3f}")
        lines.append(f"| {r['method']} | {r['compared']} | {_fmt(r['ours'], r['unit'])} | "
                     f"{_fmt(r['theirs'], r['unit'])} | {ratio} | {r['load']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", type=int, default=64)
    ap.add_argument("--det", type=int, default=64)
    ap.add_argument("--dose", type=float, default=None, help="electrons per pattern (Poisson); default noise-free")
    ap.add_argument("--rotation-deg", type=float, default=0.0, help="detector rotation against the scan (our sign)")
    ap.add_argument("--dpc-iter", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="warm calls per timing")
    ap.add_argument("--dpc-rounds", type=int, default=3, help="alternating ours/py4DSTEM DPC process pairs (fastest kept)")
    ap.add_argument("--threads", default="1", choices=("1", "all"))
    ap.add_argument("--eer-det", type=int, default=128, help="detector side for the event COM rows (0: skip)")
    ap.add_argument("--ref", default="HEAD", help="git commit of our code to measure ('worktree': the files as they are)")
    ap.add_argument("--no-traced", action="store_true", help="skip the tracemalloc cross-check call (large data)")
    ap.add_argument("--out", default=None, help="work directory (an existing data.npz made with the same "
                    "arguments is reused)")
    ap.add_argument("--json", default=None, help="also write the summary here")
    ap.add_argument("--methods", default="ssb,dpc", help="comma-separated subset of ssb,dpc to compare")
    a = ap.parse_args(argv)
    threads = 1 if a.threads == "1" else "all"
    try:
        s = compare(a.scan, a.det, a.out, a.dose, a.rotation_deg, a.dpc_iter, a.repeats, threads, a.eer_det, ref=a.ref,
                    traced=not a.no_traced, dpc_rounds=a.dpc_rounds,
                    methods=tuple(m.strip() for m in a.methods.split(",") if m.strip()))
    except PeerUnavailable as exc:
        print(f"peer unavailable: {exc}", file=sys.stderr)
        return 3
    print(f"ours at {s['ours_measured']}; scan {a.scan}², detector {a.det}², dose {a.dose or 'noise-free'} e/pattern, rotation {a.rotation_deg}°, "
          f"threads {a.threads}, fastest {'CPU' if threads == 1 else 'wall'} time of {a.repeats} warm calls; versions {json.dumps(s['versions'])}")
    print(format_table(s["table"]))
    if a.json:
        Path(a.json).write_text(json.dumps(s, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
