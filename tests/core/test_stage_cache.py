"""The stage cache (tembench.cache): arrays as .npy + JSON, no pickle, integrity, big data on disk, housekeeping."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import dummy_plugin
from tembench import Measurement, Params, Reconstruction, Reconstructor, hookimpl
from tembench import cache as cache_mod
from tembench.cache import ENTRY_JSON, StageCache, register_cache_type
from tembench.cli import main as cli_main
from tembench.eer import ElectronEvents
from tembench.runner import run_scenario, stage_keys
from tembench.scenario import parse_scenario
from tembench.types import Geometry, Sample


@pytest.fixture(autouse=True)
def _fresh_notices(monkeypatch):
    """Notices are printed once per process; each test starts with none printed."""
    monkeypatch.setattr(cache_mod, "_noticed", set())


# --- exact comparison ----------------------------------------------------------------------------
def assert_same(a, b, where="value"):
    """Equal in type, value and (for floats and arrays) bit pattern, recursively."""
    assert type(a) is type(b) or (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)), \
        f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), f"{where}: array bytes differ"
        assert a.flags.f_contiguous == b.flags.f_contiguous or a.ndim < 2 or not (
            a.flags.c_contiguous or a.flags.f_contiguous), f"{where}: memory order"
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, complex):
        assert_same(a.real, b.real, where)
        assert_same(a.imag, b.imag, where)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), f"{where}: keys {list(a)} != {list(b)}"
        for (ka, va), (kb, vb) in zip(a.items(), b.items()):
            assert_same(ka, kb, f"{where}<key>")
            assert_same(va, vb, f"{where}[{ka!r}]")
    elif dataclasses.is_dataclass(a):
        assert_same(vars(a), vars(b), f"{where}.{type(a).__name__}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _awkward_values():
    """Plain values JSON cannot hold as they are."""
    return {
        "inf": math.inf, "-inf": -math.inf, "nan": math.nan, "neg_zero": -0.0, "tiny": 5e-324, "third": 1 / 3,
        "int": 2**70, "bool": True, "false": False, "none": None, "tuple": (1, 2.0, "x", (None,)), "list": [1, [2, (3,)]],
        1: "int key", 2.5: "float key", (0, 1): "tuple key", None: "None key", False: "bool key",
        "np": (np.float32(1.5), np.float64(np.nan), np.int16(-3), np.bool_(True), np.complex64(1 - 2j), np.str_("s")),
        "complex": 3 - 4j, "bytes": b"\x00\xff", "set": {1, 2}, "frozenset": frozenset({"a"}), "dtype": np.dtype(">i4"),
        "path": Path("/tmp/x.npy"), "$t": "a key that looks like the tag", "unicode": "Å σ·V \ud83d",
    }


def _sample():
    return Sample(positions_A=[[1.0, 2.0, 3.0], [4.0, 5.0, 6.5]], numbers=[14, 8], cell_A=[10.0, 10.0, 12.0],
                  name="needle", rms_displacement_A=[0.05, 0.07], labels=np.array(["core", "shell"]),
                  metadata={"core_radius_A": 5.0, "zone_axis": [0, 0, 1], "nested": {"inf": math.inf}})


def _events():
    counts = np.random.default_rng(1).poisson(0.4, size=(3, 4, 6, 5))
    return ElectronEvents.from_dense(counts)


def _measurement_4d(big: bool = False):
    rng = np.random.default_rng(0)
    shape = (32, 32, 64, 64) if big else (4, 5, 6, 7)  # big: 16 MiB of float32, memory-mapped on load
    data = rng.random(shape, dtype=np.float32)
    geom = Geometry(energy_keV=80.0, sampling_A=(0.1, np.float64(0.1)), tilt_angles_deg=[0.0],
                    defocus_A=[-50.0], aberrations_A={"C10": 50.0, "C30": math.inf}, semiangle_mrad=25.0,
                    scan_step_A=tuple(np.broadcast_to(np.asarray(0.3, float), (2,))),
                    scan_positions_A=rng.random((20, 2)), detector_sampling_mrad=(1.5, 1.5), dose_e_per_A2=math.inf,
                    extra={"window_gpts": (64, 64), "detector_centre_px": (3.5, 3.5), "detectors_mrad": {"adf": [40.0, None]},
                           "frozen_phonons": 0, "awkward": _awkward_values()})
    ev = _events()
    return Measurement(kind="4dstem", data=data, axes=("scan_y", "scan_x", "k_y", "k_x"), geometry=geom, counted=False,
                       provenance=[{"kind": "forward_model", "name": "stem4d", "version": "1", "params": {"x": None}}],
                       extras={"virtual_images": {"adf": rng.random((4, 5), dtype=np.float32)}, "events": ev,
                               "rle": ev.sorted().to_rle(), "fortran": np.asfortranarray(rng.random((3, 4))),
                               "strided": np.arange(40.0)[::3], "scalar0d": np.array(7, dtype=np.uint8),
                               "empty": np.zeros((0, 3), np.complex64), "big_endian": np.arange(6, dtype=">f8"),
                               "structured": np.array([(1, 2.0)], dtype=[("a", "<i4"), ("b", "<f8", (1,))]),
                               "datetime": np.array(["2026-01-01"], dtype="datetime64[D]"), "same": data})


def _reconstruction():
    return Reconstruction(kind="volume", data=np.random.default_rng(2).random((4, 5, 6), dtype=np.float32),
                          sampling_A=(0.5, 0.5, 0.5), quantity="potential_V", origin_A=(0.0, -1.5, 2.0),
                          history={"cost": [3.0, 2.0, math.nan], "time_s": [0.1, 0.2]},
                          extras={"tau_eq6_per_V": math.nan, "shape": [4, 5, 6], "trace": {"update_rms_V": [1e-3]}},
                          timings_s={"total": 1.25})


STAGE_VALUES = {
    "sample": lambda: _sample(),
    "forward": lambda: _measurement_4d(),
    "noise": lambda: Measurement(kind="eer", data=None, axes=("scan_y", "scan_x", "k_y", "k_x"),
                                 geometry=Geometry(energy_keV=80.0), counted=True, extras={"events": _events()}),
    "recon": lambda: _reconstruction(),
}


@pytest.mark.parametrize("stage", list(STAGE_VALUES))
def test_every_stage_type_round_trips_bit_exactly(tmp_path, stage):
    value = {"value": STAGE_VALUES[stage](), "time_s": 0.123456789, "peak_MB": math.nan}
    cache = StageCache(tmp_path)
    assert cache.put(stage, "k" * 64, value)
    got = cache.get(stage, "k" * 64)
    assert_same(value, got)
    # only .npy files and the JSON description; no pickle anywhere
    files = sorted(p.name for p in (tmp_path / stage / ("k" * 64)).iterdir())
    assert files[-1] == ENTRY_JSON and all(f.endswith(".npy") for f in files[:-1])


def test_arrays_shared_in_a_value_are_stored_once_and_stay_shared(tmp_path):
    m = _measurement_4d()
    cache = StageCache(tmp_path)
    cache.put("forward", "k1", {"value": m})
    got = cache.get("forward", "k1")["value"]
    assert got.extras["same"] is got.data


def test_decoding_never_runs_init_or_post_init(tmp_path, monkeypatch):
    cache = StageCache(tmp_path)
    cache.put("forward", "k1", {"value": _measurement_4d()})

    def boom(self, *a, **k):
        raise AssertionError("constructor ran while decoding")

    for cls in (Sample, Geometry, Measurement, Reconstruction, ElectronEvents):
        monkeypatch.setattr(cls, "__init__", boom)
        if hasattr(cls, "__post_init__"):
            monkeypatch.setattr(cls, "__post_init__", boom)
    assert isinstance(cache.get("forward", "k1")["value"], Measurement)


def test_big_arrays_load_memory_mapped_copy_on_write(tmp_path):
    m = _measurement_4d(big=True)
    cache = StageCache(tmp_path)
    cache.put("forward", "k1", {"value": m})
    got = cache.get("forward", "k1")["value"]
    assert isinstance(got.data, np.memmap) and got.data.mode == "c"
    assert not isinstance(got.geometry.scan_positions_A, np.memmap)  # small arrays are read into RAM
    got.data[0, 0] = -1.0  # a consumer writing in place gets private pages ...
    again = cache.get("forward", "k1")["value"]  # ... and the cache is unchanged
    np.testing.assert_array_equal(again.data, m.data)


class _Odd:
    pass


@dataclasses.dataclass
class PluginState:
    """A plugin's own array-backed dataclass."""

    weights: np.ndarray
    label: str
    children: list = dataclasses.field(default_factory=list)


