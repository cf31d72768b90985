"""Issue 12 §1: hot, negative and dead detector pixels — detected over the whole scan, repaired and reported
(or refused naming pixel and frame) for DPC, iCOM and virtual detectors; SSB through the shared functions."""

from __future__ import annotations

import numpy as np
import pytest

from tembench.builtin.noise import PoissonDose
from tembench.builtin.quantifiers import normalized_cross_correlation as ncc
from tembench.errors import TembenchError
from tembench_pelz2022 import dpc, virtual
from tembench_pelz2022.common import find_bad_pixels, repaired

# detector 64² (1.57 mrad/px), disc radius ≈ 16 px about (32, 32): (30, 36) and column 36 cross the disc
HOT = [(30, 36), (5, 7), (50, 44)]


def _plant(data, case):
    d = np.array(data, dtype=np.float32, copy=True)
    planted = np.zeros(d.shape[2:], bool)
    if case == "hot_pixels":            # a few pixels at 1e6 counts in every frame
        for ky, kx in HOT:
            d[:, :, ky, kx] = 1e6
            planted[ky, kx] = True
        kind, frame = "hot", None
    elif case == "negative_pixel":      # one pixel at −1e6 in one frame (the case that wrecked SSB)
        d[3, 5, 30, 36] = -1e6
        planted[30, 36] = True
        kind, frame = "negative", (3, 5)
    elif case == "dead_pixels":         # always-zero pixels inside the bright-field disc
        for ky, kx in [(30, 36), (26, 30), (38, 33), (32, 32)]:
            d[:, :, ky, kx] = 0
            planted[ky, kx] = True
        kind, frame = "dead", None
    elif case == "dead_column":
        d[:, :, :, 36] = 0
        planted[:, 36] = True
        kind, frame = "dead", None
    elif case == "hot_column":
        d[:, :, :, 36] = 1e6
        planted[:, 36] = True
        kind, frame = "hot", None
    else:
        raise ValueError(case)
    return d, planted, kind, frame


CASES = ["hot_pixels", "negative_pixel", "dead_pixels", "dead_column", "hot_column"]


@pytest.mark.parametrize("case", CASES)
def test_bad_pixels_are_found_exactly(focused, case):
    data, planted, kind, frame = _plant(focused.measurement.data, case)
    bad = find_bad_pixels(data, "test")
    if case == "dead_column":  # the column's dark-field pixels are dead too but see (almost) nothing:
        # all of the disc's column pixels must be found, and nothing off the column
        inside = planted & (bad.mean > 0) & (np.asarray(focused.measurement.data).mean(axis=(0, 1)) > 0.01 * bad.level)
        assert (bad.mask & inside).sum() == inside.sum() and not (bad.mask & ~planted).any()
    else:
        assert np.array_equal(bad.mask, planted), np.argwhere(bad.mask ^ planted)
    assert set(bad.listing(1000)[i]["kind"] for i in range(int(bad.mask.sum()))) == {kind}
    if frame is not None:
        d = bad.listing()[0]
        assert (d["scan_y"], d["scan_x"]) == frame


def test_clean_and_counted_data_have_no_bad_pixels(focused, defocused):
    # no false positives: noise-free data and Poisson-counted data from 1 to 10⁴ electrons per pattern
    for m in (focused.measurement, defocused.measurement):
        assert not find_bad_pixels(np.asarray(m.data), "test")
        for dose in (1, 10_000):
            c = PoissonDose().apply(m, PoissonDose.Params(electrons_per_pattern=dose), np.random.default_rng(dose))
            assert not find_bad_pixels(np.asarray(c.data), "test"), dose


def _recon(cls, m, **kw):
    return cls().reconstruct(m, cls.Params(**kw), np)


