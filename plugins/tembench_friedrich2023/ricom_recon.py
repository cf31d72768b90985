"""The ``ricom`` reconstructor (Friedrich 2023 ch. 3): riCOM of a 4D-STEM or electron-event measurement.

The COM field, the bad-pixel handling and the orientation estimate are the Pelz plugin's (the same
code as its ``icom``/``dpc``): only the integration differs — a finite (optionally band-filtered)
kernel instead of the Fourier integrator. The reconstructor runs the batch form
(:func:`tembench_friedrich2023.ricom.ricom_image`, FFT); :class:`~tembench_friedrich2023.ricom.RiCOM`
is the live form and gives the same image (tests).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tembench import Params, Reconstructor
from tembench.errors import TembenchError
from tembench_pelz2022.common import ACCEPTS, load_4d, phase_image, probe_optics, scan_step
from tembench_pelz2022.dpc import checked_gradient_field, resolve_orientation


class RiCOMReconstructor(Reconstructor):
    """riCOM (eq 3.4): the COM shift field cross-correlated with an n×n kernel (a/2π)(r_p − r)/|r_p − r|²,
    optionally with a built-in band-pass (eqs 3.8–3.9). Output: a high-passed |P|² ⋆ φ in rad on the scan
    grid (the kernel suppresses frequencies below ≈ 1/(n·step), eq 3.7; kernel → ∞ gives iCOM)."""
    runs_numba_kernels = True  # numba kernels from the first call (preflight counts numba's memory)

    name = "ricom"
    accepts = ACCEPTS
    produces = "image"
    version = "2"
    depends_on = ("tembench_pelz2022",)  # the COM, orientation and bad-pixel code it reuses (identity)

    class Params(Params):
        kernel_size: int = Field(21, ge=3, le=4097, description="kernel width n in scan pixels (odd; the thesis's Fig. 3.6 uses 21 and 61)")
        k_min_per_A: float | None = Field(None, ge=0, description="band-pass lower cut-off k_min (cycles/Å; eq 3.9); None = no high-pass. FFT index on an N-pixel scan = k·N·step_A")
        k_max_per_A: float | None = Field(None, gt=0, description="band-pass upper cut-off k_max (cycles/Å); None = no low-pass")
        rotation_deg: float | None = Field(None, ge=-360, le=360, description="detector rotation vs scan (deg, COM_scan = R(θ) T COM_det, the Pelz convention); None = estimate (minimum curl; 180° branch by the phase's positive correlation with the dark-field counts, positive skew without dark-field signal — as icom)")
        transpose: bool | None = Field(None, description="detector transposed vs the scan; None = estimate with the rotation (with rotation_deg given: False)")
        bad_pixels: Literal["repair", "refuse", "ignore"] = Field("repair", description="hot/dead detector pixels (dense data), as the Pelz COM methods")
        normalize: Literal["frame", "mean"] = Field("frame", description="COM denominator: each pattern's counts, or the mean counts over the scan")
        reference: Literal["center", "mean"] = Field("center", description="COM origin: the detector centre, or the scan's mean COM")
        numba: bool | None = Field(None, description="numba kernels for the COM (default: when installed)")

    def reconstruct(self, measurement, params, xp):
        from tembench_friedrich2023.ricom import make_kernel, ricom_image  # numba: not at `tembench list`

        n = params.kernel_size
        if n % 2 == 0:
            raise TembenchError(f"ricom: kernel_size must be odd (a window centred on the probe position), got {n}")
        x, grid = load_4d(measurement, self.name, check=False)  # the finite check is made in the COM pass
        g = measurement.geometry
        opt = probe_optics(g, self.name)
        # the Pelz COM pass (as icom/dpc): COM, bad pixels and the dark-field counts (beyond 1.2 α) in one read;
        # the dark field decides the 180° branch of an estimated rotation (the skew of the phase, the fallback,
        # took the wrong branch at ~20 e/pattern: friedrich2023_ricom on a 73×63 scan, docs/ricom.md)
        gy, gx, bad, dark = checked_gradient_field(x, grid, opt.wavelength_A, opt.semiangle_mrad, self.name,
                                                   params.normalize, params.reference, params.numba,
                                                   params.bad_pixels)
        step = scan_step(g, self.name)
        o = resolve_orientation(gy, gx, step, params.rotation_deg, params.transpose, dark_field=dark)
        uy, ux = make_kernel(n, step, params.k_min_per_A, params.k_max_per_A, grid_shape=gy.shape)
        img = ricom_image(o["gy"], o["gx"], uy, ux)
        extras = {"rotation_deg": o["rotation_deg"], "transpose": o["transpose"], "curl_fraction": o["curl_fraction"],
                  **({"rotation_branch": o["branch"]} if "branch" in o else {}),
                  "kernel_size": n, "k_min_per_A": params.k_min_per_A, "k_max_per_A": params.k_max_per_A,
                  **(bad.report() if bad is not None else {})}
        return phase_image(img - img.mean(), g, self.name, **extras)
