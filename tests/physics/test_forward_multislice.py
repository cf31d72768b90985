"""The hrtem_tilt_series and stem4d forward-model components."""

import numpy as np
import pytest

from tembench.builtin.forward_multislice import STEM4D, HRTEMTiltSeries
from tembench.errors import ResourceError, TembenchError
from tembench.physics import multislice as M
from tembench.physics import potentials as P
from tembench.types import Sample


def _vacuum(cell=(10.0, 10.0, 8.0)):
    return Sample(positions_A=np.zeros((0, 3)), numbers=np.zeros(0, int), cell_A=cell)


def _si(nxy=2, nz=2):
    from ase.build import bulk

    return Sample.from_ase(bulk("Si", "diamond", a=5.43, cubic=True) * (nxy, nxy, nz))


def test_registered():
    from tembench.registry import Registry

    reg = Registry()
    assert reg.get("forward_model", "hrtem_tilt_series") is HRTEMTiltSeries
    assert reg.get("forward_model", "stem4d") is STEM4D


def test_hrtem_vacuum_is_one_and_layout():
    p = HRTEMTiltSeries.Params(sampling_A=0.4, tilt_range_deg=(-20, 20), n_tilts=3, defocus_values_A=[0, 200],
                               aberrations={"C30": 1e5}, focal_spread_A=20.0, simulation_factor=2)
    m = HRTEMTiltSeries().simulate(_vacuum(), p, np)
    assert m.kind == "hrtem_tilt_series" and m.axes == ("tilt", "defocus", "y", "x")
    assert m.data.shape == (3, 2, 25, 25) and m.data.dtype == np.float32
    np.testing.assert_allclose(m.data, 1.0, atol=1e-5)
    g = m.geometry
    assert g.tilt_angles_deg == [-20.0, 0.0, 20.0] and g.defocus_A == [0.0, 200.0] and g.tilt_axis == "y"
    assert g.sampling_A == (0.4, 0.4) and g.slice_thickness_A == 2.0 and g.energy_keV == 300.0


def test_hrtem_untilted_equals_direct_multislice():
    # the component slices a slab [z0, z_exit] that holds every tilt, then refers defocus to z = cell_z:
    # Δf at cell_z equals Δf + (z_exit − cell_z) at the slab's exit plane (free space, Δf = −C10)
    sample = _si(2, 1)
    p = HRTEMTiltSeries.Params(sampling_A=5.43 / 27 * 2, slice_thickness_A=1.1, defocus_values_A=[50.0])
    m = HRTEMTiltSeries().simulate(sample, p, np)
    gpts = m.data.shape[-2:]
    s = m.geometry.sampling_A
    z0, z_exit = m.geometry.extra["slab_z_range_A"]
    assert z0 < 0 and z_exit > 5.43
    v = P.projected_potential(sample.positions_A, sample.numbers, gpts=gpts, sampling_A=s, slice_thickness_A=1.1,
                              z_range_A=(z0, z_exit))
    direct = M.hrtem_images(v, 1.1, energy_keV=300, sampling_A=s, defocus_values_A=[50.0 + z_exit - 5.43])
    np.testing.assert_allclose(m.data[0], direct, atol=2e-5)
    # and the reference plane is physical: the same image as a multislice ending at cell_z
    v2 = P.projected_potential(sample.positions_A, sample.numbers, gpts=gpts, sampling_A=s,
                               slice_thickness_A=5.43 / 4 * 0.999, z_range_A=(-0.01, 5.42))
    near = M.hrtem_images(v2, 5.43 / 4 * 0.999, energy_keV=300, sampling_A=s, defocus_values_A=[50.0])
    assert np.abs(m.data[0] - near).max() < 0.02  # only the slicing differs


def test_hrtem_tilt_about_y_matches_rotated_sample():
    sample = _si(2, 1)
    p = HRTEMTiltSeries.Params(sampling_A=0.45, tilt_angles_deg=[0.0, 15.0], defocus_values_A=[0.0])
    m = HRTEMTiltSeries().simulate(sample, p, np)
    assert not np.allclose(m.data[0], m.data[1], atol=1e-3)
    # a 180° tilt about y mirrors x and z: its projection is the x-mirror of the untilted one
    p2 = HRTEMTiltSeries.Params(sampling_A=0.45, tilt_angles_deg=[0.0, 180.0], defocus_values_A=[0.0],
                                slice_thickness_A=6.0)
    m2 = HRTEMTiltSeries().simulate(Sample(positions_A=[[3.1, 4.0, 2.0]], numbers=[79], cell_A=[9.0, 9.0, 6.0]),
                                    p2, np)
    a, b = m2.data[0, 0], m2.data[1, 0]
    ya, xa = np.unravel_index(a.argmin(), a.shape)
    yb, xb = np.unravel_index(b.argmin(), b.shape)
    assert ya == yb and abs((xa + xb) * 0.45 - 9.0) < 0.5  # x → cell_x − x


