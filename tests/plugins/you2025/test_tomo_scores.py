"""You 2025 tomography scores: alignment error vs the regenerated truth, depth elongation of known anisotropic
Gaussians, and the core fsc / atom_tracing quantifiers on a volume in the TomoGrid frame."""

from __future__ import annotations

import numpy as np
import pytest

from tembench import Reconstruction, Sample
from tembench.physics.rotation import euler_matrix, rotate_points
from tembench.registry import get_registry
from tembench_you2025 import tomo_common as T
from tembench_you2025.tilt_series import STEM4DTiltSeries, true_alignment
from tembench_you2025.tomo_scores import (AlignmentError, DepthElongation, alignment_errors, depth_sections,
                                          elongation_ratios, fit_axial_gaussian, mean_site_elongation,
                                          rotation_angle_deg, volume_shift_part)


def _euler(n=7, span=45.0):
    return np.stack([np.zeros(n), np.linspace(-span, span, n), np.zeros(n)], axis=1)


# --- alignment ------------------------------------------------------------------------------------------
def test_volume_shift_part_is_unmeasurable():
    """Atoms moved by t and projections moved by τ − (R t)_{y,x} project exactly where the originals did."""
    rng = np.random.default_rng(0)
    eul = _euler() + rng.normal(0, 2.0, (7, 3))
    c = np.array([5.0, 5.0, 5.0])
    p = rng.uniform(2, 8, (4, 3))
    tau = rng.uniform(-2, 2, (7, 2))
    t = np.array([0.3, -0.7, 0.5])
    # recovered translations for the moved volume, found by fitting the projected positions per tilt
    tau_moved = np.zeros_like(tau)
    for k, e in enumerate(eul):
        ref = rotate_points(p, euler_matrix(*e), c)[:, [1, 0]] + tau[k]
        moved = rotate_points(p + t, euler_matrix(*e), c)[:, [1, 0]]
        tau_moved[k] = (ref - moved).mean(axis=0)
        np.testing.assert_allclose(moved + tau_moved[k], ref, atol=1e-12)   # a pure shift per tilt
    t_fit, resid = volume_shift_part(tau_moved - tau, eul)
    np.testing.assert_allclose(t_fit, -t, atol=1e-10)
    np.testing.assert_allclose(resid, 0.0, atol=1e-10)


def test_alignment_errors_known_residuals():
    rng = np.random.default_rng(1)
    te = _euler() + rng.normal(0, 1.0, (7, 3))
    tt = rng.uniform(-3.4, 3.4, (7, 2))
    t = np.array([1.0, 0.4, -2.0])
    noise = np.array([[0.1, 0.0], [0.0, -0.2], [0.3, 0.4], [0.0, 0.0], [-0.05, 0.0], [0.0, 0.1], [0.0, 0.0]])
    noise = volume_shift_part(noise, te)[1]                 # only the measurable part can be recovered
    shift = np.stack([euler_matrix(*e)[[1, 0]] @ t for e in te])
    eul = te.copy()
    eul[2, 1] += 0.3
    eul[4, 0] -= 0.2
    out = alignment_errors(tt + shift + noise, eul, tt, te)
    err = np.linalg.norm(noise, axis=1)
    assert out["translation_error_max_A"] == pytest.approx(err.max(), abs=1e-9)
    assert out["translation_error_median_A"] == pytest.approx(np.median(err), abs=1e-9)
    assert out["translation_error_raw_rms_A"] > 1.0         # the volume shift dominates the raw error
    np.testing.assert_allclose([out[f"volume_shift_{a}_A"] for a in "xyz"], -t, atol=0.05)
    assert out["euler_error_max_tilt_deg"] == pytest.approx(0.3, abs=1e-9)
    assert out["euler_error_max_rot_deg"] == pytest.approx(0.2, abs=1e-9)
    assert out["euler_error_max_psi_deg"] == 0.0
    assert out["rotation_error_raw_max_deg"] == pytest.approx(0.3, abs=0.02)
    assert 0.1 < out["rotation_error_max_deg"] < out["rotation_error_raw_max_deg"]  # part is a common rotation
    # angles wrap: 359.9 vs -0.1 is no error; rot/psi degeneracy at tilt 0 is no rotation error
    assert rotation_angle_deg([[10.0, 0.0, -10.0]], [[0.0, 0.0, 0.0]])[0] == pytest.approx(0.0, abs=1e-6)
    out2 = alignment_errors(tt, te + [360.0, 0.0, -360.0], tt, te)
    assert out2["euler_error_max_rot_deg"] == pytest.approx(0.0, abs=1e-9)


