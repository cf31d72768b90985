"""Issue 12 §1: scan–detector orientation — rotation (with its 180° branch) and a transposed detector,
estimated by default from the curl of the COM field; the sign convention pinned on exact pixel permutations."""

from __future__ import annotations

import numpy as np
import pytest

from tembench.builtin.quantifiers import normalized_cross_correlation as ncc
from tembench_pelz2022 import dpc, synthetic


def _angle_err(a, b):
    return abs((a - b + 180) % 360 - 180)


def _detector_permuted(m, f):
    """The measurement with every pattern permuted exactly (no interpolation) by ``f`` on the detector axes."""
    return m.replace(data=np.ascontiguousarray(f(np.asarray(m.data))))


def _transposed(d):
    return d.transpose(0, 1, 3, 2)


def _rot90_about_centre(d):
    # np.rot90 on the detector axes turns about ((n−1)/2, (n−1)/2); one roll along k_y moves that to n//2,
    # where the synthetic beam sits: pixel (c + a, c + b) → (c − b, c + a)
    return np.roll(np.rot90(d, axes=(2, 3)), 1, axis=2)


def test_rotation_sign_is_pinned_by_an_exact_quarter_turn(focused, blurred_truth):
    # COM_scan = R(θ) COM_det, R counter-clockwise in (x, y) with y = row index (down): np.rot90 of every
    # pattern moves a COM (y, x) = (0, +d) to (−d, 0); R(θ)(−d, 0) = (0, d) needs θ = +90°. (py4DSTEM's
    # convention has the opposite sign: docs/pelz2022.md.)
    m = _detector_permuted(focused.measurement, _rot90_about_centre)
    x = np.asarray(m.data)
    c = 32
    assert x[0, 0, c - 5, c] == np.asarray(focused.measurement.data)[0, 0, c, c + 5]  # the permutation itself
    for cls in (dpc.ICOM, dpc.DPC):
        rec = cls().reconstruct(m, cls.Params(), np)
        assert _angle_err(rec.extras["rotation_deg"], 90.0) < 0.5 and rec.extras["transpose"] is False
        assert ncc(rec.data, blurred_truth) > 0.999
    # and the explicit value reproduces the estimate bit for bit
    a = dpc.ICOM().reconstruct(m, dpc.ICOM.Params(rotation_deg=90.0), np).data
    b = dpc.ICOM().reconstruct(m, dpc.ICOM.Params(), np).data
    assert ncc(a, b) > 0.99999


def test_pure_transpose_is_detected(focused, blurred_truth):
    m = _detector_permuted(focused.measurement, _transposed)
    rec = dpc.ICOM().reconstruct(m, dpc.ICOM.Params(), np)
    assert rec.extras["transpose"] is True and _angle_err(rec.extras["rotation_deg"], 0.0) < 0.5
    assert rec.extras["curl_fraction"]["transposed"] < 1e-3 < rec.extras["curl_fraction"]["as_read"]
    assert ncc(rec.data, blurred_truth) > 0.999


@pytest.mark.parametrize("rotation_deg", [17.0, -50.0, 160.0])
def test_rotated_and_transposed_detector_is_found(phase_object, rotation_deg):
    sim = synthetic.simulate(phase_object, 0.25, 2, 200.0, 25.0, rotation_deg=rotation_deg)
    truth = synthetic.probe_intensity_blur(phase_object, 0.25, 200.0, 25.0)[::2, ::2]
    straight = sim.measurement
    flipped = _detector_permuted(straight, _transposed)
    # COM_det(flipped) = T COM_det(straight), so COM_scan = R(θ) T COM_det(flipped): the same θ, transposed
    for cls in (dpc.ICOM, dpc.DPC):
        for m, t in ((straight, False), (flipped, True)):
            rec = cls().reconstruct(m, cls.Params(), np)
            assert rec.extras["transpose"] is t
            assert _angle_err(rec.extras["rotation_deg"], rotation_deg) < 1.0
            assert ncc(rec.data, truth) > 0.999
            c = rec.extras["bad_pixel_counts"]  # only edge pixels of the rotation's zero-filled corners, if any
            assert c["hot"] == c["negative"] == 0 and c["dead"] < 16
    # the failure this fixes: reading the transposed detector as it is gives no image at any rotation
    wrong = dpc.ICOM().reconstruct(flipped, dpc.ICOM.Params(transpose=False), np)
    assert wrong.extras["transpose"] is False and ncc(wrong.data, truth) < 0.9
    # an explicit transpose with the rotation still estimated
    given = dpc.ICOM().reconstruct(flipped, dpc.ICOM.Params(transpose=True), np)
    assert _angle_err(given.extras["rotation_deg"], rotation_deg) < 1.0 and ncc(given.data, truth) > 0.999


def test_noise_does_not_flip_the_orientation(focused):
    # pure-noise COM fields have curl fractions ≈ 0.5 either way: without a clear margin the data are read as
    # they are; with enough signal (this weak object, 0.05 rad peaks, needs ~1e5 e/pattern) a transposed detector
    # is still found
    from tembench.builtin.noise import PoissonDose
    flipped_meas = _detector_permuted(focused.measurement, _transposed)
    for seed in range(4):
        rng = np.random.default_rng(seed)
        low = PoissonDose().apply(focused.measurement, PoissonDose.Params(electrons_per_pattern=0.5), rng)
        rec = dpc.ICOM().reconstruct(low, dpc.ICOM.Params(), np)
        f = rec.extras["curl_fraction"]
        assert rec.extras["transpose"] is False and abs(f["as_read"] - f["transposed"]) < rec.extras["transpose_margin"]
        flipped = PoissonDose().apply(flipped_meas, PoissonDose.Params(electrons_per_pattern=100_000), rng)
        assert dpc.ICOM().reconstruct(flipped, dpc.ICOM.Params(), np).extras["transpose"] is True
