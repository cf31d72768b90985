"""The quick scenario's report opened in headless Chromium, as a reader would: no console errors,
every plotly figure rendered to SVG with its traces, the verdict table present. The screenshot is
kept as a CI artifact at ``reports/browser/quick.png``. Chromium (Debian's ``chromium``) is
required in CI: a missing browser fails the test there and skips it locally."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from _deps import in_ci

ROOT = Path(__file__).resolve().parents[2]
ARTIFACT = ROOT / "reports" / "browser"


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        exe = shutil.which(name)
        if exe:
            return exe
    msg = "headless Chromium not found (apt-get install -y chromium): the report's browser test cannot run"
    if in_ci():
        pytest.fail("CI: " + msg, pytrace=False)
    pytest.skip(msg)


def run_browser(exe: str, url: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--no-first-run", "--disable-extensions", "--virtual-time-budget=30000", "--window-size=1400,2200",
           *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def open_report(exe: str, report: Path, screenshot: Path) -> tuple[str, list[str]]:
    """(the DOM after scripts ran, the page's console messages), and a screenshot."""
    url = report.resolve().as_uri()
    dom = run_browser(exe, url, "--enable-logging=stderr", "--v=0", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [ln for ln in dom.stderr.splitlines() if ":CONSOLE" in ln]
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    shot = run_browser(exe, url, f"--screenshot={screenshot}")
    assert shot.returncode == 0 and screenshot.exists(), shot.stderr[-2000:]
    return dom.stdout, console


def check_rendered(source: str, dom: str, console: list[str]) -> None:
    assert not console, "console messages:\n" + "\n".join(console)
    figures = re.findall(r'<div id="([\w-]+)" class="plotly-graph-div"', source)
    assert figures, "the report holds no plotly figure"
    for fig in figures:  # every figure was drawn: its div holds plotly's SVG and at least one trace
        start = dom.index(f'id="{fig}"')
        end = min((dom.find(f'id="{o}"') for o in figures if dom.find(f'id="{o}"') > start), default=len(dom))
        block = dom[start:end]
        assert 'class="main-svg"' in block, f"figure {fig} was not rendered"
        assert re.search(r'class="trace scatter', block), f"figure {fig} has no trace"
    assert 'id="verdict"' in dom and "<th>swept point</th>" in dom


def test_quick_report_renders_in_chromium(tmp_path):
    exe = chromium()
    from tembench.runner import run_scenario
    from tembench.scenario import load_scenario

    res = run_scenario(load_scenario(ROOT / "scenarios" / "quick.yaml"), out=tmp_path, progress=False)
    report = res.run_dir / "report.html"
    source = report.read_text()
    offline = not re.search(r"<script[^>]+src=|<link[^>]+href=[\"']?https?:", source)
    assert offline, "report.html loads a script or style from elsewhere; it must open offline"
    assert source.count("Plotly.newPlot") >= 1 and len(source) > 3_000_000  # plotly.js embedded once
    dom, console = open_report(exe, report, ARTIFACT / "quick.png")
    check_rendered(source, dom, console)
    verdict = dom[dom.index('id="verdict"'):]
    verdict = verdict[:verdict.index("</table>")]
    for dose in ("100", "1000", "10⁴", "∞"):
        assert f"dose_e_per_A2={dose}</th>" in verdict
    assert "wiener_eps0.05" in verdict and "significant" in verdict
    from PIL import Image
    import numpy as np

    img = np.asarray(Image.open(ARTIFACT / "quick.png").convert("L"), float)
    assert img.shape == (2200, 1400) and img.std() > 10  # not a blank page


@pytest.mark.parametrize("name", ["quick", "pelz2022_dose", "ren2020", "ren2020_table1"])
def test_committed_example_reports_render_in_chromium(name, tmp_path):
    """Every committed example (shipped gzip-compressed) opens as a reader sees it; screenshots go to
    reports/browser/ too."""
    import gzip
    import shutil

    exe = chromium()
    packed = ROOT / "reports" / "examples" / name / "report.html.gz"
    assert packed.is_file(), f"no example report {name}; python reports/examples/regenerate.py {name}"
    report = tmp_path / "report.html"
    shutil.copytree(packed.parent / "figures", tmp_path / "figures", dirs_exist_ok=True) \
        if (packed.parent / "figures").is_dir() else None
    report.write_bytes(gzip.decompress(packed.read_bytes()))
    source = report.read_text(encoding="utf-8")
    dom, console = open_report(exe, report, ARTIFACT / f"example_{name}.png")
    check_rendered(source, dom, console)
