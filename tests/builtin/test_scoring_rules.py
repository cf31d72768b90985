"""Scoring rules pinned: every quantifier's metric on a hand-built case whose answer is known by construction.

Issue 18 part 3. Each test builds its input so the right number follows from the construction
alone (no second implementation of the quantifier), and a change of rule — a wider matching
radius, Å instead of pm, the ground-truth phase in other units than rad, a flipped or swapped
cropping origin, another false-positive denominator, a swapped species order — changes a number
the test asserts.

- cross_correlation: the ground truth comes from a duck-typed sample whose projected potential
  (V·Å) / potential (V) is a hand-built array, so the quantifier's own rules (σ·V_proj in rad,
  origin → crop, border, low-pass FWHM, mean-removed RMSE, scale fit, eq 4.14) are isolated from
  the physics, which the physics tests cover. One test runs the real ``Sample`` path.
- atom_tracing: the tracer is replaced by a hand-built ``TraceResult`` (traced positions exactly
  where the test puts them), so matching radius, one-to-one matching, pm, false-positive and
  species accounting are exact; two end-to-end tests trace rendered Gaussian atoms.
- spectral_resolution and image_statistics: arrays with analytically known spectra and moments.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import tembench.builtin.atom_tracing as at_module
from tembench.analysis.atom_tracing import TraceResult
from tembench.builtin.atom_tracing import AtomTracing
from tembench.builtin.quantifiers import (
    CrossCorrelation,
    ImageStatistics,
    ground_truth_like,
    normalized_cross_correlation,
)
from tembench.builtin.quantifiers_spectral import SpectralResolution, radial_power_spectrum
from tembench.errors import TembenchError
from tembench.physics import constants
from tembench.types import Geometry, Measurement, Reconstruction, Sample

# ---------------------------------------------------------------------------------------------
# every registered quantifier has its rules pinned here
# ---------------------------------------------------------------------------------------------
PINNED = {"atom_tracing", "cross_correlation", "image_statistics", "spectral_resolution"}
# quantifiers whose known-by-construction tests live with their module: name -> (test file, a test in it)
PINNED_ELSEWHERE = {
    "fsc": ("builtin/test_fsc.py", "def test_"),
    "column_fit": ("plugins/friedrich2023/test_components.py", "column_fit"),
    "crlb": ("plugins/friedrich2023/test_crlb.py", "def test_"),
    "msp_positions": ("plugins/you2025/test_you_scenarios.py", "def test_"),
    "msp_state": ("plugins/you2025/test_you_scenarios.py", "def test_"),
    "alignment_error": ("plugins/you2025/test_tomo_scores.py", "def test_"),
    "depth_elongation": ("plugins/you2025/test_tomo_scores.py", "def test_"),
    "tomo_fsc": ("plugins/you2025/test_tomo_scores.py", "def test_"),
    "tomo_atom_tracing": ("plugins/you2025/test_tomo_scores.py", "def test_"),
    "dislocation_field": ("plugins/friedrich2023/test_dislocation.py", "def test_"),
}
# known gaps, listed so the guard still catches every new quantifier: no known-by-construction test yet
UNPINNED: set[str] = set()


def test_every_registered_quantifier_is_pinned_here():
    from pathlib import Path

    from tembench.registry import Registry

    names = set(Registry().components("quantifier"))      # built-ins and every installed plugin
    known = PINNED | set(PINNED_ELSEWHERE) | UNPINNED
    assert names == known, (f"quantifiers without pinned scoring rules: {sorted(names - known)}; "
                            "add a known-by-construction test to tests/builtin/test_scoring_rules.py "
                            "(or list the test file that pins it in PINNED_ELSEWHERE)")
    tests = Path(__file__).resolve().parents[1]
    for name, (path, marker) in PINNED_ELSEWHERE.items():
        text = (tests / path).read_text()
        assert marker in text and name in text, f"{name}: {path} does not test it"


# ---------------------------------------------------------------------------------------------
# interaction constant written out (the units of the ground-truth phase)
# ---------------------------------------------------------------------------------------------
def _sigma_by_hand(energy_keV: float) -> float:
    """σ = 2π m e λ / h² (relativistic m = γ m0) in rad/(V·Å), from SI constants (CODATA 2018)."""
    h, c, e, m0 = 6.62607015e-34, 299792458.0, 1.602176634e-19, 9.1093837015e-31
    E = energy_keV * 1e3 * e                                   # kinetic energy, J
    lam_m = h * c / math.sqrt(E * (E + 2.0 * m0 * c * c))      # relativistic wavelength, m
    m = m0 * (1.0 + E / (m0 * c * c))
    return 2.0 * math.pi * m * e * lam_m / h ** 2 * 1e-10     # rad/(V·m) → rad/(V·Å)


def test_interaction_constant_by_hand_and_kirkland_table():
    # Kirkland, Advanced Computing in Electron Microscopy (2nd ed.), σ in rad/(V·Å)
    for energy, kirkland in ((100.0, 0.00092440), (200.0, 0.00072884), (300.0, 0.00065262)):
        assert _sigma_by_hand(energy) == pytest.approx(kirkland, rel=2e-4)
        assert constants.interaction_constant(energy) == pytest.approx(_sigma_by_hand(energy), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# cross_correlation
# ---------------------------------------------------------------------------------------------
class _TruthStub:
    """Duck-typed Sample: the ground truth is a hand-built array over a periodic cell (x, y, z) Å, by
    default the one that makes the array's pixels 0.2 Å (y) × 0.25 Å (x), as the tests' reconstructions."""

    def __init__(self, vproj=None, vvol=None, cell_A=None):
        self.vproj, self.vvol, self.calls = vproj, vvol, []
        if cell_A is None and vproj is not None:
            cell_A = (np.shape(vproj)[1] * 0.25, np.shape(vproj)[0] * 0.2, 1.0)
        self.cell_A = np.asarray(cell_A if cell_A is not None else (1.0, 1.0, 1.0), float)

    def projected_potential(self, sampling_A, gpts=None, parametrization="lobato"):
        self.calls.append(("projected_potential", tuple(np.broadcast_to(sampling_A, (2,))), parametrization))
        return np.array(self.vproj, np.float64)

    def potential_volume(self, sampling_A, parametrization="lobato"):
        self.calls.append(("potential_volume", float(sampling_A), parametrization))
        return np.array(self.vvol, np.float64)


def _meas(energy_keV=300.0):
    return Measurement("phase_object_image", None, (), geometry=Geometry(energy_keV=energy_keV))


def _cc(data, truth, quantity="projected_potential_VA", sampling=(0.2, 0.25), origin=None, energy_keV=300.0,
        **params):
    kind = "image" if np.ndim(data) == 2 else "volume"
    rec = Reconstruction(kind, np.asarray(data), sampling, quantity, origin_A=origin)
    return CrossCorrelation().score(rec, _meas(energy_keV), truth, CrossCorrelation.Params(**params))


def _plane_wave(shape, cycles, phase=0.0):
    """sin(2π(m·y/ny + p·x/nx) + φ): whole periods on the grid, so its mean is 0 and its mean square ½."""
    y, x = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    return np.sin(2 * np.pi * (cycles[0] * y / shape[0] + cycles[1] * x / shape[1]) + phase)


@pytest.mark.parametrize("phi", [0.0, 0.4, 1.3, np.pi / 2, 2.5])
def test_ncc_rmse_of_sine_vs_scaled_shifted_sine(phi):
    """x = sin θ, y = a·sin(θ + φ) + b: xc (eq 4.14) = cos φ; mean-removed RMSE² = (a² + 1 − 2a cos φ)/2;
    after the least-squares scale (cos φ / a) the RMSE is |sin φ|/√2; gt std = 1/√2."""
    a, b = 2.5, 7.0
    shape, cycles = (24, 30), (2, 3)
    truth = _plane_wave(shape, cycles)
    rec = a * _plane_wave(shape, cycles, phi) + b
    assert normalized_cross_correlation(truth, rec) == pytest.approx(math.cos(phi), abs=1e-12)
    assert normalized_cross_correlation(rec, truth) == pytest.approx(math.cos(phi), abs=1e-12)
    m = _cc(rec, _TruthStub(vproj=truth))
    assert m["ncc"] == pytest.approx(math.cos(phi), abs=1e-12)
    assert m["rmse"] == pytest.approx(math.sqrt((a * a + 1 - 2 * a * math.cos(phi)) / 2), abs=1e-12)
    assert m["rmse_scaled"] == pytest.approx(abs(math.sin(phi)) / math.sqrt(2), abs=1e-12)
    assert m["gt_std"] == pytest.approx(1 / math.sqrt(2), abs=1e-12)


def test_ncc_sign_and_degenerate_cases():
    x = _plane_wave((16, 16), (1, 2))
    assert normalized_cross_correlation(x, -3 * x + 1) == pytest.approx(-1.0, abs=1e-12)
    assert math.isnan(normalized_cross_correlation(x, np.full_like(x, 4.0)))   # no variation: undefined


def _asymmetric(shape, seed=0):
    """A smooth random field: no symmetry, so any flip, swap or shift of the crop decorrelates it."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(np.random.default_rng(seed).standard_normal(shape), 1.5, mode="wrap") * 40.0


