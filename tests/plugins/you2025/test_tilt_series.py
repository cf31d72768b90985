"""stem4d_tilt_series: per-tilt Euler errors and translations move the atoms as true_alignment says; with no
errors the data are stem4d's bit for bit; the truth is only in the provenance recipe."""

from __future__ import annotations

import numpy as np
import pytest

from tembench import Params, Reconstruction, Reconstructor, Sample
from tembench.builtin.forward_multislice import STEM4D
from tembench.builtin.noise import PoissonDose
from tembench.errors import TembenchError
from tembench.physics.rotation import euler_matrix, rotate_points
from tembench_you2025.tilt_series import STEM4DTiltSeries, draw_alignment, true_alignment

CELL_A = 10.0
PARAMS = dict(energy_keV=200, sampling_A=0.2, semiangle_mrad=25, window_gpts=32, detector_gpts=16,
              slice_thickness_A=2.0, scan_step_A=0.5, scan_start_A=(3.0, 3.0), scan_end_A=(7.0, 7.0),
              detectors={"adf": (28.0, None)}, tilt_angles_deg=[-30.0, 0.0, 30.0])


def _sample(positions, numbers):
    return Sample(positions_A=np.asarray(positions, float), numbers=numbers, cell_A=[CELL_A] * 3, name="test")


def _cluster():
    """A few atoms within 2.5 Å of the centre: the slab (z0, n_slices) is the cell's at any tilt."""
    c = CELL_A / 2
    off = np.array([[0.0, 0.0, 0.0], [1.4, -0.6, 0.9], [-1.1, 1.3, -1.2], [0.3, 1.5, 1.6]])
    return _sample(c + off, [78, 8, 13, 8])


def _sim(cls, sample, **kw):
    return cls().simulate(sample, cls.parse_params({**PARAMS, **kw}), np)


def test_no_errors_is_stem4d_bit_for_bit():
    s = _cluster()
    a = _sim(STEM4D, s)
    b = _sim(STEM4DTiltSeries, s)
    assert a.kind == b.kind == "4dstem_tilt_series"
    np.testing.assert_array_equal(a.data, b.data)
    assert a.geometry.extra["entrance_z_A"] == b.geometry.extra["entrance_z_A"]
    assert b.geometry.tilt_angles_deg == [-30.0, 0.0, 30.0]
    e, t = true_alignment(b)
    np.testing.assert_array_equal(e[:, 1], [-30.0, 0.0, 30.0])
    assert not e[:, [0, 2]].any() and not t.any()
    # a plain stem4d series has no recipe: truth = nominal
    e0, t0 = true_alignment(a)
    np.testing.assert_array_equal(e0, e) and np.testing.assert_array_equal(t0, t)


def test_each_tilt_is_the_turned_and_moved_sample():
    """Independent route: the test turns the atoms by euler_matrix(true Θ_k) about the centre, moves them by
    (τ_x, τ_y, 0) and simulates them untilted with stem4d — the same patterns as tilt k of the series."""
    s = _cluster()
    kw = dict(max_translation_A=1.5, euler_error_deg=3.0, alignment_seed=7)
    m = _sim(STEM4DTiltSeries, s, **kw)
    euler, tau = true_alignment(m)
    assert np.abs(euler - np.array([[0, a, 0] for a in (-30, 0, 30)])).max() > 1.0   # errors were applied
    assert np.abs(tau).max() > 0.5
    c = s.cell_A / 2
    for k in range(3):
        moved = rotate_points(s.positions_A, euler_matrix(*euler[k]), c) + [tau[k, 1], tau[k, 0], 0.0]
        ref = _sim(STEM4D, _sample(moved, s.numbers), tilt_angles_deg=[0.0])
        assert ref.geometry.extra["entrance_z_A"] == pytest.approx(m.geometry.extra["entrance_z_A"])
        np.testing.assert_allclose(m.data[k], ref.data, rtol=1e-4, atol=1e-7 * ref.data.max())
    # a different seed gives different data
    other = _sim(STEM4DTiltSeries, s, **{**kw, "alignment_seed": 8})
    assert not np.allclose(other.data, m.data)


