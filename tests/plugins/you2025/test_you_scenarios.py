"""The You 2025 dose / slices / positions scenarios validate, and a shrunk positions scenario runs end to end:
msp's position refinement reduces the error to the true (jittered) positions, which only the quantifier sees;
the You report section renders slices, probe modes and the metric comparison."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tembench.runner import run_scenario
from tembench.scenario import parse_scenario

SCENARIOS = Path(__file__).resolve().parents[3] / "scenarios"
NEW = ["you2025_msp_dose", "you2025_msp_slices", "you2025_msp_positions"]


@pytest.mark.parametrize("name", NEW)
def test_scenario_validates_with_the_cli(name):
    r = subprocess.run([sys.executable, "-m", "tembench.cli", "validate", str(SCENARIOS / f"{name}.yaml")],
                       capture_output=True, text=True)
    if r.returncode != 0 and "No module named tembench.cli" in r.stderr:  # pragma: no cover
        pytest.skip("tembench.cli is not runnable as a module")
    assert r.returncode == 0, r.stderr + r.stdout


def test_shrunk_positions_scenario_refinement_reduces_the_error(tmp_path):
    spec = yaml.safe_load((SCENARIOS / "you2025_msp_positions.yaml").read_text())
    # one jitter value and 20 iterations: ~20 s instead of 84 s (a smaller scan or a thinner slab converges
    # worse: fewer overlapping neighbours per position, less signal)
    for r in spec["reconstructors"]:
        r["params"]["n_iterations"] = 20
    spec["sweep"]["grid"] = {"forward.position_jitter_A": [0.2]}
    res = run_scenario(parse_scenario(yaml.safe_dump(spec, allow_unicode=True)), out=tmp_path, progress=False)
    t = res.table.set_index("reconstructor")
    assert list(t["status"]) == ["ok", "ok"], t.get("error")
    before = t.loc["msp_refine", "position_error_before_A"]
    after = t.loc["msp_refine", "position_error_after_A"]
    assert 0.2 < before < 0.4                              # √2 × 0.2 Å rms per axis
    assert after < 0.6 * before, (before, after)           # refinement recovers most of the jitter
    assert t.loc["msp_fixed", "position_error_after_A"] == pytest.approx(before)  # no refinement: unchanged
    assert t.loc["msp_refine", "ncc"] > t.loc["msp_fixed", "ncc"]
    with np.load(res.run_dir / t.loc["msp_refine", "artifacts"]) as npz:
        assert npz["msp_state.slices_re_VA"].shape[0] == 2
        assert npz["msp_state.probe_power_fraction"].sum() == pytest.approx(1.0)
    page = (res.run_dir / "report.html").read_text()
    assert "You 2025: msp slices and probe modes" in page and "You 2025: methods vs sweep" in page


def test_tilt_range_scenarios_compare_both_priors_on_the_same_data():
    """The tilt-range scenarios carry the controlled comparison of issue 15: linear tomography as in the paper (no
    positivity) and with positivity, end to end as in the paper (V⁰ = 0, nonnegativity, L1 on Im V) — all
    reconstructors of one point see the same noisy measurement; wedge_priors also starts e2e from the linear
    volume (the four-range sweep keeps the three routes the paper's comparison needs)."""
    from tembench.scenario import load_scenario

    for name in ("you2025_wedge_priors", "you2025_tilt_range"):
        sc = load_scenario(SCENARIOS / f"{name}.yaml")
        rec = {r.label: r for r in sc.spec.reconstructors}
        assert rec["linear_nopos"].name == rec["linear_pos"].name == "joint_linear_tomo"
        assert rec["linear_nopos"].params["positivity"] is False and rec["linear_pos"].params["positivity"] is True
        e2e = rec["e2e"].params
        assert rec["e2e"].name == "e2e_ptycho_tomo" and e2e["init_volume"] == "zero"
        assert e2e["e2e"]["positivity"] is True and e2e["e2e"]["l1_imag"] > 0
        if name == "you2025_wedge_priors":
            assert rec["e2e_from_lin"].params["init_volume"] == "linear"
        else:
            assert set(rec) == {"linear_nopos", "linear_pos", "e2e"}
        angles = sc.spec.sweep.grid["forward.tilt_angles_deg"]
        assert [max(a) for a in angles][0] == 20 and max(angles[-1]) == 45
        assert {q.name for q in sc.spec.quantifiers} >= {"tomo_fsc", "depth_elongation", "tomo_atom_tracing"}


def test_subsampling_report_plots_fsc_against_the_total_fluence_of_one_half_set(tmp_path):
    """You 2025 Fig. 3e's x axis: the recorded half_set_fluence_e_per_A2 where the run has it, else the nominal
    dose per tilt × tilts / n_subsets from the scenario (you2025_subsampling: 7 tilts × 1e5 e/Å²; 1/12 → 58 333)."""
    import pandas as pd

    from tembench.scenario import load_scenario
    from tembench_you2025.tomo_report import fluence_figure, nominal_fluence_e_per_A2

    sc = load_scenario(SCENARIOS / "you2025_subsampling.yaml")
    rows = [{"status": "ok", "repeat": 0, "point_index": i, "reconstructor": "e2e", "reconstructor_name":
             "e2e_ptycho_tomo", "noise.half_sets.n_subsets": n, "fsc_half_resolution_A": r,
             "fsc_half_resolution_halfbit_A": r, "fsc_half_resolution_onebit_A": r + 1.0}
            for i, (n, r) in enumerate([(2, 0.8), (12, 1.55), (20, 2.89)])]
    t = pd.DataFrame(rows)
    assert nominal_fluence_e_per_A2(t.iloc[1], sc) == pytest.approx(7 * 1e5 / 12)
    assert nominal_fluence_e_per_A2(t.iloc[2], sc) == pytest.approx(7 * 1e5 / 20)
    t["half_set_fluence_e_per_A2"] = [3.4e5, 5.6e4, np.nan]        # recorded (the grid's exact pattern fraction)
    page = fluence_figure(t, sc, tmp_path)                        # one figure: recorded, and nominal for 1/20
    assert "<img" in page and "5.6e+04" in page and "3.5e+04" in page and "NOMINAL" in page
    assert "5.833e+04" not in page                                # the recorded value wins over the nominal one
