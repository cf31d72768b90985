"""The Pelz 2022 scenarios validate in full (components, params, kinds, sweep paths)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tembench.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[3]
FILES = sorted((ROOT / "scenarios").glob("pelz2022_*.yaml"))


def test_there_are_pelz2022_scenarios():
    names = {p.stem for p in FILES}
    assert {"pelz2022_dose", "pelz2022_eer_vs_dense", "pelz2022_scan_step", "pelz2022_defocus"} <= names


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_scenario_validates(path):
    sc = load_scenario(path)
    assert sc.spec.name == path.stem
