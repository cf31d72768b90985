"""Generic baseline reconstructors."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from tembench import Params, Reconstruction, Reconstructor, hookimpl
from tembench.backend import asnumpy, fft2, ifft2
from tembench.errors import TembenchError
from tembench.physics import constants, optics
from tembench.physics.grid import spatial_frequencies


class WeakPhaseWiener(Reconstructor):
    """Weak-phase-object CTF inversion of one HRTEM image by a Wiener filter (linear imaging baseline).

    For a weak phase object φ(r) the image contrast is F[I/Ī − 1](k) = 2 A(k) E(k) sin χ(k) Φ(k);
    the phase is recovered as Φ = F[I/Ī − 1] · T*/(|T|² + ε) with T = 2 A E sin χ and ε the
    regularisation (relative to max |T|²). The mean phase (k = 0) is not transferred and is set to 0.
    """

    name = "weak_phase_wiener"
    accepts = ("hrtem_image",)
    produces = "image"
    version = "1"

    class Params(Params):
        epsilon: float = Field(0.1, gt=0, le=10, description="Wiener regularisation relative to max |2 sin χ|²")

    def reconstruct(self, measurement, params, xp) -> Reconstruction:
        g = measurement.geometry
        if g.energy_keV is None or g.sampling_A is None or not g.defocus_A:
            raise TembenchError("weak_phase_wiener needs geometry.energy_keV, sampling_A and defocus_A")
        image = xp.asarray(measurement.data, dtype=xp.float32)
        mean = float(image.mean())
        if mean <= 0:
            raise TembenchError("weak_phase_wiener: the image has no signal (mean ≤ 0)")
        contrast = image / mean - 1.0
        lam = constants.wavelength_A(g.energy_keV)
        ky, kx = spatial_frequencies(image.shape, g.sampling_A, xp=xp)
        aberr = dict(g.aberrations_A or {})
        aberr["C10"] = optics.defocus_to_C10(g.defocus_A[0])
        chi = optics.aberration_function(ky, kx, lam, aberr)
        t = 2.0 * xp.sin(chi)
        if g.semiangle_mrad is not None:
            t = t * optics.aperture(ky, kx, lam, g.semiangle_mrad)
        focal = g.extra.get("focal_spread_A", 0.0)
        if focal:
            t = t * optics.temporal_envelope(ky, kx, lam, focal)
        eps = params.epsilon * float(xp.max(t * t))
        phi_k = fft2(contrast) * t / (t * t + eps)
        phi_k[0, 0] = 0
        phase = ifft2(phi_k).real.astype(xp.float32)
        return Reconstruction(kind="image", data=asnumpy(phase), sampling_A=g.sampling_A, quantity="phase_rad")


class DirectImage(Reconstructor):
    """The recorded image itself (ADF/BF/HRTEM), optionally normalised: the baseline of incoherent imaging.

    For scanned images the sampling is the scan step and the origin the first probe position, so
    quantifiers compare it with the ground truth on the same grid. In Friedrich 2023 Table 5.1 the
    ADF image is compared with the phase methods in exactly this way.
    """

    name = "direct_image"
    accepts = ("adf_image", "hrtem_image")
    produces = "image"
    version = "1"

    class Params(Params):
        normalize: bool = Field(True, description="divide by the mean so images at different doses compare")

    def reconstruct(self, measurement, params, xp) -> Reconstruction:
        g = measurement.geometry
        data = np.asarray(measurement.data, dtype=np.float32)
        if data.ndim != 2:
            raise TembenchError(f"direct_image needs a single 2D image, got data of shape {data.shape} "
                                f"(axes {measurement.axes}); use one tilt")
        extras = {}
        if params.normalize:
            mean = float(data.mean())
            if mean > 0:
                data = data / mean
            else:  # an empty image is valid data at very low dose: keep the raw values
                extras["normalized"] = False
        if measurement.kind == "adf_image":
            if g.scan_step_A is None:
                raise TembenchError("direct_image: an adf_image needs geometry.scan_step_A")
            sampling = tuple(g.scan_step_A)
            origin = (0.0, 0.0)
            if g.scan_positions_A is not None and len(g.scan_positions_A):
                origin = tuple(float(v) for v in np.asarray(g.scan_positions_A)[0])
        else:
            sampling, origin = tuple(g.sampling_A), (0.0, 0.0)
        return Reconstruction(kind="image", data=data, sampling_A=sampling, origin_A=origin, quantity="intensity",
                              extras=extras)


@hookimpl
def tembench_register_reconstructors():
    return [WeakPhaseWiener, DirectImage]
