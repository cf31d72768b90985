"""The repository layout tells the architecture; guard the rules that are easy to break."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_platform_is_a_source_root_not_a_package():
    # a package named `platform` would shadow the standard library module
    assert not (ROOT / "platform" / "__init__.py").exists()
    out = subprocess.run([sys.executable, "-c", "import platform, tembench; print(platform.system())"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip()


def test_core_never_imports_a_plugin():
    offenders = []
    for path in (ROOT / "platform" / "tembench").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.startswith("tembench_")]
    assert not offenders, offenders


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    cmds = re.findall(r"^\s*(?:\$ )?(python -m pytest[^\n]*)$", readme, flags=re.M)
    assert cmds, "README must show the test command"
    assert cmds[0].strip() in ci
