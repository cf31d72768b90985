"""The Friedrich 2023 scenarios (issue 16) validate, and a shrunk copy of friedrich2023_crlb_quick runs end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from tembench.runner import run_scenario
from tembench.scenario import parse_scenario

ROOT = Path(__file__).resolve().parents[3]
NAMES = ["friedrich2023_crlb", "friedrich2023_crlb_quick", "friedrich2023_scs_library", "friedrich2023_counting",
         "friedrich2023_dislocation"]


@pytest.mark.parametrize("name", NAMES)
def test_scenario_validates(name):
    path = ROOT / "scenarios" / f"{name}.yaml"
    sc = parse_scenario(path.read_text(), path)
    assert sc.spec.name == name
    assert path.read_text().startswith("#"), "header comment: what it reproduces, scaled settings, numbers"


def test_counting_library_ships_with_the_plugin():
    spec = yaml.safe_load((ROOT / "scenarios" / "friedrich2023_counting.yaml").read_text())
    lib = spec["quantifiers"][0]["params"]["library_path"]
    assert (ROOT / lib).is_file()
    from tembench_friedrich2023.counting import load_scs_library
    n, scs = load_scs_library(str(ROOT / lib))
    assert len(n) >= 4 and np.all(np.diff(scs) > 0)


def test_quick_crlb_scenario_shrunk_runs_and_aggregates(tmp_path):
    spec = yaml.safe_load((ROOT / "scenarios" / "friedrich2023_crlb_quick.yaml").read_text())
    spec["repeats"] = 4
    spec["sweep"] = {"grid": {"noise.poisson_dose.dose_e_per_A2": [5.0e4]}}
    spec["forward"]["params"]["scan_step_A"] = 0.4
    res = run_scenario(parse_scenario(yaml.safe_dump(spec)), out=tmp_path, progress=False, report=False)
    from tembench.store import load_aggregates
    agg = load_aggregates(res.run_dir)
    crlb = agg[agg["quantifier"] == "crlb"] if "quantifier" in agg else agg
    assert set(crlb["reconstructor"]) == {"lsq", "poisson"}
    assert (crlb["status"] == "ok").all()
    for col in ("precision_ratio_position", "precision_ratio_scs", "precision_ratio_x_pooled"):
        vals = crlb[col].to_numpy(float)
        assert np.all(np.isfinite(vals)) and np.all((vals > 0.2) & (vals < 5)), (col, vals)
    assert (crlb["n_repeats_scored"] == 4).all()