@pytest.mark.parametrize("energy_keV", [80.0, 300.0])
def test_phase_ground_truth_is_sigma_times_vproj_in_rad(energy_keV):
    """A phase image equal to σ·V_proj (σ written out above, V_proj in V·Å) scores RMSE 0; the ground
    truth's std is σ·std(V_proj) — in rad, not mrad, not per V·m, at the measurement's energy."""
    v = _asymmetric((40, 48))
    sigma = _sigma_by_hand(energy_keV)
    stub = _TruthStub(vproj=v)
    m = _cc(sigma * v, stub, quantity="phase_rad", energy_keV=energy_keV)
    assert m["gt_std"] == pytest.approx(sigma * v.std(), rel=1e-9)
    assert m["rmse"] < 1e-9 * sigma * v.std()
    assert m["rmse_scaled"] < 1e-9 * sigma * v.std()           # Σ rec² < 1 rad²: the scale fit has no floor at 1
    assert m["ncc"] == pytest.approx(1.0, abs=1e-12)
    assert stub.calls == [("projected_potential", (0.2, 0.25), "lobato")]   # on the reconstruction's grid
    stub = _TruthStub(vproj=v)
    _cc(sigma * v, stub, quantity="phase_rad", energy_keV=energy_keV, parametrization="kirkland")
    assert stub.calls[0][2] == "kirkland"
    stub = _TruthStub(vproj=v)                                  # the helper's default is the quantifier's
    rec = Reconstruction("image", sigma * v, (0.2, 0.25), "phase_rad")
    np.testing.assert_allclose(ground_truth_like(rec, stub, energy_keV), sigma * v, rtol=1e-12)
    assert stub.calls[0][2] == CrossCorrelation.Params().parametrization == "lobato"
    # a potential image is compared with V_proj itself (V·Å), an intensity image with V_proj as a proxy
    assert _cc(v, _TruthStub(vproj=v))["rmse"] < 1e-9 * v.std()
    m = _cc(3.0 * v + 2.0, _TruthStub(vproj=v), quantity="intensity")
    assert m["gt_std"] == pytest.approx(v.std(), rel=1e-9) and m["ncc"] == pytest.approx(1.0, abs=1e-12)
    assert m["rmse_scaled"] < 1e-9 * v.std()
    with pytest.raises(TembenchError, match=r"needs the beam energy \(geometry.energy_keV\)"):
        _cc(sigma * v, _TruthStub(vproj=v), quantity="phase_rad", energy_keV=None)
    with pytest.raises(TembenchError, match="no ground truth"):
        _cc(v, _TruthStub(vproj=v), quantity="amplitude")


def test_real_single_atom_sample_phase_in_rad_and_position():
    """The real Sample path: one Si atom at (x, y) = (3.0, 5.0) Å; the ground truth phase is
    σ·V_proj and peaks at the atom; a crop from origin (y, x) = (2.0, 1.5) Å scores RMSE ≈ 0."""
    sample = Sample([[3.0, 5.0, 1.0]], [14], [10.0, 12.0, 2.0])
    s, energy = 0.25, 200.0
    v = sample.projected_potential(s)                              # (48, 40) V·Å, pixel i at i·s
    assert v.shape == (48, 40) and np.unravel_index(np.argmax(v), v.shape) == (20, 12)
    phase = _sigma_by_hand(energy) * v.astype(np.float64)
    crop = phase[8:8 + 24, 6:6 + 20]                                # origin (2.0, 1.5) Å
    assert np.unravel_index(np.argmax(crop), crop.shape) == (12, 6)
    m = _cc(crop, sample, quantity="phase_rad", sampling=(s, s), origin=(2.0, 1.5), energy_keV=energy)
    assert m["ncc"] > 1 - 1e-9
    assert m["rmse"] < 1e-6 * m["gt_std"]
    assert m["gt_std"] == pytest.approx(crop.std(), rel=1e-6)


@pytest.mark.parametrize("origin_px", [(6, 11), (0, 17), (13, 0)])
def test_crop_at_the_reconstruction_origin(origin_px):
    """The reconstruction is the ground truth cut out at a known pixel offset (y, x), with sy ≠ sx:
    only the crop at origin_A / sampling_A, in (y, x) order, scores NCC 1 and RMSE 0."""
    v = _asymmetric((40, 48), seed=1)
    sy, sx = 0.2, 0.25
    oy, ox = origin_px
    rec = v[oy:oy + 20, ox:ox + 24]
    m = _cc(rec, _TruthStub(vproj=v), sampling=(sy, sx), origin=(oy * sy, ox * sx))
    assert m["ncc"] == pytest.approx(1.0, abs=1e-12) and m["rmse"] < 1e-9
    # the same data read as if cropped elsewhere is a different number: the test can tell
    for wrong in ((0, 0), (ox, oy) if ox != oy else (oy + 3, ox), (oy + 1, ox)):
        if tuple(wrong) != (oy, ox):
            assert normalized_cross_correlation(rec, v[wrong[0]:wrong[0] + 20, wrong[1]:wrong[1] + 24]) < 0.95


