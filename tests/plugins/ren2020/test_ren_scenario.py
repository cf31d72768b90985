"""The quick scenario through the runner (reduced), and the Table-1 report section."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import yaml

from tembench.registry import get_registry
from tembench.runner import run_scenario
from tembench.scenario import load_scenario, parse_scenario
from tembench_ren2020 import table1

SCENARIOS = Path(__file__).resolve().parents[3] / "scenarios"


def test_reduced_quick_scenario_runs_through_the_runner(tmp_path):
    spec = yaml.safe_load((SCENARIOS / "ren2020_quick.yaml").read_text())
    # same components and sweep, a smaller needle and fewer tilts/iterations to fit the test budget
    spec["sample"]["params"].update(core_radius_A=5, shell_thickness_A=3, core_length_A=10, relax_iterations=60)
    spec["forward"]["params"].update(n_tilts=12, tilt_range_deg=[-90, 75])
    spec["reconstructors"][0]["params"]["n_iterations"] = 6
    spec["sweep"]["zip"] = {"noise.0.dose_e_per_A2": [math.inf, 50000.0], "reconstructors.ren2020.tau_V": [1.0, 1.0]}
    assert get_registry().get("reconstructor", "ren2020_multislice_aet").produces == "volume"
    res = run_scenario(parse_scenario(yaml.safe_dump(spec, allow_unicode=True)), out=tmp_path, progress=False)
    t = res.table
    assert list(t["status"]) == ["ok", "ok"], t.get("error")
    assert t["pct_atoms_found"].notna().all() and (t["position_error_mean_pm"] > 0).all()
    assert (t["n_cost"] == 6).all() and (t["final_cost"] > 0).all()
    clean, noisy = t.sort_values("point_index")["final_cost"]
    assert noisy > clean                        # Poisson noise cannot be fitted away
    with np.load(res.run_dir / t.iloc[0]["artifacts"]) as npz:
        assert npz["history_cost"].shape == (6,) and "recon_slice_xz" in npz.files
    md = (res.run_dir / "report.md").read_text()
    assert "Ren 2020 Table 1: ours / paper" in md
    assert "| 4(a) | ∞ | 12 × 3 |" not in md       # 12 tilts is not a Table-1 row …
    assert "| — | ∞ | 12 × 3 | 180° | tv |" in md    # … so it is listed without the paper's values


def test_table1_rows_are_recognised():
    sc = load_scenario(SCENARIOS / "ren2020_table1.yaml")
    labels = []
    for p in sc.points:
        row = table1.paper_row(table1.settings_of(p.spec, "ren2020"))
        labels.append(row[0] if row else None)
    assert labels == ["4(a)", "4(b) = 6(b) = 7(a) = 8(c)", "4(c)", "6(a)", "6(c)", "7(b)", "7(c)", "8(a)", "8(b)",
                      "9(c)", "A.10", "A.11"]
    s = table1.settings_of(sc.points[6].spec, "ren2020")
    assert (s["n_tilt"], s["span"], s["dose"]) == (40, 120, 5e4)
    assert math.isinf(table1.settings_of(sc.points[0].spec, "ren2020")["dose"])


def test_table1_markdown_layout():
    rows = [{"label": "4(a)", "dose": math.inf, "n_tilt": 60, "n_def": 3, "span": 180, "reg": "tv", "variant": "",
             "ours": [3.7, 100.0, 0.0, 99.8], "paper": [12.51, 99.98, 0.0, 98.63]}]
    md = table1.markdown(rows)
    assert md.splitlines()[2] == ("| 4(a) | ∞ | 60 × 3 | 180° | tv | — | 3.70 / 12.51 | 100.00 / 99.98 | "
                                  "0.00 / 0.00 | 99.80 / 98.63 |")
    assert "<td>3.70 / 12.51</td>" in table1.html_table(rows)


def test_table1_note_is_computed_from_the_run_not_hard_coded():
    import pandas as pd

    from tembench_ren2020.table1 import note

    sc = load_scenario(SCENARIOS / "ren2020_quick.yaml")
    t = pd.DataFrame({"reconstructor_name": ["ren2020_multislice_aet"] * 2, "status": ["ok", "ok"],
                      "n_true": [585, 590]})
    text = note(t, sc)
    assert "585–590 atoms" in text and "3.0 × 3.0 × 3.0 nm" in text and "whole box" in text
    assert "2 600" not in text


def test_ren_scenarios_classify_species_by_rens_measure():
    """Ren's own site intensity (A·σ) is the default of every Ren scenario (issue 12 §4)."""
    for path in sorted(SCENARIOS.glob("ren2020_*.yaml")):
        sc = load_scenario(path)
        params = [q.params for q in sc.points[0].spec.quantifiers if q.name == "atom_tracing"]
        assert params and params[0].get("intensity_measure") == "peak_sigma", path


def test_data_resolution_scenario_rows_and_note():
    """ren2020_data_resolution: only the aperture-free 50 000 e/Å² row is Table-1 row 4(b); the others
    name their aperture and show no paper values; the note describes the first (unprefixed) atom_tracing."""
    import pandas as pd

    sc = load_scenario(SCENARIOS / "ren2020_data_resolution.yaml")
    settings = [table1.settings_of(p.spec, "ren2020") for p in sc.points]
    rows = [table1.paper_row(s) for s in settings]
    assert rows[0] is not None and rows[0][0].startswith("4(b)")
    assert all(r is None for r in rows[1:])
    assert [s["variant"] for s in settings[1:]] == [f"objective aperture {a} mrad" for a in ("16.4", "13.1", "9.85",
                                                                                               "13.1")]
    assert settings[0]["variant"] == "" and math.isinf(settings[4]["dose"])
    t = pd.DataFrame({"reconstructor_name": ["ren2020_multislice_aet"], "status": ["ok"], "n_true": [2630]})
    text = table1.note(t, sc)
    assert "whole box" in text and "'shell'" not in text      # the labelled shell tracer is the second one
