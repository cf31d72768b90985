"""tomo_sections: the stored depth/lateral sections pass through the atom and equal the truth's for a perfect volume."""

import numpy as np
import pytest

from tembench.builtin.quantifiers import ground_truth_like
from tembench.errors import TembenchError
from tembench.types import Geometry, Measurement, Reconstruction, Sample
from tembench_you2025.tomo_sections import TomoSections


def _case():
    sample = Sample(positions_A=np.array([[6.2, 5.1, 7.3]]), numbers=np.array([78]), cell_A=np.array([12.0, 12.0, 14.0]))
    s = 0.5
    probe = Reconstruction(kind="volume", data=np.zeros((28, 24, 24), np.float32), sampling_A=s,
                           quantity="potential_V", origin_A=(0.0, 0.0, 0.0))
    truth = np.asarray(ground_truth_like(probe, sample, 200.0, "lobato"), np.float32)
    rec = Reconstruction(kind="volume", data=truth, sampling_A=s, quantity="potential_V", origin_A=(0.0, 0.0, 0.0),
                         extras={"translations_A": np.zeros((3, 2)), "euler_deg": np.zeros((3, 3))})
    meas = Measurement(kind="4dstem_tilt_series", data=np.zeros((3, 1, 1, 1, 1)),
                       axes=("tilt", "scan_y", "scan_x", "k_y", "k_x"),
                       geometry=Geometry(energy_keV=200.0, tilt_angles_deg=[-10.0, 0.0, 10.0], tilt_axis="y"))
    return sample, rec, meas


def test_sections_pass_through_the_atom_and_match_the_truth():
    sample, rec, meas = _case()
    q = TomoSections()
    out = q.score(rec, meas, sample, q.Params())
    assert out["section_y_A"] == pytest.approx(5.1, abs=0.5)   # the atom's y (within a voxel)
    assert out["section_z_A"] == pytest.approx(7.3, abs=0.5)
    np.testing.assert_allclose(out["xz_section_V"], out["truth_xz_section_V"], rtol=1e-5, atol=1e-4)
    iz, ix = np.unravel_index(np.argmax(out["xz_section_V"]), out["xz_section_V"].shape)
    assert (iz * 0.5, ix * 0.5) == pytest.approx((7.3, 6.2), abs=0.5)
    np.testing.assert_array_equal(out["tilt_angles_deg"], [-10.0, 0.0, 10.0])
    assert out["translations_A"].shape == (3, 2)


def test_rejects_images():
    sample, rec, meas = _case()
    img = Reconstruction(kind="image", data=np.zeros((4, 4)), sampling_A=0.5, quantity="potential_V")
    with pytest.raises(TembenchError, match="volumes"):
        TomoSections().score(img, meas, sample, TomoSections.Params())
