"""Every scenario shipped in scenarios/ validates in full (components, params of every point, kinds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tembench.scenario import load_scenario

SCENARIOS = sorted((Path(__file__).resolve().parents[1] / "scenarios").glob("*.yaml"))


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario_validates(path):
    sc = load_scenario(path)
    assert sc.points and sc.spec.name
