"""``stem4d_tilt_series``: a 4D-STEM tilt series of an *unaligned* sample (You 2025, simulation section).

Per tilt k the atoms are turned about the rotation centre c (the cell centre, as ``stem4d``) by the
true Euler angles Θ_k = nominal + errors (RELION ZYZ, :func:`tembench.physics.rotation.euler_matrix`)
and then moved by the true translation (τ_x, τ_y, 0) Å, so the tilt's projection is
P[R_{Θ_k} V](r − τ_k) — the convention of :mod:`tembench_you2025.tomo_common`. Errors are drawn per
tilt from a seeded generator: Euler errors N(0, ``euler_error_deg``) per angle, translations uniform in
[−``max_translation_A``, +``max_translation_A``] per axis (the paper: up to 3.4 Å). Everything else
(scan-position jitter, mixed-state probe, frozen phonons, detector) is ``stem4d``'s; with no errors
the data are ``stem4d``'s bit for bit. The dose per tilt is the noise step's (``poisson_dose`` with
``dose_mode: per_image`` gives every scan, i.e. every tilt, ``dose_e_per_A2``).

The geometry holds the nominal tilt angles only (plus ``stem4d``'s ``extra``: ``rotation_centre_A``
(x, y, z) and ``entrance_z_A``, the z of the simulated stack's entrance plane to which the probe
defocus refers). The truth is not in the measurement: the provenance keeps only the recipe (seed,
``max_translation_A``, ``euler_error_deg``) and :func:`true_alignment` regenerates it for quantifiers.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field, model_validator

from tembench.builtin.forward_multislice import STEM4D, _tilted_stack
from tembench.errors import TembenchError
from tembench.physics.rotation import euler_matrix
from tembench.types import Geometry

from tembench_you2025.tomo_common import nominal_euler_deg

ALIGNMENT_RECORD = "stem4d_tilt_series_alignment"


def draw_alignment(nominal_euler: np.ndarray, seed: int, max_translation_A: float, euler_error_deg: float):
    """True alignment of a tilt series: (euler_deg (n, 3), translations_A (n, 2) (τ_y, τ_x)).

    Euler errors ~ N(0, euler_error_deg) per angle, translations ~ U[−max, +max] per axis, from one
    generator seeded with ``seed`` (both always drawn, so the translations do not depend on the error)."""
    nominal = np.asarray(nominal_euler, np.float64).reshape(-1, 3)
    n = len(nominal)
    rng = np.random.default_rng([int(seed), 0xA119])
    errors = rng.normal(0.0, float(euler_error_deg), (n, 3))
    tau = rng.uniform(-float(max_translation_A), float(max_translation_A), (n, 2))
    return nominal + errors, tau


def true_alignment(measurement) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth for quantifiers: the true (euler_deg (n, 3), translations_A (n, 2) (τ_y, τ_x)) of a tilt
    series, regenerated from the recipe in the provenance (``stem4d_tilt_series``) — or the nominal angles
    and zero translations when there is none (a ``stem4d`` tilt series: truth = nominal).

    Reconstructors must not call this (like ``true_scan_positions_A``): they get the nominal angles only."""
    g = measurement.geometry
    nominal = nominal_euler_deg(g)
    n_data = np.shape(measurement.data)[0] if measurement.data is not None else len(nominal)
    if measurement.kind == "4dstem_tilt_series" and n_data != len(nominal):
        raise TembenchError(f"true_alignment: {n_data} tilts in the data but {len(nominal)} tilt angles in the "
                            "geometry")
    for rec in reversed(getattr(measurement, "provenance", None) or []):
        if rec.get("component") == ALIGNMENT_RECORD:
            return draw_alignment(nominal, rec["seed"], rec["max_translation_A"], rec["euler_error_deg"])
    return nominal, np.zeros((len(nominal), 2))


