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
    from tembench_friedrich2023.counting import load_scs_library
    from tembench_friedrich2023.quantify import resolve_library_path
    path = resolve_library_path(lib)
    assert path.is_file() and path.parent.name == "data" and path.parent.parent.name == "tembench_friedrich2023"
    n, scs = load_scs_library(str(path))
    assert len(n) >= 4 and np.all(np.diff(scs) > 0)


def test_library_path_does_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    from tembench_friedrich2023.quantify import ColumnFitScore

    monkeypatch.chdir(tmp_path)
    lib_abs = ROOT / "plugins" / "tembench_friedrich2023" / "data" / "scs_library_pt001.csv"
    want = ColumnFitScore()._library(ColumnFitScore.Params(library_path=str(lib_abs)))
    for spelling in ("scs_library_pt001.csv", "plugins/tembench_friedrich2023/data/scs_library_pt001.csv"):
        got = ColumnFitScore()._library(ColumnFitScore.Params(library_path=spelling))
        np.testing.assert_array_equal(got[1], want[1])
    # the scenario validates from another directory too
    parse_scenario((ROOT / "scenarios" / "friedrich2023_counting.yaml").read_text())
    # a file only in the working directory is refused, at validation, with the rule in the message
    (tmp_path / "mine.csv").write_text(lib_abs.read_text())
    with pytest.raises(Exception, match="working directory is not searched"):
        ColumnFitScore.Params(library_path="mine.csv")
    ColumnFitScore.Params(library_path=str(tmp_path / "mine.csv"))   # absolute: fine


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
