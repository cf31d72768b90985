"""Dose bookkeeping against Ren 2020's own definition (§2.4, Fig. 2 caption).

Ren 2020: "a total electron budget of 7000 electrons/Å², which is equivalent to approximately
40 electrons/Å² when distributed across 60 tilt angles having 3 defocused images each", and every
Table-1 dose is the "total dose over all tilts and defocused images" (§3.1). So the dose of one
image is the total divided by N_θ·N_f (7000 / 180 = 38.9 e/Å²), and the counts of the whole series
add up to the total dose per Å². These tests pin that rule on the chain the Ren scenarios use
(hrtem_tilt_series → poisson_dose with dose_mode: total_budget → the reconstructor's intensities).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from tembench.builtin.noise import PoissonDose
from tembench.types import Sample
from tembench_ren2020 import model as M

from ren_sim import simulate

SCENARIOS = Path(__file__).resolve().parents[3] / "scenarios"


@pytest.fixture(scope="module")
def paper_series():
    """60 tilts × 3 defocus (the paper's 4(c) scheme) of one O atom in a 6 Å cube: almost all vacuum."""
    s = Sample(positions_A=np.array([[3.0, 3.0, 3.0]]), numbers=[8], cell_A=[6.0, 6.0, 6.0], name="one O")
    return simulate(s, tilt_range_deg=(-90.0, 87.0), n_tilts=60, defocus_values_A=[200.0, 450.0, 1000.0])


def test_total_budget_of_7000_is_about_40_per_image_at_60x3_as_ren_states(paper_series):
    m = paper_series
    assert m.data.shape[:2] == (60, 3)
    assert float(m.data.mean()) == pytest.approx(1.0, abs=2e-3)     # unit incident intensity, binned by the mean
    noisy = PoissonDose().apply(m, PoissonDose.Params(dose_e_per_A2=7000, dose_mode="total_budget"),
                                np.random.default_rng(7))
    per_image = 7000.0 / (60 * 3)                                     # 38.9 e/Å², "approximately 40"
    assert noisy.geometry.dose_e_per_A2 == pytest.approx(per_image, rel=1e-12)
    assert 35.0 < noisy.geometry.dose_e_per_A2 < 45.0
    assert noisy.geometry.extra["n_exposures"] == 180
    assert noisy.geometry.extra["dose_total_e_per_A2"] == pytest.approx(7000.0, rel=1e-12)
    s = 0.5                                                           # detector pixel (Å)
    assert noisy.geometry.extra["electrons_per_unit_intensity"] == pytest.approx(per_image * s * s, rel=1e-12)
    # the counts themselves: every image carries ≈ 38.9 e/Å², the series ≈ 7000 e/Å² (Poisson: ±0.1 %)
    area = (m.data.shape[-1] * s) * (m.data.shape[-2] * s)
    per_image_counts = noisy.data.reshape(180, -1).sum(axis=1) / area
    assert float(per_image_counts.mean()) == pytest.approx(per_image, rel=5e-3)
    assert float(noisy.data.sum()) / area == pytest.approx(7000.0, rel=5e-3)


def test_reconstructor_sees_unit_intensity_whatever_the_dose(paper_series):
    """Counts are converted back by the same bookkeeping: vacuum intensity 1 at 7 000 and 50 000 e/Å²."""
    for dose in (7000.0, 50000.0):
        noisy = PoissonDose().apply(paper_series, PoissonDose.Params(dose_e_per_A2=dose, dose_mode="total_budget"),
                                    np.random.default_rng(1))
        img = np.stack([M.measured_intensities(noisy, k) for k in range(60)])
        assert float(img.mean()) == pytest.approx(float(paper_series.data.mean()), rel=5e-3)
        # Poisson variance of the converted intensity is 1 / (electrons per pixel) = 180 / (dose · 0.25)
        var_expected = 180.0 / (dose * 0.25)
        assert float(np.var(img - paper_series.data)) == pytest.approx(var_expected, rel=0.05)


def test_every_ren_scenario_states_its_dose_as_a_total_budget():
    """Table-1 doses are totals over N_θ·N_f images: a per_image dose would be 180× too high at 60×3."""
    paths = sorted(SCENARIOS.glob("ren2020_*.yaml"))
    assert len(paths) >= 9
    for p in paths:
        spec = yaml.safe_load(p.read_text())
        doses = [n for n in spec.get("noise", []) if n["name"] == "poisson_dose"]
        assert doses, p.name
        for n in doses:
            assert n["params"].get("dose_mode") == "total_budget", p.name
            assert math.isinf(float(n["params"]["dose_e_per_A2"])) or float(n["params"]["dose_e_per_A2"]) >= 7000
