"""``tomo_sections``: stores what the tomography report shows of a reconstructed volume — the central xz
(depth) and xy sections of the reconstruction and of the ground truth at the same voxels, and the
recovered vs true alignment per tilt — as artifacts (the runner keeps no volumes unless ``save:`` asks).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from tembench import Params, Quantifier
from tembench.builtin.quantifiers_fsc import truth_on_reconstruction_grid
from tembench.errors import TembenchError
from tembench.metrics import Metric


def _sections(vol: np.ndarray, iy: int, iz: int) -> tuple[np.ndarray, np.ndarray]:
    """(xz section at y index iy, xy section at z index iz) of a (z, y, x) volume."""
    return np.ascontiguousarray(vol[:, iy, :], np.float32), np.ascontiguousarray(vol[iz], np.float32)


class TomoSections(Quantifier):
    """Central depth (xz) and lateral (xy) sections of a volume and of the truth, and the alignment per tilt.

    The xz plane is normal to the tilt axis y, where the missing wedge elongates atoms along z; both
    sections pass through the centre of mass of the truth's positive potential.
    """

    name = "tomo_sections"
    version = "1"
    accepts = ("volume",)
    metrics = {"section_y_A": Metric("Å", None, description="y of the stored xz section (sample frame)"),
               "section_z_A": Metric("Å", None, description="z of the stored xy section (sample frame)")}

    class Params(Params):
        parametrization: str = Field("lobato", description="scattering-factor parametrisation of the truth")

    def score(self, reconstruction, measurement, sample, params):
        if reconstruction.kind != "volume":
            raise TembenchError(f"tomo_sections scores volumes, got a {reconstruction.kind!r} reconstruction")
        energy = getattr(measurement.geometry, "energy_keV", None) or 200.0
        rec, gt = truth_on_reconstruction_grid(reconstruction, sample, energy, params.parametrization)
        w = np.clip(gt, 0, None)
        tot = float(w.sum())
        if tot > 0:
            iz = int(round(float((w.sum(axis=(1, 2)) * np.arange(w.shape[0])).sum()) / tot))
            iy = int(round(float((w.sum(axis=(0, 2)) * np.arange(w.shape[1])).sum()) / tot))
        else:
            iz, iy = w.shape[0] // 2, w.shape[1] // 2
        xz, xy = _sections(rec, iy, iz)
        gxz, gxy = _sections(gt, iy, iz)
        s = reconstruction.sampling_A
        out = {"xz_section_V": xz, "xy_section_V": xy, "truth_xz_section_V": gxz, "truth_xy_section_V": gxy,
               "voxel_A": np.asarray(s, np.float64),
               "section_y_A": float(reconstruction.origin_A[1] + s[1] * iy),
               "section_z_A": float(reconstruction.origin_A[0] + s[0] * iz)}
        ex = reconstruction.extras
        if "translations_A" in ex:
            out["translations_A"] = np.asarray(ex["translations_A"], np.float64)
        if "euler_deg" in ex:
            out["euler_deg"] = np.asarray(ex["euler_deg"], np.float64)
        truth = _true_alignment(measurement)
        if truth is not None:
            out["true_euler_deg"], out["true_translations_A"] = (np.asarray(a, np.float64) for a in truth)
        if measurement.geometry.tilt_angles_deg:
            out["tilt_angles_deg"] = np.asarray(measurement.geometry.tilt_angles_deg, np.float64)
        return out


def _true_alignment(measurement):
    """The simulated alignment (quantifiers only), if the measurement came from ``stem4d_tilt_series``."""
    try:
        from tembench_you2025.tilt_series import true_alignment
    except ImportError:  # pragma: no cover - the forward model ships with this plugin
        return None
    try:
        return true_alignment(measurement)
    except TembenchError:
        return None
