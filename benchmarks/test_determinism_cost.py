"""What determinism costs: the default FFT planner against the fastest (non-reproducible) one.

Run: ``python -m pytest benchmarks/test_determinism_cost.py -s``; numbers are in each benchmark's
``extra_info`` and printed with ``-s``.

Modes (``TEMBENCH_FFTW_EFFORT`` / ``TEMBENCH_FFT``, see :func:`tembench.backend.fft_identity`):

* ``wisdom`` — the default: pyFFTW plans read from the per-machine wisdom file (each transform
  timed once per machine, FFTW_MEASURE), the same algorithm in every process: reproducible;
* ``FFTW_MEASURE`` — the fastest mode and the old default: every process times its plans again,
  so results depend on machine load (opt-in, rows marked ``deterministic=False``);
* ``FFTW_ESTIMATE`` and ``scipy`` — the other reproducible choices, for reference.

Each case is timed warm (plans made; best of interleaved rounds, so machine load hits every mode
alike) and its planning cost in a fresh process is timed apart (plans dropped, FFTW's in-memory
wisdom forgotten): end to end per process = planning + work. Target: the default ≤ 10 % slower
than FFTW_MEASURE end to end.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from _timing import interleaved_min

from tembench import backend
from tembench.builtin.forward_multislice import STEM4D, HRTEMTiltSeries
from tembench.builtin.samples_ren import SiSiO2Needle
from tembench.registry import get_registry

pytestmark = pytest.mark.skipif(not backend.pyfftw_available(), reason="the planner modes are pyFFTW's")

MODES = {
    "wisdom (default)": {"TEMBENCH_FFTW_EFFORT": "wisdom", "TEMBENCH_FFT": "pyfftw"},
    "FFTW_MEASURE (fastest)": {"TEMBENCH_FFTW_EFFORT": "FFTW_MEASURE", "TEMBENCH_FFT": "pyfftw"},
    "FFTW_ESTIMATE": {"TEMBENCH_FFTW_EFFORT": "FFTW_ESTIMATE", "TEMBENCH_FFT": "pyfftw"},
    "scipy": {"TEMBENCH_FFTW_EFFORT": "wisdom", "TEMBENCH_FFT": "scipy"},
}
DEFAULT, FASTEST = "wisdom (default)", "FFTW_MEASURE (fastest)"


def _in_mode(mode: str, fn):
    def run():
        saved = {k: os.environ.get(k) for k in MODES[mode]}
        os.environ.update(MODES[mode])
        try:
            return fn()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return run


def _cold_planning(mode: str, fn, warm_s: float) -> float:
    """Seconds a fresh process adds for its plans: ``fn`` with no cached plan and no in-memory wisdom
    (the wisdom file stays: a machine that ran anything before has it) minus its warm time ``warm_s``."""
    import pyfftw

    backend._PLANS.clear()
    pyfftw.forget_wisdom()
    return max(0.0, _timed(_in_mode(mode, fn)) - warm_s)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _environment() -> dict:
    import numba

    return {"loadavg_1min": os.getloadavg()[0], "cpu_count": os.cpu_count(),
            "planned_fft_threads": backend.planned_fft_threads(), "scipy_fft_workers": backend.fft_workers(),
            "numba_threads": numba.config.NUMBA_NUM_THREADS}


def _report(benchmark, case: str, geometry: str, warm: dict, planning: dict, per_run: int = 1) -> None:
    """``per_run``: how many warm units one run of the case does in a process (e.g. iterations)."""
    env = _environment()
    info = {"case": case, "geometry": geometry, **env}
    lines = [f"\n{case} — {geometry}",
             f"  threads: planned FFT {env['planned_fft_threads']}, scipy.fft workers {env['scipy_fft_workers']}, "
             f"numba {env['numba_threads']}, cores {env['cpu_count']}; load average {env['loadavg_1min']:.2f}"]
    for mode, t in warm.items():
        e2e = per_run * t + planning[mode]
        info[f"{mode}: warm_s"] = t
        info[f"{mode}: planning_s"] = planning[mode]
        info[f"{mode}: end_to_end_over_fastest"] = e2e / (per_run * warm[FASTEST] + planning[FASTEST])
        lines.append(f"  {mode:24s} warm {t:8.3f} s ×{per_run} + planning {planning[mode]:6.3f} s  → "
                     f"{info[f'{mode}: end_to_end_over_fastest']:5.2f}× fastest end to end "
                     f"({t / warm[FASTEST]:5.2f}× warm)")
    benchmark.extra_info.update(info)
    print("\n".join(lines))


@pytest.fixture(scope="module")
def table1_series():
    sample = SiSiO2Needle().build(SiSiO2Needle.Params(core_radius_A=13, shell_thickness_A=7, core_length_A=33,
                                                      padding_A=4), np.random.default_rng(2020))
    p = HRTEMTiltSeries.Params(energy_keV=300, sampling_A=0.5, slice_thickness_A=2.0, tilt_range_deg=(-90, 87),
                               n_tilts=60, defocus_values_A=[200, 450, 1000])
    return HRTEMTiltSeries().simulate(sample, p, np)


def test_ren_iteration(benchmark, table1_series):
    """Alg. 3 on the Table-1 problem (96³ voxels of 0.5 Å, 60 tilts × 3 defocus, N_B = 10 slabs):
    three iterations, the per-iteration time of the last two (the first builds the operators); end
    to end = planning + 40 iterations (ren2020_table1.yaml / ren2020_tungsten.yaml)."""
    from tembench_ren2020.reconstructor import MultisliceAET

    m, rec = table1_series, MultisliceAET()
    params = MultisliceAET.Params(n_iterations=3, slice_binning=10, random_order=False)

    def iterations():
        t = np.diff([0.0] + rec.reconstruct(m, params, np).extras["iteration_trace"]["time_s"])
        return t

    per_iter = {}

    def timed_iteration(mode):
        def run():
            per_iter.setdefault(mode, []).extend(_in_mode(mode, iterations)()[1:].tolist())
        return run

    interleaved_min({mode: timed_iteration(mode) for mode in MODES}, rounds=2)
    warm = {mode: float(np.min(v)) for mode, v in per_iter.items()}
    one = _plans_of_ren(m)
    warm_one = interleaved_min({mode: _in_mode(mode, one) for mode in MODES}, rounds=1)
    planning = {mode: _cold_planning(mode, one, warm_one[mode]) for mode in MODES}
    benchmark.pedantic(_in_mode(DEFAULT, iterations), rounds=1, iterations=1)
    shape = m.data.shape
    _report(benchmark, "Ren 2020 Alg. 3 iteration (warm: per iteration; end to end: planning + 40 iterations)",
            f"96³ voxels of 0.5 Å, N_B = 10 slabs, 60 tilts × 3 defocus, images {shape[-2]}×{shape[-1]}",
            warm, planning, per_run=40)


def _plans_of_ren(m):
    """The reconstruction's transforms planned as a fresh process plans them (1 iteration)."""
    from tembench_ren2020.reconstructor import MultisliceAET

    params = MultisliceAET.Params(n_iterations=1, slice_binning=10, random_order=False)
    return lambda: MultisliceAET().reconstruct(m, params, np)


