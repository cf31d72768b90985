"""Report sections of Friedrich 2023 phase-method runs (report_phase): images side by side with the truth,
NCC vs dose, the Table 5.1 summary — on a tiny run through the real runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tembench.builtin.quantifiers import normalized_cross_correlation
from tembench.runner import run_scenario
from tembench.scenario import parse_scenario
from tembench_friedrich2023 import report_phase as rp

ROOT = Path(__file__).resolve().parents[3]

TINY = """
name: tiny_methods
seed: 7
sample:
  name: crystal
  params: {material: Si, zone_axis: [0, 0, 1], repeat: [1, 1, 1], rms_displacement_A: null}
forward:
  name: stem4d
  params: {energy_keV: 200, sampling_A: 0.15, semiangle_mrad: 25, scan_step_A: 0.45, detector_binning: 2,
           slice_thickness_A: 2.0, detectors: {adf: [50, null]}}
noise:
  - {name: poisson_dose, params: {dose_e_per_A2: 100000.0}}
reconstructors:
  - {name: icom, params: {rotation_deg: 0.0}}
  - {name: ricom, label: ricom5, params: {kernel_size: 5, rotation_deg: 0.0}}
  - {name: virtual_detector, label: adf, params: {detector: adf, score_as_phase: true}}
quantifiers:
  - {name: cross_correlation}
  - {name: spectral_resolution}
sweep:
  grid:
    noise.poisson_dose.dose_e_per_A2: [1000.0, 100000.0]
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("methods")
    spec = yaml.safe_load(TINY)
    spec["save"] = {"reconstructions": "emd"}
    sc = parse_scenario(yaml.safe_dump(spec))
    res = run_scenario(sc, out=out, progress=False, report=False)
    from tembench.store import load_table

    return sc, Path(res.run_dir), load_table(res.run_dir)


def test_truth_at_the_reconstruction_pixels_reproduces_the_runs_ncc(run):
    # the report rebuilds the sample and places the truth at the EMD image's pixels: the NCC of the two must be
    # the one the cross_correlation quantifier stored (a wrong sample seed, sampling or origin would change it)
    sc, run_dir, table = run
    ok = table[table["status"] == "ok"]
    assert len(ok) == 6
    for _, r in ok[ok["reconstructor"].isin(["icom", "ricom5"])].iterrows():
        img = rp.load_image(run_dir, r)
        assert img["sampling_A"] == pytest.approx((0.45, 0.45))
        gt = rp.truth_image(sc, img)
        assert gt["data"].shape == img["data"].shape == (13, 13)   # the scan's last row/column is past the cell
        inside = np.isfinite(gt["data"])
        assert inside.sum() == 12 * 12 and not inside[-1].any() and not inside[:, -1].any()
        assert normalized_cross_correlation(img["data"][inside], gt["data"][inside]) == pytest.approx(r["ncc"], abs=1e-9)
    # and the truth is not any image: against another point's reconstruction the NCC differs
    a, b = (rp.load_image(run_dir, r) for _, r in ok[ok["reconstructor"] == "icom"].sort_values("point_index").iterrows())
    assert not np.allclose(a["data"], b["data"])


def test_methods_table_holds_the_runs_numbers(run):
    sc, run_dir, table = run
    swept = ["noise.poisson_dose.dose_e_per_A2"]
    tab = rp.methods_table(table, swept, run_dir, sc).set_index("method")
    assert list(tab.index) == ["icom", "ricom5", "adf"]
    n_frames = 13 * 13   # 0 … 5.43 Å at 0.45 Å steps
    assert rp.frames_per_scan(table, run_dir) == n_frames
    assert [c for c in tab.columns if c.startswith(("NCC", "res"))] == ["NCC 1000", "NCC 1e5", "res 1000 (Å)",
                                                                          "res 1e5 (Å)"]
    for m, g in table.groupby("reconstructor"):
        for _, r in g.iterrows():
            lab = "1000" if r["noise.poisson_dose.dose_e_per_A2"] == 1.0e3 else "1e5"
            assert tab.loc[m, f"NCC {lab}"] == r["ncc"]
            np.testing.assert_equal(tab.loc[m, f"res {lab} (Å)"], r["resolution_A"])   # NaN where not found
        t = g["time_reconstruct_s"].median()
        assert tab.loc[m, "µs / frame"] == pytest.approx(1e6 * t / n_frames)
        assert tab.loc[m, "frames/s"] == pytest.approx(n_frames / t)
        assert tab.loc[m, "peak mem (MB)"] == pytest.approx(g["peak_memory_reconstruct_MB"].max())