def test_unrepresentable_values_are_not_cached_with_one_notice(tmp_path, capfd):
    cache = StageCache(tmp_path)
    bad = [{"value": _reconstruction(), "x": _Odd()}, {"value": np.array([object()], dtype=object)},
           {"value": PluginState(np.ones(2), "unregistered")}]
    for v in bad:
        assert cache.put("recon", "k1", v) is False
        assert cache.get("recon", "k1") is None
    assert not (tmp_path / "recon" / "k1").exists()
    assert not [p for p in (tmp_path / "recon").iterdir()], "temp folders left behind"
    cache.put("recon", "k2", {"x": _Odd()})  # the same kind of problem is reported once per process
    err = capfd.readouterr().err
    assert err.count("_Odd") == 1 and all(len(line) < 400 for line in err.splitlines())
    assert "register_cache_type" in err


def test_register_cache_type_allows_a_plugin_dataclass(tmp_path):
    with pytest.raises(TypeError):
        register_cache_type(_Odd)  # not a dataclass
    register_cache_type(PluginState)
    try:
        value = {"value": PluginState(np.arange(3.0), "w", [PluginState(np.zeros(1, np.int8), "child")])}
        cache = StageCache(tmp_path)
        assert cache.put("recon", "k1", value)
        assert_same(value, cache.get("recon", "k1"))
    finally:
        cache_mod._TYPES.pop(cache_mod._type_name(PluginState))
    # a process that has not registered the type misses (with a notice) instead of importing anything
    assert StageCache(tmp_path).get("recon", "k1") is None
    assert (tmp_path / "recon" / "k1" / ENTRY_JSON).exists()  # kept for processes that know the type