def _check_inside_field(positions_per_tilt, cell_A, angles) -> None:
    """The potential is periodic over the cell in x and y: a turned or moved atom that leaves the cell would
    re-enter on the opposite side (a different object per tilt). Refuse instead of simulating that."""
    over = 0.0
    worst = None
    for k, pos in enumerate(positions_per_tilt):
        if not len(pos):
            continue
        xy = pos[:, :2]
        o = float(max(np.max(-xy), np.max(xy - np.asarray(cell_A[:2])), 0.0))
        if o > over:
            over, worst = o, k
    if worst is not None:
        raise TembenchError(
            f"stem4d_tilt_series: at tilt {angles[worst]:g}° (with its translation) atoms lie up to {over:.2f} Å "
            f"outside the {cell_A[0]:.1f} x {cell_A[1]:.1f} Å field, where the periodic potential would wrap them "
            f"to the opposite side; pad the sample with at least {over + 0.5:.1f} Å more vacuum (e.g. padding_A), "
            "or reduce the tilt range / max_translation_A")


class STEM4DTiltSeries(STEM4D):
    """4D-STEM multislice tilt series of an unaligned sample: per tilt, atoms turned by nominal + random Euler
    errors and moved by a random translation (You 2025 simulation); truth via :func:`true_alignment`.

    Otherwise ``stem4d`` (batch-cropped multislice, mixed-state probe, position jitter, frozen phonons); the
    output is always ``4dstem_tilt_series`` (tilt, scan_y, scan_x, k_y, k_x), also for one tilt.
    """

    name = "stem4d_tilt_series"
    produces = "4dstem_tilt_series"
    version = "1"

    class Params(STEM4D.Params):
        max_translation_A: float = Field(0.0, ge=0, le=50, description="true translation of each tilt drawn "
                                         "uniformly in [−max, +max] Å per axis (y, x) (You 2025: up to 3.4 Å)")
        euler_error_deg: float = Field(0.0, ge=0, le=10, description="rms error (deg) of each true Euler angle "
                                       "(rot, tilt, psi) about the nominal tilt, normal")
        alignment_seed: int = Field(0, ge=0, description="seed of the translations and Euler errors")

        @model_validator(mode="after")
        def _series(self):
            if self.output != "patterns":
                raise ValueError("stem4d_tilt_series gives 4D patterns per tilt (output: patterns); use stem4d for "
                                 "virtual-detector images")
            if self.tilt_axis not in ("x", "y"):
                raise ValueError(f"stem4d_tilt_series: tilt_axis must be 'x' or 'y' (a tomographic tilt axis "
                                 f"perpendicular to the beam), got {self.tilt_axis!r}")
            return self

    @classmethod
    def output_kind(cls, params) -> str:
        return "4dstem_tilt_series"

    @staticmethod
    def _alignment(angles, p):
        nominal = nominal_euler_deg(Geometry(tilt_angles_deg=list(angles), tilt_axis=p.tilt_axis))
        return draw_alignment(nominal, p.alignment_seed, p.max_translation_A, p.euler_error_deg)

    def _tilted_stack(self, sample, angles, p):
        euler, tau = self._alignment(angles, p)
        matrices = [euler_matrix(*e) for e in euler]
        shifts = np.stack([tau[:, 1], tau[:, 0], np.zeros(len(tau))], axis=1)  # (x, y, z)
        out = _tilted_stack(sample, angles, p.tilt_axis, p.slice_thickness_A, matrices=matrices,
                            translations_xyz_A=shifts)
        _check_inside_field(out[0], sample.cell_A, angles)
        return out

    def simulate(self, sample, params, xp):
        m = super().simulate(sample, params, xp)
        p = params
        record = {"component": ALIGNMENT_RECORD, "seed": int(p.alignment_seed),
                  "max_translation_A": float(p.max_translation_A), "euler_error_deg": float(p.euler_error_deg)}
        return m.replace(provenance=[*m.provenance, record])