@pytest.mark.parametrize("case", CASES)
def test_com_reconstructions_are_repaired_and_report_the_pixels(focused, blurred_truth, case):
    data, planted, kind, _ = _plant(focused.measurement.data, case)
    m = focused.measurement.replace(data=data)
    for cls in (dpc.ICOM, dpc.DPC):
        # a repaired column leaves a uniform COM offset (≈0.005 mrad: the interpolation error where the column
        # crosses the disc edge) that the padded DPC integrates into a ramp, as it does any descan offset
        # (NCC 0.927 with reference="center"): reference="mean" removes it (docs/pelz2022.md)
        kw = {"rotation_deg": 0.0, **({"reference": "mean"} if cls is dpc.DPC and "column" in case else {})}
        clean = _recon(cls, focused.measurement, **kw)
        rec = _recon(cls, m, **kw)
        # repaired: as good as the clean data within 0.002 NCC against |P|²⋆φ
        assert ncc(rec.data, blurred_truth) > ncc(clean.data, blurred_truth) - 0.002
        assert rec.extras["bad_pixel_counts"][kind] == int((rec.extras["bad_pixel_mask"] & planted).sum()) > 0
        if case.startswith("hot"):  # without the check the result is wrecked (NaN or NCC ≈ 0): the test can fail
            raw = _recon(cls, m, bad_pixels="ignore", **kw)
            assert not ncc(raw.data, blurred_truth) > 0.5
    with pytest.raises(TembenchError, match=rf"{kind} pixel \(ky=\d+, kx=\d+\)"):
        _recon(dpc.ICOM, m, bad_pixels="refuse")


def test_refusal_names_the_frame_of_a_single_bad_value(focused):
    data, *_ = _plant(focused.measurement.data, "negative_pixel")
    with pytest.raises(TembenchError, match=r"negative pixel \(ky=30, kx=36\).*frame scan \(y=3, x=5\)"):
        _recon(dpc.DPC, focused.measurement.replace(data=data), bad_pixels="refuse")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("detector", ["bf", "adf"])
def test_virtual_detectors_are_repaired(focused, case, detector):
    data, planted, kind, _ = _plant(focused.measurement.data, case)
    clean = _recon(virtual.VirtualDetector, focused.measurement, detector=detector).data
    rec = _recon(virtual.VirtualDetector, focused.measurement.replace(data=data), detector=detector)
    assert ncc(rec.data, clean) > 0.99
    assert rec.extras["bad_pixel_counts"][kind] > 0
    if detector == "bf" and case in ("hot_pixels", "negative_pixel", "hot_column"):  # wrecked without the check
        raw = _recon(virtual.VirtualDetector, focused.measurement.replace(data=data), detector=detector,
                     bad_pixels="ignore")
        assert not ncc(raw.data, clean) > 0.5


def test_ssb_can_use_the_shared_repair(focused, blurred_truth):
    # SSB's own code is owned elsewhere: this shows find_bad_pixels + repaired fix the −1e6 case for it
    from tembench_pelz2022 import ssb
    data, *_ = _plant(focused.measurement.data, "negative_pixel")
    clean = ssb.SSB().reconstruct(focused.measurement, ssb.SSB.Params(), np).data
    fixed = repaired(data, find_bad_pixels(data, "ssb"))
    assert fixed is not data and data[3, 5, 30, 36] == -1e6  # a repaired copy, the input untouched
    rec = ssb.SSB().reconstruct(focused.measurement.replace(data=fixed), ssb.SSB.Params(), np).data
    assert ncc(rec, clean) > 0.99


def test_too_many_bad_pixels_are_refused(focused):
    d = np.array(focused.measurement.data, dtype=np.float32, copy=True)
    d[:, :, ::4, ::4] = 1e6  # 256 of 4096 pixels (6 %)
    with pytest.raises(TembenchError, match=r"256 of 4096 detector pixels"):
        find_bad_pixels(d, "dpc")


def test_disc_calibration_check_accepts_low_dose_data_and_still_refuses_a_wrong_calibration():
    """3 e/pattern: the brightest pixel of the mean pattern is noise; the disc must still measure ~16 px
    (it measured 7 px and SSB refused good data). A 10x wrong sampling is still refused."""
    from types import SimpleNamespace

    from tembench.errors import TembenchError
    from tembench_pelz2022.common import check_disc_calibration

    rng = np.random.default_rng(0)
    ky, kx = np.mgrid[:82, :79]
    disc = ((ky - 41) ** 2 + (kx - 39) ** 2 <= 15.9**2).astype(np.float64)
    lam = 3.0 * disc / disc.sum()  # 3 electrons per pattern
    x = rng.poisson(lam, size=(64, 64, 82, 79)).astype(np.float32)
    good = SimpleNamespace(sampling_mrad=(25.0 / 15.9, 25.0 / 15.9))
    check_disc_calibration(x, good, 25.0, "ssb")  # no refusal
    wrong = SimpleNamespace(sampling_mrad=(0.1 * 25.0 / 15.9, 0.1 * 25.0 / 15.9))
    with pytest.raises(TembenchError, match="bright-field disc radius"):
        check_disc_calibration(x, wrong, 25.0, "ssb")
