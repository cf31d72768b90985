from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import dummy_plugin
from tembench.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_validate_prints_plan(registry, scenario_file, capsys):
    code, out, _ = _run(["validate", str(scenario_file())], capsys)
    assert code == 0
    assert "3 × repeats 2 = 6 units, 12 result rows" in out
    assert "noise-free simulations: 1" in out


@pytest.mark.parametrize("text, message", [
    ("name: x\nsample: [oops\n", "malformed YAML at line"),
    (dummy_plugin.SCENARIO.replace("dummy_mean", "dummy_maen"), "Did you mean 'dummy_mean'"),
    (dummy_plugin.SCENARIO.replace("[0.0, 0.1, 0.2]", "[0.0, -3]"), "greater than or equal to 0"),
    (dummy_plugin.SCENARIO.replace("forward: {name: dummy_image, params: {n: 16}}", "forward: phase_object"),
     "accepts measurement kinds"),
    ("- just\n- a list\n", "must be a YAML mapping"),
])
def test_bad_input_exit_2_one_paragraph(registry, scenario_file, capsys, text, message, tmp_path):
    path = scenario_file(text)
    code, out, err = _run(["run", str(path), "--out", str(tmp_path / "out"), "-q"], capsys)
    assert code == 2
    assert message in err
    assert err.startswith("tembench: error: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # nothing written before validation passed


def test_missing_file(registry, capsys):
    code, _, err = _run(["validate", "no/such/file.yaml"], capsys)
    assert code == 2 and "does not exist" in err


def test_run_report_compare(registry, scenario_file, tmp_path, capsys):
    path = scenario_file()
    code, out, _ = _run(["run", str(path), "--out", str(tmp_path / "a"), "-q"], capsys)
    assert code == 0 and "12 computed now" not in out and "6 computed now" in out
    run_a = next((tmp_path / "a").glob("run-*"))
    path_b = scenario_file(dummy_plugin.SCENARIO.replace("seed: 7", "seed: 8"), name="b.yaml")
    assert _run(["run", str(path_b), "--out", str(tmp_path / "b"), "-q", "--no-report"], capsys)[0] == 0
    run_b = next((tmp_path / "b").glob("run-*"))
    code, out, _ = _run(["report", str(run_b)], capsys)
    assert code == 0 and (run_b / "report.html").exists()
    code, out, _ = _run(["compare", str(run_a), str(run_b)], capsys)
    assert code == 0 and "B−A" in out and "mean" in out
    # resuming a finished run computes nothing
    code, out, _ = _run(["run", str(path), "--out", str(tmp_path / "a"), "-q"], capsys)
    assert "0 computed now, 6 already done" in out


def test_list_shows_builtins_with_params(registry, capsys):
    code, out, _ = _run(["list", "-v"], capsys)
    assert code == 0
    for name in ("crystal", "phase_object", "poisson_dose", "weak_phase_wiener", "cross_correlation", "dummy_identity"):
        assert name in out
    assert "dose_e_per_A2" in out


def test_console_script_installed():
    out = subprocess.run([sys.executable, "-m", "tembench.cli", "list", "--kind", "sample"], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0 and "crystal" in out.stdout


def test_list_verbose_shows_literal_choices_and_optional_types(registry, capsys):
    code, out, _ = _run(["list", "-v", "--kind", "forward_model"], capsys)
    assert code == 0
    assert "propagator: one of 'fresnel' | 'exact', default 'fresnel'" in out
    assert "tilt_range_deg: tuple[float, float] | None, default None" in out
    assert "PydanticUndefined" not in out  # default factories are shown by their value
    assert "detectors: dict[str, tuple[float, float | None]], default {'haadf': (60.0, None)}" in out


def test_compare_refuses_runs_whose_sweeps_differ(registry, scenario_file, tmp_path, capsys):
    """Averaging B's sweep away would compare a mean over defocus with a single point: refuse instead."""
    a = scenario_file()
    text_b = dummy_plugin.SCENARIO.replace("sweep:\n  grid:\n", "sweep:\n  grid:\n    forward.width_px: [1.0, 3.0]\n")
    assert text_b != dummy_plugin.SCENARIO
    b = scenario_file(text_b, name="b.yaml")
    assert _run(["run", str(a), "--out", str(tmp_path / "a"), "-q", "--no-report"], capsys)[0] == 0
    assert _run(["run", str(b), "--out", str(tmp_path / "b"), "-q", "--no-report"], capsys)[0] == 0
    run_a, run_b = next((tmp_path / "a").glob("run-*")), next((tmp_path / "b").glob("run-*"))
    code, _, err = _run(["compare", str(run_a), str(run_b)], capsys)
    assert code == 2 and "run B sweeps 'forward.width_px' over 2 values but run A does not" in err


def test_list_and_validate_do_not_import_heavy_modules():
    """`tembench list` / `validate` must answer at once: numba, pyFFTW (dask), scipy.fft/sparse/ndimage,
    scikit-learn and matplotlib load when a stage runs, not when plugins register (checked in a fresh
    interpreter; the time itself is a benchmark matter, not a test's)."""
    code = (
        "import sys\n"
        "from tembench.cli import main\n"
        "heavy = ['numba', 'pyfftw', 'dask', 'scipy.fft', 'scipy.sparse', 'scipy.ndimage', 'sklearn', 'matplotlib',"
        " 'tembench.analysis.atom_tracing', 'tembench_pelz2022._kernels', 'tembench_ren2020.model']\n"
        "main(['list', '-v'])\n"
        "print('LIST', [m for m in heavy if m in sys.modules])\n"
        "main(['validate', 'scenarios/quick.yaml'])\n"
        "print('VALIDATE', [m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("LIST", "VALIDATE"))]
    assert lines[0] == "LIST []", lines
    # validating a crystal reads it with ASE (ase.build imports scipy.sparse and scipy.fft); nothing else
    assert set(eval(lines[1].split(" ", 1)[1])) <= {"scipy.fft", "scipy.sparse"}, lines


def test_compare_pairs_two_methods_run_on_the_same_data(registry, scenario_file, tmp_path, capsys):
    """The cross-paper case: run A reconstructs with one method, run B with another; rows are matched by a
    --pair (or automatically for two single-method runs) and B−A is computed, not two half-empty rows."""
    one = dummy_plugin.SCENARIO.replace("  - {name: dummy_identity, label: b}\n", "")
    a = scenario_file(one)
    b = scenario_file(one.replace("label: a}", "label: other}"), name="b.yaml")
    assert _run(["run", str(a), "--out", str(tmp_path / "a"), "-q", "--no-report"], capsys)[0] == 0
    assert _run(["run", str(b), "--out", str(tmp_path / "b"), "-q", "--no-report"], capsys)[0] == 0
    run_a, run_b = next((tmp_path / "a").glob("run-*")), next((tmp_path / "b").glob("run-*"))
    from tembench.report import compare

    for pairs in (None, {"a": "other"}):
        table = compare(run_a, run_b, pairs)
        assert set(table.index.get_level_values("reconstructor")) == {"a | other"}
        assert len(table) == 3  # one row per sigma, both runs in it
        diff = table[("mean", "B−A")]
        np_diff = table[("mean", "B")] - table[("mean", "A")]
        assert diff.notna().all() and (diff == np_diff).all()
    code, out, _ = _run(["compare", str(run_a), str(run_b), "--pair", "a=other"], capsys)
    assert code == 0 and "paired: a (A) with other (B)" in out and "a | other" in out
    code, _, err = _run(["compare", str(run_a), str(run_b), "--pair", "a=nope"], capsys)
    assert code == 2 and "run B has no reconstructor 'nope'" in err
    code, _, err = _run(["compare", str(run_a), str(run_b), "--pair", "a"], capsys)
    assert code == 2 and "--pair expects A_LABEL=B_LABEL" in err
