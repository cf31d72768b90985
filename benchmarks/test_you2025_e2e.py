"""You 2025 end-to-end ptychographic tomography (Alg. 3, ``e2e``): seconds per tilt per epoch against the FFT floor of
its multislice, and peak memory in complex volumes.

Run: ``python -m pytest benchmarks/test_you2025_e2e.py -s``; the figures are in ``extra_info`` and printed.

Problem (issue 15): a 96³ volume of 0.25 Å voxels, a 32 × 32 scan per tilt (0.35 Å steps), 48² patterns
(= probe window), 2 probe modes, slabs of b = 8 voxels (12 slabs of 2 Å), batches of 32 (32 per tilt), complex V,
probe refined, general Euler angles (nominal tilt plus small rot/psi, three plane rotations per turn).
Patterns simulated by the engine from a volume of Gaussian blobs (their content does not change the work).

* FFT floor: the 2D FFTs one epoch of one tilt cannot avoid, per pattern and probe mode 4·n_slabs of 48²
  (as the msp benchmark: incident 1, forward n and n − 1, backward n and n − 1, the incident gradient's 1), run as
  planned in-place transforms of the engine's chunk shape, interleaved with the epochs so load affects both alike.
  Everything else — the volume's rotation and its adjoint, binning, transmissions, windows, loss, steps,
  orthogonalisation — is overhead against that floor. Both volume-update modes are timed ('tilt': one rotation
  pair per tilt; 'minibatch': one per batch, Alg. 3 literally).
* Memory: tracemalloc peak of a one-tilt, one-epoch reconstruction (plans and rotation operators built before),
  in units of one complex64 volume (96³ × 8 B = 6.75 MB); the patterns are allocated before and not counted
  (they are read batch by batch, never copied whole).
"""

from __future__ import annotations

import os
import time
import tracemalloc

import numpy as np
import pytest

from tembench.backend import plan_fft2
from tembench.types import Geometry

N, S_A, W, SCAN, STEP_A, B, MODES, BATCH, E_KEV = 96, 0.25, 48, 32, 0.35, 8, 2, 32, 200.0
ANGLES = (-30.0, 0.0, 30.0)


@pytest.fixture(scope="module")
def problem():
    from tembench.physics import stem as S
    from tembench_you2025 import e2e as E
    from tembench_you2025.tomo_common import slabs, tomo_grid

    grid = tomo_grid((N, N), S_A, (N * S_A / 2,) * 3)
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*(np.arange(N) * S_A,) * 3, indexing="ij")
    vol = np.zeros(grid.shape, np.float32)
    for c in rng.uniform(8.0, 16.0, (40, 3)):
        vol += 30.0 * np.exp(-((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) / (2 * 0.4**2))
    euler = np.array([[0.3, a, -0.2] for a in ANGLES])
    probe = S.make_probe_modes((W, W), S_A, E_KEV, 25.0, {"C10": -30.0}, n_modes=MODES, defocus_spread_A=20.0)
    lo = (N * S_A - (SCAN - 1) * STEP_A) / 2
    pos = S.scan_positions((lo, lo), (lo + SCAN * STEP_A - 1e-6,) * 2, STEP_A).reshape(-1, 2)
    assert len(pos) == SCAN * SCAN
    pats = np.stack([S.stem_scan(slabs(vol, e, B, S_A), E._slab_thicknesses(grid, B), energy_keV=E_KEV,
                                 sampling_A=S_A, positions_A=pos, probe=probe, band_limit=None,
                                 bandlimit_transmission=False).patterns for e in euler])
    pats *= 1000.0  # counts
    return pats, pos, grid, euler, probe


def _run(problem, n_tilts, n_epochs, mode):
    from tembench_you2025 import e2e as E

    pats, pos, grid, euler, probe = problem
    p = E.E2EParams(n_epochs=n_epochs, slab_voxels=B, batch_size=BATCH, start_probe_epoch=0, volume_update=mode,
                    step_size=1.0)
    return E.reconstruct_e2e(pats[:n_tilts], [pos] * n_tilts, Geometry(energy_keV=E_KEV), grid, euler[:n_tilts],
                             np.zeros((n_tilts, 2)), probe, p, pattern_scales=[1000.0] * n_tilts)


@pytest.mark.parametrize("mode", ["tilt", "minibatch"])
def test_e2e_seconds_per_tilt_epoch_vs_fft_floor(benchmark, problem, mode):
    from tembench_you2025.e2e import engine_chunk

    n_slabs = -(-N // B)
    n_pos = SCAN * SCAN
    ffts = n_pos * MODES * 4 * n_slabs  # per tilt and epoch
    chunk = engine_chunk(BATCH, MODES, (W, W), n_slabs) * MODES  # the engine's FFT batch (patterns x modes)
    plan = plan_fft2((chunk, W, W), tag="you2025-e2e-floor")
    plan.buffer[...] = 1.0

    def floor():
        for _ in range(ffts // (2 * chunk)):
            plan.forward()
            plan.inverse()

    samples: list[float] = []

    def epochs():
        r = _run(problem, len(ANGLES), 2, mode)
        samples.extend(r.history["time_per_tilt_s"][1:])  # the first epoch builds plans and rotation operators

    load = os.getloadavg()[0]
    floor()
    epochs()
    samples.clear()
    floors = []
    for _ in range(2):
        t = time.perf_counter()
        floor()
        floors.append(time.perf_counter() - t)
        epochs()
    benchmark.pedantic(floor, rounds=1, iterations=1)
    per_tilt, floor_s = float(np.median(samples)), float(np.median(floors))
    info = {"seconds_per_tilt_epoch": per_tilt, "fft_floor_s": floor_s, "over_fft_floor": per_tilt / floor_s,
            "ffts_per_tilt_epoch": ffts, "fft_shape": [chunk, W, W], "volume": [N, N, N], "patterns_per_tilt": n_pos,
            "slabs": n_slabs, "probe_modes": MODES, "batch": BATCH, "volume_update": mode,
            "loadavg_1min": load, "loadavg_1min_after": os.getloadavg()[0]}
    benchmark.extra_info.update(info)
    print(f"\ne2e ({mode}; load {load:.1f} -> {os.getloadavg()[0]:.1f}): {N}³ volume, {n_pos} patterns of {W}², "
          f"{n_slabs} slabs, {MODES} modes, batch {BATCH}: {per_tilt:.3f} s per tilt per epoch, FFT floor "
          f"{floor_s:.3f} s ({ffts} FFTs of {W}²) -> {per_tilt / floor_s:.2f}x floor")


@pytest.mark.parametrize("mode", ["tilt", "minibatch"])
def test_e2e_peak_memory_in_complex_volumes(benchmark, problem, mode):
    pats = problem[0]
    _run(problem, 1, 1, mode)  # plans, caches, rotation operators outside the measurement
    tracemalloc.start()
    try:
        _run(problem, 1, 1, mode)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    vol = N**3 * 8
    data = pats[:1].nbytes
    benchmark.extra_info.update(peak_MB=peak / 2**20, complex_volume_MB=vol / 2**20, peak_over_complex_volume=peak / vol,
                                data_one_tilt_MB=data / 2**20, volume_update=mode)
    print(f"\ne2e ({mode}) peak {peak / 2**20:.1f} MB = {peak / vol:.2f} complex volumes of {vol / 2**20:.2f} MB "
          f"(patterns of the tilt: {data / 2**20:.1f} MB, not counted)")
