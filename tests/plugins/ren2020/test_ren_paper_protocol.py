"""Ren's own data protocol (model.paper_protocol_series) against the platform's independent simulator."""

from __future__ import annotations

import numpy as np
import pytest

from tembench.errors import TembenchError
from tembench.builtin.noise import PoissonDose
from tembench_ren2020 import model as M


def _ncc(a, b):
    a = np.asarray(a, np.float64).ravel() - np.mean(a)
    b = np.asarray(b, np.float64).ravel() - np.mean(b)
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def test_predicted_images_are_the_ones_the_loss_fits(toy_series, toy_sample):
    """predict_intensities is the forward half of tilt_loss_and_gradient: its images give eq 5 = 0."""
    problem = M.build_problem(toy_series, slice_binning=3)
    vol = np.asarray(toy_sample.potential_volume(0.5), np.float32)
    for k in (0, 5):
        img = M.predict_intensities(vol, k, problem)
        assert img.shape == np.shape(toy_series.data)[1:] and img.dtype == np.float32
        loss, _ = M.tilt_loss_and_gradient(vol, img, k, problem, want_gradient=False)
        assert loss < 1e-8 * img.size
        other, _ = M.tilt_loss_and_gradient(vol, img, (k + 1) % 8, problem, want_gradient=False)
        assert other > 1e3 * max(loss, 1e-12)       # another tilt's images do not fit


def test_paper_protocol_matches_the_platform_simulation_of_the_same_atoms(toy_series, toy_sample):
    """Voxel potential + the reconstruction's multislice (N_B = 1) vs Lobato slices on a 2× grid (independent)."""
    ren = M.paper_protocol_series(toy_series, toy_sample)
    assert ren.data.shape == toy_series.data.shape and not ren.counted
    assert ren.geometry is toy_series.geometry
    assert float(np.mean(ren.data)) == pytest.approx(1.0, abs=2e-3)
    contrast = np.std(toy_series.data)
    assert contrast > 1e-3
    for k in range(8):
        for j in range(2):
            assert _ncc(ren.data[k, j], toy_series.data[k, j]) > 0.95, (k, j)
    # a mirrored volume (atoms at −x) is a different sample: the same test tells them apart
    flipped = toy_sample.__class__(positions_A=np.c_[12.0 - toy_sample.positions_A[:, 0], toy_sample.positions_A[:, 1:]],
                                   numbers=toy_sample.numbers, cell_A=toy_sample.cell_A, name="mirror")
    wrong = M.paper_protocol_series(toy_series, flipped)
    assert min(_ncc(wrong.data[k, 0], toy_series.data[k, 0]) for k in range(8)) < 0.8


def test_paper_protocol_refuses_counted_data(toy_series, toy_sample):
    noisy = PoissonDose().apply(toy_series, PoissonDose.Params(dose_e_per_A2=1e5, dose_mode="total_budget"),
                                np.random.default_rng(0))
    with pytest.raises(TembenchError, match="noise-free"):
        M.paper_protocol_series(noisy, toy_sample)
