"""Pelz 2022 peers: SSB and DPC of py4DSTEM 0.14.18 vs ours on the same saved data, in one run.

    python benchmarks/peers/pelz2022_peers.py [--scan 64] [--det 64] [--out DIR]

py4DSTEM 0.14.18 pins numpy 1.26, so it runs in its OWN virtual environment, created here on first
use (``$TEMBENCH_PEER_VENV`` or ``~/.cache/tembench/peers/py4dstem-0.14.18``) with
``pip install py4DSTEM==0.14.18``; nothing of it enters tembench's dependencies. Every method runs
in a fresh process on the same ``.npz`` (a synthetic weak-phase object, see
``tembench_pelz2022.synthetic``) so that time and peak memory are comparable; the phases are
scored against the object's phase by normalised cross-correlation. Prints and returns a JSON
summary; raises :class:`PeerUnavailable` if the environment cannot be built.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WORKER = HERE / "pelz2022_peer_worker.py"
PY4DSTEM = "py4DSTEM==0.14.18"


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


def make_data(path: Path, scan: int = 64, det: int = 64, seed: int = 0) -> np.ndarray:
    """Save a synthetic weak-phase 4D-STEM dataset (scan² positions, det² pixels); return the object phase."""
    from tembench_pelz2022 import synthetic

    rng = np.random.default_rng(seed)
    sampling = 0.25
    phi = synthetic.gaussian_atoms_phase((det, det), sampling, max(4, det * det // 340), 0.4, 0.05, rng)
    step_px = max(1, det // scan)
    s = synthetic.simulate(phi, sampling, step_px, 200.0, 25.0)
    g = s.measurement.geometry
    np.savez(path, data=s.measurement.data, energy_keV=200.0, semiangle_mrad=25.0,
             step_A=g.scan_step_A[0], det_mrad=g.detector_sampling_mrad[0])
    return phi[::step_px, ::step_px]


def run(impl: str, method: str, data: Path, out: Path, python: str) -> dict:
    env = dict(os.environ)
    if impl == "py4dstem":
        env.pop("PYTHONPATH", None)
    r = subprocess.run([python, str(WORKER), impl, method, str(data), str(out)], capture_output=True, text=True,
                       env=env, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{impl} {method} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def compare(scan: int = 64, det: int = 64, workdir: str | None = None) -> dict:
    from tembench.builtin.quantifiers import normalized_cross_correlation as ncc
    from tembench_pelz2022 import synthetic

    py_peer = str(ensure_venv())
    wd = Path(workdir or tempfile.mkdtemp(prefix="pelz2022_peers_"))
    wd.mkdir(parents=True, exist_ok=True)
    data = wd / "data.npz"
    truth = make_data(data, scan, det)
    blur = synthetic.probe_intensity_blur(truth, 0.25 * max(1, det // scan), 200.0, 25.0) if det == scan else truth
    summary: dict = {"scan": scan, "det": det}
    for method in ("ssb", "dpc"):
        res = {}
        for impl, py in (("ours", sys.executable), ("py4dstem", py_peer)):
            out = wd / f"{impl}_{method}.npz"
            r = run(impl, method, data, out, py)
            ph = np.load(out)["phase"]
            r["ncc_truth"] = ncc(ph, truth)
            r["ncc_blurred_truth"] = ncc(ph, blur)
            res[impl] = r
        res["speedup_warm"] = res["py4dstem"]["warm_s"] / res["ours"]["warm_s"]
        res["speedup_cold"] = res["py4dstem"]["cold_s"] / res["ours"]["cold_s"]
        res["memory_ratio"] = res["ours"]["peak_MB"] / max(res["py4dstem"]["peak_MB"], 1e-9)
        summary[method] = res
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", type=int, default=64)
    ap.add_argument("--det", type=int, default=64)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    try:
        print(json.dumps(compare(a.scan, a.det, a.out), indent=2))
    except PeerUnavailable as exc:
        print(f"peer unavailable: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
