"""The speed paths of the physics engine give the results of the plain computations they replace."""

import numpy as np
import pytest

from tembench.physics import multislice as M
from tembench.physics import potentials as P


def _crystal(nxy=3, nz=4, a=5.43):
    from ase.build import bulk

    atoms = bulk("Si", "diamond", a=a, cubic=True) * (nxy, nxy, nz)
    return atoms.positions, atoms.numbers, np.diag(atoms.cell.array).copy()


@pytest.mark.parametrize("gpts", [(48, 48), (47, 50), (50, 45)])
def test_half_ky_structure_factors_match_exact_product(gpts):
    """±ky symmetry (real × complex products of half the size) vs the plain complex matrix product."""
    rng = np.random.default_rng(3)
    ny, nx = gpts
    yx = rng.uniform(-5, 25, (300, 2))
    slice_of_atom = rng.integers(0, 5, 300)
    ky, kx = np.fft.fftfreq(ny, d=0.4), np.fft.rfftfreq(nx, d=0.45)
    fast = P._structure_factors_by_slice(yx, slice_of_atom, 5, ky, kx, np)
    for s in range(5):
        exact = P._structure_factor_2d(yx[slice_of_atom == s], ky, kx, np)
        assert np.linalg.norm(fast[s] - exact) <= 1e-5 * np.linalg.norm(exact)


def test_repeated_slices_computed_once_give_the_same_potential(monkeypatch):
    pos, numbers, cell = _crystal()
    kw = dict(gpts=(64, 64), sampling_A=cell[0] / 64, slice_thickness_A=cell[2] / 14, z_range_A=(0, cell[2]))
    rep = P._repeated_slices(pos, numbers, P._assign_slices(pos[:, 2], P.slice_edges(kw["slice_thickness_A"],
                                                                                   kw["z_range_A"])), 14)
    assert len(np.unique(rep)) < 14  # the crystal does repeat slices
    fast = P.projected_potential(pos, numbers, **kw)
    monkeypatch.setattr(P, "_repeated_slices", lambda pos, numbers, idx, n: np.arange(n))
    plain = P.projected_potential(pos, numbers, **kw)
    assert np.array_equal(fast, plain)
    # frozen phonons: nothing repeats
    rng = np.random.default_rng(0)
    moved = pos + rng.normal(0, 0.08, pos.shape)
    idx = P._assign_slices(moved[:, 2], P.slice_edges(kw["slice_thickness_A"], kw["z_range_A"]))
    assert np.array_equal(P._repeated_slices(moved, numbers, idx, 14), np.arange(14))


def test_duplicate_slice_transmissions_match_per_slice():
    rng = np.random.default_rng(1)
    distinct = (rng.random((3, 40, 42)) * 20).astype(np.float32)
    order = [0, 1, 2, 1, 0, 0, 2, 1]
    v = distinct[order]
    v[5, 3, 4] += 1e-3  # nearly but not exactly a repeat: must be kept apart
    assert M.duplicate_slices(v).tolist() == [0, 1, 2, 1, 0, 5, 2, 1]
    kw = dict(energy_keV=200, sampling_A=0.2)
    wave = np.ones((40, 42), np.complex64)
    fast = M.multislice(wave, 1.5, potentials=v, **kw).exit_wave
    t = np.stack([M.transmission_functions(v[m:m + 1], **kw)[0] for m in range(len(v))])
    plain = M.multislice(wave, 1.5, transmissions=t, **kw).exit_wave
    assert np.linalg.norm(fast - plain) <= 1e-5 * np.linalg.norm(plain)  # float32 FFT rounding


@pytest.mark.parametrize("shape", [(2, 40, 42), (45, 50)])
def test_pruned_fft_matches_full_on_band_limited_spectra(shape):
    from tembench.backend import plan_fft2, plan_pruned_fft2
    from tembench.physics.propagation import PropagatorCache

    props = PropagatorCache(shape[-2:], 0.2, 0.025)
    keep = props.kept_columns()
    assert sum(keep) < shape[-1]  # the 2/3 limit leaves columns out
    rng = np.random.default_rng(2)
    x = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    p = props(1.0)
    full = plan_fft2(shape, tag="test-full")
    full.buffer[...] = x
    full.forward()
    full.buffer *= p
    want = full.inverse().copy()
    pruned = plan_pruned_fft2(shape, keep, tag="test-pruned")
    pruned.buffer[...] = x
    pruned.forward_pruned()
    pruned.buffer *= p / np.float32(shape[-1] * shape[-2])
    got = pruned.inverse_pruned()
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)


# --- deterministic FFT planning (issue 9) ------------------------------------------------------
_PLAN_SCRIPT = """
import hashlib, sys
import numpy as np
from tembench.backend import FFT2Plan, IRFFT2Plan, PrunedFFT2Plan
rng = np.random.default_rng(5)
x = (rng.normal(size=(3, 96, 80)) + 1j * rng.normal(size=(3, 96, 80))).astype(np.complex64)
h = hashlib.sha256()
p = FFT2Plan(x.shape); p.buffer[...] = x; h.update(p.forward().tobytes()); h.update(p.inverse().tobytes())
q = PrunedFFT2Plan(x.shape, (20, 19)); q.buffer[...] = x; h.update(q.forward_pruned().tobytes())
h.update(q.inverse_pruned().tobytes())
r = IRFFT2Plan((2, 96, 80)); r.spectrum[...] = x[:2, :, :41]; h.update(r().tobytes())
print(p.library, h.hexdigest())
"""


def _plans_in_fresh_process(env_extra):
    import os
    import subprocess
    import sys

    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", _PLAN_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


