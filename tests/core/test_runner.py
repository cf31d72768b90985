from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import dummy_plugin
from tembench.errors import RunDirectoryError
from tembench.runner import run_scenario
from tembench.scenario import parse_scenario

HERE = Path(__file__).parent


def test_run_writes_tables_manifest_report(registry, tmp_path):
    sc = parse_scenario(dummy_plugin.SCENARIO)
    res = run_scenario(sc, out=tmp_path, progress=False)
    for name in ("results.parquet", "results.csv", "manifest.json", "report.html", "report.md"):
        assert (res.run_dir / name).exists(), name
    t = res.table
    assert len(t) == 3 * 2 * 2  # points × repeats × reconstructors
    assert set(t["status"]) == {"ok"}
    assert {"noise.0.sigma", "mean", "sumsq", "time_reconstruct_s", "peak_memory_reconstruct_MB",
            "reconstructor_version", "tembench_version", "final_cost"} <= set(t.columns)
    # noise-free point: every repeat gives the same mean; noisy points differ between repeats
    clean = t[(t["noise.0.sigma"] == 0.0) & (t["reconstructor"] == "a")]["mean"]
    assert clean.nunique() == 1
    noisy = t[(t["noise.0.sigma"] == 0.2) & (t["reconstructor"] == "a")]["mean"]
    assert noisy.nunique() == 2
    # one noise-free simulation serves every point and repeat
    assert dummy_plugin.CALLS["simulate"] == 1
    manifest = json.loads((res.run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["n_rows"] == 12
    assert "dummy_identity" in json.dumps(manifest["identity"]["components"])
    assert {"numpy", "scipy"} <= set(manifest["identity"]["environment"]["libraries"])
    assert "library" in manifest["identity"]["environment"]["fft"]
    html = (res.run_dir / "report.html").read_text()
    assert "<img src=\"data:image/png;base64," in html and "mean" in html
    # curves returned by quantifiers become artifacts
    with np.load(res.run_dir / t.iloc[0]["artifacts"]) as npz:
        assert "dummy_mean.profile" in npz.files and "recon_preview" in npz.files


def test_parquet_csv_round_trip(registry, tmp_path):
    res = run_scenario(parse_scenario(dummy_plugin.SCENARIO), out=tmp_path, progress=False, report=False)
    pq = pd.read_parquet(res.run_dir / "results.parquet")
    csv = pd.read_csv(res.run_dir / "results.csv")
    pd.testing.assert_frame_equal(pq, res.table)
    for col in ("mean", "sumsq", "noise.0.sigma", "repeat"):
        np.testing.assert_allclose(csv[col].to_numpy(float), pq[col].to_numpy(float), rtol=1e-12)
    assert list(csv["reconstructor"]) == list(pq["reconstructor"])


def test_rerun_hits_cache_and_keeps_rows(registry, tmp_path):
    sc = parse_scenario(dummy_plugin.SCENARIO)
    first = run_scenario(sc, out=tmp_path, progress=False, report=False)
    calls = dict(dummy_plugin.CALLS)
    second = run_scenario(sc, out=tmp_path, progress=False, report=False)
    assert second.run_dir == first.run_dir
    assert second.n_computed == 0
    assert dummy_plugin.CALLS == calls
    pd.testing.assert_frame_equal(first.table, second.table)
    # a new reconstructor on the same data reuses the cached noisy measurements
    sc2 = parse_scenario(dummy_plugin.SCENARIO.replace("- {name: dummy_identity, label: b}",
                                                       "- {name: dummy_identity, label: b}\n  - {name: dummy_identity, label: c, params: {sleep_s: 0.001}}"))
    third = run_scenario(sc2, out=tmp_path, progress=False, report=False)
    assert third.run_dir != first.run_dir
    assert dummy_plugin.CALLS["simulate"] == calls["simulate"]
    # a/b reconstructions come from the stage cache; only c is computed (a and b have identical
    # parameters, so they already shared one cached reconstruction in the first run)
    assert dummy_plugin.CALLS["reconstruct"] == calls["reconstruct"] + 6
    assert (third.table["recon_cache_hit"] == (third.table["reconstructor"] != "c")).all()


def test_failing_point_is_recorded_and_sweep_continues(registry, tmp_path):
    text = dummy_plugin.SCENARIO.replace("{name: dummy_identity, label: b}",
                                         "{name: dummy_identity, label: b, params: {fail: true}}")
    res = run_scenario(parse_scenario(text), out=tmp_path, progress=False)
    t = res.table
    bad = t[t["reconstructor"] == "b"]
    assert (bad["status"] == "error").all() and len(bad) == 6
    assert bad["error"].str.contains("deliberate failure").all()
    assert bad["traceback"].str.contains("Traceback").all()
    assert (t[t["reconstructor"] == "a"]["status"] == "ok").all()
    assert "Failures" in (res.run_dir / "report.md").read_text()


def test_different_scenario_in_same_output_folder_is_refused(registry, tmp_path):
    run_scenario(parse_scenario(dummy_plugin.SCENARIO), out=tmp_path, progress=False, report=False)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    other = parse_scenario(dummy_plugin.SCENARIO.replace("name: dummy\n", "name: other\n"))
    with pytest.raises(RunDirectoryError, match="already holds runs of scenario 'dummy'"):
        run_scenario(other, out=tmp_path, progress=False)
    # same scenario name but different content forced into an existing run folder
    changed = parse_scenario(dummy_plugin.SCENARIO.replace("seed: 7", "seed: 8"))
    run_id = next(p.name for p in tmp_path.iterdir() if p.name.startswith("run-"))
    with pytest.raises(RunDirectoryError, match="different scenario"):
        run_scenario(changed, out=tmp_path, run_id=run_id, progress=False)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_deterministic_seeds(registry, tmp_path):
    sc = parse_scenario(dummy_plugin.SCENARIO)
    a = run_scenario(sc, out=tmp_path / "a", progress=False, report=False).table
    b = run_scenario(sc, out=tmp_path / "b", progress=False, report=False, use_cache=False).table
    pd.testing.assert_series_equal(a["mean"], b["mean"])


KILL_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {here!r})
    import dummy_plugin
    from tembench.registry import Registry, set_registry
    from tembench.runner import run_scenario
    from tembench.scenario import parse_scenario
    reg = Registry(load_entry_points=False)
    reg.register(dummy_plugin, name="dummy_plugin")
    set_registry(reg)
    run_scenario(parse_scenario({text!r}), out={out!r}, progress=False, report=False)
""")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_resume_after_kill(tmp_path, sig):
    """Kill a sweep mid-run, re-run it: no finished unit is recomputed and no row is duplicated.

    The child hangs in its 7th reconstruction (after 3 of 6 units, 6 of 12 rows), so the kill
    lands mid-sweep however loaded the machine is.
    """
    text = dummy_plugin.SCENARIO.replace("{name: dummy_identity, label: a}",
                                         "{name: dummy_identity, label: a, params: {sleep_s: 0.01}}")
    out = tmp_path / "out"
    log = tmp_path / "calls.log"
    script = KILL_SCRIPT.format(here=str(HERE), text=text, out=str(out))
    env = dict(os.environ, TEMBENCH_TEST_CALL_LOG=str(log))
    proc = subprocess.Popen([sys.executable, "-c", script], env=dict(env, TEMBENCH_TEST_BLOCK_AT="7"))
    deadline = time.monotonic() + 120
    rows_dir = None
    while time.monotonic() < deadline:
        dirs = list(out.glob("run-*/rows"))
        if dirs and len(list(dirs[0].glob("*.json"))) >= 6 and log.read_text().count("reconstruct") >= 7:
            rows_dir = dirs[0]
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert rows_dir is not None, "the run never reached its 7th reconstruction"
    done_before = {p.name for p in rows_dir.glob("*.json")}
    assert len(done_before) == 6
    n_recon_before = log.read_text().count("reconstruct")
    proc = subprocess.run([sys.executable, "-c", script], env=env, timeout=120)
    assert proc.returncode == 0
    table = pd.read_parquet(rows_dir.parent / "results.parquet")
    assert len(table) == 12
    assert not table.duplicated(["point_index", "repeat", "reconstructor"]).any()
    assert done_before <= {p.name for p in rows_dir.glob("*.json")}
    # the 6 finished rows (and their reconstructions) are reused; exactly the other 6 are computed
    assert log.read_text().count("reconstruct") - n_recon_before == 6


def test_processes_executor_matches_serial(tmp_path):
    """The process pool (forkserver workers load built-ins and entry points only) gives the serial result."""
    pytest.importorskip("tembench.physics.potentials")
    text = textwrap.dedent("""
        name: pool
        seed: 3
        repeats: 2
        sample: {name: crystal, params: {material: Si, repeat: [1, 1, 1]}}
        forward: {name: phase_object, params: {sampling_A: 0.25, defocus_A: 100}}
        noise: [{name: poisson_dose, params: {dose_e_per_A2: 1000}}]
        reconstructors: [weak_phase_wiener]
        quantifiers: [cross_correlation]
        sweep: {grid: {forward.defocus_A: [80, 120]}}
    """)
    from tembench.registry import Registry, set_registry

    set_registry(Registry(load_entry_points=False))
    try:
        sc = parse_scenario(text)
        a = run_scenario(sc, out=tmp_path / "serial", progress=False, report=False).table
        b = run_scenario(sc, out=tmp_path / "pool", executor="processes", workers=2, progress=False, report=False).table
    finally:
        set_registry(None)
    assert (b["status"] == "ok").all()
    np.testing.assert_allclose(a["ncc"], b["ncc"], rtol=1e-6)


def test_lifecycle_hooks_point_finished_and_report_sections(registry, tmp_path):
    from tembench import hookimpl

    seen = []

    class Observer:
        @hookimpl
        def tembench_point_finished(self, point, rows, error):
            seen.append((point["point_index"], point["repeat"], len(rows), error))

        @hookimpl
        def tembench_report_sections(self, table, scenario, run_dir):
            return [{"title": "Observer section", "markdown": f"{len(table)} rows seen",
                     "html": f"<p>{len(table)} rows seen</p>"}]

    registry.register(Observer(), name="observer")
    res = run_scenario(parse_scenario(dummy_plugin.SCENARIO), out=tmp_path, progress=False)
    assert sorted(seen) == [(p, r, 2, None) for p in range(3) for r in range(2)]
    assert "## Observer section" in (res.run_dir / "report.md").read_text()
    assert "<p>12 rows seen</p>" in (res.run_dir / "report.html").read_text()


def test_report_sections_placement_top_after_the_verdict_end_by_default(registry, tmp_path):
    from tembench import hookimpl
    from tembench.errors import TembenchError
    from tembench.report import render_report

    where = {"Late": None, "Early": "top"}

    class Sections:
        @hookimpl
        def tembench_report_sections(self, table, scenario, run_dir):
            return [{"title": t, "markdown": f"{t} text", "html": f"<p>{t} text</p>",
                     **({"placement": p} if p else {})} for t, p in where.items()]

    registry.register(Sections(), name="sections")
    res = run_scenario(parse_scenario(dummy_plugin.SCENARIO), out=tmp_path, progress=False)
    html, md = (res.run_dir / "report.html").read_text(), (res.run_dir / "report.md").read_text()
    order = ("Verdict", "Early", "Results", "Late", "Scenario")
    for doc, head in ((html, "<h2>{}</h2>"), (md, "\n## {}\n")):
        at = [doc.index(head.format(t)) for t in order]
        assert at == sorted(at), at
    where["Late"] = "bottom"
    with pytest.raises(TembenchError, match=r"'Late': placement must be one of \('top', 'end'\), got 'bottom'"):
        render_report(res.run_dir, registry=registry)


def test_appending_a_noise_step_keeps_earlier_realisations(registry, tmp_path):
    """Each noise step is seeded by the chain up to it: adding a step after keeps the earlier noise."""
    one = parse_scenario(dummy_plugin.SCENARIO)
    two = parse_scenario(dummy_plugin.SCENARIO.replace(
        "noise: [{name: dummy_noise, params: {sigma: 0.1}}]",
        "noise: [{name: dummy_noise, params: {sigma: 0.1}}, {name: dummy_noise, label: extra, params: {sigma: 0.0}}]"))
    a = run_scenario(one, out=tmp_path / "a", progress=False, report=False).table
    b = run_scenario(two, out=tmp_path / "b", progress=False, report=False).table
    np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-6)


def test_report_handles_null_and_mixed_sweep_values(registry, tmp_path):
    text = dummy_plugin.SCENARIO.replace("    noise.0.sigma: [0.0, 0.1, 0.2]", "    forward.offset: [null, 0.5, 1.0]")
    res = run_scenario(parse_scenario(text), out=tmp_path, progress=False)
    assert (res.table["status"] == "ok").all()
    md = (res.run_dir / "report.md").read_text()
    assert "null" in md and "## mean" in md
    assert (res.run_dir / "figures" / "metric_mean.png").exists()
