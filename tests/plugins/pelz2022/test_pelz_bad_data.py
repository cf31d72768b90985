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
