"""Physics engine speed and memory, reported as ratios measured in one run (ours / FFT floor, ours / abTEM).

Run: ``python -m pytest benchmarks/test_physics_multislice.py -s``. Each benchmark's ``extra_info``
holds the ratios; ``-s`` prints them. The FFT floor is 2 planned in-place FFTs per slice with the
fastest library available (pyFFTW, FFTW_MEASURE, one thread for a single plane), timed interleaved
with our code so machine load affects both alike. abTEM 1.0.11 runs eagerly (dask.lazy False) with
its FFTW backend, one FFTW thread.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from tembench.backend import plan_fft2
from tembench.physics import multislice as M
from tembench.physics import potentials as P
from tembench.physics import stem as S
from _timing import interleaved_min, block_min


def _fft_floor(gpts, n_slices, batch=()):
    plan = plan_fft2(tuple(batch) + tuple(gpts), tag="floor")
    plan.buffer[...] = 1.0

    def floor():  # raw planned transforms (the 1/N of the inverse is left out, as our loops fold it in)
        for _ in range(n_slices):
            plan.forward()
            plan.inverse_unnormalized()

    return floor


def _si_block(gpts_xy, n_slices, slice_A=2.0, sampling_A=None):
    """Si [001] block whose lateral cell fits ``gpts_xy`` pixels at ~0.11 Å and n_slices·slice_A thick."""
    from ase.build import bulk

    a = 5.43
    nxy = max(1, int(round(gpts_xy * (sampling_A or 0.113) / a)))
    nz = int(np.ceil(n_slices * slice_A / a))
    atoms = bulk("Si", "diamond", a=a, cubic=True) * (nxy, nxy, nz)
    cell = np.diag(atoms.cell.array).copy()
    dz = cell[2] / n_slices
    return atoms, cell, dz


@pytest.mark.parametrize("n", [96, 256, 512])
def test_plane_wave_multislice_vs_fft_floor(benchmark, n):
    n_slices = 98
    rng = np.random.default_rng(0)
    v = (rng.random((n_slices, n, n)) * 30).astype(np.float32)
    kw = dict(energy_keV=300, sampling_A=0.1)
    t = M.transmission_functions(v, **kw)
    wave = np.ones((n, n), np.complex64)

    def ours():  # the propagation loop, transmissions precomputed (the 2-FFT-per-slice part)
        return M.multislice(wave, 1.0, transmissions=t, **kw)

    times = interleaved_min({
        "floor": _fft_floor((n, n), n_slices),
        "ours": ours,
        "ours_bandlimited_t": lambda: M.multislice(wave, 1.0, potentials=v, **kw),
        "ours_unlimited_t": lambda: M.multislice(wave, 1.0, potentials=v, bandlimit_transmission=False, **kw),
    }, rounds=5 if n < 512 else 3)
    benchmark.pedantic(ours, rounds=3, iterations=1)
    info = {f"{k}_over_floor": times[k] / times["floor"] for k in times if k != "floor"}
    info["floor_ms"] = times["floor"] * 1e3
    benchmark.extra_info.update(info)
    print(f"\n{n}² x {n_slices} slices: floor {times['floor'] * 1e3:.1f} ms; "
          + ", ".join(f"{k} {v:.2f}x" for k, v in info.items() if k.endswith("floor")))


def _abtem():
    abtem = pytest.importorskip("abtem")
    abtem.config.set({"device": "cpu", "dask.lazy": False, "fft": "fftw", "fftw.threads": 1,
                      "diagnostics.progress_bar": False})
    return abtem


@pytest.mark.parametrize("phonons", [False, True], ids=["crystal", "frozen_phonon"])
@pytest.mark.parametrize("n", [96, 256])
def test_plane_wave_end_to_end_vs_abtem(benchmark, n, phonons):
    """Perfect crystal (our engine computes each of its 8 distinct slices once) and one frozen-phonon
    configuration of it (0.08 Å rms, no two slices alike: the general case), same atoms for both codes."""
    abtem = _abtem()
    n_slices = 98
    atoms, cell, dz = _si_block(n, n_slices)
    if phonons:
        atoms.positions += np.random.default_rng(5).normal(0, 0.08, atoms.positions.shape)
    s = cell[0] / n

    def ours():
        v = P.projected_potential(atoms.positions, atoms.numbers, gpts=(n, n), sampling_A=s, slice_thickness_A=dz,
                                  z_range_A=(0, cell[2]))
        return M.hrtem_exit_wave(v, dz, energy_keV=300, sampling_A=s).exit_wave

    def theirs():
        pot = abtem.Potential(atoms, gpts=(n, n), slice_thickness=dz, parametrization="lobato",
                              projection="infinite")
        return abtem.PlaneWave(energy=300e3).multislice(pot).compute().array

    assert M.hrtem_exit_wave.__name__  # same physics, checked in tests/physics/test_abtem_crosscheck.py
    times = block_min({"floor": _fft_floor((n, n), n_slices), "ours": ours, "abtem": theirs}, rounds=3)
    benchmark.pedantic(ours, rounds=3, iterations=1)
    info = {"abtem_over_ours": times["abtem"] / times["ours"], "ours_over_floor": times["ours"] / times["floor"],
            "abtem_over_floor": times["abtem"] / times["floor"], "n_atoms": len(atoms)}
    benchmark.extra_info.update(info)
    print(f"\n{n}² x {n_slices} slices, {len(atoms)} atoms{' (frozen phonon)' if phonons else ''}: ours {times['ours'] * 1e3:.0f} ms, abTEM "
          f"{times['abtem'] * 1e3:.0f} ms -> {info['abtem_over_ours']:.1f}x faster; ours/floor "
          f"{info['ours_over_floor']:.2f}, abTEM/floor {info['abtem_over_floor']:.2f}")


def test_stem_probes_per_second_vs_abtem(benchmark):
    abtem = _abtem()
    n, n_slices, n_side = 216, 22, 16
    atoms, cell, dz = _si_block(n, n_slices, slice_A=2.0, sampling_A=0.1)
    s = cell[0] / n
    v = P.projected_potential(atoms.positions, atoms.numbers, gpts=(n, n), sampling_A=s, slice_thickness_A=dz,
                              z_range_A=(0, cell[2]))
    pot = abtem.PotentialArray(v.transpose(0, 2, 1).copy(), slice_thickness=dz, sampling=(s, s))
    start, end = (0.0, 0.0), (cell[1] / 2, cell[0] / 2)
    pos = S.scan_positions(start, end, (end[0] / n_side, end[1] / n_side)).reshape(-1, 2)
    assert len(pos) == n_side * n_side

    def ours():  # identical scan: window = field (abTEM does not crop), patterns kept
        return S.stem_scan(v, dz, energy_keV=200, sampling_A=s, positions_A=pos, semiangle_mrad=20,
                           window_gpts=(n, n), detectors={"adf": (40.0, None)})

    def theirs():
        probe = abtem.Probe(semiangle_cutoff=20, energy=200e3)
        scan = abtem.CustomScan(pos[:, ::-1].copy())
        return probe.scan(pot, scan=scan, detectors=abtem.PixelatedDetector(max_angle=None)).compute()

    floor_plan = _fft_floor((n, n), n_slices + 1, batch=(4,))

    def floor():  # 2 FFTs per slice (+1 far field) per probe, batched 4 at a time (the fastest batch measured)
        for _ in range(len(pos) // 4):
            floor_plan()

    times = block_min({"floor": floor, "ours": ours, "abtem": theirs}, rounds=2)
    benchmark.pedantic(ours, rounds=2, iterations=1)
    info = {"probes_per_s_ours": len(pos) / times["ours"], "probes_per_s_abtem": len(pos) / times["abtem"],
            "ours_speedup_vs_abtem": times["abtem"] / times["ours"], "ours_over_floor": times["ours"] / times["floor"],
            "abtem_over_floor": times["abtem"] / times["floor"]}
    benchmark.extra_info.update(info)
    print("\n4D-STEM 216² x 22 slices x 256 probes: " + ", ".join(f"{k} {v:.2f}" for k, v in info.items()))


def test_stem_batch_cropping_speedup(benchmark):
    """Batch cropping (You eq 8): a 96² window on a 384² field vs the probe on the whole field."""
    n, w = 384, 96
    rng = np.random.default_rng(1)
    v = P.projected_potential(rng.uniform(0, 38.4, (2000, 3)), [14] * 2000, gpts=(n, n), sampling_A=0.1,
                              slice_thickness_A=2.0, z_range_A=(0, 20))
    pos = S.scan_positions((10, 10), (14, 14), 0.5).reshape(-1, 2)
    kw = dict(energy_keV=300, sampling_A=0.1, positions_A=pos, semiangle_mrad=20, detectors={"adf": (40, None)},
              return_patterns=False)
    times = interleaved_min({"cropped": lambda: S.stem_scan(v, 2.0, window_gpts=(w, w), **kw),
                              "full": lambda: S.stem_scan(v, 2.0, window_gpts=(n, n), **kw)}, rounds=2)
    benchmark.pedantic(lambda: S.stem_scan(v, 2.0, window_gpts=(w, w), **kw), rounds=2, iterations=1)
    benchmark.extra_info["full_over_cropped"] = times["full"] / times["cropped"]
    print(f"\nbatch cropping: {times['full'] / times['cropped']:.1f}x faster than full-field probes")


def test_tilt_series_peak_memory(benchmark):
    """96³-voxel sample (0.5 Å), 60 tilts x 3 defocus: peak traced memory / one complex 96³ volume."""
    from tembench.builtin.forward_multislice import HRTEMTiltSeries
    from tembench.types import Sample

    rng = np.random.default_rng(2)
    cell = np.array([48.0, 48.0, 48.0])
    r = 18.0 * rng.random(3000) ** (1 / 3)
    u = rng.normal(size=(3000, 3))
    pos = cell / 2 + u / np.linalg.norm(u, axis=1, keepdims=True) * r[:, None]
    sample = Sample(positions_A=pos, numbers=rng.choice([14, 8], 3000), cell_A=cell)
    params = HRTEMTiltSeries.Params(sampling_A=0.5, slice_thickness_A=2.0, tilt_range_deg=(-60, 60), n_tilts=60,
                                    defocus_values_A=[0.0, 100.0, 200.0])

    def run():
        return HRTEMTiltSeries().simulate(sample, params, np)

    run()  # plans and caches exist before tracing
    tracemalloc.start()
    m = run()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    volume = 96**3 * 8
    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update({"peak_MB": peak / 2**20, "peak_over_complex_volume": peak / volume,
                                 "output_MB": m.data.nbytes / 2**20})
    print(f"\ntilt series 96³ x 60 tilts x 3 defocus: peak {peak / 2**20:.1f} MB = {peak / volume:.2f} complex "
          f"volumes (output alone {m.data.nbytes / 2**20:.1f} MB)")