def test_hrtem_memory_guard():
    p = HRTEMTiltSeries.Params(sampling_A=0.1, tilt_range_deg=(-70, 70), n_tilts=500, max_memory_GB=0.01)
    with pytest.raises(ResourceError, match="hrtem_tilt_series"):
        HRTEMTiltSeries().simulate(_vacuum((60.0, 60.0, 60.0)), p, np)


def test_slices_thicker_than_sample_and_coarse_sampling():
    with pytest.raises(TembenchError, match="thicker than the sample"):
        HRTEMTiltSeries().simulate(_vacuum((10.0, 10.0, 3.0)), HRTEMTiltSeries.Params(slice_thickness_A=5.0), np)
    with pytest.raises(TembenchError, match="objective aperture"):
        HRTEMTiltSeries().simulate(_vacuum(), HRTEMTiltSeries.Params(sampling_A=0.5, semiangle_mrad=40.0), np)


def test_hrtem_bad_params():
    with pytest.raises(Exception, match="C99"):
        HRTEMTiltSeries.Params(aberrations={"C99": 1.0})
    with pytest.raises(Exception):
        HRTEMTiltSeries.Params(energy_keV=0)


def test_stem4d_patterns_images_and_tilts(tmp_path):
    sample = _si(2, 1)
    p = STEM4D.Params(sampling_A=0.1, semiangle_mrad=20, scan_step_A=2.0, energy_keV=200,
                      detectors={"bf": (0.0, 20.0), "adf": (40.0, None)})
    m = STEM4D().simulate(sample, p, np)
    assert m.kind == "4dstem" and m.axes == ("scan_y", "scan_x", "k_y", "k_x")
    assert m.data.shape[:2] == (6, 6) and m.data.dtype == np.float32
    tot = m.data.sum(axis=(-2, -1))
    assert np.all(tot <= 1.0 + 1e-4) and np.all(tot > 0.99)
    g = m.geometry
    assert g.scan_positions_A.shape == (36, 2) and g.detector_sampling_mrad[0] > 0 and g.semiangle_mrad == 20
    assert m.extras["virtual_images"]["adf"].shape == (6, 6)
    # streamed to disk, with tilts
    p2 = STEM4D.Params(**{**p.model_dump(), "tilt_angles_deg": [0.0, 0.0], "patterns_path": str(tmp_path / "p.npy")})
    m2 = STEM4D().simulate(sample, p2, np)
    assert m2.kind == "4dstem_tilt_series" and m2.data.shape[:3] == (2, 6, 6)
    assert isinstance(m2.data.base, np.memmap) or isinstance(m2.data, np.memmap)
    np.testing.assert_allclose(m2.data[0], m.data, atol=1e-6)
    np.testing.assert_allclose(m2.data[1], m.data, atol=1e-6)
    # images only: no 4D array
    p3 = STEM4D.Params(**{**p.model_dump(), "output": "image"})
    m3 = STEM4D().simulate(sample, p3, np)
    assert m3.kind == "adf_image" and m3.data.shape == (6, 6)
    np.testing.assert_allclose(m3.data, m.extras["virtual_images"]["bf"], rtol=1e-5)
    assert STEM4D.output_kind(p3) == "adf_image" and STEM4D.output_kind(p2) == "4dstem_tilt_series"


def test_stem4d_bad_input():
    sample = _si(1, 1)
    with pytest.raises(TembenchError, match="too coarse"):
        STEM4D().simulate(sample, STEM4D.Params(sampling_A=0.4, semiangle_mrad=30), np)
    with pytest.raises(TembenchError, match="keeps angles"):
        STEM4D().simulate(sample, STEM4D.Params(sampling_A=0.1, detectors={"haadf": (90.0, 200.0)}), np)
    # an annulus reaching past the simulated angles would be silently truncated: refuse it
    with pytest.raises(TembenchError, match="reaches 200.0 mrad.*up to 6[0-9].[0-9] mrad"):
        STEM4D().simulate(sample, STEM4D.Params(sampling_A=0.1, detectors={"haadf": (50.0, 200.0)}), np)
    with pytest.raises(TembenchError, match="larger than"):
        STEM4D().simulate(sample, STEM4D.Params(sampling_A=0.1, window_gpts=128), np)