def test_common_rotation_is_removed():
    """Rotations R_k·Q⁻¹ (a volume turned by Q) are no alignment error; Euler angles from scipy's ZYZ decomposition."""
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(3)
    te = _euler() + rng.normal(0, 1.0, (7, 3))
    q = Rotation.from_rotvec(np.radians(5.0) * np.array([0.6, 0.0, 0.8])).as_matrix()
    est = []
    for e in te:
        psi, tilt, rot = Rotation.from_matrix(euler_matrix(*e) @ q.T).as_euler("ZYZ", degrees=True)
        np.testing.assert_allclose(euler_matrix(rot, tilt, psi), euler_matrix(*e) @ q.T, atol=1e-12)
        est.append((rot, tilt, psi))
    tt = rng.uniform(-3, 3, (7, 2))
    out = alignment_errors(tt, est, tt, te)
    assert out["rotation_error_max_deg"] == pytest.approx(0.0, abs=1e-9)
    assert out["rotation_error_raw_max_deg"] == pytest.approx(5.0, abs=1e-9)
    assert out["common_rotation_deg"] == pytest.approx(5.0, abs=1e-6)
    # one tilt off by 0.5° about y on top: that error stays (less the share Q absorbs)
    est[3] = (est[3][0], est[3][1] + 0.5, est[3][2])
    out = alignment_errors(tt, est, tt, te)
    assert 0.35 < out["rotation_error_max_deg"] < 0.5


def test_alignment_error_quantifier_reads_the_recipe():
    from tembench.builtin.forward_multislice import STEM4D  # noqa: F401  (registered with the core)

    c = 5.0
    sample = Sample(positions_A=[[c, c, c]], numbers=[14], cell_A=[10.0] * 3)
    p = STEM4DTiltSeries.parse_params(dict(energy_keV=200, sampling_A=0.25, semiangle_mrad=20, window_gpts=24,
                                           detector_gpts=8, slice_thickness_A=2.5, scan_step_A=3.0,
                                           scan_start_A=(4.0, 4.0), scan_end_A=(6.0, 6.0), detectors={},
                                           tilt_range_deg=(-30, 30), n_tilts=5, max_translation_A=3.4,
                                           euler_error_deg=0.5, alignment_seed=4))
    m = STEM4DTiltSeries().simulate(sample, p, np)
    te, tt = true_alignment(m)
    vol = np.zeros((4, 4, 4), np.float32)
    q = AlignmentError()
    rec = Reconstruction(kind="volume", data=vol, sampling_A=0.5, quantity="potential_V")
    assert q.score(rec, m, sample, q.parse_params({})) == {}        # no alignment extras: nothing to score
    rec.extras = {"translations_A": tt + [0.2, 0.0], "euler_deg": T.nominal_euler_deg(m.geometry)}
    out = q.score(rec, m, sample, q.parse_params({}))
    # a common y shift is (nearly: the true angles have 0.5° errors) a volume shift
    assert out["translation_error_max_A"] < 0.01 and out["translation_error_raw_rms_A"] == pytest.approx(0.2)
    assert out["volume_shift_y_A"] == pytest.approx(-0.2, abs=0.01)   # projections moved by +0.2: volume at −0.2
    assert out["rotation_error_raw_max_deg"] == pytest.approx(rotation_angle_deg(te, T.nominal_euler_deg(m.geometry)).max())
    assert 0.1 < out["rotation_error_raw_max_deg"] < 5.0


