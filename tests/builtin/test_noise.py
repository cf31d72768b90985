"""Poisson dose: per-pixel statistics against theory and dose bookkeeping."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tembench.builtin.noise import PoissonDose
from tembench.errors import TembenchError
from tembench.types import Geometry, Measurement


def apply(m, seed=0, **kw):
    return PoissonDose().apply(m, PoissonDose.Params(**kw), np.random.default_rng(seed))


def hrtem(shape=(64, 64), value=1.0, sampling=0.5):
    return Measurement("hrtem_image", np.full(shape, value, np.float32), ("y", "x"), Geometry(sampling_A=(sampling, sampling)))


def test_plane_wave_mean_and_variance_per_pixel():
    # I = 0.8, dose 10 e/Å², pixel 0.5 Å: λ = 0.8·10·0.25 = 2
    out = apply(hrtem((128, 128), 0.8), dose_e_per_A2=10.0)
    lam, n = 2.0, out.data.size
    assert out.counted and out.data.dtype == np.float32
    assert abs(out.data.mean() - lam) < 5 * math.sqrt(lam / n)
    assert abs(out.data.var() / lam - 1) < 5 * math.sqrt(2 / n)  # var of sample variance ≈ 2λ²/n (λ≥1)
    assert out.geometry.dose_e_per_A2 == 10.0 and out.provenance[-1]["component"] == "poisson_dose"


def test_total_budget_split_over_tilts_and_defocus():
    n_t, n_f, total = 6, 3, 900.0
    data = np.ones((n_t, n_f, 32, 32), np.float32)
    m = Measurement("hrtem_tilt_series", data, ("tilt", "defocus", "y", "x"), Geometry(sampling_A=(0.5, 0.5)))
    out = apply(m, dose_e_per_A2=total, dose_mode="total_budget")
    assert out.geometry.dose_e_per_A2 == pytest.approx(total / (n_t * n_f))
    # vacuum: all electrons delivered = total dose × image area, within Poisson error
    expected = total * (32 * 0.5) ** 2
    assert abs(out.data.sum() - expected) < 5 * math.sqrt(expected)
    per_image = out.data.sum(axis=(2, 3))
    assert abs(per_image.mean() - expected / (n_t * n_f)) < 5 * math.sqrt(expected / (n_t * n_f) / per_image.size)


def test_4dstem_electrons_per_pattern_from_scan_step():
    rng = np.random.default_rng(1)
    pat = rng.random((8, 8)).astype(np.float32)
    pat /= pat.sum()
    data = np.broadcast_to(pat, (10, 12, 8, 8)).copy()
    m = Measurement("4dstem", data, ("scan_y", "scan_x", "k_y", "k_x"), Geometry(scan_step_A=(0.5, 0.4)))
    out = apply(m, dose_e_per_A2=1000.0)
    n_e = 1000.0 * 0.5 * 0.4
    assert out.geometry.electrons_per_pattern == pytest.approx(n_e)
    sums = out.data.sum(axis=(2, 3))
    assert abs(sums.mean() - n_e) < 5 * math.sqrt(n_e / sums.size)
    assert abs(sums.var() / n_e - 1) < 5 * math.sqrt(2 / sums.size)


def test_electrons_per_pattern_param_and_adf_image():
    m = Measurement("adf_image", np.full((50, 50), 0.1, np.float32), ("y", "x"), Geometry(sampling_A=(0.2, 0.2)))
    out = apply(m, electrons_per_pattern=50.0)
    assert abs(out.data.mean() - 5.0) < 5 * math.sqrt(5.0 / out.data.size)
    assert out.geometry.dose_e_per_A2 == pytest.approx(50.0 / 0.04)


@pytest.mark.parametrize("dose", [math.inf, "inf", ".inf"])
def test_infinite_dose_is_noise_free(dose):
    m = hrtem(value=0.7)
    out = apply(m, dose_e_per_A2=dose)
    assert np.array_equal(out.data, m.data) and not out.counted


def test_seeded_reproducible():
    m = hrtem()
    assert np.array_equal(apply(m, 3, dose_e_per_A2=5.0).data, apply(m, 3, dose_e_per_A2=5.0).data)
    assert not np.array_equal(apply(m, 3, dose_e_per_A2=5.0).data, apply(m, 4, dose_e_per_A2=5.0).data)


def test_errors():
    counted = apply(hrtem(), dose_e_per_A2=5.0)
    with pytest.raises(TembenchError, match="already counted"):
        apply(counted, dose_e_per_A2=5.0)
    with pytest.raises(TembenchError, match="sampling_A"):
        apply(Measurement("hrtem_image", np.ones((4, 4)), ("y", "x")), dose_e_per_A2=5.0)
    m4 = Measurement("4dstem", np.ones((2, 2, 4, 4)), ("scan_y", "scan_x", "k_y", "k_x"))
    with pytest.raises(TembenchError, match="electrons_per_pattern"):
        apply(m4, dose_e_per_A2=5.0)
    with pytest.raises(Exception, match="dose_e_per_A2"):
        PoissonDose.Params(dose_e_per_A2=-1)


def test_noise_free_virtual_images_are_dropped_when_counting():
    m = Measurement("4dstem", np.full((2, 2, 4, 4), 1 / 16, np.float32), ("scan_y", "scan_x", "k_y", "k_x"),
                    Geometry(scan_step_A=(0.5, 0.5)), extras={"virtual_images": {"adf": np.ones((2, 2))}})
    out = apply(m, dose_e_per_A2=100.0)
    assert "virtual_images" not in out.extras and out.provenance[-1]["dropped_extras"] == ["virtual_images"]