@pytest.fixture(scope="module")
def mos2():
    reg = get_registry()
    cls = reg.get("sample", "twisted_bilayer")
    return cls().build(cls.parse_params({"material": "MoS2", "n_layers": 1, "repeat": [3, 2],
                                         "rms_displacement_A": None}), np.random.default_rng(2022))


def test_stem4d_simulation(benchmark, mos2):
    """The 4D-STEM forward model of pelz2022_dose.yaml (80 kV, 25 mrad, 0.3 Å scan step, 0.1 Å
    sampling, detector binning 2, 2 Å slices) on MoS2 3×2 cells (the scenario has 5×3: same
    transforms, more probe positions; 3×2 keeps the 4-mode comparison near a minute)."""
    p = STEM4D.Params(energy_keV=80, sampling_A=0.1, semiangle_mrad=25, scan_step_A=0.3, detector_binning=2,
                      slice_thickness_A=2.0, detectors={"adf": [40, None]})
    out = {}

    def simulate():
        out["m"] = STEM4D().simulate(mos2, p, np)

    warm = interleaved_min({mode: _in_mode(mode, simulate) for mode in MODES}, rounds=1)
    planning = {mode: _cold_planning(mode, simulate, warm[mode]) for mode in MODES}
    benchmark.pedantic(_in_mode(DEFAULT, simulate), rounds=1, iterations=1)
    d = out["m"].data
    _report(benchmark, "4D-STEM simulation (stem4d)",
            f"MoS2 3×2 cells, scan {d.shape[0]}×{d.shape[1]}, patterns {d.shape[2]}×{d.shape[3]} (binned ×2), "
            f"0.1 Å sampling, 2 Å slices", warm, planning)
