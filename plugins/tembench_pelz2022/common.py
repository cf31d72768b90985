"""Reading 4D-STEM / EER measurements: data, detector grid, probe optics and scan grid."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tembench.eer import ElectronEvents, events_of
from tembench.errors import TembenchError
from tembench.physics import constants, optics
from tembench.types import Measurement, Reconstruction
from tembench_pelz2022.eer_ops import DetectorGrid

ACCEPTS = ("4dstem", "eer")


def load_4d(measurement: Measurement, method: str):
    """(dense array or ElectronEvents, DetectorGrid) of a ``4dstem`` or ``eer`` measurement."""
    if measurement.kind == "eer":
        x: np.ndarray | ElectronEvents = events_of(measurement)
        det_shape = x.detector_shape
    elif measurement.kind == "4dstem":
        x = np.asarray(measurement.data)
        if x.ndim != 4:
            raise TembenchError(f"{method}: 4D-STEM data must be (scan_y, scan_x, k_y, k_x), got shape {x.shape}")
        det_shape = x.shape[2:]
        check_finite(x, method)
    else:
        raise TembenchError(f"{method}: accepts measurement kinds {ACCEPTS}, got {measurement.kind!r}")
    return x, DetectorGrid.from_geometry(measurement.geometry, det_shape)


def check_finite(x: np.ndarray, method: str) -> None:
    """Refuse data holding NaN or ±inf, naming the first bad frame (scan y, x) and detector pixel.

    One non-finite pixel otherwise turns the whole DPC/iCOM image (and, for inf, SSB) into NaN,
    or makes SSB report a misleading "no signal".
    """
    if np.issubdtype(x.dtype, np.integer):
        return
    bad = ~np.isfinite(x)
    if not bad.any():
        return
    n = int(bad.sum())
    frames = int(bad.any(axis=(2, 3)).sum())
    sy, sx, ky, kx = (int(i) for i in np.argwhere(bad)[0])
    raise TembenchError(f"{method}: the 4D-STEM data hold {n} non-finite value(s) in {frames} frame(s); first at "
                        f"scan (y={sy}, x={sx}), detector pixel (ky={ky}, kx={kx}) = {x[sy, sx, ky, kx]!r}. "
                        "Replace or mask them (e.g. set dead/hot detector pixels to the frame's local median) "
                        "before reconstructing")


def check_disc_calibration(x, grid, semiangle_mrad: float, method: str, tolerance: float = 2.0) -> None:
    """Refuse dense data whose measured bright-field disc radius (px) disagrees with semiangle / sampling.

    A 10x wrong detector calibration otherwise passes silently. Skipped when the expected disc does not
    fit inside the detector or is under 2 px (the measurement would not be reliable).
    """
    if not isinstance(x, np.ndarray) or x.ndim != 4:
        return
    sy, sx = grid.sampling_mrad
    expected = semiangle_mrad / math.sqrt(float(sy) * float(sx))
    mean = x.mean(axis=(0, 1), dtype=np.float64)
    peak = float(mean.max())
    if not peak > 0:
        return
    measured = math.sqrt(float((mean > 0.5 * peak).sum()) / math.pi)
    fits = 0.45 * min(x.shape[2:])
    if expected <= fits:
        bad = not (max(expected, 1.5) / tolerance <= measured <= max(expected, 1.5) * tolerance)
    else:  # the disc should (nearly) fill the detector
        bad = measured * tolerance < fits
    if bad:
        raise TembenchError(f"{method}: the measured bright-field disc radius is {measured:.1f} px, but "
                            f"semiangle {semiangle_mrad:g} mrad / detector sampling {math.sqrt(sy * sx):.4g} mrad/px "
                            f"gives {expected:.1f} px; check Geometry.detector_sampling_mrad and semiangle_mrad")


def scan_shape_of(x) -> tuple[int, int]:
    return x.scan_shape if isinstance(x, ElectronEvents) else tuple(np.shape(x)[:2])


@dataclass(frozen=True)
class ProbeOptics:
    energy_keV: float
    wavelength_A: float
    semiangle_mrad: float
    aberrations: dict  # canonical C_nm (Å) / phi_nm (rad), C10 = −defocus

    @property
    def k0_A_inv(self) -> float:
        """Bright-field disc radius α/λ (1/Å)."""
        return self.semiangle_mrad * 1e-3 / self.wavelength_A


def probe_optics(geometry, method: str, aberrations: dict | None = None, defocus_A: float | None = None) -> ProbeOptics:
    """Probe optics from the geometry; ``aberrations`` / ``defocus_A`` override what it records.

    The geometry's ``aberrations_A`` are used as they are (C10 = −Δf); if they hold no C10 the
    first of ``defocus_A`` gives it.
    """
    if geometry.energy_keV is None or geometry.semiangle_mrad is None:
        raise TembenchError(f"{method} needs Geometry.energy_keV and Geometry.semiangle_mrad (probe convergence "
                            "semiangle, mrad) from the 4D-STEM forward model")
    ab = optics.normalize_aberrations(geometry.aberrations_A if aberrations is None else aberrations)
    if "C10" not in ab and aberrations is None and geometry.defocus_A:
        ab["C10"] = optics.defocus_to_C10(geometry.defocus_A[0])
    if defocus_A is not None:
        ab["C10"] = optics.defocus_to_C10(defocus_A)
    return ProbeOptics(float(geometry.energy_keV), constants.wavelength_A(geometry.energy_keV),
                       float(geometry.semiangle_mrad), ab)


def scan_step(geometry, method: str) -> tuple[float, float]:
    s = geometry.scan_step_A
    if s is None:
        raise TembenchError(f"{method} needs Geometry.scan_step_A (probe step, Å)")
    sy, sx = (float(s), float(s)) if np.ndim(s) == 0 else (float(s[0]), float(s[1]))
    if not (sy > 0 and sx > 0):
        raise TembenchError(f"{method}: scan_step_A must be positive, got {s}")
    return sy, sx


def scan_origin(geometry) -> tuple[float, float]:
    p = geometry.scan_positions_A
    if p is None or len(p) == 0:
        return (0.0, 0.0)
    p = np.asarray(p, dtype=float).reshape(-1, 2)
    return float(p[0, 0]), float(p[0, 1])


def rotation_matrix(angle_deg: float) -> np.ndarray:
    """R(θ) acting on (y, x) vectors: a counter-clockwise rotation by θ in the (x, y) plane."""
    t = math.radians(angle_deg)
    c, s = math.cos(t), math.sin(t)
    # in (x, y): [[c, −s], [s, c]]; reordered to (y, x)
    return np.array([[c, s], [-s, c]], dtype=np.float64)


def phase_image(phase: np.ndarray, geometry, method: str, **extras) -> Reconstruction:
    """A phase reconstruction on the scan grid: sampling = scan step, origin = first probe position."""
    return Reconstruction(kind="image", data=np.asarray(phase, dtype=np.float32), sampling_A=scan_step(geometry, method),
                          quantity="phase_rad", origin_A=scan_origin(geometry), extras=extras)
