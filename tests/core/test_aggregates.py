"""Aggregate step over a point's repeats: Quantifier.aggregates / aggregate() → aggregates.parquet."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import Field

import tembench.runner as runner_mod
from tembench import Params, Quantifier, hookimpl
from tembench.executors import SerialExecutor
from tembench.runner import run_scenario
from tembench.scenario import parse_scenario
from tembench.store import load_aggregates


class RepeatSpread(Quantifier):
    """Per repeat: the image mean and its middle row; over repeats: their standard deviation."""

    name = "repeat_spread"
    accepts = ("image",)
    aggregates = True

    class Params(Params):
        fail: bool = Field(False, description="raise in aggregate()")

    def score(self, reconstruction, measurement, sample, params):
        d = np.asarray(reconstruction.data, dtype=np.float64)
        return {"estimate": float(d.mean()), "profile": d[d.shape[0] // 2], "tag": "x", "n_px": np.int64(d.size),
                "nothing": None, "inf": float("inf")}

    def aggregate(self, repeats, sample, params):
        if params.fail:
            raise RuntimeError("deliberate aggregate failure")
        assert all(r["tag"] == "x" and r["nothing"] is None and r["inf"] == float("inf") for r in repeats)
        assert all(isinstance(r["n_px"], int) and isinstance(r["profile"], np.ndarray) for r in repeats)
        est = np.array([r["estimate"] for r in repeats])
        prof = np.stack([r["profile"] for r in repeats])
        return {"std_estimate": float(est.std(ddof=1)), "first_estimate": float(est[0]),
                "std_profile": prof.std(axis=0, ddof=1), "n_atoms": len(sample), "order": [r["estimate"] for r in repeats]}


@hookimpl
def tembench_register_quantifiers():
    return [RepeatSpread]


@pytest.fixture
def reg(registry):
    registry.register(sys.modules[__name__], name="aggregate_test_plugin")
    return registry


SCENARIO = """
name: agg
seed: 7
repeats: 3
sample: dummy_dot
forward: {name: dummy_image, params: {n: 16}}
noise: [{name: dummy_noise, params: {sigma: 0.1}}]
reconstructors:
  - {name: dummy_identity, label: a}
  - {name: dummy_identity, label: bad, params: {fail: true}}
quantifiers: [dummy_mean, repeat_spread]
sweep:
  grid:
    noise.0.sigma: [0.0, 0.2]