# --- depth elongation -----------------------------------------------------------------------------------
def _blobs(shape, sites, sigma_z_A, sigma_lat_A, s, amp=1.0):
    zz, yy, xx = np.indices(shape).astype(float) * s
    v = np.zeros(shape)
    for cz, cy, cx in np.asarray(sites) * s:
        v += amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma_lat_A**2) - (zz - cz) ** 2 / (2 * sigma_z_A**2))
    return v


SITES = [(12.3, 10.2, 10.0), (12.0, 10.4, 22.6), (20.6, 21.7, 11.1), (24.2, 22.0, 22.4), (8.5, 25.0, 16.0)]


@pytest.mark.parametrize("ratio", [1.0, 2.0, 3.0])
def test_fit_recovers_known_anisotropic_gaussians(ratio):
    s = 0.25
    vol = _blobs((36, 34, 34), SITES, 0.3 * ratio, 0.3, s) + 0.05
    for c in SITES:
        sz, sl, centre = fit_axial_gaussian(vol, np.round(c), s, 1.0, 2.5)
        assert sz / sl == pytest.approx(ratio, rel=0.01)
        np.testing.assert_allclose(centre, c, atol=0.01)


@pytest.mark.parametrize("ratio", [2.0, 3.0])
def test_depth_elongation_quantifier_traced_and_truth(ratio):
    s = 0.25
    shape = (40, 36, 36)
    origin = (-1.0, -0.5, 0.25)                              # (z, y, x) of voxel 0
    vol = _blobs(shape, SITES, 0.35 * ratio, 0.35, s)
    atoms = np.asarray(origin) + np.asarray(SITES) * s       # (z, y, x)
    sample = Sample(positions_A=atoms[:, ::-1], numbers=[26] * len(SITES), cell_A=[9.0, 9.0, 9.0])
    rec = Reconstruction(kind="volume", data=vol.astype(np.float32), sampling_A=s, quantity="potential_V",
                         origin_A=origin)
    q = DepthElongation()
    out = q.score(rec, None, sample, q.parse_params({"box_lateral_A": 0.9, "box_axial_A": 2.5}))
    assert out["depth_n_fitted"] == len(SITES)                # each atom once, however the tracer split it
    assert out["depth_elongation_ratio"] == pytest.approx(ratio, rel=0.03)
    assert out["depth_sigma_z_median_A"] == pytest.approx(0.35 * ratio, rel=0.03)
    # the band-limited true potential of isotropic atoms is round
    assert out["depth_n_truth_fitted"] == len(SITES)
    assert 0.85 < out["depth_elongation_truth_ratio"] < 1.15
    assert out["depth_elongation_rel"] == pytest.approx(out["depth_elongation_ratio"] / out["depth_elongation_truth_ratio"])
    assert q.score(Reconstruction(kind="image", data=vol[0], sampling_A=s, quantity="potential_V"), None, sample,
                   q.parse_params({})) == {}


TALL = (58, 36, 36)                                            # room for the mean box's 2 × 1.6 Å along z
TALL_SITES = [(z + 9.0, y, x) for z, y, x in SITES]


@pytest.mark.parametrize("ratio", [1.0, 2.5])
def test_mean_site_elongation_of_known_gaussians_at_sub_voxel_sites(ratio):
    """The mean profile about the sites (each box resampled about its own sub-voxel site) is the atoms' own
    Gaussian: σ_lat 0.35 Å, σ_z ratio × that."""
    s = 0.25
    vol = _blobs(TALL, TALL_SITES, 0.35 * ratio, 0.35, s) + 0.02
    got, sz, sl, n = mean_site_elongation(vol, TALL_SITES, s, 0.9, 1.6)
    assert n == len(TALL_SITES)
    assert got == pytest.approx(ratio, rel=0.03)
    assert sl == pytest.approx(0.35, rel=0.03) and sz == pytest.approx(0.35 * ratio, rel=0.03)


