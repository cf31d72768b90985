"""Report building blocks: axes that place ∞ and null per axes, the sweep layout (x, facets, zip
configurations), the verdict's paired confidence intervals, metric metadata and its fallback, and
units in results.parquet."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from tembench import report
from tembench.metrics import UNKNOWN, Metric, MetricCatalog, catalog_for, parquet_bytes, parquet_units


def test_infinite_dose_gets_its_own_tick_past_the_largest_finite_value():
    ax = report.x_axis(pd.Series([7000.0, 50000.0, math.inf]))
    assert not ax.log  # 7000 … 50000 spans less than 50×
    assert ax.positions["inf"] > ax.positions["50000.0"] > ax.positions["7000.0"]
    assert ax.ticktext == ["7000", "5·10⁴", "∞"]  # 7000 gets a tick; no "5e∞04"
    assert ax.tickvals[-1] == ax.positions["inf"] and len(ax.breaks) == 1
    assert ax.positions["50000.0"] < ax.breaks[0] < ax.positions["inf"]


def test_log_axis_over_decades_and_null_before_the_smallest():
    ax = report.x_axis(pd.Series([100.0, 1000.0, 10000.0, math.inf]))
    assert ax.log and ax.positions["inf"] == pytest.approx(1e5)
    assert ax.ticktext == ["100", "1000", "10⁴", "∞"]
    ax = report.x_axis(pd.Series(["null", 0.5, 1.0]))
    assert ax.positions["null"] < ax.positions["0.5"] and "null" in ax.ticktext
    cat = report.x_axis(pd.Series(["tv", "lasso", "none"]))
    assert sorted(cat.positions.values()) == [0.0, 1.0, 2.0]


def _table(zip_cols: dict[str, list], methods=("a",), repeats=1, metric=lambda p, m, r: float(p)):
    n = len(next(iter(zip_cols.values())))
    rows = []
    for p in range(n):
        for r in range(repeats):
            for m in methods:
                rows.append({"point_index": p, "repeat": r, "reconstructor": m, "status": "ok", "artifacts": None,
                             **{k: v[p] for k, v in zip_cols.items()}, "ncc": metric(p, m, r)})
    return pd.DataFrame(rows)


def test_zip_sweep_of_many_parameters_becomes_named_configurations():
    cols = {"noise.0.dose_e_per_A2": [math.inf, 5e4, 7000.0, 5e4, 5e4],
            "forward.n_tilts": [60, 60, 60, 20, 60],
            "reconstructors.r.regularizer": ["tv", "tv", "tv", "tv", "lasso"]}
    t = _table(cols)
    lay = report.sweep_layout(t, list(cols), zipped=list(cols))
    assert lay.x == report.CONFIG
    assert lay.config_labels == {0: "dose_e_per_A2=∞", 1: "baseline", 2: "dose_e_per_A2=7000", 3: "n_tilts=20",
                                 4: "regularizer=lasso"}
    assert "n_tilts=60" in lay.baseline
    fig = report.metric_figure(report.prepared(t, list(cols), lay), "ncc", Metric(direction="higher"), lay, ["a"])
    assert list(fig.data[0].y) == [0.0, 1.0, 2.0, 3.0, 4.0] and list(fig.data[0].x) == [4.0, 3.0, 2.0, 1.0, 0.0]
    assert fig.layout.yaxis.ticktext[0] == "dose_e_per_A2=∞"  # sweep order from the top


def test_zip_with_a_distinct_numeric_column_plots_against_it():
    cols = {"noise.0.dose_e_per_A2": [math.inf, 5e4, 7000.0], "reconstructors.r.tau_V": [1.0, 1.0, 2.5]}
    lay = report.sweep_layout(_table(cols), list(cols), zipped=list(cols))
    assert lay.x == "noise.0.dose_e_per_A2" and lay.companions == ["reconstructors.r.tau_V"]


def test_second_grid_parameter_becomes_small_multiples():
    rows = [{"point_index": i, "repeat": 0, "reconstructor": m, "status": "ok", "dose": d, "defocus": f, "ncc": 0.5}
            for i, (d, f) in enumerate([(d, f) for f in (0.0, 50.0) for d in (10.0, 100.0, 1000.0)])
            for m in ("a", "b")]
    t = pd.DataFrame(rows)
    lay = report.sweep_layout(t, ["dose", "defocus"])
    assert lay.x == "dose" and lay.facet == "defocus"
    fig = report.metric_figure(report.prepared(t, ["dose", "defocus"], lay), "ncc", Metric(direction="higher"), lay,
                               ["a", "b"])
    assert [a.text for a in fig.layout.annotations] == ["defocus = 0", "defocus = 50"]
    assert [tr.name for tr in fig.data if tr.showlegend] == ["a", "b"]  # the legend names only what varies


def test_verdict_lead_is_significant_only_when_the_paired_interval_excludes_zero():
    rng = np.random.default_rng(3)
    noise = rng.normal(0, 0.05, (2, 6))   # one realisation per (point, repeat), shared by the methods

    def value(p, m, r):
        return 0.5 + noise[p, r] + {"good": 0.1 if p == 0 else 0.0, "other": 0.0}[m] + (
            rng.normal(0, 0.02) if p == 1 else 0.0)

    t = _table({"dose": [10.0, 100.0]}, methods=("good", "other"), repeats=6, metric=value)
    lay = report.sweep_layout(t, ["dose"])
    d = report.prepared(t, ["dose"], lay)
    leads = report.leads(d, "ncc", Metric(direction="higher"))
    assert leads[0].best == "good" and leads[0].significant and leads[0].ci[0] > 0
    assert leads[0].n_pairs == 6 and leads[0].sem > 0
    assert leads[1].significant is False and leads[1].ci[0] < 0 < leads[1].ci[1]
    html, md = report.verdict_html(d, ["ncc"], MetricCatalog([("q", "ncc", Metric(direction="higher"))]), 2)
    assert 'id="verdict"' in html and 'id="ranking"' in html and "✓ significant" in html
    assert any("1. good" in line for line in md)


def test_unknown_metrics_are_shown_but_not_ranked_and_diagnostics_are_kept_apart():
    cat = MetricCatalog([("q", "ncc", Metric(direction="higher", headline=True)),
                         ("q", "gt_std", Metric(diagnostic=True)),
                         ("q", "rms_error_*_pm", Metric("pm", "lower")),
                         ("tembench", "final_*", Metric(diagnostic=True))])
    assert cat.get("mystery") is UNKNOWN and not UNKNOWN.rankable
    assert cat.get("q.ncc").headline and cat.get("other.ncc").headline
    assert cat.get("rms_error_z_pm").unit == "pm" and cat.get("final_cost").diagnostic
    assert report.verdict_metrics(["mystery", "ncc", "gt_std"], cat) == ["ncc"]
    assert report.verdict_metrics(["mystery"], cat) == []


def test_builtin_quantifiers_declare_their_metrics():
    from tembench.registry import get_registry

    cat = catalog_for(get_registry())
    assert cat.get("ncc").direction == "higher" and cat.get("ncc").range == (-1.0, 1.0)
    assert not cat.get("rmse").comparable and not cat.get("rmse_scaled").comparable  # units follow the quantity
    assert cat.get("gt_std").diagnostic and cat.get("final_residual").diagnostic
    assert cat.get("position_error_mean_pm").unit == "pm" and cat.get("resolution_A").unit == "Å"
    assert cat.get("pct_atoms_found").axis_label("pct_atoms_found") == "pct_atoms_found [%] · ↑ higher is better"


def test_results_parquet_carries_units_and_reads_back_unchanged(tmp_path):
    t = pd.DataFrame({"reconstructor": ["a", "b"], "ncc": [0.5, 0.7], "position_error_mean_pm": [3.0, 4.0],
                      "other": [1, 2]})
    cat = MetricCatalog([("q", "ncc", Metric("", "higher")), ("q", "position_error_mean_pm", Metric("pm", "lower"))])
    path = tmp_path / "results.parquet"
    path.write_bytes(parquet_bytes(t, cat))
    pd.testing.assert_frame_equal(pd.read_parquet(path), t)
    units = parquet_units(path)
    assert units["position_error_mean_pm"]["unit"] == "pm" and units["ncc"]["direction"] == "higher"
    assert "other" not in units
    schema_meta = json.loads(pq.read_schema(path).metadata[b"tembench_metrics"])
    assert schema_meta["position_error_mean_pm"]["unit"] == "pm"


def test_list_verbose_shows_metric_metadata(capsys):
    from tembench.cli import main

    assert main(["list", "--kind", "quantifier", "-v"]) == 0
    out = capsys.readouterr().out
    assert "metrics:" in out and "ncc: dimensionless, ↑ higher is better, range -1 … 1, headline" in out
    assert "gt_std: unit 'rad | V·Å | V'" in out and "not comparable across methods" in out


def test_report_of_a_synthetic_run_with_aggregates(tmp_path):
    """A run folder with a grid sweep, an undeclared metric and aggregates.parquet renders every part."""
    rng = np.random.default_rng(0)
    rows = [{"point_index": i, "repeat": r, "reconstructor": m, "status": "ok", "artifacts": None, "dose": d,
             "defocus_A": f, "ncc": 0.5 + 0.1 * (m == "a") + rng.normal(0, 0.01), "mystery": rng.random(),
             "final_cost": 1.0, "time_reconstruct_s": 0.1}
            for i, (d, f) in enumerate([(d, f) for f in (0.0, 50.0) for d in (10.0, math.inf)])
            for r in range(3) for m in ("a", "b")]
    run = tmp_path / "run-x"
    run.mkdir()
    pd.DataFrame(rows).to_parquet(run / "results.parquet")
    agg = pd.DataFrame([{"point_index": i, "dose": d, "defocus_A": f, "reconstructor": m, "quantifier": "q",
                         "status": "ok", "spread": 0.01 * (i + 1)}
                        for i, (d, f) in enumerate([(d, f) for f in (0.0, 50.0) for d in (10.0, math.inf)])
                        for m in ("a", "b")])
    agg.to_parquet(run / "aggregates.parquet")
    (run / "manifest.json").write_text(json.dumps({"scenario": "synthetic", "swept": ["dose", "defocus_A"],
                                                   "repeats": 3, "status": "complete"}))
    md, html_path = report.render_report(run)
    page = html_path.read_text()
    assert 'id="verdict"' in page and 'id="ranking"' in page and "no metadata" in page
    assert "Diagnostics" in page and 'id="agg-0"' in page and "defocus_A = 50" in page
    text = md.read_text()
    assert "## ncc" in text and "### spread" in text and "(figures/metric_ncc.png)" in text


def test_the_derived_reconstructor_seed_is_not_plotted_as_a_result():
    """reconstructor_seed (an input the runner derives) and emd_file are bookkeeping, not metrics."""
    import pandas as pd

    from tembench.report import metric_columns

    t = pd.DataFrame({"ncc": [0.5, 0.6], "reconstructor_seed": [3744695577, 3744695577], "emd_file": ["a", "b"]})
    assert metric_columns(t, []) == ["ncc"]