def test_crop_with_reconstruction_extending_before_the_truth():
    """Origin (−3, −5) px: the reconstruction's first 3 rows / 5 columns lie outside the ground truth and
    are ignored; the overlap is rec[3:, 5:] = truth[:17, :19]. Garbage outside it must not count."""
    v = _asymmetric((40, 48), seed=2)
    rec = np.random.default_rng(9).standard_normal((20, 24)) * 1e3
    rec[3:, 5:] = v[:17, :19]
    m = _cc(rec, _TruthStub(vproj=v), sampling=(0.2, 0.25), origin=(-3 * 0.2, -5 * 0.25))
    assert m["ncc"] == pytest.approx(1.0, abs=1e-12) and m["rmse"] < 1e-9
    # a reconstruction that runs past the truth's far edge: overlap rec[:7, :9] = truth[33:, 39:]
    rec = np.random.default_rng(8).standard_normal((20, 24)) * 1e3
    rec[:7, :9] = v[33:, 39:]
    m = _cc(rec, _TruthStub(vproj=v), sampling=(0.2, 0.25), origin=(33 * 0.2, 39 * 0.25))
    assert m["ncc"] == pytest.approx(1.0, abs=1e-12)
    # a single overlapping row is still an overlap
    rec = np.random.default_rng(7).standard_normal((20, 24)) * 1e3
    rec[0] = v[39, 10:34]
    m = _cc(rec, _TruthStub(vproj=v), sampling=(0.2, 0.25), origin=(39 * 0.2, 10 * 0.25))
    assert m["ncc"] == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(TembenchError, match="reconstruction and ground truth do not overlap"):
        _cc(v[:20, :24], _TruthStub(vproj=v), sampling=(0.2, 0.25), origin=(0.0, 48 * 0.25))


def _waves(y, x, cell_yx):
    """A periodic, band-limited truth over the cell: two plane waves with whole periods (no symmetry)."""
    Y, X = np.meshgrid(y / cell_yx[0], x / cell_yx[1], indexing="ij")
    return 30.0 * np.sin(2 * np.pi * (3 * Y + 2 * X) + 0.3) + 12.0 * np.cos(2 * np.pi * (-Y + 5 * X) + 1.1)


@pytest.mark.parametrize("step, origin", [((0.2, 0.25), (0.47, -0.6)),           # origin between pixels
                                          ((0.3, 0.3), (0.0, 0.0)),             # step not dividing the cell
                                          ((0.29, 0.31), (0.45, 1.13))])
def test_truth_at_the_exact_reconstruction_pixel_positions(step, origin):
    """The truth is a band-limited periodic image over a 10 × 12 Å cell on 0.2 × 0.25 Å pixels; the
    reconstruction holds the same function at origin + i·step exactly. Comparing at exactly those points
    scores RMSE 0; rounding them onto the truth's pixels (up to half a pixel off) would not."""
    cell_yx, n_gt = (10.0, 12.0), (50, 48)
    truth = _waves(np.arange(n_gt[0]) * 0.2, np.arange(n_gt[1]) * 0.25, cell_yx)
    stub = _TruthStub(vproj=truth, cell_A=(12.0, 10.0, 1.0))
    n = (int(9.0 / step[0]), int(11.0 / step[1]))
    y, x = origin[0] + step[0] * np.arange(n[0]), origin[1] + step[1] * np.arange(n[1])
    m = _cc(_waves(y, x, cell_yx), stub, sampling=step, origin=origin)
    assert m["ncc"] == pytest.approx(1.0, abs=1e-12) and m["rmse"] < 1e-9 * m["gt_std"]
    # pixels before the cell (x < −half a truth pixel) are left out, as in the on-grid crop
    keep_x = x >= -0.125
    assert m["gt_std"] == pytest.approx(_waves(y, x[keep_x], cell_yx).std(), rel=1e-9)


def test_pixels_between_truth_pixels_kept_exactly_over_the_cell():
    """Reconstruction rows start half a truth pixel before the cell (y = −0.1 Å, kept: it rounds onto truth
    row 0) and run one row past it (y = 9.9 Å = (50 − ½)·0.2 Å rounds onto row 50, which does not exist:
    left out), so 50 of its 51 rows are compared; x on a shifted grid. No overlap at all is an error."""
    cell_yx = (10.0, 12.0)
    truth = _waves(np.arange(50) * 0.2, np.arange(48) * 0.25, cell_yx)
    y, x = -0.1 + 0.2 * np.arange(51), 0.1 + 0.25 * np.arange(40)
    rec = _waves(y, x, cell_yx)
    rec[-1] = 1e3                                                # the row past the cell: must not count
    m = _cc(rec, _TruthStub(vproj=truth, cell_A=(12.0, 10.0, 1.0)), sampling=(0.2, 0.25), origin=(-0.1, 0.1))
    assert m["ncc"] == pytest.approx(1.0, abs=1e-12)
    assert m["gt_std"] == pytest.approx(_waves(y[:50], x, cell_yx).std(), rel=1e-9)
    with pytest.raises(TembenchError, match="reconstruction and ground truth do not overlap"):
        _cc(rec, _TruthStub(vproj=truth, cell_A=(12.0, 10.0, 1.0)), sampling=(0.2, 0.25), origin=(10.05, 0.1))


def test_subpixel_origin_real_sample():
    """Atoms moved by −δ give, on the same grid, exactly the band-limited truth at the points i·s + δ
    (Fourier shift theorem): a reconstruction of it with origin δ (a third of a pixel) scores RMSE ≈ 0."""
    pos = np.array([[3.0, 5.0, 1.0], [6.2, 2.7, 1.0], [7.9, 8.8, 1.0]])
    sample = Sample(pos, [14, 8, 42], [10.0, 12.0, 2.0])
    s, delta = 0.25, np.array([0.08, -0.05])                     # (y, x) Å
    moved = Sample(pos - np.r_[delta[::-1], 0.0], [14, 8, 42], [10.0, 12.0, 2.0])
    rec = moved.projected_potential(s).astype(np.float64)
    m = _cc(rec, sample, sampling=(s, s), origin=tuple(delta))
    assert m["rmse"] < 1e-5 * m["gt_std"]
    # the same data scored as if it sat on the truth's pixels is visibly worse
    assert _cc(rec, sample, sampling=(s, s))["rmse"] > 0.05 * m["gt_std"]


def test_volume_crop_origin_zyx():
    v = _asymmetric((20, 22, 24), seed=3)
    stub = _TruthStub(vvol=v)
    rec = v[4:16, 7:19, 2:22]
    m = _cc(rec, stub, quantity="potential_V", sampling=0.5, origin=(2.0, 3.5, 1.0))
    assert m["ncc"] == pytest.approx(1.0, abs=1e-12) and m["rmse"] < 1e-9
    assert m["gt_std"] == pytest.approx(rec.std(), rel=1e-12)
    assert stub.calls == [("potential_volume", 0.5, "lobato")]
    stub = _TruthStub(vvol=v)
    m = _cc(rec, stub, quantity="potential_au", sampling=0.5, origin=(2.0, 3.5, 1.0), parametrization="kirkland")
    assert m["ncc"] == pytest.approx(1.0, abs=1e-12) and stub.calls[0][2] == "kirkland"
    assert _cc(rec, _TruthStub(vvol=v), quantity="potential_V", sampling=0.5, origin=(1.0, 3.5, 2.0))["ncc"] < 0.9
    with pytest.raises(TembenchError, match="no ground truth"):
        _cc(rec, _TruthStub(vvol=v), quantity="phase_rad", sampling=0.5)


