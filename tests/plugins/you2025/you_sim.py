"""A small two-slice weak-phase object and its 4D-STEM scan for the You 2025 tests (fixtures in conftest.py;
imported by name ``you_sim``, not ``conftest``, so that test files resolve it whatever else pytest collects).

No inverse crime: the object is analytic (Gaussian blobs), simulated by the core's ``stem_scan`` on a
0.1 Å grid with a 96² probe window (with the 2/3 band limit and band-limited transmissions), and
the central 48² detector pixels are kept, so the reconstruction runs on a 0.2 Å grid with its own
(unlimited) propagator. Two slices 30 Å apart (200 kV, 40 mrad: depth of field λ/α² ≈ 16 Å).
"""

from __future__ import annotations

import numpy as np

from tembench import Geometry
from tembench.physics import stem as S
from tembench.physics.constants import interaction_constant

ENERGY_KEV = 200.0
SEMIANGLE_MRAD = 40.0
DZ_A = 30.0
FIELD_A = 19.2
SIM_SAMPLING_A = 0.1
ABERRATIONS = {"C10": -40.0}
BLOB_WIDTH_A = 0.45


class TwoSlice:
    def __init__(self, seed=3, n_blobs=10, lo=6.0, hi=13.0):
        rng = np.random.default_rng(seed)
        sig = interaction_constant(ENERGY_KEV)
        self.centres = [rng.uniform(lo, hi, (n_blobs, 2)), rng.uniform(lo, hi, (n_blobs, 2))]
        self.amps = [rng.uniform(0.1, 0.25, n_blobs) / sig, rng.uniform(0.1, 0.25, n_blobs) / sig]  # 0.1–0.25 rad

    def slice_at(self, k, y, x):
        """V·Å of slice k at points y (ny,), x (nx,) Å (periodic over the simulation field)."""
        Y, X = np.meshgrid(y, x, indexing="ij")
        out = np.zeros(Y.shape)
        for (cy, cx), a in zip(self.centres[k], self.amps[k]):
            dy = (Y - cy + FIELD_A / 2) % FIELD_A - FIELD_A / 2
            dx = (X - cx + FIELD_A / 2) % FIELD_A - FIELD_A / 2
            out += a * np.exp(-(dy**2 + dx**2) / (2 * BLOB_WIDTH_A**2))
        return out

    def stack(self, sampling_A):
        n = int(round(FIELD_A / sampling_A))
        g = np.arange(n) * sampling_A
        return np.stack([self.slice_at(0, g, g), self.slice_at(1, g, g)]).astype(np.float32)


def scan_grid(step_A=0.45, lo=5.0, hi=13.5):
    ys = np.arange(lo, hi, step_A)
    return np.stack(np.meshgrid(ys, ys, indexing="ij"), -1)


def simulate(obj, positions_A, n_modes=1):
    modes = S.make_probe_modes((96, 96), SIM_SAMPLING_A, ENERGY_KEV, SEMIANGLE_MRAD, ABERRATIONS, n_modes=n_modes,
                               defocus_spread_A=30.0 if n_modes > 1 else 0.0)
    res = S.stem_scan(obj.stack(SIM_SAMPLING_A), DZ_A, energy_keV=ENERGY_KEV, sampling_A=SIM_SAMPLING_A,
                      positions_A=np.asarray(positions_A).reshape(-1, 2), probe=modes, detector_gpts=48)
    geo = Geometry(energy_keV=ENERGY_KEV, semiangle_mrad=SEMIANGLE_MRAD, aberrations_A=dict(ABERRATIONS),
                   defocus_A=[-ABERRATIONS["C10"]], detector_sampling_mrad=res.detector_sampling_mrad,
                   scan_positions_A=np.asarray(positions_A).reshape(-1, 2), slice_thickness_A=DZ_A,
                   extra={"detector_centre_px": (24.0, 24.0)})
    return res.patterns, geo




# --- the issue-15 alignment draws (test_linear_tomo, test_linear_tomo_fourier) ------------------------------
#: the joint schedule of the issue-15 angle tests: 10 outer × 40 volume steps at full resolution, joint steps from
#: the 4th, no background threshold (noise-free data)
ISSUE15_JOINT_SCHEDULE = dict(refine_euler=("rot", "tilt", "psi"), downsample=1, n_outer=0, n_outer_full=10,
                              start_euler_outer=3, n_volume_steps=40, threshold_fraction=0.0, n_final_steps=1)


def atom_offsets(n_atoms=20, r_lo=2.0, r_hi=8.5, min_d=2.5, seed=1):
    """(z, y, x) voxel offsets from the box centre of ``n_atoms`` points at least ``min_d`` apart, ``r_lo``..``r_hi``
    from the centre: the Gaussian "atoms" of the issue-15 angle tests."""
    rng = np.random.default_rng(seed)
    pts = []
    while len(pts) < n_atoms:
        q = rng.uniform(-r_hi, r_hi, 3)
        if r_lo < np.linalg.norm(q) < r_hi and all(np.linalg.norm(q - r) > min_d for r in pts):
            pts.append(q)
    return np.array(pts)


def issue15_alignment_draw(seed: int, n_tilts: int = 11):
    """One draw of docs/you2025_alignment_angles.md: tilts over ±60°, the nominal Euler triples (0, tilt, 0), the
    truth with errors of 0.5–1.5° (random sign) on all three angles, and translations of 1–3 Å (Å, (y, x))."""
    rng = np.random.default_rng(seed)
    tilts = np.linspace(-60.0, 60.0, n_tilts)
    nominal = np.stack([0 * tilts, tilts, 0 * tilts], 1)
    truth = nominal + rng.uniform(0.5, 1.5, nominal.shape) * rng.choice([-1.0, 1.0], nominal.shape)
    mag, phase = rng.uniform(1.0, 3.0, n_tilts), rng.uniform(0, 2 * np.pi, n_tilts)
    return tilts, nominal, truth, np.stack([mag * np.sin(phase), mag * np.cos(phase)], 1)


def issue15_scores(result, nominal, tau, truth):
    """(start, got): :func:`tomo_scores.alignment_errors` of the nominal start and of ``result``'s alignment (printed)."""
    from tembench_you2025.tomo_scores import alignment_errors

    start = alignment_errors(np.zeros_like(tau), nominal, tau, truth)
    got = alignment_errors(result.translations_A, result.euler_deg, tau, truth)
    print({k: round(got[k], 4) for k in ("translation_error_max_A", "rotation_error_median_deg",
                                          "rotation_error_max_deg")},
          "start", round(start["rotation_error_median_deg"], 3), round(start["rotation_error_max_deg"], 3))
    return start, got