def test_mean_site_elongation_keeps_the_atoms_a_per_site_fit_drops():
    """Three round atoms and two so elongated (σ_z 1.8 Å) that their per-site fit hits the box (1.6 Å) and is
    rejected: the per-site median sees only the round ones (ratio 1), the mean profile of all five does not."""
    s = 0.25
    round_, long_ = TALL_SITES[:3], TALL_SITES[3:]
    vol = _blobs(TALL, round_, 0.35, 0.35, s) + _blobs(TALL, long_, 1.8, 0.35, s)
    per_site, _, _ = elongation_ratios(vol, TALL_SITES, s, 0.9, 1.6)
    assert len(per_site) == 3 and np.median(per_site) == pytest.approx(1.0, rel=0.03)
    ratio, _, _, n = mean_site_elongation(vol, TALL_SITES, s, 0.9, 1.6)
    assert n == 5 and ratio > 1.5
    only_round, _, _, _ = mean_site_elongation(vol, round_, s, 0.9, 1.6)
    assert only_round == pytest.approx(1.0, rel=0.03)


def test_mean_site_elongation_leaves_out_sites_whose_box_leaves_the_volume():
    s = 0.25
    edge = [(3.0, 18.0, 18.0)]                                 # 3 voxels from z = 0: the 2 × 1.6 Å box does not fit
    vol = _blobs(TALL, TALL_SITES, 0.35, 0.35, s) + _blobs(TALL, edge, 1.0, 0.35, s)   # an elongated atom there
    want = mean_site_elongation(vol, TALL_SITES, s, 0.9, 1.6)
    got = mean_site_elongation(vol, TALL_SITES + edge, s, 0.9, 1.6)
    assert got[3] == len(TALL_SITES)
    assert got[0] == pytest.approx(want[0], rel=1e-12)
    assert np.isnan(mean_site_elongation(vol, edge, s, 0.9, 1.6)[0])


# --- core quantifiers on a TomoGrid volume --------------------------------------------------------------
@pytest.mark.parametrize("centre_shift_A", [(0.0, 0.0, 0.0), (0.1, -0.35, 0.6)])
def test_fsc_and_atom_tracing_run_on_a_tomo_grid_volume(centre_shift_A):
    """A perfect reconstruction on a TomoGrid (centred on the rotation centre, origin possibly off the truth's
    voxels, box larger than the cell): fsc vs truth reaches Nyquist, atom tracing finds every atom."""
    from scipy.ndimage import map_coordinates

    s = 0.25
    cell = 8.0
    rng = np.random.default_rng(2)
    pos = np.array([[2.5, 2.5, 3.0], [5.5, 3.0, 5.2], [3.0, 5.6, 5.0], [5.4, 5.5, 2.6]]) + rng.uniform(-.1, .1, (4, 3))
    sample = Sample(positions_A=pos, numbers=[78, 8, 13, 78], cell_A=[cell] * 3)
    centre = np.full(3, cell / 2) + np.asarray(centre_shift_A)   # (z, y, x)
    grid = T.tomo_grid((36, 36), s, centre)                  # 9 Å box about the centre of an 8 Å cell
    gt = np.asarray(sample.potential_volume(s), np.float64)
    coords = [(o + s * np.arange(n)) / s for o, n in zip(grid.origin_A, grid.shape)]
    vol = map_coordinates(gt, np.meshgrid(*coords, indexing="ij"), order=3, mode="grid-wrap")
    inside_z = (coords[0] >= 0) & (coords[0] <= gt.shape[0] - 1)
    vol[~inside_z] = 0.0                                      # no wrapped atoms along the beam
    rec = Reconstruction(kind="volume", data=vol.astype(np.float32), sampling_A=s, quantity="potential_V",
                         origin_A=grid.origin_A)
    reg = get_registry()
    fsc = reg.get("quantifier", "fsc")
    out = fsc().score(rec, None, sample, fsc.parse_params({}))
    assert out["fsc_gt_resolution_A"] == pytest.approx(2 * s, rel=0.05)
    at = reg.get("quantifier", "atom_tracing")
    out = at().score(rec, None, sample, at.parse_params({}))
    assert out["pct_atoms_found"] == 100.0 and out["pct_false_positives"] == 0.0
    assert out["position_error_mean_pm"] < 5.0
    # the depth sections of volume and truth are taken at the same points
    sec = depth_sections(vol, grid.origin_A, s, 1.0, gt)
    a, b = sec["depth_section_xz"][inside_z], sec["depth_section_xz_truth"][inside_z]
    assert a.shape == (inside_z.sum(), 36) and np.abs(a).max() > 1.0
    np.testing.assert_allclose(a, b, atol=0.02 * np.abs(b).max())


