"""Same scenario + seed → the same results table, bit for bit, on a busy machine (issue 9).

Two small scenarios that go through the planned pyFFTW transforms (sizes ≥ 4096 elements; smaller
ones fall back to scipy.fft), the numba kernels and the Ren and Pelz plugins:

* Ren 2020 multislice AET on a tiny needle (hrtem_tilt_series forward model, batched image FFTs,
  pruned multislice FFTs, numba rotate-and-bin and TV kernels, atom tracing);
* Pelz 2022 4D-STEM on a small MoS2 cell (stem4d forward model, electron events, numba SSB with
  a parallel loop, COM on events, DPC, iCOM).

Each runs while a busy process spins on one core, four ways: serial in this process, fresh (the
reference); the ``processes`` executor (fresh interpreters, which plan their FFTs anew); serial
resumed on top of a partial run in a fresh folder (some stages from the cache, some recomputed);
and serial into a new run folder that shares the reference's cache (every stage a cache hit). Every non-timing column must be identical
bit for bit, and so must the reconstruction previews stored as artifacts.

Before the fix, pyFFTW planned with FFTW_MEASURE, which picks algorithms by timing them: two
processes picked different ones under load and the tables differed (NCC in the 6th digit, atoms
traced by ±1-15).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tembench.backend import fft_identity, pyfftw_available
from tembench.runner import run_scenario
from tembench.scenario import load_scenario

REN = """\
name: det_ren
seed: 7
repeats: 1
sample:
  name: si_sio2_needle
  params: {core_radius_A: 5, shell_thickness_A: 3, core_length_A: 10, relax_iterations: 60}
forward:
  name: hrtem_tilt_series
  params: {energy_keV: 300, sampling_A: 0.5, slice_thickness_A: 1.0, simulation_factor: 2,
           tilt_range_deg: [-90, 60], n_tilts: 6, defocus_values_A: [200, 1000]}
noise:
  - name: poisson_dose
    params: {dose_e_per_A2: 50000, dose_mode: total_budget}
reconstructors:
  - {name: ren2020_multislice_aet, label: ren2020, params: {n_iterations: 3, regularizer: tv, tau_V: 1.0}}
quantifiers:
  - {name: atom_tracing, params: {intensity_threshold: 30.0}}
  - {name: cross_correlation}
sweep:
  grid:
    noise.0.dose_e_per_A2: [.inf, 50000]
"""

PELZ = """\
name: det_pelz
seed: 3
repeats: 1
sample:
  name: twisted_bilayer
  params: {material: MoS2, n_layers: 1, repeat: [2, 2], rms_displacement_A: null}
forward:
  name: stem4d
  params: {energy_keV: 80, sampling_A: 0.1, semiangle_mrad: 25, scan_step_A: 0.6, detector_binning: 2,
           slice_thickness_A: 2.0, detectors: {adf: [40, null]}}
noise:
  - name: poisson_dose
    params: {electrons_per_pattern: 1000}
  - name: electron_events
reconstructors:
  - {name: ssb, label: ssb}
  - {name: dpc, label: dpc}
  - {name: icom, label: icom}
quantifiers:
  - {name: cross_correlation}
sweep:
  grid:
    noise.poisson_dose.electrons_per_pattern: [100, 10000]
"""

SCENARIOS = {"ren": REN, "pelz": PELZ}
KEYS = ["point_id", "repeat", "reconstructor"]
# columns that measure the run, not the result
SKIP = {"wall_time_s", "recon_cache_hit", "artifacts", "run_id"}


def _is_timing(col: str) -> bool:
    return col in SKIP or col.startswith(("time_", "peak_memory_")) or col.endswith("_time_s")


@pytest.fixture(scope="module")
def busy_cpu():
    """A process spinning on one core for the duration of the module (the machine is 'busy')."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenarios")
    out = {}
    for name, text in SCENARIOS.items():
        (root / f"{name}.yaml").write_text(text)
        # the first sweep point only: a partial run that a full run then resumes from the cache
        first = text.replace("[.inf, 50000]", "[.inf]").replace("[100, 10000]", "[100]")
        assert first != text
        (root / f"{name}_first.yaml").write_text(first)
        out[name] = root / f"{name}.yaml"
    return out