def _craft(folder: Path, value_tree, files=None) -> None:
    """Write an entry as someone with write access to a shared cache folder could (checksum included)."""
    body = {"stage": "recon", "key": folder.name, "created": 0.0, "files": files or {}, "value": value_tree}
    doc = {"format": cache_mod.FORMAT, "version": cache_mod.VERSION, "body": body,
           "body_blake2b": cache_mod._body_digest(body)}
    folder.mkdir(parents=True)
    (folder / ENTRY_JSON).write_text(json.dumps(doc))


@pytest.mark.parametrize("tree", [
    {"$t": "obj", "type": "os:system", "state": {}},                                   # not in the allowlist
    {"$t": "obj", "type": "posix:system", "state": {}},
    {"$t": "obj", "type": "tembench.types:Sample", "state": {"__class__": {"$t": "tuple", "items": []}}},
    {"$t": "obj", "type": "tembench.types:Sample", "state": {"elements": [1]}},        # a property of the class
    {"$t": "obj", "type": "tembench.types:Sample", "state": {"name": "no arrays"}},    # fields missing
    {"$t": "array", "file": "../../../etc/passwd"},
    {"$t": "dtype", "descr": "|O"},
    {"$t": "npscalar", "dtype": "|O", "hex": "00" * 8},
    {"$t": "nonsense"},
])
def test_a_crafted_entry_runs_no_code_and_is_a_miss(tmp_path, tree, capfd):
    _craft(tmp_path / "recon" / "k1", {"value": tree})
    assert StageCache(tmp_path).get("recon", "k1") is None
    assert len(capfd.readouterr().err.strip().splitlines()) == 1


def test_an_object_array_file_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    staged = tmp_path / "a0.npy"
    np.save(staged, np.array([_Payload(marker)], dtype=object), allow_pickle=True)  # an .npy holding a pickle
    scheme, digest = cache_mod.file_digest(staged)
    # the description lies about the dtype, so that the loader itself meets the object array
    rec = {"a0.npy": {"size": staged.stat().st_size, "scheme": scheme, "digest": digest, "shape": [1], "dtype": "<f8"}}
    entry = tmp_path / "recon" / "k1"
    _craft(entry, {"value": {"$t": "array", "file": "a0.npy"}}, rec)
    staged.rename(entry / "a0.npy")
    assert StageCache(tmp_path).get("recon", "k1") is None
    assert not marker.exists()


# --- integrity -----------------------------------------------------------------------------------
def _entry(tmp_path, big=False):
    cache = StageCache(tmp_path)
    cache.put("forward", "k1", {"value": _measurement_4d(big=big)})
    return cache, tmp_path / "forward" / "k1"