def test_finer_simulation_grid_keeps_detector_pixel_centres():
    """Binning from a finer grid (App. A1.1) must not shift the image: pixel i stays centred at i·s.

    With a 10 mrad aperture the images are smooth at 0.5 Å, so binned and point-sampled images
    differ only by where the pixels sit. Before the fix the f-times finer simulation moved the image
    by −(f − 1)·s/(2f): −12.5 pm at f = 2 and −16.7 pm at f = 3 (measured −12.9 and −16.5 pm).
    """
    from skimage.registration import phase_cross_correlation

    rng = np.random.default_rng(0)
    pos = np.c_[rng.uniform(0, 12, (12, 2)), np.full(12, 4.0)]
    sample = Sample(positions_A=pos, numbers=[74] * 12, cell_A=(12.0, 12.0, 8.0))

    def image(f):
        m = HRTEMTiltSeries().simulate(sample, HRTEMTiltSeries.Params(
            energy_keV=300, sampling_A=0.5, slice_thickness_A=2.0, tilt_angles_deg=[0.0], defocus_values_A=[50.0],
            semiangle_mrad=10.0, simulation_factor=f), np)
        assert m.geometry.extra["detector_pixel_offset_A"] == (0.0, 0.0)
        return m.data[0, 0].astype(np.float64)

    ref = image(1)
    for f in (2, 3):
        shift_pm = phase_cross_correlation(ref, image(f), upsample_factor=1000)[0] * 50.0
        assert np.all(np.abs(shift_pm) < 3.0), (f, shift_pm)


@pytest.mark.parametrize("binning", [1, 2, 3])
def test_stem4d_records_where_the_unscattered_beam_falls(binning):
    """In vacuum the pattern's centroid is the beam centre; stem4d records it (between pixels for even binning)."""
    m = STEM4D().simulate(_vacuum((12.0, 12.0, 4.0)), STEM4D.Params(
        energy_keV=200, sampling_A=0.1, semiangle_mrad=20, scan_step_A=6.0, slice_thickness_A=2.0,
        window_gpts=72, detector_binning=binning), np)
    pattern = m.data.reshape(-1, *m.data.shape[-2:])[0].astype(np.float64)
    y, x = np.mgrid[: pattern.shape[0], : pattern.shape[1]]
    centroid = ((pattern * y).sum() / pattern.sum(), (pattern * x).sum() / pattern.sum())
    np.testing.assert_allclose(centroid, m.geometry.extra["detector_centre_px"], atol=0.02)
    if binning % 2:
        assert m.geometry.extra["detector_centre_px"] == (pattern.shape[0] // 2, pattern.shape[1] // 2)


def test_stem4d_streaming_to_one_path_twice_makes_a_new_file(tmp_path):
    """A second simulation to the same patterns_path must not rewrite the first one's data in place
    (the stage cache hard-links the finished file; a sweep or a parallel worker reuses the path)."""
    import os

    sample = _si(2, 1)
    path = tmp_path / "p.npy"
    base = dict(sampling_A=0.1, semiangle_mrad=20, scan_step_A=2.0, energy_keV=200, patterns_path=str(path))
    first = STEM4D().simulate(sample, STEM4D.Params(**base), np)
    kept = np.array(first.data)
    inode = os.stat(path).st_ino
    second = STEM4D().simulate(sample, STEM4D.Params(**{**base, "energy_keV": 80}), np)
    assert os.stat(path).st_ino != inode  # a new file was renamed into place
    np.testing.assert_array_equal(first.data, kept)  # the first result is untouched
    assert not np.allclose(second.data, kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.npy"]  # no temp files left behind
    np.testing.assert_array_equal(np.load(path).reshape(second.data.shape), second.data)


def test_stem4d_failed_stream_leaves_no_temp_file(tmp_path, monkeypatch):
    import tembench.builtin.forward_multislice as fm

    def fail(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(fm, "stem_scan", fail)
    p = STEM4D.Params(sampling_A=0.1, semiangle_mrad=20, scan_step_A=2.0, patterns_path=str(tmp_path / "p.npy"))
    with pytest.raises(RuntimeError, match="boom"):
        STEM4D().simulate(_si(2, 1), p, np)
    assert list(tmp_path.iterdir()) == []
