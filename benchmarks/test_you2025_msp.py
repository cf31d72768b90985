"""You 2025 multislice ptychography (``msp``) iteration time against the FFT floor, and its peak memory.

Run: ``python -m pytest benchmarks/test_you2025_msp.py -s``; the ratios are in ``extra_info`` and printed.

Geometry (the problem of ``benchmarks/peers/you2025_peers.py``): Si [001] 3 × 3 × 2 cubic cells (16.3 ×
16.3 × 10.9 Å, 432 atoms), 300 keV, 20 mrad, Δf = 50 Å, 24 × 24 probe positions, 96² detector pixels of
2.01 mrad (0.102 Å object pixels), simulated with 8 slices; reconstructed with 4 slices, 2 probe modes,
batches of 64, probe refined, positions fixed, real potential.

* FFT floor: the 2D FFTs one iteration cannot avoid, per pattern and probe mode 4·n_slices of 96²
  (incident wave 1; forward n_slices and n_slices − 1 (the last inverse/forward pair cancels);
  back-propagation n_slices inverse and n_slices − 1 forward, plus the incident gradient's forward 1),
  run as planned in-place transforms of the engine's chunk shape (4 patterns × 2 modes), interleaved with the
  iterations so that machine load affects both alike. Everything else (transmissions, windows, loss,
  updates, orthogonalisation) is overhead against that floor.
* Memory: tracemalloc peak of a 1-iteration reconstruction over the bytes of the data (N·96²·4).
"""

from __future__ import annotations

import os
import time
import tracemalloc

import numpy as np
import pytest

from tembench.backend import plan_fft2
from tembench.types import Geometry

N_SLICES, N_MODES, BATCH, SCAN, W = 4, 2, 64, 24, 96


@pytest.fixture(scope="module")
def problem():
    from ase.build import bulk

    from tembench.physics import potentials as P
    from tembench.physics import stem as S

    atoms = bulk("Si", "diamond", a=5.43, cubic=True) * (3, 3, 2)
    cell = np.diag(atoms.cell.array)
    n = 160
    s = cell[0] / n
    v = P.projected_potential(atoms.positions, atoms.numbers, gpts=(n, n), sampling_A=s,
                              slice_thickness_A=cell[2] / 8, z_range_A=(0, cell[2]))
    e, alpha, df = 300.0, 20.0, 50.0
    probe = S.make_probe_modes((W, W), s, e, alpha, {"C10": -df})
    step = cell[0] / SCAN
    pos = S.scan_positions((0, 0), (cell[1], cell[0]), (step, step)).reshape(-1, 2)
    res = S.stem_scan(v, cell[2] / 8, energy_keV=e, sampling_A=s, positions_A=pos, probe=probe)
    geo = Geometry(energy_keV=e, semiangle_mrad=alpha, detector_sampling_mrad=res.detector_sampling_mrad,
                   aberrations_A={"C10": -df}, defocus_A=[df])
    return res.patterns, pos, geo, cell[2] / N_SLICES


def _params(n_iterations, dz):
    from tembench_you2025.msp import MSPParams

    return MSPParams(n_slices=N_SLICES, slice_thickness_A=dz, n_iterations=n_iterations, batch_size=BATCH,
                     n_probe_modes=N_MODES, start_probe_iter=0, reconstruct_absorption=False, seed=0)


def test_msp_iteration_vs_fft_floor(benchmark, problem):
    from tembench_you2025.msp import reconstruct_msp

    patterns, pos, geo, dz = problem
    n_pos = len(pos)
    ffts = n_pos * N_MODES * 4 * N_SLICES
    chunk = 8  # the engine's chunk at 4 MB: 4 patterns x 2 modes
    plan = plan_fft2((chunk, W, W), tag="you2025-floor")
    plan.buffer[...] = 1.0

    def floor():
        for _ in range(ffts // (2 * chunk)):
            plan.forward()
            plan.inverse()

    samples: list[float] = []

    def iterations():
        r = reconstruct_msp(patterns, pos, geo, _params(3, dz))
        samples.extend(r.history["time_s"][1:])  # the first iteration builds the FFT plans

    load = os.getloadavg()[0]
    floor()
    iterations()
    samples.clear()
    floors = []
    for _ in range(3):
        t = time.perf_counter()
        floor()
        floors.append(time.perf_counter() - t)
        iterations()
    benchmark.pedantic(floor, rounds=1, iterations=1)
    it_s, floor_s = float(np.median(samples)), float(np.median(floors))
    info = {"iteration_s": it_s, "fft_floor_s": floor_s, "iteration_over_fft_floor": it_s / floor_s,
            "ffts_per_iteration": ffts, "fft_shape": [W, W], "patterns": n_pos, "slices": N_SLICES,
            "probe_modes": N_MODES, "batch": BATCH, "loadavg_1min": load, "loadavg_1min_after": os.getloadavg()[0]}
    benchmark.extra_info.update(info)
    print(f"\nmsp (load {load:.1f}): {n_pos} patterns of {W}², {N_SLICES} slices, {N_MODES} modes, batch {BATCH}: "
          f"iteration {it_s:.3f} s, FFT floor {floor_s:.3f} s ({ffts} FFTs of {W}²) -> {it_s / floor_s:.2f}x floor")


def test_msp_peak_memory(benchmark, problem):
    from tembench_you2025.msp import reconstruct_msp

    patterns, pos, geo, dz = problem
    reconstruct_msp(patterns, pos, geo, _params(1, dz))  # plans and caches outside the measurement
    tracemalloc.start()
    try:
        reconstruct_msp(patterns, pos, geo, _params(1, dz))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    data = patterns.nbytes
    benchmark.extra_info.update(peak_MB=peak / 2**20, data_MB=data / 2**20, peak_over_data=peak / data)
    print(f"\nmsp peak {peak / 2**20:.1f} MB = {peak / data:.2f}x the {data / 2**20:.1f} MB of patterns")