def test_single_atom_image_moves_by_tau():
    """An atom at the rotation centre stays there at every tilt; its ADF image is centred at c + τ."""
    c = CELL_A / 2
    m = _sim(STEM4DTiltSeries, _sample([[c, c, c]], [78]), scan_step_A=0.2, max_translation_A=1.2,
             alignment_seed=3, tilt_angles_deg=[-40.0, 20.0])
    _, tau = true_alignment(m)
    img = m.extras["virtual_images"]["adf"]
    ys = np.arange(3.0, 7.0 - 1e-9, 0.2)
    for k in range(2):
        im = img[k] - img[k].min()
        iy, ix = np.unravel_index(np.argmax(im), im.shape)
        w = im[iy - 3:iy + 4, ix - 3:ix + 4] ** 2
        yc = (w * ys[iy - 3:iy + 4, None]).sum() / w.sum()
        xc = (w * ys[None, ix - 3:ix + 4]).sum() / w.sum()
        np.testing.assert_allclose([yc, xc], c + tau[k], atol=0.05)


def test_recipe_only_and_distribution():
    m = _sim(STEM4DTiltSeries, _cluster(), max_translation_A=3.4, euler_error_deg=1.0, alignment_seed=2,
             tilt_angles_deg=[-10.0, 10.0], scan_step_A=2.0)
    rec = [r for r in m.provenance if r["component"] == "stem4d_tilt_series_alignment"]
    assert rec == [{"component": "stem4d_tilt_series_alignment", "seed": 2, "max_translation_A": 3.4,
                    "euler_error_deg": 1.0}]
    flat = repr(m.geometry.extra) + repr(sorted(m.extras))
    assert "translation" not in flat and "euler" not in flat
    e, t = draw_alignment(np.zeros((20000, 3)), 5, 3.4, 1.0)
    assert np.abs(t).max() <= 3.4 and abs(t.std() - 3.4 / np.sqrt(3)) < 0.03
    assert abs(e.std() - 1.0) < 0.02
    e2, t2 = draw_alignment(np.zeros((20000, 3)), 5, 3.4, 0.0)
    np.testing.assert_array_equal(t, t2)                    # translations do not depend on the Euler error
    assert not e2.any()


def test_poisson_dose_is_per_tilt():
    m = _sim(STEM4DTiltSeries, _cluster(), tilt_angles_deg=[-10.0, 10.0], scan_step_A=1.0)
    dose = 200.0
    p = PoissonDose.parse_params({"dose_e_per_A2": dose})
    noisy = PoissonDose().apply(m, p, np.random.default_rng(0))
    n_e = dose * 1.0 * 1.0                                  # electrons per pattern = dose x step area
    for k in range(2):
        expected = m.data[k].sum() * n_e
        assert noisy.data[k].sum() == pytest.approx(expected, rel=5 * expected**-0.5)


def test_bad_params():
    with pytest.raises(ValueError, match="tilt_axis"):
        STEM4DTiltSeries.parse_params({**PARAMS, "tilt_axis": "z"})
    with pytest.raises(ValueError, match="output"):
        STEM4DTiltSeries.parse_params({**PARAMS, "output": "image"})
    with pytest.raises(ValueError):
        STEM4DTiltSeries.parse_params({**PARAMS, "max_translation_A": -1.0})
    bad = _sim(STEM4DTiltSeries, _cluster(), tilt_angles_deg=[-10.0, 10.0], scan_step_A=2.0)
    bad = bad.replace(geometry=bad.geometry.replace(tilt_angles_deg=[0.0]))
    with pytest.raises(TembenchError, match="tilt"):
        true_alignment(bad)


