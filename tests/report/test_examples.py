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


#: the SIMD paths numpy and OpenBLAS dispatched on where the examples were made (session 11: AMD EPYC with AVX-512)
EXAMPLES_SIMD = (("X86_V3", "X86_V4", "AVX512_ICL"), "SkylakeX")


def _simd_signature():
    """(the SIMD targets numpy dispatches to here, OpenBLAS's kernel architecture), or None if unknown."""
    try:  # numpy's own record of what it dispatches to (private; None if it moves: the test then skips)
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    except ImportError:
        return None
    found = tuple(f for f in __cpu_dispatch__ if __cpu_features__.get(f))
    try:
        from threadpoolctl import threadpool_info

        arch = next((e.get("architecture", "") for e in threadpool_info() if e.get("user_api") == "blas"), "")
    except ImportError:
        arch = ""
    return found, arch


@pytest.mark.parametrize("name", ["quick", "ren2020"])
def test_example_rows_are_what_the_code_gives_today_bit_for_bit(name, tmp_path):
    """The cheap examples rerun (serial, fresh folder) and every metric of every row compared exactly with the committed
    results.csv (written with full float precision). Versions and scenario hashes alone missed that physics commits at
    float32-rounding level had moved quick's and ren2020_quick's noisy rows (session 11): any number-changing commit now
    has to regenerate them. ≈ 3 s for quick, ≈ 30 s for ren2020_quick."""
    import numpy as np
    import pandas as pd

    from tembench.identity import environment_identity
    from tembench.registry import get_registry
    from tembench.runner import run_scenario
    from tembench.scenario import load_scenario

    # bit-for-bit only where the bits are promised: the numeric environment the example recorded (libraries, FFT
    # backend and wisdom, BLAS threads) and the CPU features numpy and OpenBLAS dispatch on (AVX-512 kernels round
    # differently from AVX2 ones); elsewhere the example is not a reference for this machine
    manifest = json.loads((ROOT / "reports" / "examples" / name / "manifest.json").read_text())
    env, recorded = environment_identity(), manifest["identity"]["environment"]
    differ = sorted(k for k in set(env) | set(recorded) if env.get(k) != recorded.get(k))
    if differ:
        pytest.skip(f"example {name} was made in another numeric environment ({differ}); bits are not comparable")
    if _simd_signature() != EXAMPLES_SIMD:
        pytest.skip(f"example {name} was made on a CPU with {EXAMPLES_SIMD}, this one has {_simd_signature()}")
    scenario = load_scenario(ROOT / "scenarios" / f"{EXAMPLES[name]}.yaml", get_registry(), check_resources=False)
    table = run_scenario(scenario, out=tmp_path, executor="serial", progress=False, report=False).table
    committed = pd.read_csv(ROOT / "reports" / "examples" / name / "results.csv")
    keys = ["point_index", "repeat", "reconstructor"]
    a = table.sort_values(keys).reset_index(drop=True)
    b = committed.sort_values(keys).reset_index(drop=True)
    assert len(a) == len(b) and (a["status"] == "ok").all()
    skip = ("time_", "peak_", "wall_time", "trace_time")
    cols = [c for c in b.columns if b[c].dtype.kind == "f" and c in a.columns and not c.startswith(skip)
            and not any(s in c for s in ("time_s", "_MB"))]
    assert len(cols) >= 3

    def num(col):
        return pd.to_numeric(col.astype(object).replace("", np.nan), errors="coerce").to_numpy(np.float64)

    moved = [c for c in cols if not np.array_equal(num(a[c]), num(b[c]), equal_nan=True)]
    assert not moved, (f"example {name}: {moved} differ from a rerun at this code; regenerate it: "
                       f"python reports/examples/regenerate.py {name}")
