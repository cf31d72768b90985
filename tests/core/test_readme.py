"""The README's plugin example and quick scenario must keep working as written."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

from tembench.runner import run_scenario
from tembench.scenario import load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parents[2]


def test_readme_plugin_example_registers_and_runs(registry, tmp_path):
    readme = (ROOT / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "hookimpl" in b)
    module = types.ModuleType("readme_plugin")
    exec(compile(code, "README.md", "exec"), module.__dict__)
    sys.modules["readme_plugin"] = module
    try:
        registry.register(module, name="readme_plugin")
        assert "contrast" in registry.components("reconstructor")
        text = (ROOT / "scenarios" / "quick.yaml").read_text()
        text = text.replace("  - {name: weak_phase_wiener, label: wiener_eps0.5, params: {epsilon: 0.5}}",
                            "  - contrast").replace("[100, 1000, 10000, .inf]", "[1000]").replace("repeats: 2", "repeats: 1")
        res = run_scenario(parse_scenario(text), out=tmp_path, progress=False, report=False)
        assert set(res.table["reconstructor"]) == {"wiener_eps0.05", "contrast"}
        assert (res.table["status"] == "ok").all()
    finally:
        sys.modules.pop("readme_plugin", None)


def test_readme_scenario_reference_is_valid(registry):
    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", readme, flags=re.S) if "sweep:" in b)
    sc = parse_scenario(block)
    assert len(sc.points) == 4 * 2


def test_quick_scenario_runs_and_scores(tmp_path):
    """scenarios/quick.yaml end to end: noise-free NCC high, NCC increases with dose."""
    sc = load_scenario(ROOT / "scenarios" / "quick.yaml")
    res = run_scenario(sc, out=tmp_path, progress=False)
    t = res.table
    assert (t["status"] == "ok").all() and len(t) == 16
    m = t[t["reconstructor"] == "wiener_eps0.05"].groupby("noise.0.dose_e_per_A2")["ncc"].mean()
    assert m.loc[float("inf")] > 0.85
    assert m.is_monotonic_increasing
    assert (res.run_dir / "report.html").exists()