# --- through the runner: registration, provenance recipe, quantifiers ------------------------------------
class OracleTomo(Reconstructor):
    """Test-only volume 'reconstructor': the true alignment with known errors (an oracle may call true_alignment;
    real reconstructors must not) and one blob elongated 2x along z."""

    name = "test_oracle_tomo"
    accepts = ("4dstem_tilt_series",)
    produces = "volume"

    class Params(Params):
        pass

    def reconstruct(self, measurement, params, xp):
        euler, tau = true_alignment(measurement)
        if not np.abs(tau).max() > 0.5:                       # the recipe survived the noise chain and the cache
            raise AssertionError("stem4d_tilt_series alignment recipe lost")
        t = np.array([0.3, 0.2, -0.4])                       # a volume shift (x, y, z): not an alignment error
        tau = tau + np.stack([euler_matrix(*e)[[1, 0]] @ t for e in euler])
        tau[1] += [0.4, 0.0]                                  # one real error of 0.4 Å along y
        z, y, x = np.indices((28, 24, 24)) * 0.25
        vol = np.exp(-((y - 3.0) ** 2 + (x - 3.0) ** 2) / (2 * 0.3**2) - (z - 3.5) ** 2 / (2 * 0.6**2))
        return Reconstruction(kind="volume", data=vol.astype(np.float32), sampling_A=0.25,
                              quantity="potential_V", extras={"translations_A": tau, "euler_deg": euler})


def test_runner_scores_a_tilt_series(tmp_path):
    from tembench import hookimpl
    from tembench.registry import Registry, set_registry
    from tembench.runner import run_scenario
    from tembench.scenario import parse_scenario
    from tembench_you2025.tomo_scores import AlignmentError, DepthElongation

    class _Plugin:
        @hookimpl
        def tembench_register_forward_models(self):
            return [STEM4DTiltSeries]

        @hookimpl
        def tembench_register_reconstructors(self):
            return [OracleTomo]

        @hookimpl
        def tembench_register_quantifiers(self):
            return [AlignmentError, DepthElongation]

    reg = Registry(load_entry_points=False)
    reg.register(_Plugin(), name="you2025_tilt_series_test")
    set_registry(reg)
    try:
        sc = parse_scenario("""
name: tilt_series_wiring
seed: 3
sample: {name: crystal, params: {material: Si, shape: sphere, radius_A: 2.5, padding_A: 4.0, rms_displacement_A: null}}
forward:
  name: stem4d_tilt_series
  params: {energy_keV: 200, sampling_A: 0.25, semiangle_mrad: 20, window_gpts: 16, detector_gpts: 8,
           slice_thickness_A: 2.0, scan_step_A: 1.5, detectors: {}, tilt_range_deg: [-30, 30], n_tilts: 4,
           max_translation_A: 3.4, euler_error_deg: 1.0, alignment_seed: 5}
noise: [{name: poisson_dose, params: {dose_e_per_A2: 1000}}]
reconstructors: [test_oracle_tomo]
quantifiers: [alignment_error, {name: depth_elongation, params: {truth: false, box_axial_A: 2.0}}]
""")
        res = run_scenario(sc, out=tmp_path / "a", progress=False, report=False)
        t = res.table
        assert (t["status"] == "ok").all(), t.get("error")
        row = t.iloc[0]
        assert row["translation_error_raw_rms_A"] > 0.3
        assert 0.25 < row["translation_error_max_A"] < 0.4      # the 0.4 Å error, less its share of the fit
        assert row["translation_error_median_A"] < 0.15
        assert row["rotation_error_max_deg"] == pytest.approx(0.0, abs=1e-6)
        assert row["depth_elongation_ratio"] == pytest.approx(2.0, rel=0.03)
    finally:
        set_registry(None)


def test_atoms_leaving_the_periodic_field_are_refused():
    c = CELL_A / 2
    edge = _sample([[c, c, c], [c + 4.0, c, c]], [78, 8])      # 1 Å from the x edge: a 30° tilt keeps it inside
    _sim(STEM4DTiltSeries, edge, tilt_angles_deg=[-30.0, 30.0], scan_step_A=2.0)
    with pytest.raises(TembenchError, match="padding_A"):      # a 2 Å translation pushes it out
        _sim(STEM4DTiltSeries, edge, tilt_angles_deg=[-30.0, 30.0], scan_step_A=2.0, max_translation_A=3.0,
             alignment_seed=1)
