"""Issue 12 §1: data as it arrives from a microscope — bad pixels give a clear error naming frame and pixel."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tembench.errors import TembenchError
from tembench_pelz2022.common import load_4d


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_pixel_is_refused_naming_frame_and_pixel(focused, bad):
    meas = focused.measurement
    data = np.array(meas.data, dtype=np.float32, copy=True)
    data[3, 5, 10, 11] = bad
    m = meas.model_copy(update={"data": data}) if hasattr(meas, "model_copy") else dataclasses.replace(meas, data=data)
    with pytest.raises(TembenchError, match=r"scan \(y=3, x=5\), detector pixel \(ky=10, kx=11\)"):
        load_4d(m, "dpc")


def test_finite_data_pass(focused):
    x, _ = load_4d(focused.measurement, "ssb")
    assert np.isfinite(x).all()


def test_ten_times_wrong_detector_calibration_is_refused_with_the_numbers(focused):
    from tembench_pelz2022 import ssb
    meas = focused.measurement
    g = meas.geometry
    s = g.detector_sampling_mrad
    wrong = (np.asarray(s, dtype=float) * 10).tolist() if np.ndim(s) else float(s) * 10
    g2 = g.model_copy(update={"detector_sampling_mrad": wrong}) if hasattr(g, "model_copy") else dataclasses.replace(g, detector_sampling_mrad=wrong)
    m = meas.model_copy(update={"geometry": g2}) if hasattr(meas, "model_copy") else dataclasses.replace(meas, geometry=g2)
    with pytest.raises(TembenchError, match="measured bright-field disc radius"):
        ssb.SSB().reconstruct(m, ssb.SSB.Params(), np)


def test_too_small_scan_is_refused(focused):
    from tembench_pelz2022 import ssb
    meas = focused.measurement
    data = np.asarray(meas.data)[:2, :2]
    m = meas.model_copy(update={"data": data}) if hasattr(meas, "model_copy") else dataclasses.replace(meas, data=data)
    with pytest.raises(TembenchError, match="4x4 scan"):
        ssb.SSB().reconstruct(m, ssb.SSB.Params(), np)


@pytest.mark.parametrize("rotation_deg", [17.0])
def test_dpc_and_icom_estimate_the_rotation_by_default_and_report_it(phase_object, rotation_deg):
    # convention pinned: synthetic rotation θ is found as +θ (ours = −py4DSTEM's: +16.93° vs −17.0°)
    from tembench_pelz2022 import dpc, synthetic
    m = synthetic.simulate(phase_object[::2, ::2], 0.5, 1, 200.0, 25.0, rotation_deg=rotation_deg).measurement
    for cls in (dpc.ICOM, dpc.DPC):
        rec = cls().reconstruct(m, cls.Params(), np)
        assert abs((rec.extras["rotation_deg"] - rotation_deg + 180) % 360 - 180) < 1.0


def test_ssb_accepts_rotation_none_and_estimates_it(phase_object):
    from tembench_pelz2022 import ssb, synthetic
    m = synthetic.simulate(phase_object[::2, ::2], 0.5, 1, 200.0, 25.0, rotation_deg=17.0).measurement
    rec = ssb.SSB().reconstruct(m, ssb.SSB.Params(rotation_deg=None), np)
    assert abs((rec.extras["rotation_deg"] - 17.0 + 180) % 360 - 180) < 1.0
    assert np.isfinite(rec.data).all()