def test_volume_with_anisotropic_voxels_is_refused():
    # the ground-truth volume is built on cubic voxels: comparing it with (0.5, 0.4, 0.4) Å voxels
    # would silently pair different points
    v = _asymmetric((20, 22, 24), seed=3)
    with pytest.raises(TembenchError, match=r"needs cubic voxels.*\(z, y, x\) Å; resample the reconstruction"):
        _cc(v, _TruthStub(vvol=v), quantity="potential_V", sampling=(0.5, 0.4, 0.4))


def test_border_px_drops_that_many_pixels_at_every_edge():
    v = _asymmetric((30, 36), seed=4)
    rec = v.copy()
    b = 3
    junk = np.random.default_rng(5).standard_normal(v.shape) * 1e3
    edge = np.ones(v.shape, bool)
    edge[b:-b, b:-b] = False
    rec[edge] = junk[edge]
    m = _cc(rec, _TruthStub(vproj=v), border_px=b)
    assert m["ncc"] == pytest.approx(1.0, abs=1e-12) and m["rmse"] < 1e-9
    assert m["gt_std"] == pytest.approx(v[b:-b, b:-b].std(), rel=1e-12)
    assert _cc(rec, _TruthStub(vproj=v), border_px=b - 1)["ncc"] < 0.5
    vol = _asymmetric((12, 14, 16), seed=6)
    rec = vol + 0.0
    rec[[0, -1]] = rec[:, [0, -1]] = rec[:, :, [0, -1]] = 1e4
    assert _cc(rec, _TruthStub(vvol=vol), quantity="potential_V", sampling=0.5, border_px=1)["ncc"] == \
        pytest.approx(1.0, abs=1e-12)


def test_lowpass_is_a_gaussian_of_that_fwhm():
    """Ground truth = one bright pixel; low-passed to 1 Å it is a Gaussian of FWHM 1 Å, σ = 1/2.355 Å
    (4.25 px along y at 0.1 Å, 3.40 px along x at 0.125 Å). A sampled Gaussian of that σ scores NCC ≈ 1;
    one of 1.2× the width does not."""
    v = np.zeros((96, 80))
    v[40, 30] = 50.0
    sy, sx = 0.1, 0.125
    y = (np.arange(96) - 40) * sy
    x = (np.arange(80) - 30) * sx

    def gauss(fwhm):
        s = fwhm / (2 * math.sqrt(2 * math.log(2)))
        return np.exp(-y[:, None] ** 2 / (2 * s * s) - x[None, :] ** 2 / (2 * s * s))

    cell = (80 * sx, 96 * sy, 1.0)
    m = _cc(gauss(1.0), _TruthStub(vproj=v, cell_A=cell), sampling=(sy, sx), lowpass_A=1.0)
    assert m["ncc"] > 0.99999
    assert _cc(gauss(1.2), _TruthStub(vproj=v, cell_A=cell), sampling=(sy, sx), lowpass_A=1.0)["ncc"] < 0.995
    assert _cc(gauss(1.0), _TruthStub(vproj=v, cell_A=cell), sampling=(sy, sx))["ncc"] < 0.2       # no low-pass
    # the truth is periodic over the cell: a peak on the first row spreads onto the last rows
    v = np.zeros((96, 80))
    v[0, 30] = 50.0
    y = np.minimum(np.arange(96), 96 - np.arange(96)) * sy
    m = _cc(gauss(1.0), _TruthStub(vproj=v, cell_A=cell), sampling=(sy, sx), lowpass_A=1.0)
    assert m["ncc"] > 0.99999


# ---------------------------------------------------------------------------------------------
# image_statistics
# ---------------------------------------------------------------------------------------------
def _stats(data, **params):
    kind = "image" if np.ndim(data) == 2 else "volume"
    rec = Reconstruction(kind, np.asarray(data, np.float64), 0.5, "intensity")
    return ImageStatistics().score(rec, None, None, ImageStatistics.Params(**params))


def test_image_statistics_known_moments_and_border():
    # interior: a checkerboard of 1 and 3 → mean 2, population std 1, contrast 0.5; border of 100s
    a = np.full((10, 12), 100.0)
    inner = np.where(np.add.outer(np.arange(6), np.arange(8)) % 2 == 0, 1.0, 3.0)
    a[2:-2, 2:-2] = inner
    assert _stats(a, border_px=2) == {"mean_value": 2.0, "std_value": 1.0, "contrast": 0.5}
    # whole image: 48 pixels of mean 2 and 72 of 100 → mean (48·2 + 72·100)/120
    m = _stats(a)
    mean = (48 * 2.0 + 72 * 100.0) / 120
    std = math.sqrt((24 * 1.0 + 24 * 9.0 + 72 * 1e4) / 120 - mean ** 2)
    assert m["mean_value"] == pytest.approx(mean) and m["std_value"] == pytest.approx(std)
    assert m["contrast"] == pytest.approx(std / mean)
    # volume: border on all three axes
    vol = np.full((6, 7, 8), -50.0)
    vol[1:-1, 1:-1, 1:-1] = 4.0
    assert _stats(vol, border_px=1) == {"mean_value": 4.0, "std_value": 0.0, "contrast": 0.0}
    # zero mean: contrast undefined
    assert math.isnan(_stats(np.array([[-1.0, 1.0], [1.0, -1.0]]))["contrast"])


# ---------------------------------------------------------------------------------------------
# spectral_resolution
# ---------------------------------------------------------------------------------------------
def _spec(img, sampling, **params):
    rec = Reconstruction("image", img, sampling, "phase_rad")
    return SpectralResolution().score(rec, None, None, SpectralResolution.Params(**params))


def _cosine_in_noise(n, sampling, cycles, noise=0.05, seed=0):
    """cos(2π(m·y/n + p·x/n)) + white noise: all signal power in one ring, |k| = √(m²/(n sy)² + p²/(n sx)²)."""
    y, x = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    img = np.cos(2 * np.pi * (cycles[0] * y + cycles[1] * x) / n)
    return img + noise * np.random.default_rng(seed).standard_normal((n, n))


@pytest.mark.parametrize("sampling", [0.25, 0.5])
def test_spectral_cutoff_at_a_known_frequency_in_A(sampling):
    """A cosine with (m, p) = (10, 20) cycles over 128 px: |k| = √500 / (128 s) 1/Å lies in ring 22 (rings
    are 1/(128 s) wide from 0). With no smoothing and no window, k_c is that ring's centre, 22.5/(128 s)
    1/Å, and the resolution 128 s / 22.5 Å — twice as many Å for twice the pixel size."""
    n = 128
    img = _cosine_in_noise(n, sampling, (10, 20))
    m = _spec(img, sampling, window=False, smooth_bins=1)
    assert m["spectral_cutoff_A_inv"] == pytest.approx(22.5 / (n * sampling), rel=1e-12)
    assert m["resolution_A"] == pytest.approx(n * sampling / 22.5, rel=1e-12)
    assert m["resolution_limited_by_band"] == 0.0
    # white noise 0.05 per pixel, unnormalised FFT: floor = N² σ²
    assert m["spectral_noise_floor"] == pytest.approx(n * n * 0.05 ** 2, rel=0.15)
    # the default 3-ring smoothing spreads the peak one ring up: k_c is the next ring's centre
    m3 = _spec(img, sampling, window=False)
    assert m3["spectral_cutoff_A_inv"] == pytest.approx(23.5 / (n * sampling), rel=1e-12)


