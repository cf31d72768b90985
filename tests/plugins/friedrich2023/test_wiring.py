"""column_fit → column_fit / crlb through the runner, with the aggregate step over repeats (aggregates.parquet).

A stand-in forward model renders Gaussian columns (one per sample column, height ∝ atoms) so the
run takes seconds; the physics of the fit and the bound are tested in the other files.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tembench import ForwardModel, Params, SampleModel, hookimpl
from tembench.registry import Registry, set_registry
from tembench.runner import run_scenario
from tembench.scenario import parse_scenario
from tembench.types import Geometry, Measurement, Sample
from tembench_friedrich2023 import columns as C
from tembench_friedrich2023 import plugin as friedrich_plugin
from tembench_friedrich2023.quantify import true_columns

STEP = 0.2


class ColumnLattice(SampleModel):
    """4×4 square lattice of Pt columns of 2…8 atoms (test stand-in)."""

    name = "test_column_lattice"

    class Params(Params):
        seed: int = 0

    def build(self, params, rng):
        r = np.random.default_rng(params.seed)
        xs, ys = np.meshgrid(np.arange(4) * 2.0 + 1.6, np.arange(4) * 2.0 + 1.6)
        counts = r.integers(2, 9, 16)
        pos = [(x, y, 2.0 * k) for x, y, c in zip(xs.ravel(), ys.ravel(), counts) for k in range(c)]
        return Sample(np.array(pos), np.full(len(pos), 78), [9.2, 9.2, 20.0], name="lattice")


class GaussianADF(ForwardModel):
    """ADF image as Gaussian columns: height 0.004 per atom, ρ 0.45 Å, background 0.002 (test stand-in)."""

    name = "test_gaussian_adf"
    produces = "adf_image"

    class Params(Params):
        pass

    def simulate(self, sample, params, xp):
        cols = true_columns(sample)
        n = int(round(sample.cell_A[0] / STEP))
        grid = C.ImageGrid((n, n), (STEP, STEP))
        img = C.ColumnModel(cols["x_A"], cols["y_A"], 0.004 * cols["n_atoms"], 0.45, [0.002]).image(grid, 8)
        yy, xx = grid.coords()
        geo = Geometry(energy_keV=300.0, scan_step_A=(STEP, STEP), scan_positions_A=np.stack([yy, xx], 1))
        return Measurement("adf_image", img.astype(np.float32), ("scan_y", "scan_x"), geo)


@hookimpl
def tembench_register_samples():
    return [ColumnLattice]


@hookimpl
def tembench_register_forward_models():
    return [GaussianADF]


@pytest.fixture
def registry():
    reg = Registry(load_entry_points=False)
    reg.register(friedrich_plugin, name="friedrich2023")
    reg.register(sys.modules[__name__], name="friedrich_wiring_test")
    set_registry(reg)
    yield reg
    set_registry(None)


SCENARIO = """
name: friedrich_wiring
seed: 5
repeats: 8
sample: test_column_lattice
forward: test_gaussian_adf
noise: [{name: poisson_dose, params: {dose_e_per_A2: 1.0e6}}]
reconstructors: [{name: column_fit}]
quantifiers:
  - {name: column_fit, params: {border_A: 0.5, library: [[1, 0.00509], [10, 0.0509]]}}
  - {name: crlb, params: {border_A: 0.5}}
"""


def test_column_fit_and_crlb_through_the_runner(registry, tmp_path):
    res = run_scenario(parse_scenario(SCENARIO), out=tmp_path, progress=False, report=False)
    t = res.table
    assert (t["status"] == "ok").all(), t.get("error")
    assert len(t) == 8 and (t["pct_columns_found"] == 100).all()
    assert (t["position_mae_A"] < 0.02).all() and (t["library_count_exact_frac"] == 1.0).all()
    assert np.isfinite(t["crlb_position_median_pm"]).all()
    # the run is itself an SCS library (median count and median normalised SCS per row)
    from tembench_friedrich2023.counting import load_scs_library

    n, scs = load_scs_library(res.run_dir)
    assert len(n) == 1 and scs[0] == pytest.approx(2 * np.pi * 0.004 * n[0] * 0.45 ** 2, rel=0.02)
    try:
        from tembench.store import load_aggregates
    except ImportError:   # the core's aggregate step is not in this checkout yet
        pytest.skip("tembench.store.load_aggregates (the runner's aggregate step) is not available")
    agg = load_aggregates(res.run_dir)
    row = agg[agg["quantifier"] == "crlb"].iloc[0]
    assert row["status"] == "ok" and row["n_repeats"] == 8 and row["n_columns_scored"] == 16
    for k in ("position", "scs"):
        assert 0.6 < row[f"precision_ratio_{k}"] < 1.5
        assert row[f"precision_ratio_{k}_ci_low"] < row[f"precision_ratio_{k}_pooled"] < row[f"precision_ratio_{k}_ci_high"]
    with np.load(res.run_dir / row["artifacts"]) as z:
        assert z["curve_std_scs"].shape == (16,)