"""

TIMING = ["time_aggregate_s", "run_id"]  # not results (the determinism tests skip them too)


def _agg(run_dir) -> pd.DataFrame:
    return load_aggregates(run_dir).drop(columns=TIMING)


def test_aggregate_values_are_exact_and_errors_are_recorded(reg, tmp_path):
    res = run_scenario(parse_scenario(SCENARIO), out=tmp_path, progress=False, report=False)
    assert (res.run_dir / "aggregates.parquet").exists() and (res.run_dir / "aggregates.csv").exists()
    agg = load_aggregates(res.run_dir)
    assert len(agg) == 2 * 2  # points × reconstructors × aggregating quantifiers
    assert {"noise.0.sigma", "point_id", "reconstructor", "quantifier", "n_repeats"} <= set(agg.columns)
    ok = agg[agg["reconstructor"] == "a"].set_index("point_index")
    assert (ok["status"] == "ok").all() and (ok["n_repeats"] == 3).all()
    t = res.table[res.table["reconstructor"] == "a"]
    for p, grp in t.groupby("point_index"):
        grp = grp.sort_values("repeat")
        assert ok.loc[p, "std_estimate"] == np.std(grp["estimate"].to_numpy(), ddof=1)  # bit for bit
        assert ok.loc[p, "first_estimate"] == grp["estimate"].iloc[0]
        assert ok.loc[p, "n_atoms"] == 1
        profiles = []
        for rel in grp["artifacts"]:
            with np.load(res.run_dir / rel) as z:
                profiles.append(z["repeat_spread.profile"])
        with np.load(res.run_dir / ok.loc[p, "artifacts"]) as z:
            assert np.array_equal(z["std_profile"], np.std(profiles, axis=0, ddof=1))
            assert np.array_equal(z["order"], grp["estimate"].to_numpy())  # ordered by repeat index
    assert ok.loc[0, "std_estimate"] == 0.0  # noise-free point
    assert ok.loc[1, "std_estimate"] > 0
    # every repeat of 'bad' failed: the aggregate row says so; the run went on
    bad = agg[agg["reconstructor"] == "bad"]
    assert (bad["status"] == "error").all() and (bad["n_repeats_failed"] == 3).all()
    assert bad["error"].str.contains("no repeat of point").all()
    csv = pd.read_csv(res.run_dir / "aggregates.csv")
    np.testing.assert_array_equal(csv["std_estimate"].to_numpy(float), agg["std_estimate"].to_numpy(float))

    # an exception in aggregate() is recorded, not fatal
    failing = parse_scenario(SCENARIO.replace("[dummy_mean, repeat_spread]",
                                              "[dummy_mean, {name: repeat_spread, params: {fail: true}}]"))
    res2 = run_scenario(failing, out=tmp_path, progress=False, report=False)
    agg2 = load_aggregates(res2.run_dir)
    a2 = agg2[agg2["reconstructor"] == "a"]
    assert (a2["status"] == "error").all() and a2["error"].str.contains("deliberate aggregate failure").all()
    assert (res2.table[res2.table["reconstructor"] == "a"]["status"] == "ok").all()


def test_resume_recomputes_aggregates_bit_for_bit(reg, tmp_path):
    sc = parse_scenario(SCENARIO)
    first = run_scenario(sc, out=tmp_path, progress=False, report=False)
    ref = _agg(first.run_dir)
    # an interrupted run: one unit of point 1 and the point's aggregates lost, the tables not yet written
    for p in (first.run_dir / "rows").glob("p00001-*-r002-a.json"):
        p.unlink()
    for p in (first.run_dir / "aggregates" / "rows").glob("p00001-*"):
        p.unlink()
    (first.run_dir / "aggregates.parquet").unlink()
    resumed = run_scenario(sc, out=tmp_path, progress=False, report=False)
    assert resumed.n_computed == 1
    pd.testing.assert_frame_equal(_agg(resumed.run_dir), ref)
    # aggregates of a run whose repeats all finished in an earlier session, computed afresh
    shutil.rmtree(first.run_dir / "aggregates")
    (first.run_dir / "aggregates.parquet").unlink()
    again = run_scenario(sc, out=tmp_path, progress=False, report=False)
    assert again.n_computed == 0
    pd.testing.assert_frame_equal(_agg(again.run_dir), ref)


class _ReversedExecutor(SerialExecutor):
    """Results arrive in the reverse order (as from a pool, where the last task may finish first)."""

    def map_unordered(self, fn, tasks):
        yield from reversed([fn(t) for t in list(tasks)])


def test_result_order_does_not_change_aggregates(reg, tmp_path, monkeypatch):
    sc = parse_scenario(SCENARIO)
    ref = _agg(run_scenario(sc, out=tmp_path / "serial", progress=False, report=False).run_dir)
    monkeypatch.setattr(runner_mod, "make_executor", lambda *a, **k: _ReversedExecutor())
    rev = _agg(run_scenario(sc, out=tmp_path / "reversed", progress=False, report=False).run_dir)
    pd.testing.assert_frame_equal(rev, ref)


def test_no_aggregating_quantifier_no_aggregates_table(reg, tmp_path):
    sc = parse_scenario(SCENARIO.replace("[dummy_mean, repeat_spread]", "[dummy_mean]"))
    res = run_scenario(sc, out=tmp_path, progress=False, report=False)
    assert not (res.run_dir / "aggregates.parquet").exists() and not (res.run_dir / "aggregates").exists()
    assert load_aggregates(res.run_dir).empty
    assert not list((res.run_dir / "artifacts").glob("*.scores.json"))


POOL_SCRIPT = """
from tembench.runner import run_scenario
from tembench.scenario import parse_scenario
import test_aggregates
run_scenario(parse_scenario(test_aggregates.SCENARIO), out={out!r}, executor="processes", workers=2,
             progress=False, report=False)
"""


@pytest.mark.slow
def test_processes_executor_gives_the_serial_aggregates(reg, tmp_path):
    """A real process pool: its workers find this module and the dummy plugin through an entry point
    (a dist-info folder on PYTHONPATH), score the repeats in any order, and the aggregates match."""
    site = tmp_path / "site"
    info = site / "tembench_aggregate_test-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tembench-aggregate-test\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[tembench]\naggregate_test = test_aggregates\ndummy = dummy_plugin\n")
    here = str(Path(__file__).parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), here, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", POOL_SCRIPT.format(out=str(tmp_path / "pool"))], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = _agg(run_scenario(parse_scenario(SCENARIO), out=tmp_path / "serial", progress=False, report=False).run_dir)
    (pool_dir,) = (tmp_path / "pool").glob("run-*")
    pd.testing.assert_frame_equal(_agg(pool_dir), ref)