def test_spectral_cutoff_uses_each_axis_sampling():
    """sy = 0.2, sx = 0.25 Å: a cosine of 48 cycles along x over 160 px is at 48/(160·0.25) = 1.2 1/Å;
    the rings go to the smaller Nyquist, 2.0 1/Å, in 80 rings of 0.025 1/Å; 1.2 1/Å opens ring 48.
    Sampling swapped between the axes would put it at 1.5 1/Å."""
    n = 160
    img = _cosine_in_noise(n, (0.2, 0.25), (0, 48), seed=1)
    k, psd, counts = radial_power_spectrum(img, (0.2, 0.25), window=False)
    assert len(k) == 80 and k[-1] == pytest.approx(2.0 - 0.0125)
    assert k[int(np.nanargmax(psd))] == pytest.approx(1.2125)
    m = _spec(img, (0.2, 0.25), window=False, smooth_bins=1)
    assert m["spectral_cutoff_A_inv"] == pytest.approx(1.2125)
    assert m["resolution_A"] == pytest.approx(1 / 1.2125)


def test_spectral_window_floor_threshold_and_band():
    n = 128
    rng = np.random.default_rng(2)
    noise = rng.standard_normal((n, n))
    # white noise of unit variance under a separable Hann window: E|F|² = Σw_y² · Σw_x²
    w2 = float((np.hanning(n) ** 2).sum())
    m = _spec(noise + _cosine_in_noise(n, 0.25, (10, 20), noise=0.0), 0.25)
    assert m["spectral_noise_floor"] == pytest.approx(w2 * w2, rel=0.15)
    # a pure cosine of amplitude a in noise σ: ring power ≈ (a²/4)·N²·2/count vs floor N²σ²; with the
    # threshold above that ratio the ring no longer counts and there is no resolution at all
    img = 0.05 * rng.standard_normal((n, n)) + _cosine_in_noise(n, 0.25, (10, 20), noise=0.0)
    k, psd, counts = radial_power_spectrum(img, 0.25, window=False)
    ratio = psd[22] / np.median(psd[(k >= 0.8 * 2.0)])
    assert 100 < ratio < 1e5
    assert math.isnan(_spec(img, 0.25, window=False, smooth_bins=1, threshold=2 * ratio)["resolution_A"])
    assert _spec(img, 0.25, window=False, smooth_bins=1, threshold=0.5 * ratio)["resolution_A"] == \
        pytest.approx(128 * 0.25 / 22.5)
    # a cosine inside the floor band (ring 54 of 64, above 0.8 Nyquist) is the floor, not a signal
    # and the floor is the band's median ring: the one bright ring does not raise it (its mean would)
    img = 0.05 * rng.standard_normal((n, n)) + _cosine_in_noise(n, 0.25, (30, 46), noise=0.0)
    m = _spec(img, 0.25, window=False, smooth_bins=1)
    assert math.isnan(m["resolution_A"])
    assert m["spectral_noise_floor"] == pytest.approx(n * n * 0.05 ** 2, rel=0.15)
    # signal filling every ring up to the band (0.8 Nyquist = 1.6 1/Å) is flagged as limited by the band
    # (sampling): k_c is then the last ring below the band, centre 50.5/32 1/Å
    img = 0.01 * rng.standard_normal((n, n)) + sum(_cosine_in_noise(n, 0.25, (0, j), noise=0.0)
                                                    for j in range(1, 52))
    m = _spec(img, 0.25, window=False, smooth_bins=1)
    assert m["resolution_limited_by_band"] == 1.0 and m["spectral_cutoff_A_inv"] == pytest.approx(50.5 / 32)


# ---------------------------------------------------------------------------------------------
# atom_tracing: scoring with a hand-built trace
# ---------------------------------------------------------------------------------------------
SHAPE = (40, 44, 48)                       # (z, y, x) voxels


def _box(sampling, origin):
    d, o = np.asarray(sampling, float), np.asarray(origin, float)
    lo = (o - 0.5 * d)[::-1]
    hi = (o + (np.array(SHAPE) - 0.5) * d)[::-1]
    return lo, hi                          # (x, y, z) Å