def _data_file(entry: Path) -> Path:
    body = json.loads((entry / ENTRY_JSON).read_text())["body"]
    return entry / body["value"]["value"]["state"]["data"]["file"]


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x01]))


@pytest.mark.parametrize("damage", ["truncate", "flip", "missing_file", "extra_bytes", "json_truncated",
                                    "json_edited", "no_json", "wrong_key"])
def test_damaged_entries_are_detected_discarded_and_missed(tmp_path, damage, capfd):
    cache, entry = _entry(tmp_path)
    f = _data_file(entry)
    if damage == "truncate":
        os.truncate(f, f.stat().st_size - 100)
    elif damage == "flip":
        _flip_byte(f, f.stat().st_size // 2)
    elif damage == "missing_file":
        f.unlink()
    elif damage == "extra_bytes":
        with open(f, "ab") as fh:
            fh.write(b"\0")
    elif damage == "json_truncated":
        text = (entry / ENTRY_JSON).read_text()
        (entry / ENTRY_JSON).write_text(text[: len(text) // 2])
    elif damage == "json_edited":  # still valid JSON, but a number changed
        text = (entry / ENTRY_JSON).read_text()
        (entry / ENTRY_JSON).write_text(text.replace('"energy_keV": 80.0', '"energy_keV": 81.0'))
    elif damage == "no_json":  # a half-written entry (e.g. copied by hand, or a crash of an older writer)
        (entry / ENTRY_JSON).unlink()
    elif damage == "wrong_key":
        os.rename(entry, entry.parent / "k2")
        entry = entry.parent / "k2"
    capfd.readouterr()
    assert cache.get("forward", "k2" if damage == "wrong_key" else "k1") is None
    assert not entry.exists(), "a damaged entry is discarded so that it is recomputed"
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "recomputing" in err[0]


def test_sampled_checksum_of_big_files(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "FULL_HASH_LIMIT_BYTES", 2**20)  # make the 16 MiB data "big"
    monkeypatch.setattr(cache_mod, "_verified", set())
    cache, entry = _entry(tmp_path, big=True)
    rec = json.loads((entry / ENTRY_JSON).read_text())["body"]["files"][_data_file(entry).name]
    assert rec["scheme"].startswith("blake2b-128-sampled")
    cache_mod._verified.clear()
    assert cache.get("forward", "k1") is not None
    _flip_byte(_data_file(entry), 100)  # inside the header / first sampled block
    cache_mod._verified.clear()
    assert cache.get("forward", "k1") is None


# --- no pickle ---------------------------------------------------------------------------------
class _Payload:
    """Creates a file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _forbid_pickle(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("pickle used in the run path")

    for name in ("load", "loads", "dump", "dumps", "Unpickler", "Pickler"):
        monkeypatch.setattr(pickle, name, forbidden)


def _comparable(table: pd.DataFrame) -> pd.DataFrame:
    """Everything but what differs between two runs by design (run id, timings of work done now)."""
    drop = [c for c in table.columns if c in ("run_id", "wall_time_s", "time_score_s", "recon_cache_hit")]
    return table.drop(columns=drop)


def test_no_pickle_is_written_or_read_and_a_planted_pickle_never_loads(registry, tmp_path, monkeypatch, capfd):
    sc = parse_scenario(dummy_plugin.SCENARIO)
    marker = tmp_path / "pwned"
    out = tmp_path / "out"
    planted = set()
    for point in sc.points:
        for repeat in range(sc.spec.repeats):
            k = stage_keys(point.spec, registry, repeat)
            for stage, key in [("sample", k.sample), ("forward", k.forward), ("noise", k.noise),
                               *[("recon", v) for v in k.recon.values()]]:
                p = out / ".cache" / stage / f"{key}.pkl"  # where the pickle cache kept this entry
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(pickle.dumps({"value": _Payload(marker), "time_s": 0.0, "peak_MB": 0.0}))
                planted.add(p)
    clean = run_scenario(sc, out=tmp_path / "clean", progress=False, report=False, use_cache=False).table
    _forbid_pickle(monkeypatch)
    res = run_scenario(sc, out=out, progress=False, report=False)
    rerun = run_scenario(sc, out=out, run_id="run-again", progress=False, report=False)  # every stage a hit
    assert not marker.exists(), "a planted pickle was loaded"
    assert (res.table["status"] == "ok").all() and rerun.table["recon_cache_hit"].all()
    pd.testing.assert_series_equal(res.table["mean"], clean["mean"], check_exact=True)
    err = capfd.readouterr().err
    assert err.count("old cache format") == 1
    pkl = sorted(out.rglob("*.pkl"))
    assert pkl == sorted(planted), "the cache wrote a pickle"
    entries = [p for p in (out / ".cache").glob("*/*") if p.is_dir()]
    assert entries and all((e / ENTRY_JSON).is_file() for e in entries)
    for e in entries:
        for f in e.iterdir():
            assert f.name == ENTRY_JSON or f.read_bytes()[:6] == b"\x93NUMPY"


# --- runs ------------------------------------------------------------------------------------
def test_cache_hit_gives_a_bit_identical_table(registry, tmp_path):
    sc = parse_scenario(dummy_plugin.SCENARIO)
    fresh = run_scenario(sc, out=tmp_path, progress=False, report=False)
    calls = dict(dummy_plugin.CALLS)
    cached = run_scenario(sc, out=tmp_path, run_id="run-cached", progress=False, report=False)
    assert dummy_plugin.CALLS == calls and cached.table["recon_cache_hit"].all()
    pd.testing.assert_frame_equal(_comparable(fresh.table), _comparable(cached.table), check_exact=True)
    for rel in fresh.table["artifacts"]:
        with np.load(fresh.run_dir / rel) as a, np.load(cached.run_dir / rel) as b:
            assert a.files == b.files and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a.files)


def test_corrupted_and_truncated_entries_are_recomputed_to_the_same_table(registry, tmp_path, capfd):
    sc = parse_scenario(dummy_plugin.SCENARIO)
    fresh = run_scenario(sc, out=tmp_path, progress=False, report=False)
    calls = dict(dummy_plugin.CALLS)
    cache = tmp_path / ".cache"
    k0 = stage_keys(sc.points[0].spec, registry, 0)
    k1 = stage_keys(sc.points[1].spec, registry, 1)
    _flip_byte(_data_file(cache / "forward" / k0.forward), 200)          # corrupted noise-free measurement
    noisy = cache / "noise" / k1.noise                                   # truncated noisy measurement
    f = _data_file(noisy)
    os.truncate(f, f.stat().st_size // 2)
    (cache / "recon" / k1.recon["a"] / ENTRY_JSON).write_text("{\"format\": ")  # half-written description
    capfd.readouterr()
    again = run_scenario(sc, out=tmp_path, run_id="run-repaired", progress=False, report=False)
    err = capfd.readouterr().err
    assert err.count("recomputing") == 3, err
    assert dummy_plugin.CALLS["simulate"] == calls["simulate"] + 1
    assert dummy_plugin.CALLS["reconstruct"] > calls["reconstruct"]
    cols = [c for c in _comparable(fresh.table).columns if not c.startswith(("time_", "peak_memory_"))]
    pd.testing.assert_frame_equal(fresh.table[cols], again.table[cols], check_exact=True)
    # the recomputed entries are whole again: a third run hits everything
    third = run_scenario(sc, out=tmp_path, run_id="run-third", progress=False, report=False)
    assert third.table["recon_cache_hit"].all() and "recomputing" not in capfd.readouterr().err


class _OddRecon(Reconstructor):
    """Returns extras the cache cannot store."""

    name = "cache_test_odd"
    accepts = ("dummy_image",)
    produces = "image"

    class Params(Params):
        pass

    def reconstruct(self, measurement, params, xp):
        dummy_plugin.CALLS["reconstruct"] += 1
        return Reconstruction(kind="image", data=measurement.data.copy(), sampling_A=1.0, quantity="intensity",
                              extras={"handle": _Odd()})


class _OddPlugin:
    @hookimpl
    def tembench_register_reconstructors(self):
        return [_OddRecon]


def test_a_stage_the_cache_cannot_store_runs_uncached(registry, tmp_path, capfd):
    registry.register(_OddPlugin(), name="cache_test_odd_plugin")
    text = dummy_plugin.SCENARIO.replace("- {name: dummy_identity, label: b}", "- {name: cache_test_odd, label: b}")
    sc = parse_scenario(text)
    first = run_scenario(sc, out=tmp_path, progress=False, report=False)
    assert (first.table["status"] == "ok").all()
    n = dummy_plugin.CALLS["reconstruct"]
    again = run_scenario(sc, out=tmp_path, run_id="run-again", progress=False, report=False)
    t = again.table
    assert t[t["reconstructor"] == "a"]["recon_cache_hit"].all() and not t[t["reconstructor"] == "b"]["recon_cache_hit"].any()
    assert dummy_plugin.CALLS["reconstruct"] == n + 6
    assert capfd.readouterr().err.count("not cached") == 1


def test_copy_on_write_memmap_is_linked_only_while_unmodified(tmp_path):
    cache = StageCache(tmp_path)
    m = _measurement_4d(big=True)
    cache.put("forward", "k1", {"value": m})
    src = _data_file(tmp_path / "forward" / "k1")
    hit = cache.get("forward", "k1")["value"]
    cache.put("noise", "k2", {"value": hit})  # e.g. an empty noise chain passes the measurement on
    if sys.platform.startswith("linux"):
        assert _data_file(tmp_path / "noise" / "k2").stat().st_ino == src.stat().st_ino
    hit.data[1, 2, 3, 4] = 42.0  # a noise model writing in place: the file no longer holds the array
    cache.put("noise", "k3", {"value": hit})
    assert _data_file(tmp_path / "noise" / "k3").stat().st_ino != src.stat().st_ino
    assert cache.get("noise", "k3")["value"].data[1, 2, 3, 4] == 42.0
    assert cache.get("forward", "k1")["value"].data[1, 2, 3, 4] == m.data[1, 2, 3, 4]


def test_a_linked_producer_file_modified_later_invalidates_the_entry(tmp_path):
    path = tmp_path / "patterns.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(1, 6, 4, 4))
    mm[:] = 1.0
    data = mm.reshape(2, 3, 4, 4)  # stem4d hands out a reshaped view of its memmap
    m = Measurement(kind="4dstem", data=data, axes=("scan_y", "scan_x", "k_y", "k_x"))
    cache = StageCache(tmp_path / "c")
    cache.put("forward", "k1", {"value": m})
    f = _data_file(tmp_path / "c" / "forward" / "k1")
    if sys.platform.startswith("linux"):
        assert f.stat().st_ino == path.stat().st_ino  # referenced, not copied
    got = cache.get("forward", "k1")["value"]
    assert got.data.shape == (2, 3, 4, 4) and (got.data == 1.0).all()
    del got
    time.sleep(0.01)
    mm[0, 0, 0, 0] = 2.0  # the producer's file is written again (e.g. another simulation to the same path)
    mm.flush()
    os.utime(path)  # writes through a shared mapping update the time lazily; make it explicit
    assert cache.get("forward", "k1") is None


# --- big data stays on disk --------------------------------------------------------------------
RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time
    import pyarrow, pandas  # imported lazily by the runner's table writer; not part of what is measured
    from tembench.registry import get_registry
    from tembench.runner import run_scenario
    from tembench.scenario import parse_scenario
    get_registry()
    sc = parse_scenario(open(sys.argv[1]).read())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = run_scenario(sc, out=sys.argv[2], run_id=sys.argv[3], progress=False, report=False)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = res.table
    print(json.dumps({"growth_KiB": after - before, "hit": bool(t["recon_cache_hit"].all()),
                      "ok": bool((t["status"] == "ok").all()), "error": str(t.get("error", [""])[0])[:300]}))
""")

STEM_SCENARIO = """
name: cache_rss
seed: 1
repeats: 1
sample: {{name: twisted_bilayer, params: {{material: MoS2, n_layers: 1, repeat: [5, 3], rms_displacement_A: null}}}}
forward:
  name: stem4d
  params: {{energy_keV: 80, sampling_A: 0.1, semiangle_mrad: 25, scan_step_A: 0.14, window_gpts: 64,
           slice_thickness_A: 6.6, detectors: {{adf: [40, null]}}, patterns_path: {path}}}
reconstructors: [{{name: virtual_detector, label: vbf, params: {{detector: bf}}}}]
quantifiers: [image_statistics]
"""


def test_streamed_4dstem_rerun_from_cache_stays_under_a_quarter_of_the_data_size(tmp_path):
    """stem4d streams ≈208 MiB of patterns to disk; a re-run from the cache holds < 25 % of it in RAM.

    The pickle cache copied the whole array into RAM to store it and loaded it whole on every
    hit (peak RSS growth ≥ 100 % of the data). Both runs are subprocesses, so the measurement is
    the peak RSS (ru_maxrss) of a fresh interpreter around ``run_scenario``.
    """
    patterns = tmp_path / "patterns.npy"
    scenario = tmp_path / "sc.yaml"
    scenario.write_text(STEM_SCENARIO.format(path=patterns))
    script = tmp_path / "rss.py"
    script.write_text(RSS_SCRIPT)
    out = tmp_path / "out"

    def run(run_id):
        p = subprocess.run([sys.executable, str(script), str(scenario), str(out), run_id], capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout.strip().splitlines()[-1])

    fresh = run("run-fresh")
    assert fresh["ok"], fresh
    data_bytes = patterns.stat().st_size
    assert data_bytes >= 200 * 2**20
    forward = next((out / ".cache" / "forward").iterdir())
    linked = [f for f in forward.iterdir() if f.stat().st_ino == patterns.stat().st_ino]
    assert linked, "the streamed data set is referenced by the cache, not copied"
    cached = run("run-cached")
    assert cached["ok"] and cached["hit"], cached
    growth = cached["growth_KiB"] * 1024
    assert growth < 0.25 * data_bytes, f"cached re-run grew RSS by {growth / 2**20:.0f} MiB for {data_bytes / 2**20:.0f} MiB"


# --- housekeeping ----------------------------------------------------------------------------------
def _snapshot(root: Path) -> dict[str, str]:
    """Hash of every file outside .cache (rows, tables, manifests, reports, markers)."""
    return {str(p.relative_to(root)): hashlib.blake2b(p.read_bytes()).hexdigest() for p in root.rglob("*")
            if p.is_file() and ".cache" not in p.relative_to(root).parts}


def test_cache_info_and_prune(registry, tmp_path, capsys):
    reports = tmp_path / "reports"
    sc = parse_scenario(dummy_plugin.SCENARIO)
    run_scenario(sc, out=reports / "dummy", progress=False)
    cache = reports / "dummy" / ".cache"
    (cache / "recon" / ("0" * 64 + ".pkl")).write_bytes(b"old")          # an old pickle entry
    stale = cache / "noise" / ".tmp-dead-1-ab"                            # a killed writer's temp folder
    stale.mkdir()
    (stale / "a0.npy").write_bytes(b"x" * 10)
    os.utime(stale / "a0.npy", (time.time() - 7200,) * 2)
    keep = _snapshot(reports)
    n_entries = {s: len([p for p in (cache / s).iterdir() if (p / ENTRY_JSON).exists()]) for s in
                 ("sample", "forward", "noise", "recon")}

    assert cli_main(["cache", "info", str(reports)]) == 0
    info = capsys.readouterr().out
    assert "scenario 'dummy'" in info
    for stage, n in n_entries.items():
        assert any(line.split()[:2] == [stage, str(n)] for line in info.splitlines()), info
    assert "old pickle entries" in info

    assert cli_main(["cache", "prune", str(tmp_path / "nowhere")]) == 2
    # age: make the noise entries 10 days old; --dry-run removes nothing
    old = time.time() - 10 * 86400
    for p in (cache / "noise").iterdir():
        if (p / ENTRY_JSON).exists():
            os.utime(p / ENTRY_JSON, (old, old))
    assert cli_main(["cache", "prune", str(reports), "--older-than", "7", "--dry-run"]) == 0
    assert len(list((cache / "noise").iterdir())) == n_entries["noise"] + 1
    capsys.readouterr()
    assert cli_main(["cache", "prune", str(reports)]) == 0  # no limit: only what is never used again
    assert "removed 0 entries, 1 old pickle files and 1 unfinished folders" in capsys.readouterr().out
    assert cli_main(["cache", "prune", str(reports), "--older-than", "7"]) == 0
    assert "removed 6 entries, 0 old pickle files and 0 unfinished folders" in capsys.readouterr().out
    assert not list((cache / "noise").iterdir()) and not list(cache.rglob("*.pkl"))
    assert len(list((cache / "recon").iterdir())) == n_entries["recon"]
    # size: least recently used first, down to the limit
    assert cli_main(["cache", "prune", str(reports / "dummy"), "--max-size", "0"]) == 0
    assert not [p for p in cache.glob("*/*")]
    assert _snapshot(reports) == keep, "prune touched something outside .cache"
    # the run still resumes and recomputes from an empty cache
    again = run_scenario(sc, out=reports / "dummy", run_id="run-after-prune", progress=False, report=False)
    assert (again.table["status"] == "ok").all()