# --- sub-sampling (You 2025 Fig. 3e): half_sets split: positions, n_subsets ------------------------------
def _scan_measurement(sy=24, sx=60):
    from tembench import Geometry, Measurement

    return Measurement(kind="4dstem_tilt_series", data=np.zeros((2, sy, sx, 4, 4), np.float32),
                       axes=("tilt", "scan_y", "scan_x", "k_y", "k_x"),
                       geometry=Geometry(tilt_angles_deg=[-10.0, 10.0], tilt_axis="y"))


def test_two_subsets_are_the_checkerboard_bit_for_bit():
    from tembench.builtin.half_sets import HalfSets, subset_labels

    m = _scan_measurement(7, 9)
    out = HalfSets().apply(m, HalfSets.parse_params({"split": "positions"}), np.random.default_rng(0))
    spec = out.extras["half_sets"]
    yy, xx = np.indices((7, 9))
    np.testing.assert_array_equal(spec["mask_a"], (yy + xx) % 2 == 0)
    assert set(spec) == {"split", "mask_a"}                    # the n = 2 spec is unchanged
    np.testing.assert_array_equal(subset_labels((7, 9), 2) == 0, spec["mask_a"])


@pytest.mark.parametrize("n", [12, 20])
def test_subsets_are_interleaved_fractions(n):
    from tembench.builtin.half_sets import subset_labels

    lab = subset_labels((24, 60), n)
    counts = np.bincount(lab.ravel(), minlength=n)
    assert counts.min() == counts.max() == 24 * 60 // n        # each subset 1/n of the patterns
    for row in lab:                                            # interleaved: every n consecutive positions hold all
        assert len(set(row[:n].tolist())) == n
    # evenly spread: the nearest position of the same subset is at least ~sqrt(n)·0.85 steps away
    pts = np.argwhere(lab == 0)
    d = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
    d[d == 0] = np.inf
    assert d.min() >= 0.85 * np.sqrt(n)
    from tembench.builtin.half_sets import HalfSets

    with pytest.raises(ValueError, match="n_subsets"):
        HalfSets.parse_params({"split": "dose", "n_subsets": n})


def test_n_subsets_halves_hold_one_nth_or_are_refused():
    """Half B must be subset 1 (1/n of the patterns), not the complement of A: until the core's
    half_measurement reads mask_b the split is refused with a clear error."""
    from tembench.builtin.half_sets import HalfSets, subset_labels
    from tembench.errors import TembenchError
    from tembench.types import half_measurement

    m = _scan_measurement()
    try:
        p = HalfSets.parse_params({"split": "positions", "n_subsets": 12})   # refused at validation …
    except ValueError as e:
        assert "mask_b" in str(e)
        with pytest.raises(TembenchError, match="mask_b"):                  # … and when applied
            HalfSets._positions(m, 12)
        return
    out = HalfSets().apply(m, p, np.random.default_rng(0))
    lab = subset_labels((24, 60), 12)
    for i in (0, 1):
        h = half_measurement(out, i)
        np.testing.assert_array_equal(h.extras["pattern_mask"], lab == i)
        assert h.geometry.extra["pattern_fraction"] == pytest.approx(1 / 12)