@pytest.mark.skipif(not __import__("tembench.backend").backend.pyfftw_available(), reason="needs pyFFTW")
def test_wisdom_planner_gives_the_same_bits_in_every_process(tmp_path):
    """Default planner: a transform is timed once (FFTW_MEASURE) into the wisdom file, then every
    process plans it from there (FFTW_WISDOM_ONLY); the file is never rewritten for known shapes."""
    wisdom = tmp_path / "wisdom.json"
    env = {"TEMBENCH_FFTW_WISDOM": str(wisdom), "TEMBENCH_FFTW_EFFORT": ""}
    first = _plans_in_fresh_process(env)
    assert first[0] == "pyfftw" and wisdom.exists()
    before = wisdom.read_bytes()
    assert _plans_in_fresh_process(env) == first
    assert wisdom.read_bytes() == before


@pytest.mark.skipif(not __import__("tembench.backend").backend.pyfftw_available(), reason="needs pyFFTW")
@pytest.mark.parametrize("effort", ["wisdom", "FFTW_ESTIMATE"])
def test_deterministic_plans_ignore_other_wisdom_in_the_process(effort, tmp_path, monkeypatch):
    """FFTW reuses any wisdom in the process (FFTW_ESTIMATE plans too): a library that planned with
    FFTW_MEASURE before us (abTEM does) must not change our plans, and keeps its wisdom."""
    import pyfftw

    from tembench.backend import FFT2Plan

    monkeypatch.setenv("TEMBENCH_FFTW_WISDOM", str(tmp_path / "w.json"))
    monkeypatch.setenv("TEMBENCH_FFTW_EFFORT", effort)
    x = (np.random.default_rng(1).normal(size=(2, 96, 96)) + 0j).astype(np.complex64)

    def transform():
        p = FFT2Plan(x.shape)
        p.buffer[...] = x
        return p.forward().copy()

    saved = pyfftw.export_wisdom()
    try:
        pyfftw.forget_wisdom()
        clean = transform()
        a = pyfftw.empty_aligned(x.shape, np.complex64)  # someone else's measured plans
        for shape in [(2, 96, 96), (96, 96), (96,)]:
            b = pyfftw.empty_aligned(shape, np.complex64)
            pyfftw.FFTW(b, b, axes=tuple(range(-min(2, len(shape)), 0)), flags=("FFTW_MEASURE",))
        theirs = [set(w.splitlines()) for w in pyfftw.export_wisdom()]
        assert transform().tobytes() == clean.tobytes()
        assert [set(w.splitlines()) for w in pyfftw.export_wisdom()] == theirs  # (in another order)
        del a
    finally:
        pyfftw.forget_wisdom()
        pyfftw.import_wisdom(saved)


def test_fft_identity_names_the_planner_and_marks_timing_planners(monkeypatch, tmp_path):
    from tembench import backend

    monkeypatch.setenv("TEMBENCH_FFTW_WISDOM", str(tmp_path / "w.json"))
    monkeypatch.delenv("TEMBENCH_FFTW_EFFORT", raising=False)
    monkeypatch.delenv("TEMBENCH_FFT", raising=False)
    ident = backend.fft_identity()
    assert set(ident) == {"library", "pyfftw", "planner", "wisdom", "threads", "blas_threads", "numba",
                          "deterministic"}
    assert all(isinstance(v, str) for v in ident.values())
    assert ident["deterministic"] == "true"
    if backend.pyfftw_available():
        assert ident["library"] == "pyfftw" and ident["planner"] == "wisdom" and ident["wisdom"] != "none"
        assert backend.fft_identity()["wisdom"] == ident["wisdom"]  # the file's id, stable
        monkeypatch.setenv("TEMBENCH_FFTW_EFFORT", "FFTW_MEASURE")
        timed = backend.fft_identity()
        assert timed["planner"] == "FFTW_MEASURE" and timed["deterministic"] == "false"
        monkeypatch.setenv("TEMBENCH_FFTW_EFFORT", "estimate")
        assert backend.fft_identity()["planner"] == "FFTW_ESTIMATE"
        assert backend.fft_identity()["deterministic"] == "true"
        monkeypatch.setenv("TEMBENCH_FFTW_EFFORT", "FFTW_FASTEST")
        with pytest.raises(ValueError, match="TEMBENCH_FFTW_EFFORT"):
            backend.fft_identity()
        monkeypatch.delenv("TEMBENCH_FFTW_EFFORT")
    monkeypatch.setenv("TEMBENCH_FFT", "scipy")
    sp = backend.fft_identity()
    assert sp["library"] == "scipy" and sp["planner"] == "none" and sp["deterministic"] == "true"
    assert sp != ident or not backend.pyfftw_available()
    monkeypatch.setenv("TEMBENCH_FFT_WORKERS", "2")
    assert backend.fft_identity()["threads"] == "2"
    assert backend.fft_identity("gpu")["library"] == "cupy"


def test_scipy_fft_bits_do_not_depend_on_the_worker_count():
    """Why scipy.fft's worker count is not in fft_identity: pocketfft splits only independent 1D
    transforms between threads."""
    import scipy.fft

    rng = np.random.default_rng(4)
    x = (rng.normal(size=(7, 96, 90)) + 1j * rng.normal(size=(7, 96, 90))).astype(np.complex64)
    one = scipy.fft.fft2(x, workers=1)
    for w in (2, 3, 8):
        assert scipy.fft.fft2(x, workers=w).tobytes() == one.tobytes()
    r = scipy.fft.rfft2(x.real)
    assert scipy.fft.irfft2(r, s=(96, 90), workers=1).tobytes() == scipy.fft.irfft2(r, s=(96, 90), workers=4).tobytes()
