"""Noise steps on disk-backed data: streamed chunk by chunk into a new file, values identical to the in-RAM path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tembench.builtin.detector_noise import ScintillatorPMT
from tembench.builtin.noise import PoissonDose, poisson_counts
from tembench.cache import StageCache
from tembench.types import Geometry, Measurement

AXES_4D = ("scan_y", "scan_x", "k_y", "k_x")


def patterns(shape=(9, 7, 24, 20), seed=3):
    rng = np.random.default_rng(seed)
    data = rng.random(shape).astype(np.float32)
    return data / data.sum(axis=(2, 3), keepdims=True)


def on_disk(tmp_path, data, name="patterns.npy"):
    path = tmp_path / name
    np.save(path, data)
    return np.load(path, mmap_mode="c"), path


def measurement(data, kind="4dstem", axes=AXES_4D):
    return Measurement(kind, data, axes, Geometry(scan_step_A=(0.5, 0.5), sampling_A=(0.5, 0.5)))


def test_chunk_size_does_not_change_the_counts():
    """One sequential stream of the generator: any chunking draws the same numbers."""
    lam = patterns((5, 5, 16, 16)) * 300
    ref = poisson_counts(lam, 1.0, np.random.default_rng(7), chunk_elems=lam.size)
    for chunk in (1, 1000, 4097, 1 << 20):
        np.testing.assert_array_equal(poisson_counts(lam, 1.0, np.random.default_rng(7), chunk_elems=chunk), ref)


@pytest.mark.parametrize("params", [{"electrons_per_pattern": 500.0}, {"dose_e_per_A2": 40.0}])
def test_poisson_dose_streamed_equals_in_ram(tmp_path, params, monkeypatch):
    import tembench.builtin.noise as noise

    monkeypatch.setattr(noise, "CHUNK_ELEMS", 1000)  # many chunks, a ragged last one
    data = patterns()
    mapped, path = on_disk(tmp_path, data)
    before = path.read_bytes()
    p = PoissonDose.Params(**params)
    ram = PoissonDose().apply(measurement(data.copy()), p, np.random.default_rng(11))
    disk = PoissonDose().apply(measurement(mapped), p, np.random.default_rng(11))
    assert not isinstance(ram.data, np.memmap)
    assert isinstance(disk.data, np.memmap) and os.path.dirname(disk.data.filename) == str(tmp_path)
    assert disk.data.shape == data.shape and disk.data.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(disk.data), ram.data)
    assert ram.data.sum() > 0 and disk.counted
    assert path.read_bytes() == before  # the input file is never written
    # the same step on the same file replaces its own output instead of adding another
    again = PoissonDose().apply(measurement(mapped), p, np.random.default_rng(11))
    assert again.data.filename == disk.data.filename
    assert sorted(f.name for f in tmp_path.iterdir() if not f.name.startswith(".")) == sorted(
        ["patterns.npy", os.path.basename(disk.data.filename)])
    # the stage cache hard-links the streamed output instead of copying it
    cache = StageCache(tmp_path / ".cache")
    assert cache.put("noise", "k" * 32, disk)
    entry = json.loads((cache.entry_dir("noise", "k" * 32) / "entry.json").read_text())
    assert [f["source"] for f in entry["body"]["files"].values() if "source" in f] == ["linked"]


def test_streaming_from_a_cache_entry_writes_into_the_cache(tmp_path):
    cache = StageCache(tmp_path / ".cache")
    data = patterns((20, 20, 64, 64))  # 6.3 MB: read back memory-mapped only above the threshold
    import tembench.cache as c

    old = c.MMAP_THRESHOLD_BYTES
    c.MMAP_THRESHOLD_BYTES = 1 << 20
    try:
        assert cache.put("forward", "f" * 32, measurement(data))
        hit = cache.get("forward", "f" * 32)
    finally:
        c.MMAP_THRESHOLD_BYTES = old
    assert isinstance(hit.data, np.memmap)
    p = PoissonDose.Params(electrons_per_pattern=100.0)
    disk = PoissonDose().apply(hit, p, np.random.default_rng(2))
    ram = PoissonDose().apply(measurement(data), p, np.random.default_rng(2))
    np.testing.assert_array_equal(np.asarray(disk.data), ram.data)
    folder = os.path.dirname(disk.data.filename)
    assert os.path.basename(folder).startswith(".tmp-stream-")  # pruned as a stale temp folder later
    assert os.path.dirname(folder) == str(tmp_path / ".cache" / "forward")
    assert cache.get("forward", "f" * 32) is not None  # the forward entry is untouched and still whole


@pytest.mark.parametrize("counted", [False, True])
@pytest.mark.parametrize("output", ["electrons", "normalized", "anode"])
def test_scintillator_pmt_streamed_equals_in_ram(tmp_path, monkeypatch, counted, output):
    import tembench.builtin.noise as noise

    monkeypatch.setattr(noise, "CHUNK_ELEMS", 777)
    img = np.random.default_rng(4).random((3, 40, 50)).astype(np.float32) * 0.02
    p = ScintillatorPMT.Params(dose_e_per_A2=200.0, output=output, dark_noise_std_electrons=0.3)
    m = Measurement("adf_image", img, ("tilt", "scan_y", "scan_x"), Geometry(scan_step_A=(0.5, 0.5)))
    if counted:
        m = PoissonDose().apply(m, PoissonDose.Params(dose_e_per_A2=200.0), np.random.default_rng(1))
    mapped, _ = on_disk(tmp_path, np.asarray(m.data), "adf.npy")
    ram = ScintillatorPMT().apply(m, p, np.random.default_rng(5))
    disk = ScintillatorPMT().apply(m.replace(data=mapped), p, np.random.default_rng(5))
    assert isinstance(disk.data, np.memmap) and not isinstance(ram.data, np.memmap)
    np.testing.assert_array_equal(np.asarray(disk.data), ram.data)
    # the intermediate counts file is removed; only the input and the output remain
    assert sorted(f.name for f in tmp_path.iterdir() if not f.name.startswith(".")) == sorted(
        ["adf.npy", os.path.basename(disk.data.filename)])


def test_scintillator_pmt_values_pinned():
    """The in-RAM path keeps the numbers of version 1 (Poisson counts first, then the Gaussians, one stream)."""
    img = np.full((4, 5), 0.01, np.float32)
    m = Measurement("adf_image", img, ("scan_y", "scan_x"), Geometry(scan_step_A=(0.5, 0.5)))
    p = ScintillatorPMT.Params(dose_e_per_A2=400.0)
    out = ScintillatorPMT().apply(m, p, np.random.default_rng(9))
    rng = np.random.default_rng(9)
    counts = rng.poisson(np.full(20, 0.01 * 400.0 * 0.25)).astype(np.float64)
    from tembench.builtin.detector_noise import single_electron_relative_sigma

    rel = single_electron_relative_sigma(300.0, 0.25, 4.0)
    expect = (counts + rng.standard_normal(20) * rel * np.sqrt(counts)).astype(np.float32)
    np.testing.assert_array_equal(out.data.reshape(-1), expect)


PEAK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    from tembench.builtin.noise import PoissonDose
    from tembench.types import Geometry, Measurement

    def status(field):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024

    path, shape = sys.argv[1], (32, 32, 256, 256)
    row = np.full(shape[1:], 1.0 / (256 * 256), np.float32)
    with open(path, "wb") as fh:  # written row by row: the set never sits in this process's memory
        np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": shape})
        for _ in range(shape[0]):
            fh.write(row.data)
    data = np.load(path, mmap_mode="c")
    m = Measurement("4dstem", data, ("scan_y", "scan_x", "k_y", "k_x"), Geometry(scan_step_A=(0.5, 0.5)))
    p = PoissonDose.Params(electrons_per_pattern=2000.0)
    PoissonDose().apply(Measurement("4dstem", np.ones((2, 2, 4, 4), np.float32), m.axes, m.geometry), p,
                        np.random.default_rng(0))  # warm up the code path
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    base = status("VmRSS")
    out = PoissonDose().apply(m, p, np.random.default_rng(1))
    peak = status("VmHWM")
    total = float(out.data[:4].sum(dtype=np.float64))
    print(json.dumps({"base": base, "peak": peak, "nbytes": int(data.nbytes), "memmap": isinstance(out.data, np.memmap),
                      "electrons_first_rows": total}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
def test_poisson_dose_on_a_256_MiB_memory_mapped_set_stays_small(tmp_path):
    """Peak RSS added by the noise stage < 10 % of the data (measured 30 MiB on 256 MiB; in RAM it is > 100 %)."""
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "big.npy")], capture_output=True,
                         text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["memmap"]
    assert abs(r["electrons_first_rows"] - 4 * 32 * 2000.0) < 5 * np.sqrt(4 * 32 * 2000.0)
    added = r["peak"] - r["base"]
    assert added < 0.10 * r["nbytes"], (added / 2**20, r["nbytes"] / 2**20)