def test_report_has_the_sections_and_figures(run):
    from tembench.report import render_report

    sc, run_dir, table = run
    md, page = render_report(run_dir)
    text = page.read_text()
    for title in ("Friedrich 2023: phase images side by side", "Friedrich 2023: NCC vs dose",
                  "Friedrich 2023: methods (Table 5.1)"):
        assert title in text and title in md.read_text()
    figs = run_dir / "figures"
    assert (figs / "friedrich_phase_images.png").stat().st_size > 5000
    assert (figs / "friedrich_ncc_vs_sweep.png").exists() and (figs / "friedrich_resolution_A_vs_sweep.png").exists()
    assert "Å (same axes for all)" in text   # EMD geometry used
    # the sections come right after the verdict, in order, before the core's results (placement "top"), in both
    # the page and the Markdown
    titles = ("Verdict", "Friedrich 2023: phase images side by side", "Friedrich 2023: NCC vs dose",
              "Friedrich 2023: methods (Table 5.1)", "Results")
    for doc, head in ((text, "<h2>{}</h2>"), (md.read_text(), "\n## {}\n")):
        at = [doc.index(head.format(t)) for t in titles]
        assert at == sorted(at), at


def test_without_emd_files_the_previews_are_shown_in_pixels(run):
    sc, run_dir, table = run
    t = table.copy()
    t["emd_file"] = None
    html, png = rp.image_grid(t, ["noise.poisson_dose.dose_e_per_A2"], sc, run_dir)
    assert "images in pixels" in html and png[:4] == b"\x89PNG"
    img = rp.load_image(run_dir, t.iloc[0])
    assert img["sampling_A"] is None and img["data"].ndim == 2
    assert rp.frames_per_scan(t, run_dir) == 13 * 13   # from a whole preview of a scan-grid method


def test_no_sections_for_runs_without_ricom_or_airpi():
    t = pd.DataFrame({"reconstructor_name": ["ssb", "icom"], "status": ["ok", "ok"]})
    assert not rp.wants_phase_sections(t)
    assert rp.wants_phase_sections(pd.DataFrame({"reconstructor_name": ["airpi"]}))


def test_extent_is_pixel_centres_in_angstrom():
    img = {"data": np.zeros((3, 5)), "sampling_A": (0.5, 0.25), "origin_A": (1.0, 2.0)}
    left, right, bottom, top = rp._extent(img)
    assert (left, right) == pytest.approx((2.0 - 0.125, 2.0 + 4.5 * 0.25))
    assert (top, bottom) == pytest.approx((1.0 - 0.25, 1.0 + 2.5 * 0.5))


def test_methods_scenario_validates_and_has_a_header():
    path = ROOT / "scenarios" / "friedrich2023_methods.yaml"
    sc = parse_scenario(path.read_text(), path)
    assert path.read_text().startswith("#")
    names = {r.name for r in sc.spec.reconstructors}
    assert {"ssb", "dpc", "icom", "ricom", "msp"} <= names
    assert sc.spec.save is not None and sc.spec.save.reconstructions == "emd"   # the report's truth column


def test_methods_table_of_a_step_by_dose_grid_keeps_every_point(tmp_path):
    # the step study (Fig. 4.7) sweeps scan step × dose: each (step, dose) gets its own column — one key per
    # column would overwrite the NCC of one step by another's — and no time per frame (frames differ per step)
    steps, doses = [0.2, 0.4, 1.6], [np.inf, 500.0]
    rows = []
    for i, (st, d) in enumerate([(s, d) for s in steps for d in doses]):
        for m in ("airpi", "icom"):
            rows.append({"status": "ok", "repeat": 0, "point_index": i, "reconstructor": m, "reconstructor_name": m,
                         "forward.scan_step_A": st, "noise.poisson_dose.dose_e_per_A2": d,
                         "ncc": round(st + (d == 500.0) / 10 + (m == "icom") / 100, 3), "time_reconstruct_s": 1.0})
    t = pd.DataFrame(rows)
    tab = rp.methods_table(t, ["forward.scan_step_A", "noise.poisson_dose.dose_e_per_A2"], tmp_path).set_index("method")
    ncc = [c for c in tab.columns if c.startswith("NCC")]
    assert len(ncc) == 6
    assert tab.loc["icom", "NCC step 1.6, dose 500"] == pytest.approx(1.71)
    assert tab.loc["airpi", "NCC step 0.4, dose ∞"] == pytest.approx(0.4)
    assert "µs / frame" not in tab.columns
    # a dose-only sweep keeps the short labels
    one = t[t["forward.scan_step_A"] == 0.2]
    tab1 = rp.methods_table(one, ["noise.poisson_dose.dose_e_per_A2"], tmp_path)
    assert [c for c in tab1.columns if c.startswith("NCC")] == ["NCC 500", "NCC ∞"]