@pytest.mark.parametrize("n", [2, 20])
def test_half_set_fluence_is_dose_per_tilt_times_tilts_over_n(n):
    """You 2025 Fig. 3e's x axis by hand: 3 tilts at 1e4 e/Å² per tilt (per_image) on a 4 × 20 scan of 0.5 Å steps,
    split into n interleaved subsets (each exactly 1/n of the 80 patterns): one half set uses 3 × 1e4 / n e/Å² over
    the whole series. Cross-check: the electrons actually counted in half A's patterns over the scanned area."""
    from tembench import Geometry, Measurement
    from tembench.builtin.half_sets import HalfSets
    from tembench.builtin.noise import PoissonDose
    from tembench.types import half_measurement
    from tembench_you2025.tomo_scores import half_set_fluence_e_per_A2

    n_t, sy, sx, step, dose = 3, 4, 20, 0.5, 1.0e4
    m = Measurement(kind="4dstem_tilt_series", data=np.full((n_t, sy, sx, 4, 4), 1 / 16, np.float32),
                    axes=("tilt", "scan_y", "scan_x", "k_y", "k_x"),
                    geometry=Geometry(tilt_angles_deg=[-10.0, 0.0, 10.0], tilt_axis="y", scan_step_A=step))
    rng = np.random.default_rng(0)
    m = PoissonDose().apply(m, PoissonDose.parse_params({"dose_e_per_A2": dose}), rng)
    assert half_set_fluence_e_per_A2(m) is None                      # not split yet
    m = HalfSets().apply(m, HalfSets.parse_params({"split": "positions", "n_subsets": n}), rng)
    f = half_set_fluence_e_per_A2(m)
    assert f == pytest.approx(n_t * dose / n, rel=1e-12)              # 15 000 / 1 500 e/Å²
    mask = half_measurement(m, 0).extras["pattern_mask"]
    assert mask.sum() == sy * sx // n
    counted = np.asarray(m.data)[:, mask].sum() / (sy * sx * step ** 2)  # electrons of half A per Å² of the field
    assert counted == pytest.approx(f, rel=0.03)                       # 30 000 electrons at 1/20: ±0.6 %
    # tomo_fsc reports it beside the half-set FSC
    from tembench import Reconstruction
    from tembench_you2025.tomo_scores import TomoFSC

    vol = np.random.default_rng(1).normal(size=(8, 8, 8))
    half = [Reconstruction(kind="volume", data=vol + 0.1 * np.random.default_rng(i).normal(size=vol.shape),
                           sampling_A=(0.4, 0.4, 0.4), quantity="potential_V") for i in (2, 3)]
    rec = Reconstruction(kind="volume", data=vol, sampling_A=(0.4, 0.4, 0.4), quantity="potential_V",
                         extras={"half_sets": half})
    out = TomoFSC().score(rec, m, None, TomoFSC.parse_params({"ground_truth": False, "register_max_shift_A": None}))
    assert out["half_set_fluence_e_per_A2"] == pytest.approx(n_t * dose / n)
    assert np.isfinite(out["fsc_half_resolution_A"])


