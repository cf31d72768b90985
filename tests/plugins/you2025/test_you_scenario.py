"""The You 2025 scenarios validate in full (components, params, kinds, sweep paths)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tembench.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[3]
FILES = sorted((ROOT / "scenarios").glob("you2025_*.yaml"))


def test_there_is_a_quick_msp_scenario():
    assert "you2025_msp_quick" in {p.stem for p in FILES}


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_scenario_validates(path):
    sc = load_scenario(path)
    assert sc.spec.name == path.stem
    names = {r.name for r in sc.spec.reconstructors}
    assert names & {"msp", "joint_linear_tomo", "e2e_ptycho_tomo"}, names


def test_there_is_a_quick_tomography_scenario_with_both_routes():
    sc = load_scenario(ROOT / "scenarios" / "you2025_tilt_range_quick.yaml")
    assert {r.name for r in sc.spec.reconstructors} == {"joint_linear_tomo", "e2e_ptycho_tomo"}
    assert sc.spec.forward.name == "stem4d_tilt_series"
