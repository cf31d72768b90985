"""Regenerate the committed example reports from the current code.

    python reports/examples/regenerate.py                      # every example, runs under /tmp/tembench-examples
    python reports/examples/regenerate.py quick --runs DIR     # one example; runs (and resumes) under DIR
    python reports/examples/regenerate.py ren2020_table1 --run-dir DIR/ren2020_table1/run-…  # render a finished run

Each example folder gets report.html (self-contained, interactive), report.md with figures/,
results.csv, manifest.json (scenario hash and component versions, checked by
tests/report/test_examples.py) and screenshot.png (headless Chromium at 1400 px, first screen).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
#: example folder -> scenario file stem
EXAMPLES = {"quick": "quick", "pelz2022_dose": "pelz2022_dose", "ren2020": "ren2020_quick",
            "ren2020_table1": "ren2020_table1",
            "friedrich2023_methods": "friedrich2023_methods",
            "you2025_tilt_range": "you2025_tilt_range",
            "friedrich2023_ricom": "friedrich2023_ricom"}
KEEP = ("report.html", "report.md", "results.csv", "manifest.json")


def screenshot(html: Path, png: Path, height: int = 2200) -> None:
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        raise SystemExit("headless Chromium not found: apt-get install -y chromium")
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=30000",
                    f"--window-size=1400,{height}", f"--screenshot={png}", html.resolve().as_uri()],
                   check=True, capture_output=True, timeout=300)


def export(run_dir: Path, dest: Path) -> None:
    from tembench.report import render_report

    render_report(run_dir)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in KEEP:
        shutil.copy2(run_dir / name, dest / name)
    if (run_dir / "figures").is_dir():
        shutil.copytree(run_dir / "figures", dest / "figures")
    screenshot(dest / "report.html", dest / "screenshot.png")
    compress(dest / "report.html")


def compress(html: Path) -> Path:
    """Keep the example as report.html.gz: the page is self-contained, so it embeds plotly.js (~4.5 MB),
    which gzip shrinks ~3x; open it with `gunzip -k report.html.gz` (the browser test does that itself)."""
    import gzip

    gz = html.with_suffix(".html.gz")
    with open(html, "rb") as src, gzip.GzipFile(gz, "wb", compresslevel=9, mtime=0) as dst:
        shutil.copyfileobj(src, dst)
    html.unlink()
    return gz


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", default=list(EXAMPLES), choices=list(EXAMPLES))
    p.add_argument("--runs", default="/tmp/tembench-examples", help="output root of the runs")
    p.add_argument("--run-dir", help="render this finished run folder instead of running (one name only)")
    p.add_argument("--executor", default="serial", choices=["serial", "processes"])
    args = p.parse_args(argv)
    if args.run_dir:
        if len(args.names) != 1:
            raise SystemExit("--run-dir needs exactly one example name")
        export(Path(args.run_dir), HERE / args.names[0])
        return 0
    from tembench.runner import run_scenario
    from tembench.scenario import load_scenario

    for name in args.names:
        scenario = load_scenario(ROOT / "scenarios" / f"{EXAMPLES[name]}.yaml")
        res = run_scenario(scenario, out=Path(args.runs) / EXAMPLES[name], executor=args.executor, report=False)
        export(res.run_dir, HERE / name)
        print(f"{name}: {res.run_dir} -> {HERE / name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