# --- registration of a tomogram to the truth before fsc / atom tracing --------------------------------------
def test_registered_fsc_and_atom_tracing_remove_a_common_shift():
    """A perfect volume whose content is displaced by t0 (the gauge a reconstruction may pick): plain fsc and
    atom_tracing see the shift, tomo_fsc / tomo_atom_tracing remove it; half B displaced further is put onto A."""
    from scipy.ndimage import map_coordinates

    from tembench_you2025.tomo_scores import TomoAtomTracing, TomoFSC, correlation_shift_vox

    s, cell = 0.25, 8.0
    pos = np.array([[2.5, 2.5, 3.0], [5.5, 3.0, 5.2], [3.0, 5.6, 5.0], [5.4, 5.5, 2.6]])
    sample = Sample(positions_A=pos, numbers=[78, 8, 13, 78], cell_A=[cell] * 3)
    grid = T.tomo_grid((40, 40), s, (4.1, 3.9, 4.2))
    gt = np.asarray(sample.potential_volume(s), np.float64)

    def displaced(t0):
        coords = [(o + s * np.arange(n) - d) / s for o, n, d in zip(grid.origin_A, grid.shape, t0)]
        return map_coordinates(gt, np.meshgrid(*coords, indexing="ij"), order=3, mode="constant").astype(np.float32)

    t0 = np.array([0.3, -0.45, 0.2])                          # (z, y, x) Å
    vol = displaced(t0)
    # the correlation peak is the displacement (sign and axes) — on the same grid
    np.testing.assert_allclose(correlation_shift_vox(vol, displaced((0, 0, 0)), 8) * s, t0, atol=0.03)
    half_b = Reconstruction(kind="volume", data=displaced(t0 + [0.25, 0.0, -0.3]), sampling_A=s,
                            quantity="potential_V", origin_A=grid.origin_A)
    half_a = Reconstruction(kind="volume", data=vol, sampling_A=s, quantity="potential_V", origin_A=grid.origin_A)
    rec = Reconstruction(kind="volume", data=vol, sampling_A=s, quantity="potential_V", origin_A=grid.origin_A,
                         extras={"half_sets": [half_a, half_b]})
    reg = get_registry()
    fsc, at = reg.get("quantifier", "fsc"), reg.get("quantifier", "atom_tracing")
    plain = fsc().score(rec, None, sample, fsc.parse_params({}))
    out = TomoFSC().score(rec, None, sample, TomoFSC.parse_params({}))
    np.testing.assert_allclose([out[f"registration_shift_{a}_A"] for a in "zyx"], t0, atol=0.03)
    assert out["registration_half_shift_A"] == pytest.approx(np.hypot(0.25, 0.3), abs=0.03)
    assert plain["fsc_gt_resolution_A"] > 1.2 * out["fsc_gt_resolution_A"]
    assert out["fsc_gt_resolution_A"] < 2.4 * s
    assert plain["fsc_half_resolution_A"] > 1.2 * out["fsc_half_resolution_A"]
    assert TomoFSC().score(rec, None, sample, TomoFSC.parse_params({"register_max_shift_A": None})) .keys() == plain.keys()
    p_at = at().score(rec, None, sample, at.parse_params({}))
    o_at = TomoAtomTracing().score(rec, None, sample, TomoAtomTracing.parse_params({}))
    assert p_at["position_error_mean_pm"] > 40.0                # |t0| = 58 pm
    assert o_at["pct_atoms_found"] == 100.0 and o_at["position_error_mean_pm"] < 5.0


