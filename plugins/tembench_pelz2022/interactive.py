"""Interactive SSB ("virtual focus", Pelz 2022 Fig. 2): G(k, K) once, a new focus in one pass.

    from tembench_pelz2022.interactive import InteractiveSSB
    view = InteractiveSSB.from_measurement(measurement, max_detector_px=24)
    phase = view.phase(defocus_A=120.0)          # ≪ 1 s for a 256² scan binned to 24²
    panels = view.g_panels(n=9)                   # |G(k, K)| at nine K for judging aberrations

Higher-order aberrations (Cs, coma, 3-fold …) are folded into G once (``fixed_aberrations``,
or changed later with :meth:`set_fixed_aberrations`); defocus and 2-fold astigmatism are
applied in the reduction through separable phase factors and cost no more than the
aberration-free reduction. See docs/pelz2022_interactive.md.
"""

from __future__ import annotations

import time

import numpy as np

from tembench.physics import optics
from tembench_pelz2022 import ssb
from tembench_pelz2022.common import load_4d, probe_optics, scan_step


class InteractiveSSB:
    """Holds G(k, K) of one dataset; :meth:`phase` re-runs only the aberration-dependent reduction."""

    def __init__(self, data: ssb.SSBData):
        self.data = data
        self.last_reduce_s = float("nan")

    @classmethod
    def from_measurement(cls, measurement, max_detector_px: int = 32, bin_factor: int | None = None,
                         rotation_deg: float = 0.0, fixed_aberrations: dict | None = None) -> InteractiveSSB:
        """Crop/bin (O(C) for electron events), densify the small detector and transform once."""
        x, grid = load_4d(measurement, "InteractiveSSB")
        opt = probe_optics(measurement.geometry, "InteractiveSSB")
        data = ssb.prepare(x, grid, opt, scan_step(measurement.geometry, "InteractiveSSB"), max_detector_px,
                           bin_factor, rotation_deg=rotation_deg)
        fixed = opt.aberrations if fixed_aberrations is None else fixed_aberrations
        data.set_fixed_aberrations(fixed)
        return cls(data)

    @property
    def nbytes(self) -> int:
        return int(self.data.G.nbytes)

    def set_fixed_aberrations(self, aberrations: dict) -> None:
        """Change the folded higher-order aberrations (one pass of the general χ over G)."""
        self.data.set_fixed_aberrations(aberrations)

    def phase(self, defocus_A: float | None = None, C12_A: float = 0.0, phi12_rad: float = 0.0,
              numba: bool | None = None, normalization: str = "mean") -> np.ndarray:
        """Phase (rad) for defocus Δf (Å; None: the recorded one) and 2-fold astigmatism C12/phi12."""
        ab = dict(self.data.folded)
        rec = optics.normalize_aberrations(self.data.optics.aberrations)
        ab["C10"] = rec.get("C10", 0.0) if defocus_A is None else optics.defocus_to_C10(defocus_A)
        ab["C12"], ab["phi12"] = float(C12_A), float(phi12_rad)
        t0 = time.perf_counter()
        out = self.data.phase(ab, numba=numba, normalization=normalization)
        self.last_reduce_s = time.perf_counter() - t0
        return out

    def g_panels(self, n: int = 9) -> tuple[np.ndarray, np.ndarray]:
        """|G(k, K)| (n, ny, nx) at the ``n`` scan frequencies with the largest |G| summed over the
        bright field (K ≠ 0), and their K (n, 2) in 1/Å (detector frame) — the middle panel of Fig. 2."""
        d = self.data
        ny, nx = len(d.ky), len(d.kx)
        power = np.abs(d.G).sum(axis=(2, 3)) if d.G.ndim == 4 else np.abs(d.G).sum(axis=-1)
        power[0, 0] = 0
        flat = np.argsort(power.ravel())[::-1][:n]
        a, b = np.unravel_index(flat, power.shape)
        panels = np.abs(d.G.reshape(d.G.shape[0], d.G.shape[1], ny, nx)[a, b])
        return panels, np.stack([d.KY[a, b], d.KX[a, b]], axis=1)
