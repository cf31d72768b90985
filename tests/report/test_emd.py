"""Reconstructions (and, opt-in, noisy measurements) saved as HDF5 in the EMD 1.0 layout are read
back by independent readers — rosettasciio's EMD reader (HyperSpy) and emdfile (py4DSTEM) — with
their calibrations: sampling in Å, origin, units and axis names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tembench.emd import read_emd, save_outputs, save_reconstruction
from tembench.types import Geometry, Measurement, Reconstruction
from _deps import require


@pytest.fixture
def volume():
    rng = np.random.default_rng(0)
    return Reconstruction(kind="volume", data=rng.random((6, 7, 8)).astype(np.float32), sampling_A=(0.5, 0.5, 0.5),
                          quantity="potential_V", origin_A=(-1.5, 2.0, 0.25))


@pytest.fixture
def tilt_series():
    rng = np.random.default_rng(1)
    geo = Geometry(energy_keV=300.0, sampling_A=(0.5, 0.5), tilt_angles_deg=[-60.0, 0.0, 45.0],
                   defocus_A=[200.0, 450.0], dose_e_per_A2=5e4)
    return Measurement(kind="hrtem_tilt_series", data=rng.poisson(5.0, (3, 2, 7, 8)).astype(np.float32),
                       axes=("tilt", "defocus", "y", "x"), geometry=geo, counted=True)


def test_rosettasciio_reads_volume_with_calibrations(tmp_path, volume, tilt_series):
    emd = require("rsciio.emd")
    path = save_reconstruction(tmp_path / "v.emd", volume, tilt_series, {"reconstructor": "ren2020", "dose": 5e4})
    signals = {s["metadata"]["General"]["title"]: s for s in emd.file_reader(str(path))}
    rec = signals["reconstruction"]
    np.testing.assert_array_equal(rec["data"], volume.data)
    axes = rec["axes"]
    assert [a["name"] for a in axes] == ["z", "y", "x"]
    assert all(a["units"] == "Å" for a in axes)
    assert [a["scale"] for a in axes] == pytest.approx([0.5, 0.5, 0.5])
    assert [a["offset"] for a in axes] == pytest.approx([-1.5, 2.0, 0.25])
    meas = signals["measurement"]
    np.testing.assert_array_equal(meas["data"], tilt_series.data)
    assert [a["name"] for a in meas["axes"]] == ["tilt", "defocus", "y", "x"]
    assert meas["axes"][2]["units"] == "Å" and meas["axes"][2]["scale"] == pytest.approx(0.5)


def test_emdfile_reads_image_units_dims_and_metadata(tmp_path):
    emdfile = require("emdfile")
    img = Reconstruction(kind="image", data=np.arange(20, dtype=np.float64).reshape(4, 5), sampling_A=(0.2, 0.25),
                         quantity="phase_rad", origin_A=(1.0, -0.5))
    path = save_reconstruction(tmp_path / "i.emd", img, None, {"swept:noise.0.dose_e_per_A2": float("inf")})
    root = emdfile.read(str(path))
    arr = root.tree("reconstruction") if hasattr(root, "tree") and not hasattr(root, "data") else root
    np.testing.assert_array_equal(arr.data, img.data)
    assert arr.units == "rad"
    assert list(arr.dim_names) == ["y", "x"] and list(arr.dim_units) == ["A", "A"]
    np.testing.assert_allclose(arr.dims[0][:2], [1.0, 1.2])
    np.testing.assert_allclose(arr.dims[1][:2], [-0.5, -0.25])
    md = arr.metadata["tembench"]
    assert md["quantity"] == "phase_rad" and np.isinf(md["swept:noise.0.dose_e_per_A2"])


def test_own_reader_and_measurement_opt_in(tmp_path, volume, tilt_series):
    from tembench.scenario import parse_scenario

    text = (Path(__file__).resolve().parents[2] / "scenarios" / "quick.yaml").read_text()
    spec = parse_scenario(text, check_resources=False).spec
    assert save_outputs(tmp_path, "p0-r0-a", spec, volume, tilt_series) is None  # no `save`: nothing written
    spec = parse_scenario(text + "save: {reconstructions: emd}\n", check_resources=False).spec
    rel = save_outputs(tmp_path, "p0-r0-a", spec, volume, tilt_series, {"noise.0.dose_e_per_A2": 100.0}, "wiener")
    got = read_emd(tmp_path / rel)
    assert set(got) == {"reconstruction"}  # the measurement only on request
    assert got["reconstruction"]["metadata"]["reconstructor"] == "wiener"
    spec = parse_scenario(text + "save: {reconstructions: emd, measurements: true}\n", check_resources=False).spec
    got = read_emd(tmp_path / save_outputs(tmp_path, "p0-r0-b", spec, volume, tilt_series))
    assert got["measurement"]["units"] == "counts"
    names = [d[0] for d in got["measurement"]["dims"]]
    assert names == ["tilt", "defocus", "y", "x"]
    np.testing.assert_allclose(got["measurement"]["dims"][0][2], [-60.0, 0.0, 45.0])  # irregular axis: every value
    assert got["measurement"]["dims"][0][1] == "deg"


def test_save_option_leaves_scenario_hash_of_existing_scenarios_alone():
    from tembench.scenario import parse_scenario, stable_hash

    text = (Path(__file__).resolve().parents[2] / "scenarios" / "quick.yaml").read_text()
    spec = parse_scenario(text, check_resources=False).spec
    assert "save" not in spec.model_dump(mode="json")
    saved = parse_scenario(text + "save: {reconstructions: emd}\n", check_resources=False).spec
    assert stable_hash(saved.model_dump(mode="json")) != stable_hash(spec.model_dump(mode="json"))
    assert saved.model_dump(mode="json")["save"] == {"reconstructions": "emd", "measurements": False}


def test_a_run_with_save_writes_one_emd_per_row_and_units_in_its_parquet(tmp_path):
    """The runner itself honours ``save:`` and writes units into results.parquet — no report needed."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
    import dummy_plugin

    from tembench.metrics import parquet_units
    from tembench.registry import Registry, set_registry
    from tembench.runner import run_scenario
    from tembench.scenario import parse_scenario

    reg = Registry(load_entry_points=False)
    reg.register(dummy_plugin, name="dummy_plugin")
    set_registry(reg)
    try:
        res = run_scenario(parse_scenario(dummy_plugin.SCENARIO + "save: {reconstructions: emd}\n"), out=tmp_path,
                           progress=False, report=False)
    finally:
        set_registry(None)
    t = res.table
    assert len(t) == 12 and t["emd_file"].notna().all()
    for rel, key in zip(t["emd_file"], t["reconstructor"]):
        got = read_emd(res.run_dir / rel)
        assert got["reconstruction"]["metadata"]["reconstructor"] == key
        assert got["reconstruction"]["data"].shape == (16, 16)
    units = parquet_units(res.run_dir / "results.parquet")
    assert not (res.run_dir / "report.html").exists()
    assert units["time_reconstruct_s"]["unit"] == "s" and units["peak_memory_reconstruct_MB"]["unit"] == "MB"
    assert units["final_cost"]["diagnostic"] == "true"