# --- elongation not fooled by false positives; the axial-wedge correlation -------------------------------
def test_true_site_elongation_ignores_false_positive_peaks():
    """Atoms elongated 2× along z plus as many round noise peaks elsewhere (what an unconverged tomogram shows):
    the traced median mixes both, the fit at the TRUE sites of the registered volume reads 2 for every atom."""
    s = 0.25
    shape = (40, 36, 36)
    origin = (-1.0, -0.5, 0.25)
    false = [(30.0, 8.0, 28.0), (6.0, 6.0, 6.0), (30.5, 28.0, 7.0), (18.0, 30.0, 30.0), (33.0, 17.0, 18.0),
             (5.0, 17.0, 28.5)]
    vol = _blobs(shape, SITES, 0.7, 0.35, s) + _blobs(shape, false, 0.35, 0.35, s, amp=1.2)
    atoms = np.asarray(origin) + np.asarray(SITES) * s
    sample = Sample(positions_A=atoms[:, ::-1], numbers=[26] * len(SITES), cell_A=[9.0, 9.0, 9.0])
    rec = Reconstruction(kind="volume", data=vol.astype(np.float32), sampling_A=s, quantity="potential_V",
                         origin_A=origin)
    q = DepthElongation()
    out = q.score(rec, None, sample, q.parse_params({"box_lateral_A": 0.9, "box_axial_A": 2.5}))
    assert out["depth_n_fitted"] == len(SITES) + len(false)
    assert out["depth_elongation_ratio"] < 1.6                      # the round false peaks are the majority
    assert out["depth_n_true_sites"] == out["depth_n_true_sites_fitted"] == len(SITES)
    assert out["depth_elongation_true_sites_ratio"] == pytest.approx(2.0, rel=0.03)
    assert out["depth_elongation_true_sites_rel"] == pytest.approx(
        out["depth_elongation_true_sites_ratio"] / out["depth_elongation_truth_ratio"])
    off = q.score(rec, None, sample, q.parse_params({"true_sites": False}))
    assert "depth_elongation_true_sites_ratio" not in off and "depth_wedge_cc_axial" not in off


def _plane_waves(shape, s, waves):
    """Σ cos(2π k·r) for k given as (|k| 1/Å, angle from +x towards +z in the xz plane, deg), on a periodic box whose
    k lie on the FFT grid (rounded)."""
    zz, yy, xx = np.indices(shape).astype(float)
    v = np.zeros(shape)
    for kmag, ang in waves:
        mz = round(kmag * np.sin(np.radians(ang)) * shape[0] * s)
        mx = round(kmag * np.cos(np.radians(ang)) * shape[2] * s)
        v += np.cos(2 * np.pi * (mz * zz / shape[0] + mx * xx / shape[2]))
    return v


def test_wedge_correlations_split_k_space_by_the_angle_from_the_lateral_axis():
    from tembench_you2025.tomo_scores import wedge_correlations

    s, shape = 0.25, (32, 32, 32)
    axial = _plane_waves(shape, s, [(0.6, 75.0)])                  # 75° from x: inside the ±30° wedge about z
    lateral = _plane_waves(shape, s, [(0.6, 20.0), (0.4, 45.0)])   # measured directions
    truth = axial + lateral
    assert wedge_correlations(truth, truth, s) == pytest.approx((1.0, 1.0))
    assert wedge_correlations(lateral, truth, s) == pytest.approx((0.0, 1.0), abs=1e-9)   # linear: wedge empty
    wrong = _plane_waves(shape, s, [(0.5, 80.0)])                  # content in the wedge that the truth lacks
    assert wedge_correlations(lateral + wrong, truth, s) == pytest.approx((0.0, 1.0), abs=1e-9)
    assert wedge_correlations(lateral + wrong + axial, truth, s)[0] == pytest.approx(1 / np.sqrt(2))
    assert wedge_correlations(axial - lateral, truth, s) == pytest.approx((1.0, -1.0))
    # the axial wave (on the grid: k = (5, 1)/8 Å, 78.7° from x) leaves the wedge when the split is 80° (±10°)
    cc = wedge_correlations(axial, truth, s, split_deg=80.0)
    assert abs(cc[0]) < 1e-6 and cc[1] == pytest.approx(1 / np.sqrt(3))
    assert wedge_correlations(axial, truth, s, split_deg=78.0) == pytest.approx((1.0, 0.0), abs=1e-9)
    # beyond k_max nothing counts
    assert wedge_correlations(lateral, truth, s, k_max_invA=0.5)[1] == pytest.approx(1.0)
    assert np.isnan(wedge_correlations(truth, truth, s, k_max_invA=0.05)[0])
    # a tilt axis x: waves in the xz plane have no k along the lateral axis y — all of them are axial
    assert wedge_correlations(lateral, truth, s, tilt_axis="x")[0] == pytest.approx(np.sqrt(2 / 3), rel=1e-6)
