"""The committed example reports (reports/examples/) must match the code that would produce them:
the scenario file's hash and every component's declared version as recorded in the example's
manifest, and the current report format. A failure names the example to regenerate with
``python reports/examples/regenerate.py NAME``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "reports" / "examples"))
from regenerate import EXAMPLES  # noqa: E402


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_report_matches_current_scenario_and_code(name):
    from tembench.registry import get_registry
    from tembench.report import REPORT_FORMAT
    from tembench.scenario import load_scenario, stable_hash

    folder = ROOT / "reports" / "examples" / name
    hint = f"regenerate it: python reports/examples/regenerate.py {name}"
    for f in ("report.html.gz", "report.md", "results.csv", "manifest.json", "screenshot.png"):
        assert (folder / f).is_file(), f"example {name} has no {f}; {hint}"
    manifest = json.loads((folder / "manifest.json").read_text())
    registry = get_registry()
    scenario = load_scenario(ROOT / "scenarios" / f"{EXAMPLES[name]}.yaml", registry, check_resources=False)
    # the runner's scenario hash (runner.run_scenario): the spec without executor and output
    current = stable_hash(scenario.spec.model_dump(mode="json", exclude={"executor", "output"}))
    assert manifest["scenario"] == scenario.spec.name
    assert manifest["scenario_hash"] == current, f"scenarios/{EXAMPLES[name]}.yaml changed since example {name}; {hint}"
    assert manifest.get("status") == "complete"
    for key, fingerprint in manifest["identity"]["components"].items():
        kind, comp = key.split(":", 1)
        version = registry.get(kind, comp).version
        assert fingerprint.split(":")[0] == str(version), (
            f"{kind} {comp!r} is at version {version}, example {name} was made with {fingerprint.split(':')[0]}; {hint}")
    import gzip

    head = gzip.decompress((folder / "report.html.gz").read_bytes()).decode("utf-8")[:2000]
    assert f"name='tembench-report-format' content='{REPORT_FORMAT}'" in head, f"report format changed; {hint}"