def _grid_atoms(sampling, origin, spacing=4.0, margin=3.0):
    lo, hi = _box(sampling, origin)
    axes = [np.arange(lo[k] + margin, hi[k] - margin, spacing) for k in range(3)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def _score_trace(monkeypatch, true_xyz, Z, traced_xyz, sampling=(0.5, 0.5, 0.5), origin=(0.0, 0.0, 0.0),
                 amplitude=None, sigma_A=None, labels=None, **params):
    """Score ``traced_xyz`` (x, y, z Å) as if the tracer had found exactly these sites."""
    d, o = np.asarray(sampling, float), np.asarray(origin, float)
    q = np.asarray(traced_xyz, float).reshape(-1, 3)
    n = len(q)
    res = TraceResult(positions_vox=(q[:, ::-1] - o) / d,
                      amplitude=np.ones(n) if amplitude is None else np.asarray(amplitude, float),
                      sigma_A=np.full(n, 0.35) if sigma_A is None else np.asarray(sigma_A, float),
                      sampling_A=d, n_rounds=1, converged=True, history={"n_sites": [n], "rms_shift_vox": [0.0]})
    monkeypatch.setattr(at_module._tracing, "trace_atoms", lambda *a, **k: res)
    rec = Reconstruction("volume", np.zeros(SHAPE, np.float32), sampling, "potential_V", origin_A=origin)
    lo, hi = _box(sampling, origin)
    sample = Sample(true_xyz, Z, np.maximum(hi, 1.0) + 10.0, labels=labels)
    return AtomTracing().score(rec, Measurement("hrtem_tilt_series", None, ()), sample, AtomTracing.Params(**params))


def _directions(n, seed=0):
    v = np.random.default_rng(seed).standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_default_match_radius_is_1A():
    # Ren's scoring matched within 2 voxels of 0.5 Å (compareWithGroundTruth.m: radiusMax = 2)
    assert AtomTracing.Params().match_radius_A == 1.0


@pytest.mark.parametrize("sampling", [(0.5, 0.5, 0.5), (0.4, 0.35, 0.45)])
def test_match_radius_just_inside_and_just_outside(monkeypatch, sampling):
    """Traced sites 0.98 Å (inside) or 1.02 Å (outside) from their true atom, in random directions, with
    the default radius 1 Å — in Å, whatever the voxel size. Outside ones are a miss and a false positive."""
    origin = (-2.0, 1.0, 3.0)
    true = _grid_atoms(sampling, origin)
    n = len(true)
    r = np.where(np.arange(n) % 2 == 0, 0.98, 1.02)
    traced = true + r[:, None] * _directions(n)
    m = _score_trace(monkeypatch, true, np.full(n, 14), traced, sampling, origin)
    inside = r < 1.0
    assert m["n_true"] == n and m["n_traced"] == n
    assert m["n_matched"] == inside.sum() and m["n_missing"] == (~inside).sum()
    assert m["n_false_positives"] == (~inside).sum()
    np.testing.assert_array_equal(m["matched_true_index"], np.flatnonzero(inside))
    np.testing.assert_allclose(m["position_error_pm"], 98.0, atol=1e-9)
    np.testing.assert_allclose(m["position_error_hist_edges_pm"], np.linspace(0, 100, 51))
    # a smaller radius, in Å: 0.6 Å is 1.2–1.7 voxels here; 0.58 Å in, 0.62 Å out
    r = np.where(np.arange(n) % 3 == 0, 0.62, 0.58)
    m = _score_trace(monkeypatch, true, np.full(n, 14), true + r[:, None] * _directions(n, 1), sampling, origin,
                     match_radius_A=0.6)
    assert m["n_matched"] == (r < 0.6).sum() and m["n_false_positives"] == (r > 0.6).sum()


def test_one_to_one_when_two_traced_sites_compete_for_one_atom(monkeypatch):
    """Two traced sites 0.3 Å and 0.6 Å from one true atom (and nothing else within 1 Å): the closer one
    is the match (30 pm), the other a false positive — never two matches for one atom."""
    true = np.array([[10.0, 10.0, 10.0], [16.0, 10.0, 10.0]])
    traced = np.array([[10.0, 10.3, 10.0], [10.0, 10.0, 9.4], [16.0, 10.0, 10.05]])
    m = _score_trace(monkeypatch, true, [14, 14], traced)
    assert m["n_matched"] == 2 and m["n_false_positives"] == 1 and m["n_missing"] == 0
    np.testing.assert_array_equal(m["matched_traced_index"], [0, 2])
    np.testing.assert_allclose(m["position_error_pm"], [30.0, 5.0], atol=1e-9)
    assert m["pct_atoms_found"] == 100.0 and m["pct_false_positives"] == 50.0
    # atoms at x = 10 and 11 Å, sites at 10.55 (0.45 Å from the second atom: the nearest pair) and 11.6
    # (0.6 Å from the second, 1.6 Å from the first): the most pairs is 2 (10.55 → first atom, 55 pm;
    # 11.6 → second, 60 pm); nearest-first matching (either order) would give 1 pair and 1 false positive
    true = np.array([[10.0, 10.0, 10.0], [11.0, 10.0, 10.0]])
    traced = np.array([[10.55, 10.0, 10.0], [11.6, 10.0, 10.0]])
    m = _score_trace(monkeypatch, true, [14, 8], traced)
    assert m["n_matched"] == 2 and m["n_false_positives"] == 0
    np.testing.assert_allclose(m["position_error_pm"], [55.0, 60.0], atol=1e-9)


def test_position_errors_in_pm_per_axis(monkeypatch):
    """Hand-built displacements (x, y, z) in pm: |d| = 10, 20, 30, 40, 60 pm → mean 32 pm, median 30 pm,
    rms √1320 pm; per axis rms √(Σd_k²/5). Anisotropic voxels and an off-zero origin: the frames must agree."""
    sampling, origin = (0.4, 0.5, 0.45), (-3.0, 5.0, 2.5)
    true = _grid_atoms(sampling, origin, spacing=5.0)[:5]
    d_pm = np.array([[10.0, 0, 0], [0, -20, 0], [0, 0, 30], [24, 32, 0], [0, 36, -48]])
    m = _score_trace(monkeypatch, true, np.full(5, 14), true + d_pm / 100.0, sampling, origin)
    assert m["n_matched"] == 5
    np.testing.assert_allclose(m["position_error_pm"], [10, 20, 30, 40, 60], atol=1e-9)
    np.testing.assert_allclose(m["displacement_xyz_pm"], d_pm, atol=1e-9)
    assert m["position_error_mean_pm"] == pytest.approx(32.0)
    assert m["position_error_median_pm"] == pytest.approx(30.0)
    assert m["position_error_rms_pm"] == pytest.approx(math.sqrt(1320.0))
    assert m["rms_error_x_pm"] == pytest.approx(math.sqrt((100 + 576) / 5))
    assert m["rms_error_y_pm"] == pytest.approx(math.sqrt((400 + 1024 + 1296) / 5))
    assert m["rms_error_z_pm"] == pytest.approx(math.sqrt((900 + 2304) / 5))
    np.testing.assert_allclose(m["traced_positions_xyz_A"], true + d_pm / 100.0, atol=1e-12)


def test_false_positives_are_a_percentage_of_the_true_atoms(monkeypatch):
    """8 true atoms; 7 traced on them, 1 missing, 2 extra sites in vacuum ≥ 3 Å from every atom.
    Ren Table 1 / compareWithGroundTruth.m: found and false positives are both % of the true sites
    (found + missing): 87.5 % found, 25 % false positives (not 2/9 of the traced sites)."""
    true = np.array([[x, y, z] for x in (5.0, 10.0) for y in (5.0, 10.0) for z in (5.0, 10.0)])
    vacuum = np.array([[18.0, 18.0, 15.0], [18.0, 4.0, 17.0]])
    traced = np.vstack([true[:7], vacuum])
    m = _score_trace(monkeypatch, true, np.full(8, 14), traced)
    assert (m["n_true"], m["n_traced"], m["n_matched"], m["n_missing"], m["n_false_positives"]) == (8, 9, 7, 1, 2)
    assert m["pct_atoms_found"] == 87.5 and m["pct_false_positives"] == 25.0
    # box margin 3.5 Å: the box is [−0.25, 23.75] × [−0.25, 21.75] × [−0.25, 19.75]; the vacuum site at
    # z = 17 lies in the margin (> 16.25: not counted), the one at z = 15 inside; the atoms at 5 and 10 are inside
    m = _score_trace(monkeypatch, true, np.full(8, 14), traced, roi=3.5)
    assert (m["n_true"], m["n_false_positives"]) == (8, 1) and m["pct_false_positives"] == 12.5
    # label ROI: a false positive counts where its nearest true atom is in the region
    labels = np.where(true[:, 0] < 7.0, "core", "shell")          # 4 core (x = 5), 4 shell (x = 10)
    fp = np.array([[2.0, 5.0, 5.0], [13.0, 5.0, 5.0]])            # nearest a core atom / a shell atom
    m = _score_trace(monkeypatch, true, np.full(8, 14), np.vstack([true, fp]), labels=labels, roi="core")
    assert (m["n_true"], m["n_traced"], m["n_false_positives"]) == (4, 5, 1) and m["pct_false_positives"] == 25.0


def test_true_atoms_outside_the_reconstructed_box_are_not_counted(monkeypatch):
    lo, hi = _box((0.5, 0.5, 0.5), (0.0, 0.0, 0.0))               # voxel centres ± half a voxel
    true = np.array([[10.0, 10.0, 10.0], [hi[0] - 0.01, 10.0, 10.0], [hi[0] + 0.01, 10.0, 10.0],
                     [10.0, lo[1] + 0.01, 10.0], [10.0, lo[1] - 0.01, 10.0], [10.0, 10.0, hi[2] + 0.01]])
    m = _score_trace(monkeypatch, true, np.full(6, 14), true[[0]])
    assert m["n_true"] == 3 and m["n_missing"] == 2 and m["pct_atoms_found"] == pytest.approx(100 / 3)


def _two_species(n_each=12):
    pos = _grid_atoms((0.5, 0.5, 0.5), (0.0, 0.0, 0.0))[:2 * n_each]
    Z = np.array([8, 14] * n_each)
    return pos, Z


def test_species_known_mix_with_one_wrong(monkeypatch):
    """12 O (peak 1.0 ± 5 %) and 12 Si (3.0 ± 5 %), one Si traced at O brightness → 23/24 correct.
    Dimmer class → lighter element. With 2 more true atoms missing and a bright vacuum site, the
    denominator stays the matched atoms (Ren classifyAtoms.m: numCorrectSpecies / numPeaksFound)."""
    pos, Z = _two_species()
    spread = np.linspace(-0.05, 0.05, 24)
    amp = np.where(Z == 14, 3.0, 1.0) * (1 + spread)
    wrong = np.flatnonzero(Z == 14)[4]
    amp[wrong] = 1.02
    m = _score_trace(monkeypatch, pos, Z, pos, amplitude=amp, intensity_measure="peak")
    assert m["n_matched"] == 24 and m["n_species"] == 2
    assert m["pct_correct_species"] == pytest.approx(100 * 23 / 24)
    expect = np.where(Z == 14, 14, 8)
    expect[wrong] = 8
    np.testing.assert_array_equal(m["traced_Z"], expect)
    assert 1.05 < m["species_thresholds"][0] < 2.85
    extra = np.array([[20.0, 18.0, 17.0], [21.0, 18.5, 3.0]])      # true atoms with no traced site
    true2 = np.vstack([pos, extra])
    traced2 = np.vstack([pos, [[2.0, 2.0, 17.5]]])               # + a bright false positive
    m = _score_trace(monkeypatch, true2, np.r_[Z, 14, 8], traced2, amplitude=np.r_[amp, 3.0],
                     intensity_measure="peak")
    assert (m["n_matched"], m["n_missing"], m["n_false_positives"]) == (24, 2, 1)
    assert m["pct_correct_species"] == pytest.approx(100 * 23 / 24)
    # nothing matched: no species score
    m = _score_trace(monkeypatch, pos, Z, pos + 3.0 * _directions(24), amplitude=amp, intensity_measure="peak")
    assert m["n_matched"] == 0 and math.isnan(m["pct_correct_species"]) and m["pct_atoms_found"] == 0.0


@pytest.mark.parametrize("measure", ["integrated", "peak", "peak_sigma"])
def test_site_intensity_measures(monkeypatch, measure):
    """integrated = A·(2π)^{3/2}·σ³, peak = A, peak_sigma = A·σ (σ in Å). Si: A 2.0, σ 0.35 Å; O: A 1.0,
    σ 0.30 Å. One Si is given A = 0.8, σ = 0.45 Å: O-like by peak (0.8) and by A·σ (0.36 vs O 0.30, Si 0.70),
    Si-like by the integrated measure (A·σ³ 0.073 vs O 0.027, Si 0.086) — the measure decides its class."""
    pos, Z = _two_species()
    spread = 1 + np.linspace(-0.03, 0.03, 24)
    amp = np.where(Z == 14, 2.0, 1.0) * spread
    sig = np.where(Z == 14, 0.35, 0.30)
    odd = np.flatnonzero(Z == 14)[2]
    amp[odd], sig[odd] = 0.8, 0.45
    m = _score_trace(monkeypatch, pos, Z, pos, amplitude=amp, sigma_A=sig, intensity_measure=measure)
    expected = {"integrated": amp * (2 * np.pi) ** 1.5 * sig ** 3, "peak": amp, "peak_sigma": amp * sig}[measure]
    np.testing.assert_allclose(m["site_intensity"], expected, rtol=1e-12)
    right = 24 if measure == "integrated" else 23
    assert m["pct_correct_species"] == pytest.approx(100 * right / 24)
    assert AtomTracing.Params().intensity_measure == "integrated"


# ---------------------------------------------------------------------------------------------
# atom_tracing end to end: rendered Gaussian atoms, the real tracer, default parameters
# ---------------------------------------------------------------------------------------------
def _render(shape, sampling, origin, pos_xyz, peak=1.0, sigma=0.35):
    ax = [origin[k] + np.arange(shape[k]) * sampling[k] for k in range(3)]
    vol = np.zeros(shape)
    for p in np.asarray(pos_xyz)[:, ::-1]:
        e = [np.exp(-(ax[k] - p[k]) ** 2 / (2 * sigma * sigma)) for k in range(3)]
        vol += peak * e[0][:, None, None] * e[1][None, :, None] * e[2][None, None, :]
    return vol


def test_end_to_end_radius_and_pm_with_the_real_tracer():
    """Atoms rendered 0.95 Å (in) or 1.05 Å (out) away from where the sample says they are, plus a
    displaced pair with known per-axis offsets: the traced result, with default parameters, matches
    exactly the inside ones, with errors of 95 pm, and counts the outside ones as missing + false positive."""
    sampling, origin, shape = (0.5, 0.5, 0.5), (0.0, 0.0, 0.0), (32, 32, 32)
    true = np.array([[4.0, 4.0, 4.0], [11.0, 4.0, 4.0], [4.0, 11.0, 11.0], [11.0, 11.0, 4.0],
                     [4.0, 4.0, 11.0], [11.0, 4.0, 11.0]])
    off = np.array([[0.95, 0, 0], [0, -1.05, 0], [0, 0, 0.95], [-0.63, 0.0, -0.84],   # |off| 0.95, 1.05, 0.95, 1.05
                    [0.10, 0.20, 0.30], [-0.2, 0.1, -0.4]])
    vol = _render(shape, sampling, origin, true + off)
    rec = Reconstruction("volume", vol, sampling, "potential_V", origin_A=origin)
    sample = Sample(true, np.full(len(true), 14), [16.0, 16.0, 16.0])
    m = AtomTracing().score(rec, Measurement("hrtem_tilt_series", None, ()), sample, AtomTracing.Params())
    assert m["n_traced"] == 6 and m["n_matched"] == 4 and m["n_false_positives"] == 2 and m["n_missing"] == 2
    np.testing.assert_array_equal(m["matched_true_index"], [0, 2, 4, 5])
    np.testing.assert_allclose(m["position_error_pm"], 100 * np.linalg.norm(off[[0, 2, 4, 5]], axis=1), atol=0.1)
    np.testing.assert_allclose(m["displacement_xyz_pm"][2:], 100 * off[[4, 5]], atol=0.1)


def test_every_tracing_parameter_reaches_the_tracer(monkeypatch):
    """Non-default values of every tracing parameter arrive at trace_atoms unchanged (none silently
    replaced by its default); the trace time is measured."""
    seen = {}
    params = dict(dog_sigmas_vox=(0.6, 1.3), intensity_threshold_frac=0.2, intensity_threshold=0.7,
                  min_size_vox=0.8, merge_distance_vox=2.0, fit_radius_vox=2.5, sigma_init_vox=0.8,
                  sigma_range_vox=(0.3, 1.4), max_rounds=7, tol_sites=3, tol_rms_vox=0.01, lm_iterations=5,
                  background="median", min_integrated_frac=0.2)
    res = TraceResult(np.zeros((1, 3)) + 10, np.ones(1), np.full(1, 0.35), np.full(3, 0.5), 1, True,
                      {"n_sites": [1], "rms_shift_vox": [0.0]})

    def fake(volume, sampling_A, **kw):
        seen.update(kw, sampling_A=tuple(sampling_A))
        return res

    monkeypatch.setattr(at_module._tracing, "trace_atoms", fake)
    rec = Reconstruction("volume", np.zeros(SHAPE, np.float32), 0.5, "potential_V")
    sample = Sample([[5.0, 5.0, 5.0]], [14], [30.0, 30.0, 30.0])         # one atom: a valid sample
    m = AtomTracing().score(rec, Measurement("x", None, ()), sample, AtomTracing.Params(**params))
    assert seen == dict(params, sampling_A=(0.5, 0.5, 0.5))
    assert 0.0 <= m["trace_time_s"] < 60.0
    assert m["n_true"] == 1 and m["n_matched"] == 1 and m["pct_correct_species"] == 100.0   # one element, one site


def test_species_undefined_with_too_few_sites(monkeypatch):
    """Two elements but three traced sites: the mixture cannot be fitted, so no species score and no
    thresholds (not a guess)."""
    pos = np.array([[5.0, 5.0, 5.0], [10.0, 5.0, 5.0], [15.0, 5.0, 5.0]])
    m = _score_trace(monkeypatch, pos, [8, 14, 14], pos, amplitude=[1.0, 3.0, 3.1])
    assert m["n_matched"] == 3 and math.isnan(m["pct_correct_species"]) and len(m["species_thresholds"]) == 0
    # no traced site at all
    m = _score_trace(monkeypatch, pos, [8, 14, 14], np.zeros((0, 3)))
    assert m["n_traced"] == 0 and m["pct_atoms_found"] == 0.0 and math.isnan(m["pct_correct_species"])
    m = _score_trace(monkeypatch, pos, [8, 14, 14], np.zeros((0, 3)), labels=["core", "core", "shell"], roi="core")
    assert (m["n_true"], m["n_traced"], m["n_false_positives"]) == (2, 0, 0)


def test_box_edges_and_margin_on_both_sides(monkeypatch):
    """Atoms exactly on the box faces (voxel centres ± half a voxel) are inside; with a 3.5 Å margin a
    false positive 3 Å from the low face (x = 2.75) is left out like one 3 Å from the high face."""
    lo, hi = _box((0.5, 0.5, 0.5), (0.0, 0.0, 0.0))
    true = np.array([[lo[0], 10.0, 10.0], [hi[0], 12.0, 10.0], [10.0, 10.0, 10.0]])
    m = _score_trace(monkeypatch, true, [14, 14, 14], true)
    assert m["n_true"] == 3 and m["n_matched"] == 3
    fps = np.array([[lo[0] + 3.0, 5.0, 5.0], [hi[0] - 3.0, 5.0, 5.0], [10.0, 15.0, 15.0]])
    m = _score_trace(monkeypatch, true[2:], [14], np.vstack([true[2:], fps]), roi=3.5)
    assert (m["n_true"], m["n_traced"], m["n_false_positives"]) == (1, 2, 1)


def test_atom_tracing_error_messages_say_what_to_fix(monkeypatch):
    rec = Reconstruction("volume", np.zeros(SHAPE, np.float32), 0.5, "potential_V")
    meas, P = Measurement("x", None, ()), AtomTracing.Params
    img = Reconstruction("image", np.zeros((8, 8)), 0.5, "phase_rad")
    sample = Sample([[5.0, 5.0, 5.0]], [14], [30.0, 30.0, 30.0])
    with pytest.raises(TembenchError, match=r"use a quantifier for images \(e.g. cross_correlation\) instead"):
        AtomTracing().score(img, meas, sample, P())
    with pytest.raises(TembenchError, match="atom_tracing: the sample has no atoms to score against"):
        AtomTracing().score(rec, meas, Sample(np.zeros((0, 3)), [], [30.0, 30.0, 30.0]), P())
    monkeypatch.setattr(at_module._tracing, "trace_atoms", lambda *a, **k: TraceResult(
        np.zeros((0, 3)), np.zeros(0), np.zeros(0), np.full(3, 0.5), 1, True, {"n_sites": [0], "rms_shift_vox": [0.0]}))
    far = Sample([[50.0, 5.0, 5.0]], [14], [60.0, 30.0, 30.0])
    with pytest.raises(TembenchError, match=r"x∈\[-0.25, 23.75\], y∈\[-0.25, 21.75\], z∈\[-0.25, 19.75\] Å; check "
                                            r"Reconstruction.origin_A \(z, y, x: position of voxel \[0,0,0\] in the "
                                            r"sample frame\) and sampling_A"):
        AtomTracing().score(rec, meas, far, P())
    with pytest.raises(TembenchError, match=r"has no labels; use roi='all' or a box margin in Å"):
        AtomTracing().score(rec, meas, sample, P(roi="core"))
    labelled = Sample([[5.0, 5.0, 5.0], [6.0, 5.0, 5.0]], [14, 8], [30.0, 30.0, 30.0], labels=["shell", "rim"])
    with pytest.raises(TembenchError, match=r"roi label 'core' is not one of the sample's labels \['rim', 'shell'\]"):
        AtomTracing().score(rec, meas, labelled, P(roi="core"))


def test_artifacts_by_construction(monkeypatch):
    """Histograms and per-site artifacts of a hand-built trace: errors 10.5, 21, 31.5, 42, 63 pm in 50 bins
    over 0 … 100 pm (the match radius) land in bins 5, 10, 15, 21, 31; with a 0.6 Å radius the 6 edges run
    to 60 pm (63 pm is no match); the intensity histogram counts every traced site; trace history is
    passed through."""
    sampling, origin = (0.4, 0.5, 0.45), (-3.0, 5.0, 2.5)
    true = _grid_atoms(sampling, origin, spacing=5.0)[:5]
    d_pm = 1.05 * np.array([[10.0, 0, 0], [0, -20, 0], [0, 0, 30], [24, 32, 0], [0, 36, -48]])
    amp = np.array([1.0, 1.5, 2.0, 2.5, 3.0])
    m = _score_trace(monkeypatch, true, np.full(5, 14), true + d_pm / 100.0, sampling, origin, amplitude=amp,
                     intensity_measure="peak")
    expect = np.zeros(50, int)
    expect[[5, 10, 15, 21, 31]] = 1
    np.testing.assert_array_equal(m["position_error_hist"], expect)
    np.testing.assert_allclose(m["position_error_hist_edges_pm"], np.linspace(0, 100, 51))
    np.testing.assert_allclose(m["site_intensity_hist_edges"], np.linspace(1.0, 3.0, 65))
    assert len(m["site_intensity_hist"]) == 64 and m["site_intensity_hist"].sum() == 5
    assert m["site_intensity_hist"][0] == 1 and m["site_intensity_hist"][-1] == 1
    np.testing.assert_array_equal(m["traced_in_roi"], np.ones(5, bool))
    np.testing.assert_array_equal(m["trace_history_n_sites"], [5])
    np.testing.assert_array_equal(m["trace_history_rms_shift_vox"], [0.0])
    assert (m["n_traced_volume"], m["trace_rounds"], m["trace_converged"]) == (5, 1, True)
    m = _score_trace(monkeypatch, true, np.full(5, 14), true + d_pm / 100.0, sampling, origin, match_radius_A=0.6,
                     hist_bins=6)
    np.testing.assert_allclose(m["position_error_hist_edges_pm"], np.linspace(0, 60, 7))
    np.testing.assert_array_equal(m["position_error_hist"], [0, 1, 1, 1, 1, 0])
    assert m["n_matched"] == 4