@pytest.fixture(scope="module")
def reference(files, busy_cpu, tmp_path_factory):
    """Fresh serial runs in this process: the tables every other way of running must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    return {name: run_scenario(load_scenario(path), out=out / name, executor="serial", progress=False,
                               report=False).run_dir
            for name, path in files.items()}


def _table(run_dir: Path) -> pd.DataFrame:
    t = pd.read_parquet(run_dir / "results.parquet")
    assert (t["status"] == "ok").all(), t.get("error")
    return t.sort_values(KEYS).reset_index(drop=True)


def _assert_bitwise_equal(a_dir: Path, b_dir: Path, what: str) -> None:
    a, b = _table(a_dir), _table(b_dir)
    cols = [c for c in a.columns if not _is_timing(c)]
    assert cols == [c for c in b.columns if not _is_timing(c)], what
    assert len(a) == len(b) > 0, what
    differ = []
    for c in cols:
        x, y = a[c].to_numpy(), b[c].to_numpy()
        if x.dtype.kind == "f" and y.dtype.kind == "f":
            same = x.dtype == y.dtype and x.tobytes() == y.tobytes()  # bitwise: NaN == NaN, 0.0 != -0.0
        else:
            same = [repr(u) for u in x] == [repr(v) for v in y]
        if not same:
            differ.append(f"{c}: {x.tolist()} vs {y.tolist()}")
    assert not differ, f"{what}: columns differ from the reference run:\n" + "\n".join(differ)
    # the reconstructions themselves (previews stored with every row), not only their scores
    for (_, ra), (_, rb) in zip(a.iterrows(), b.iterrows()):
        with np.load(a_dir / ra["artifacts"]) as za, np.load(b_dir / rb["artifacts"]) as zb:
            assert sorted(za.files) == sorted(zb.files)
            for k in za.files:
                assert za[k].tobytes() == zb[k].tobytes(), f"{what}: artifact {k} of {ra['reconstructor']} differs"


def test_fft_setup_is_deterministic_by_default():
    ident = fft_identity()
    assert ident["deterministic"] == "true", ident
    if pyfftw_available():  # the dev install: planned transforms go through pyFFTW
        assert ident["library"] == "pyfftw" and ident["planner"] == "wisdom", ident


@pytest.mark.parametrize("name", ["ren", "pelz"])
def test_processes_executor_reproduces_serial_run(name, files, reference, busy_cpu, tmp_path):
    res = run_scenario(load_scenario(files[name]), out=tmp_path, executor="processes", workers=2,
                       progress=False, report=False)
    _assert_bitwise_equal(reference[name], res.run_dir, f"{name}: processes vs serial")


@pytest.mark.parametrize("name", ["ren", "pelz"])
def test_resumed_run_reproduces_fresh_run(name, files, reference, busy_cpu, tmp_path):
    first = files[name].with_name(f"{name}_first.yaml")
    run_scenario(load_scenario(first), out=tmp_path, executor="serial", progress=False, report=False)
    res = run_scenario(load_scenario(files[name]), out=tmp_path, executor="serial", progress=False, report=False)
    hits = _table(res.run_dir)["recon_cache_hit"]
    assert hits.any() and not hits.all()  # part from the cache, part recomputed in this process
    _assert_bitwise_equal(reference[name], res.run_dir, f"{name}: resumed in-process vs fresh")


@pytest.mark.parametrize("name", ["ren", "pelz"])
def test_cache_hits_reproduce_computed_run(name, files, reference, busy_cpu):
    res = run_scenario(load_scenario(files[name]), out=reference[name].parent, run_id="cached", executor="serial",
                       progress=False, report=False)
    assert res.run_dir != reference[name]
    assert _table(res.run_dir)["recon_cache_hit"].all()
    _assert_bitwise_equal(reference[name], res.run_dir, f"{name}: from cache vs computed")
