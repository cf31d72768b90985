"""Fourier shell / ring correlation (tembench.analysis.fsc) and the ``fsc`` quantifier.

Statistics used below: for a shell of n Fourier voxels (both Friedel mates counted, i.e. n real
degrees of freedom), the FSC of two independent white-noise maps has mean 0 and standard
deviation 1/√n, and for S + N_A vs S + N_B with spectral SNR(k) = P_S/P_N the Fisher transform
atanh(FSC) is ≈ normal around atanh(SNR/(1+SNR)) (Frank & Al-Ali 1975) with standard error
1/√(n − 3). Expected curves are computed here from the test's own shell assignment, not from
the code under test.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tembench.analysis.fsc import (fourier_ring_correlation, fourier_shell_correlation, halfbit_threshold,
                                   hann_edge_mask, onebit_threshold, resolution_at, threshold_curve)
from tembench.builtin.quantifiers_fsc import FourierShellCorrelation, fsc_report_section
from tembench.errors import TembenchError
from tembench.types import Geometry, Measurement, Reconstruction, Sample


def _random_field(shape, sampling, power, rng):
    """A Gaussian random field with power spectrum ``power(|k| in 1/Å)`` (per-voxel variance units)."""
    ks = np.meshgrid(*[np.fft.fftfreq(n, d=s) for n, s in zip(shape, sampling)], indexing="ij")
    k = np.sqrt(sum(x ** 2 for x in ks))
    return np.fft.ifftn(np.fft.fftn(rng.normal(size=shape)) * np.sqrt(power(k))).real, k


def _expected_fsc(k, power, dk, n_shells):
    """Shell-averaged SNR/(1+SNR) for unit-variance white noise, shells j = round(|k|/dk), j = 1 … n."""
    idx = np.floor(k / dk + 0.5).astype(int)
    snr = np.array([power(k[idx == j]).mean() for j in range(1, n_shells + 1)])
    return snr / (1 + snr)


def _gauss_power(amplitude, k0):
    return lambda k: amplitude * np.exp(-0.5 * (k / k0) ** 2)


def _crossing_k(amplitude, k0, level):
    """k where SNR/(1+SNR) = level for SNR = amplitude·exp(−k²/2k0²)."""
    return k0 * np.sqrt(2 * np.log(amplitude / (level / (1 - level))))


# --- curve ------------------------------------------------------------------------------------
def test_identical_maps_correlate_to_one_in_every_shell():
    rng = np.random.default_rng(1)
    v = rng.normal(size=(24, 32, 28))
    c = fourier_shell_correlation(v, v.copy(), (1.0, 0.75, 0.8))
    assert np.all(np.abs(c.fsc - 1) < 1e-12) and np.all(c.n_voxels > 0)
    img = rng.normal(size=(40, 36))
    c2 = fourier_ring_correlation(img, 3.0 * img + 7.0, 0.5, mask_edge_A=3.0)  # scale and offset do not matter
    assert np.all(np.abs(c2.fsc - 1) < 1e-12)
    assert np.all(np.abs(fourier_shell_correlation(v, -v, 1.0).fsc + 1) < 1e-12)


def test_independent_noise_stays_below_the_one_bit_curve():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(2, 64, 64, 64))
    c = fourier_shell_correlation(a, b, 0.5)
    below = np.mean(c.fsc < c.threshold("onebit"))
    assert below >= 0.95, below                    # measured: 1.0 of 32 shells
    assert np.mean(c.fsc < c.threshold("halfbit")) >= 0.95
    # the spread pins n_voxels as the full-shell count: FSC·√n is a unit normal
    z = c.fsc * np.sqrt(c.n_voxels)
    assert 0.75 < z.std() < 1.3 and abs(z.mean()) < 0.6, (z.std(), z.mean())
    # voxels in shells 1 … J fill the ball of radius J + ½ Fourier pixels, less the DC voxel
    for big_j, rel in ((10, 0.03), (20, 0.005), (31, 0.005)):   # measured 4944, 36136, 131154 voxels
        assert c.n_voxels[:big_j].sum() == pytest.approx(4 / 3 * np.pi * (big_j + 0.5) ** 3 - 1, rel=rel)


def test_signal_plus_independent_noise_follows_snr_over_one_plus_snr_3d():
    rng = np.random.default_rng(3)
    amp, k0, s = 50.0, 0.15, 0.5
    power = _gauss_power(amp, k0)
    signal, k = _random_field((48, 48, 48), (s, s, s), power, rng)
    a, b = signal + rng.normal(size=signal.shape), signal + rng.normal(size=signal.shape)
    c = fourier_shell_correlation(a, b, s)
    rho = _expected_fsc(k, power, c.shell_width_invA, len(c.k_invA))
    z = (np.arctanh(c.fsc) - np.arctanh(rho)) * np.sqrt(c.n_voxels - 3)
    assert np.all(np.abs(z) < 4.5), np.abs(z).max()
    assert 0.6 < np.sqrt(np.mean(z ** 2)) < 1.5, np.sqrt(np.mean(z ** 2))   # measured 1.05 over 6 seeds
    # resolution at 0.143 where SNR = 1/6: analytic k* = 0.5066 1/Å (1.974 Å)
    r = c.resolution("0.143")
    assert r.reached and abs(r.k_invA - _crossing_k(amp, k0, 0.143)) < 0.025, r


def test_frc_2d_analogue():
    rng = np.random.default_rng(4)
    amp, k0, s = 50.0, 0.15, 0.5
    power = _gauss_power(amp, k0)
    signal, k = _random_field((256, 256), (s, s), power, rng)
    a, b = signal + rng.normal(size=signal.shape), signal + rng.normal(size=signal.shape)
    c = fourier_ring_correlation(a, b, s)
    assert len(c.k_invA) == 128 and np.isclose(c.shell_width_invA, 1 / 128)
    rho = _expected_fsc(k, power, c.shell_width_invA, len(c.k_invA))
    z = (np.arctanh(c.fsc) - np.arctanh(rho)) * np.sqrt(c.n_voxels - 3)
    assert np.all(np.abs(z) < 4.5) and 0.6 < np.sqrt(np.mean(z ** 2)) < 1.5
    r = c.resolution("0.143")
    assert abs(r.k_invA - _crossing_k(amp, k0, 0.143)) < 0.06, r   # ~3σ of the crossing for rings of ~400 px
    # pixels in rings 1 … J fill the disc of radius J + ½, less the DC pixel
    for big_j in (20, 100):
        assert c.n_voxels[:big_j].sum() == pytest.approx(np.pi * (big_j + 0.5) ** 2 - 1, rel=0.01)  # 1312, 31756


def test_anisotropic_sampling_uses_physical_shells():
    # y step 0.5 Å, x step 1.0 Å, both 32 Å boxes: k_y = 0.25 1/Å is y index 8 of 64, k_x = 0.125 1/Å is x
    # index 4 of 32 — the same fraction of each axis, so shells in pixel units would mix them
    y = 0.5 * np.arange(64)[:, None]
    x = 1.0 * np.arange(32)[None, :]
    wy, wx = np.cos(2 * np.pi * 0.25 * y) + 0 * x, np.cos(2 * np.pi * 0.125 * x) + 0 * y
    c = fourier_ring_correlation(wy + wx, wy - wx, (0.5, 1.0))
    assert np.isclose(c.shell_width_invA, 1 / 32) and np.isclose(c.nyquist_invA, 0.5)
    at = {round(k, 6): f for k, f in zip(c.k_invA, c.fsc)}
    assert np.isclose(at[0.25], 1.0) and np.isclose(at[0.125], -1.0)
    assert np.allclose([f for k, f in at.items() if k not in (0.25, 0.125)], 0.0)


def test_anisotropic_volume_matches_analytic_curve_in_physical_k():
    rng = np.random.default_rng(5)
    amp, k0, s = 50.0, 0.1, (1.0, 0.5, 0.5)
    power = _gauss_power(amp, k0)
    signal, k = _random_field((24, 48, 48), s, power, rng)
    a, b = signal + rng.normal(size=signal.shape), signal + rng.normal(size=signal.shape)
    c = fourier_shell_correlation(a, b, s)
    assert np.isclose(c.nyquist_invA, 0.5) and np.isclose(c.shell_width_invA, 1 / 24)
    rho = _expected_fsc(k, power, c.shell_width_invA, len(c.k_invA))
    z = (np.arctanh(c.fsc) - np.arctanh(rho)) * np.sqrt(c.n_voxels - 3)
    assert np.all(np.abs(z) < 4.5) and 0.6 < np.sqrt(np.mean(z ** 2)) < 1.5
    r = c.resolution(0.143)
    assert abs(r.k_invA - _crossing_k(amp, k0, 0.143)) < 0.03, r   # k* = 0.338 1/Å


# --- thresholds and resolution ------------------------------------------------------------------
@pytest.mark.parametrize("n, onebit, halfbit", [
    # by hand: (0.5 + 2.41421/√n)/(1.5 + 1.41421/√n) and (0.20711 + 1.91018/√n)/(1.20711 + 0.91018/√n)
    (1, 1.0, 1.0),
    (10, 0.64885, 0.54261),
    (1000, 0.37311, 0.21645),
    (1e12, 1 / 3, 0.17157),
])
def test_threshold_values_by_hand(n, onebit, halfbit):
    assert abs(float(onebit_threshold(n)) - onebit) < 2e-5
    assert abs(float(halfbit_threshold(n)) - halfbit) < 2e-5
    assert float(threshold_curve("one-bit", [n])[0]) == pytest.approx(float(onebit_threshold(n)))
    assert float(threshold_curve("0.143", [n])[0]) == 0.143


def test_unknown_criterion_is_an_error():
    with pytest.raises(TembenchError, match="criterion"):
        threshold_curve("3sigma-ish", [10])


def test_resolution_at_known_crossings():
    k = [0.1, 0.2, 0.3, 0.4]
    r = resolution_at(k, [0.9, 0.6, 0.4, 0.1], 0.5)
    assert r.reached and not r.at_first_shell and r.k_invA == pytest.approx(0.25) and r.resolution_A == pytest.approx(4.0)
    r = resolution_at(k, [0.9, 0.8, 0.4, 0.1], [0.5, 0.5, 0.3, 0.3])  # threshold per shell
    assert r.resolution_A == pytest.approx(3.0)
    r = resolution_at(k, [0.9, 0.8, 0.7, 0.6], 0.5, nyquist_invA=0.45)
    assert not r.reached and r.resolution_A == pytest.approx(1 / 0.45)
    r = resolution_at(k, [0.4, 0.8, 0.7, 0.6], 0.5)
    assert r.at_first_shell and r.resolution_A == pytest.approx(10.0)
    r = resolution_at(k, [0.9, 0.6, 0.7, 0.1], 0.65)  # first crossing, not a later one
    assert r.k_invA == pytest.approx(0.1 + 0.1 * 0.25 / 0.30)   # FSC − T: +0.25 → −0.05
    # a sparse spectrum: the last crossing, or the first one above k_min, skips the gap at 0.2
    r = resolution_at(k, [0.9, 0.6, 0.7, 0.1], 0.65, crossing="last")
    assert r.k_invA == pytest.approx(0.3 + 0.1 * 0.05 / 0.60)   # +0.05 → −0.55
    r = resolution_at(k, [0.1, 0.6, 0.7, 0.1], 0.65, k_min_invA=0.25)
    assert r.k_invA == pytest.approx(0.3 + 0.1 * 0.05 / 0.60)
    assert resolution_at(k, [0.1, 0.6, 0.7, 0.9], 0.65, crossing="last", nyquist_invA=0.5).resolution_A == 2.0
    r = resolution_at(k, [0.1, 0.2, 0.3, 0.1], 0.65, crossing="last")
    assert r.at_first_shell and r.resolution_A == pytest.approx(10.0)


def test_mask_and_errors():
    w = hann_edge_mask((20, 30), (0.5, 1.0), 4.0)
    assert w[10, 15] == 1.0 and w.min() > 0 and w[0, 15] < 0.05 and w[10, 0] < 0.05
    assert np.allclose(w, w[::-1, ::-1])
    with pytest.raises(TembenchError, match="half the box"):
        hann_edge_mask((20, 30), (0.5, 1.0), 5.0)
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(2, 32, 32, 32))
    c = fourier_shell_correlation(a, b, 1.0, mask_edge_A=4.0)
    assert np.mean(c.fsc < c.threshold("onebit")) >= 0.95
    with pytest.raises(TembenchError, match="same shape"):
        fourier_shell_correlation(a, b[:-1], 1.0)
    with pytest.raises(TembenchError, match="sampling"):
        fourier_shell_correlation(a, b, (1.0, -1.0, 1.0))
    with pytest.raises(TembenchError, match="finer"):
        fourier_shell_correlation(a, b, 1.0, shell_width_invA=0.01)


# --- quantifier -----------------------------------------------------------------------------
def _image_sample():
    return Sample(positions_A=[[3, 4, 3], [8, 7, 3.5], [5, 9, 2.5], [10, 2, 4]], numbers=[14, 8, 79, 6],
                  cell_A=[12, 12, 6])


def _measurement():
    return Measurement(kind="phase_object_image", data=np.zeros((2, 2)), axes=("y", "x"),
                       geometry=Geometry(energy_keV=300.0))


def _score(rec, sample, **params):
    q = FourierShellCorrelation()
    return q.score(rec, _measurement(), sample, q.parse_params(params))


def test_quantifier_image_vs_truth_and_half_sets():
    sample = _image_sample()
    s = 0.2
    gt = sample.projected_potential(s).astype(np.float64)                  # (60, 60) V·Å over the cell
    # a crop placed by its origin: correlates perfectly only if the origin is honoured
    crop = gt[10:50, 5:55]
    rec = Reconstruction("image", crop, (s, s), "projected_potential_VA", origin_A=(10 * s, 5 * s))
    m = _score(rec, sample)
    assert np.all(m["fsc_gt_curve"] > 0.999) and m["fsc_gt_not_reached"] is True
    assert m["fsc_gt_resolution_A"] == pytest.approx(2 * s)
    assert np.isnan(m["fsc_half_resolution_A"]) and m["fsc_half_not_reached"] is None
    assert len(m["fsc_k_invA"]) == len(m["fsc_gt_curve"]) == len(m["fsc_gt_n_voxels"])
    wrong = Reconstruction("image", crop, (s, s), "projected_potential_VA", origin_A=(0.0, 0.0))
    assert np.mean(_score(wrong, sample)["fsc_gt_curve"]) < 0.5

    # half sets: truth + independent noise; the full reconstruction is their mean
    rng = np.random.default_rng(7)
    sigma = 2.0 * gt.std()
    ha, hb = gt + sigma * rng.normal(size=gt.shape), gt + sigma * rng.normal(size=gt.shape)
    halves = [Reconstruction("image", h, (s, s), "projected_potential_VA") for h in (ha, hb)]
    rec = Reconstruction("image", 0.5 * (ha + hb), (s, s), "projected_potential_VA", extras={"half_sets": halves})
    m = _score(rec, sample, criterion="onebit", mask_edge_A=1.0)
    for tag in ("onebit", "halfbit", "0143", "05"):
        assert 2 * s <= m[f"fsc_half_resolution_{tag}_A"] < 12.0
    assert m["fsc_half_resolution_A"] == m["fsc_half_resolution_onebit_A"]
    # one-bit ≥ half-bit everywhere, so its first crossing is never at a finer resolution
    assert m["fsc_half_resolution_onebit_A"] >= m["fsc_half_resolution_halfbit_A"]
    assert m["fsc_half_resolution_05_A"] >= m["fsc_half_resolution_0143_A"]
    assert np.all(m["fsc_half_onebit"] >= m["fsc_half_halfbit"])
    assert m["fsc_half_resolution_0143_A"] < 1.0 and not m["fsc_half_0143_not_reached"]
    # the full reconstruction (mean of the halves, half the noise power) vs truth: 0.5 here ~ half-set 0.143
    assert abs(m["fsc_gt_resolution_A"] - m["fsc_half_resolution_0143_A"]) < 0.15 * m["fsc_half_resolution_0143_A"]   # measured 0.725 vs 0.727 Å

    halves_bad = [halves[0], Reconstruction("image", hb[:-2], (s, s), "projected_potential_VA")]
    rec_bad = Reconstruction("image", ha, (s, s), "projected_potential_VA", extras={"half_sets": halves_bad})
    with pytest.raises(TembenchError, match="different shapes"):
        _score(rec_bad, sample)
    halves_bad = [halves[0], Reconstruction("image", hb, (s, 0.25), "projected_potential_VA")]
    rec_bad = Reconstruction("image", ha, (s, s), "projected_potential_VA", extras={"half_sets": halves_bad})
    with pytest.raises(TembenchError, match="different samplings"):
        _score(rec_bad, sample)
    rec_bad = Reconstruction("image", ha, (s, s), "projected_potential_VA", extras={"half_sets": halves[:1]})
    with pytest.raises(TembenchError, match="two reconstructions"):
        _score(rec_bad, sample, ground_truth=False)


def test_quantifier_image_truth_resolution_with_noise_is_finite_and_monotone():
    sample = _image_sample()
    s = 0.2
    gt = sample.projected_potential(s).astype(np.float64)
    rng = np.random.default_rng(8)
    res = []
    for level in (1.0, 3.0):
        rec = Reconstruction("image", gt + level * gt.std() * rng.normal(size=gt.shape), (s, s),
                             "projected_potential_VA")
        m = _score(rec, sample)
        assert not m["fsc_gt_not_reached"]
        res.append(m["fsc_gt_resolution_A"])
    assert res[0] < res[1], res   # more noise, coarser resolution


def test_quantifier_volume_with_half_sets_and_anisotropic_truth():
    sample = Sample(positions_A=[[3, 4, 3], [6, 5, 4.5], [4, 6, 2.5]], numbers=[14, 8, 79], cell_A=[8, 8, 8])
    s = 0.4
    gt = sample.potential_volume(s).astype(np.float64)              # (20, 20, 20)
    crop = gt[2:18, 3:19, 1:17]
    rec = Reconstruction("volume", crop, s, "potential_V", origin_A=(2 * s, 3 * s, 1 * s))
    m = _score(rec, sample)
    assert np.all(m["fsc_gt_curve"] > 0.999) and m["fsc_gt_not_reached"]
    rng = np.random.default_rng(9)
    sigma = 0.3 * gt.std()
    halves = [Reconstruction("volume", gt + sigma * rng.normal(size=gt.shape), s, "potential_V") for _ in range(2)]
    rec = Reconstruction("volume", gt, s, "potential_V", extras={"half_sets": halves})
    m = _score(rec, sample, ground_truth=False)
    assert np.isnan(m["fsc_gt_resolution_A"]) and "fsc_gt_curve" not in m
    assert 2 * s <= m["fsc_half_resolution_halfbit_A"] < 8.0 and len(m["fsc_half_curve"]) == len(m["fsc_k_invA"])
    # anisotropic voxels: the truth is resampled (band-limited) onto the reconstruction's grid
    rec = Reconstruction("volume", gt[::2], (2 * s, s, s), "potential_V")
    m = _score(rec, sample)
    low = m["fsc_k_invA"] < 0.4
    assert np.all(m["fsc_gt_curve"][low] > 0.9), m["fsc_gt_curve"]
    bad = Reconstruction("volume", gt, s, "intensity")
    with pytest.raises(TembenchError, match="quantity"):
        _score(bad, sample)


def test_report_section_plots_stored_curves(tmp_path):
    k = np.linspace(0.05, 1.0, 20)
    arrays = {"fsc.fsc_k_invA": k, "fsc.fsc_gt_curve": np.exp(-k), "fsc.fsc_gt_threshold": np.full(20, 0.5),
              "fsc.fsc_half_k_invA": k, "fsc.fsc_half_curve": np.exp(-2 * k),
              "fsc.fsc_half_onebit": onebit_threshold(100 * k ** 2), "fsc.fsc_half_halfbit": halfbit_threshold(100 * k ** 2)}
    (tmp_path / "artifacts").mkdir()
    np.savez(tmp_path / "artifacts" / "r0.npz", **arrays)
    np.savez(tmp_path / "artifacts" / "r1.npz", recon_preview=np.zeros((4, 4)))
    table = pd.DataFrame({"artifacts": ["artifacts/r0.npz", "artifacts/r1.npz"], "status": ["ok", "ok"],
                          "repeat": [0, 0], "reconstructor": ["ssb", "dpc"], "point_index": [0, 0]})
    sec = fsc_report_section(table, tmp_path)
    assert len(sec) == 1 and "data:image/png;base64," in sec[0]["html"] and (tmp_path / "figures" / "fsc.png").exists()
    assert fsc_report_section(table.iloc[1:], tmp_path) == []

    # the report reaches it through the hook (every tembench.builtin module is registered as a plugin)
    import pluggy

    from tembench import hookspecs
    from tembench.builtin import quantifiers_fsc

    pm = pluggy.PluginManager("tembench")
    pm.add_hookspecs(hookspecs)
    pm.register(quantifiers_fsc)
    assert [h.function.__module__ for h in pm.hook.tembench_report_sections.get_hookimpls()] == [
        "tembench.builtin.quantifiers_fsc"]
