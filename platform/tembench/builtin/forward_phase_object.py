"""Single-slice phase-object HRTEM image: the simplest physically correct forward model.

ψ_exit = exp(iσ V_proj) for a plane wave (projection approximation, no propagation inside the
sample), imaged through the objective CTF: I = |F⁻¹[F[ψ_exit] · A(k) E(k) exp(−iχ(k))]|².
Valid for thin samples (thickness ≪ 1/(λ k_max²)); for thick ones use ``hrtem_tilt_series``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from tembench import ForwardModel, Geometry, Measurement, Params, hookimpl
from tembench.backend import asnumpy, fft2, ifft2
from tembench.physics import constants, optics
from tembench.physics.grid import spatial_frequencies
from tembench.physics.potentials import PARAMETRIZATIONS, projected_potential


class PhaseObjectImage(ForwardModel):
    """Plane-wave HRTEM image of a thin sample in the phase-object approximation (one slice, objective CTF)."""

    name = "phase_object"
    produces = "hrtem_image"
    version = "1"

    class Params(Params):
        energy_keV: float = Field(300.0, gt=0, le=3000, description="beam energy (keV)")
        sampling_A: float = Field(0.2, gt=0, le=2.0, description="pixel size (Å); the field of view is the sample cell")
        defocus_A: float = Field(100.0, description="defocus Δf = −C10 (Å), > 0 underfocus")
        Cs_A: float = Field(0.0, description="spherical aberration C30 (Å)")
        semiangle_mrad: float | None = Field(30.0, gt=0, description="objective aperture semiangle (mrad); None = none")
        focal_spread_A: float = Field(0.0, ge=0, description="rms focal spread (Å), temporal-coherence envelope")
        parametrization: Literal[PARAMETRIZATIONS] = Field("lobato", description="atomic potential parametrisation")

    @classmethod
    def preflight(cls, params, upstream=None):
        from tembench.preflight import Footprint

        if upstream is None or upstream.cell_A is None:
            return None
        nx = max(1, int(round(upstream.cell_A[0] / params.sampling_A)))
        ny = max(1, int(round(upstream.cell_A[1] / params.sampling_A)))
        # potential slab + complex wave, its spectrum, CTF and frequency grids; structure factors per atom row
        nbytes = ny * nx * (4 + 5 * 8) + min(upstream.n_atoms or 0, 2**20) * (ny + nx) * 8
        return Footprint(peak_bytes=nbytes, what=f"phase_object ({ny} x {nx} px)", output_bytes=ny * nx * 4,
                         fix="Use a coarser sampling_A or a smaller sample.")

    def simulate(self, sample, params, xp) -> Measurement:
        nx = int(round(sample.cell_A[0] / params.sampling_A))
        ny = int(round(sample.cell_A[1] / params.sampling_A))
        sampling = (sample.cell_A[1] / ny, sample.cell_A[0] / nx)
        v = projected_potential(sample.positions_A, sample.numbers, gpts=(ny, nx), sampling_A=sampling,
                                parametrization=params.parametrization, xp=xp).sum(axis=0)
        sigma = constants.interaction_constant(params.energy_keV)
        lam = constants.wavelength_A(params.energy_keV)
        psi = xp.exp(1j * sigma * v.astype(xp.float32)).astype(xp.complex64)
        ky, kx = spatial_frequencies((ny, nx), sampling, xp=xp)
        aberr = {"C10": optics.defocus_to_C10(params.defocus_A), "C30": params.Cs_A}
        h = optics.ctf(ky, kx, lam, aberr, params.semiangle_mrad, focal_spread_A=params.focal_spread_A)
        image = xp.abs(ifft2(fft2(psi) * h)) ** 2
        geometry = Geometry(energy_keV=params.energy_keV, sampling_A=sampling, defocus_A=[params.defocus_A],
                            aberrations_A={"C30": params.Cs_A}, semiangle_mrad=params.semiangle_mrad,
                            extra={"focal_spread_A": params.focal_spread_A, "field_of_view_A": (ny * sampling[0], nx * sampling[1])})
        return Measurement(kind="hrtem_image", data=asnumpy(image).astype(np.float32), axes=("y", "x"),
                           geometry=geometry)


@hookimpl
def tembench_register_forward_models():
    return [PhaseObjectImage]
