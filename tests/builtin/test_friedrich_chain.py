"""Friedrich 2023 Ch. 2 distortion chain: order, refusals, jitter in Å, fast-scan line start, the 333-column particle.

Each test would have caught a defect of issue 16: scan jitter applied to noisy PMT counts
(variance/mean 0.46 instead of ≈ 1.018, Fig. 2.3 peaks erased), detector noise applied twice,
jitter σ in scan pixels, a fast-scan filter started from zero at every line (a flat image read
0.50, 0.71, 0.80 …), and an 11-cell particle with 373 columns instead of the thesis' 333.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from tembench.builtin.detector_noise import ScintillatorPMT, single_electron_relative_sigma
from tembench.builtin.noise import PoissonDose
from tembench.builtin.samples_friedrich import PtNanoparticle
from tembench.builtin.scan_distortions import (
    FastScanSmear,
    ScanJitter,
    SourceSizeBroadening,
    ar1_rms,
    fast_scan_cumulative,
)
from tembench.errors import ScenarioError, TembenchError
from tembench.scenario import parse_scenario
from tembench.types import Geometry, Measurement

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
CHAIN = {"source_size": SourceSizeBroadening, "scan_jitter": ScanJitter, "scintillator_pmt": ScintillatorPMT,
         "poisson_dose": PoissonDose, "fast_scan_smear": FastScanSmear}
REL = single_electron_relative_sigma(300.0, 0.25, 4.0)   # σ₁ at 300 kV with the thesis defaults, 0.133
NOISE_FACTOR = 1 + REL**2                                # variance/mean of PMT output in electrons, 1.018


def flat(value=0.5, shape=(400, 200), step=0.4):
    return Measurement("adf_image", np.full(shape, value, np.float32), ("y", "x"),
                       Geometry(sampling_A=(step, step), scan_step_A=(step, step), energy_keV=300.0))


def apply(m, name, seed=0, **params):
    cls = CHAIN[name]
    out = cls().apply(m, cls.Params(**params), np.random.default_rng(seed))
    out.provenance.append({"kind": "noise_model", "name": name, "version": cls.version, "params": params})  # runner stamp
    return out


def scenario_chain(name):
    return [(n["name"], dict(n.get("params", {}))) for n in yaml.safe_load((SCENARIOS / name).read_text())["noise"]]


def near_integer_fraction(x, half_width=0.25):
    return float(np.mean(np.abs(x - np.round(x)) < half_width))


# --- order: the scenario's chain keeps the detector noise --------------------------------------------
def test_adf_scenario_chain_keeps_pmt_noise_and_single_electron_peaks():
    chain = scenario_chain("friedrich_adf_detector.yaml")
    assert [n for n, _ in chain] == ["scan_jitter", "scintillator_pmt"]       # jitter first: the thesis order
    m = flat()                                        # 0.5 × 10 e/Å² × 0.16 Å² = 0.8 electrons per pixel
    for name, params in chain:
        if name == "scintillator_pmt":
            params["dose_e_per_A2"] = 10.0
        m = apply(m, name, **params)
    d = np.asarray(m.data, np.float64)
    # Poisson × PMT pulse spread: var/mean = 1 + σ₁² = 1.018 (0.46–0.56 with the jitter after the PMT)
    assert d.mean() == pytest.approx(0.8, rel=0.02)
    assert d.var() / d.mean() == pytest.approx(NOISE_FACTOR, abs=0.03)
    assert near_integer_fraction(d) > 0.85             # Fig. 2.3: peaks at whole electrons (0.62 before)


def test_smear_after_the_detector_correlates_the_noise_by_the_kernel():
    m = apply(flat(), "scintillator_pmt", dose_e_per_A2=10.0)
    out = np.asarray(apply(m, "fast_scan_smear").data, np.float64)
    # var/mean = (1 + σ₁²)[Σ_{k<n} w_k² + (w_n + 1 − C_n)²] at column n (the last term: the settled line start)
    p = FastScanSmear.Params()
    cum = fast_scan_cumulative(200, p.dwell_time_us, p.response_time_us, p.model, p.arrival)
    w = np.diff(cum, prepend=0.0)
    cols = np.arange(60, 200)
    factor = np.array([np.sum(w[:n] ** 2) + (w[n] + 1 - cum[n]) ** 2 for n in cols])
    assert out[:, cols].mean() == pytest.approx(0.8, rel=0.02)               # the level is kept
    assert (out[:, cols].var(axis=0) / out[:, cols].mean(axis=0)).mean() == pytest.approx(
        NOISE_FACTOR * factor.mean(), rel=0.06)


def test_jitter_after_the_detector_would_average_the_noise_away():
    # the old scenario order, now only with an explicit opt-in: variance/mean drops to ≈ 0.46
    m = apply(flat(), "scintillator_pmt", dose_e_per_A2=10.0)
    # 0.5 / 0.25 px at the 0.4 Å step (the old scenario read Table 2.2 in scan pixels)
    bad = apply(m, "scan_jitter", seed=1, sigma_x_A=0.2, sigma_y_A=0.1, allow_noisy_input=True)
    d = np.asarray(bad.data, np.float64)[2:-2, 2:-2]
    assert d.var() / d.mean() < 0.6 and near_integer_fraction(d) < 0.7
    assert bad.provenance[-2]["applied_to_counted_input"] is True


# --- refusals -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("first", ["scintillator_pmt", "poisson_dose"])
@pytest.mark.parametrize("then", ["scan_jitter", "source_size"])
def test_probe_distortions_refuse_counted_input(first, then):
    m = apply(flat(), first, dose_e_per_A2=10.0)
    with pytest.raises(TembenchError, match="source_size → scan_jitter → poisson_dose / scintillator_pmt → "
                                            "fast_scan_smear") as err:
        apply(m, then)
    assert "allow_noisy_input" in str(err.value) and "already counted" in str(err.value)


def test_detector_noise_refused_twice_and_after_the_smear():
    once = apply(flat(), "scintillator_pmt", dose_e_per_A2=10.0)
    with pytest.raises(TembenchError, match="already carries scintillator–PMT detector noise"):
        apply(once, "scintillator_pmt", dose_e_per_A2=10.0)
    with pytest.raises(TembenchError, match="already counted"):        # poisson_dose refuses it as before
        apply(once, "poisson_dose", dose_e_per_A2=10.0)
    smeared = apply(flat(), "fast_scan_smear")
    with pytest.raises(TembenchError, match="scintillator_pmt → fast_scan_smear"):
        apply(smeared, "scintillator_pmt", dose_e_per_A2=10.0)
    with pytest.raises(TembenchError, match="poisson_dose → fast_scan_smear"):
        apply(smeared, "poisson_dose", dose_e_per_A2=10.0)
    # counts changed after counting (here: jitter allowed on purpose) are not electron counts any more
    counted = apply(flat(), "poisson_dose", dose_e_per_A2=10.0)
    moved = apply(counted, "scan_jitter", allow_noisy_input=True)
    with pytest.raises(TembenchError, match="not whole electron counts"):
        apply(moved, "scintillator_pmt")
    # the legitimate combination: PMT on poisson_dose counts
    ok = apply(counted, "scintillator_pmt")
    assert ok.counted and ok.provenance[-2]["component"] == "scintillator_pmt"


def test_every_friedrich_scenario_orders_its_chain_like_the_thesis():
    rank = {"source_size": 0, "scan_jitter": 1, "poisson_dose": 2, "scintillator_pmt": 2, "fast_scan_smear": 3}
    for path in sorted(SCENARIOS.glob("*friedrich*.yaml")):
        order = [rank[n] for n, _ in scenario_chain(path.name) if n in rank]
        assert order == sorted(order), path.name
        for n, params in scenario_chain(path.name):
            assert not any(k.endswith("_px") for k in params), (path.name, n)


# --- jitter in Å ----------------------------------------------------------------------------------------
def test_jitter_sigma_in_angstrom_and_rms_against_the_ar1_closed_form():
    phi_x, phi_y, sx, sy = 0.5, 0.5, 0.08, 0.04
    # closed form against the explicit sum of Var Δ_j = σ²(1 − φ^{2j})/(1 − φ²) (eq 2.14) and σ²/(1 − φ²) (eq 2.15)
    j = np.arange(1, 6)
    assert ar1_rms(5, 0.7, 1.0, False) == pytest.approx(math.sqrt(np.mean((1 - 0.49**j) / 0.51)), rel=1e-12)
    assert ar1_rms(5, 0.7, 1.0, True) == pytest.approx(math.sqrt(1 / 0.51), rel=1e-12)
    n_frames, ny = 400, 6                      # short series: the x start at a_1 (eq 2.14) matters
    img = np.zeros((n_frames, ny, 16), np.float32)
    rms = {}
    for step in (0.4, 0.12):
        m = Measurement("adf_tilt_series", img, ("tilt", "y", "x"), Geometry(scan_step_A=(step, step)))
        out = ScanJitter().apply(m, ScanJitter.Params(phi_x=phi_x, sigma_x_A=sx, phi_y=phi_y, sigma_y_A=sy,
                                                      record_shifts=True), np.random.default_rng(3))
        shifts_A = out.extras["truth_scan_jitter_px"] * step          # (frames, lines, (Δy, Δx)) in Å
        rec = out.provenance[-1]
        assert rec["sigma_px"] == pytest.approx([sy / step, sx / step], rel=1e-12)
        expected_x, expected_y = ar1_rms(ny, phi_x, sx, False), ar1_rms(ny, phi_y, sy, True)
        assert rec["rms_displacement_A"]["x"] == pytest.approx(expected_x, rel=1e-12)
        assert rec["rms_displacement_A"]["y"] == pytest.approx(expected_y, rel=1e-12)
        assert expected_y == pytest.approx(0.04 / math.sqrt(0.75), rel=1e-12)          # 0.0462 Å
        tol = 4 * math.sqrt(2 / (n_frames * ny)) * 1.5                                  # χ² spread, correlated lines
        real_x = math.sqrt(np.mean(shifts_A[..., 1] ** 2))
        real_y = math.sqrt(np.mean(shifts_A[..., 0] ** 2))
        assert real_x == pytest.approx(expected_x, rel=tol) and real_y == pytest.approx(expected_y, rel=tol)
        assert rec["realised_rms_displacement_A"]["x"] == pytest.approx(real_x, rel=1e-6)
        rms[step] = shifts_A
    # the same σ in Å is the same jitter in Å at any scan step (same draws, shifts in px scale as 1/step)
    assert np.allclose(rms[0.4], rms[0.12], rtol=1e-9, atol=1e-12)


def test_jitter_pixel_parameters_are_refused_with_the_conversion():
    with pytest.raises(ValidationError, match="sigma_x_A"):
        ScanJitter.Params(sigma_x_px=0.5)
    text = (SCENARIOS / "friedrich_adf_detector.yaml").read_text().replace("sigma_x_A: 0.08", "sigma_x_px: 0.3")
    with pytest.raises(ScenarioError, match=r"sigma_x_px.*replaced by sigma_x_A in Å.*0\.08 Å"):
        parse_scenario(text, check_resources=False)


# --- fast-scan smear: line start and arrival convention ---------------------------------------------------
@pytest.mark.parametrize("model", ["exponential", "half_lorentzian"])
@pytest.mark.parametrize("arrival", ["uniform", "pixel_start"])
def test_fast_scan_settled_line_start_keeps_a_flat_image_flat(model, arrival):
    out = apply(flat(shape=(3, 64)), "fast_scan_smear", model=model, arrival=arrival)
    assert np.allclose(out.data, 0.5, rtol=1e-6)                     # was 0.25, 0.35, 0.40 … (0.50, 0.71, 0.80 × 0.5)


def test_fast_scan_blanked_line_start_reads_the_response_cdf():
    out = apply(flat(1.0, shape=(2, 32)), "fast_scan_smear", model="half_lorentzian", arrival="pixel_start",
                line_start="blanked")
    # (2/π) atan(k + 1) for τ = t_d: the detector starting from zero at every line
    assert np.allclose(out.data[0, :3], [0.5, 2 / np.pi * np.arctan(2), 2 / np.pi * np.arctan(3)], atol=1e-6)
    out = apply(flat(1.0, shape=(2, 32)), "fast_scan_smear", model="exponential", arrival="uniform",
                line_start="blanked")
    k = np.arange(3)
    assert np.allclose(out.data[0, :3], 1 - np.exp(-k) * (1 - np.exp(-1)), atol=1e-6)   # e⁻¹, 0.767, 0.914


@pytest.mark.parametrize("model, arrival, own, next_", [
    ("exponential", "pixel_start", 1 - math.exp(-1), math.exp(-1) * (1 - math.exp(-1))),      # 0.632, 0.233
    ("exponential", "uniform", math.exp(-1), (1 - math.exp(-1)) ** 2),                        # 0.368, 0.400
    ("half_lorentzian", "pixel_start", 0.5, 2 / math.pi * (math.atan(2) - math.atan(1))),
    ("half_lorentzian", "uniform", 2 / math.pi * (math.pi / 4 - 0.5 * math.log(2)), None),    # 0.279
])
def test_fast_scan_arrival_convention_fraction_in_own_pixel(model, arrival, own, next_):
    img = np.zeros((2, 64), np.float32)
    img[:, 20] = 1.0
    out = apply(flat(shape=(2, 64)).replace(data=img), "fast_scan_smear", model=model, arrival=arrival,
                dwell_time_us=0.5, response_time_us=0.5)
    assert np.allclose(out.data[:, :20], 0.0, atol=1e-7)
    assert out.data[0, 20] == pytest.approx(own, abs=1e-6)
    assert out.provenance[-2]["kernel_fraction_first_pixel"] == pytest.approx(own, abs=1e-12)
    if next_ is not None:
        assert out.data[0, 21] == pytest.approx(next_, abs=1e-6)


# --- the Fig. 2.9 particle ---------------------------------------------------------------------------------
def test_pt_nanoparticle_default_is_the_thesis_particle_with_333_columns():
    p = PtNanoparticle.Params()
    assert p.diameter_cells == 11 and p.zone_axis == (1, 0, 0)
    s = PtNanoparticle().build(p, np.random.default_rng(0))
    assert s.metadata["n_columns"] == 333
    # whole atoms (hard spheres of radius a/2√2) inside an 11-cell sphere: outer surface 11 cells across
    r = np.linalg.norm(s.positions_A - s.cell_A / 2, axis=1)
    assert r.max() + p.a_A / (2 * math.sqrt(2)) <= 11 * p.a_A / 2 + 1e-9
    # the v1 construction (every atom centre in an atom-centred sphere) gave 373
    old = PtNanoparticle().build(PtNanoparticle.Params(centre="atom", atoms_inside="centre"), np.random.default_rng(0))
    assert old.metadata["n_columns"] == 373


def test_pt_nanoparticle_scenario_uses_the_table_2_1_particle_source_size():
    spec = yaml.safe_load((SCENARIOS / "friedrich_pt_nanoparticle.yaml").read_text())
    assert dict(scenario_chain("friedrich_pt_nanoparticle.yaml"))["source_size"]["fwhm_A"] == 0.75
    fwd = spec["forward"]["params"]
    assert fwd["semiangle_mrad"] == 21.0 and fwd["detectors"]["haadf"][0] == 42
