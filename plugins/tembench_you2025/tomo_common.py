"""The frame shared by You 2025 part 2: joint linear tomography (Alg. 2) and end-to-end ptychographic
tomography (Alg. 3) reconstruct one volume on one grid, turned per tilt by the same operator.

Frames
------
* Sample frame: positions (x, y, z) Å; ``stem4d`` turns the atoms of tilt k about the rotation centre
  c = ``geometry.extra["rotation_centre_A"]`` (x, y, z) and scans the probes at the nominal (y, x)
  positions of the untilted frame.
* The volume V (nz, ny, nx) in V holds cubic voxels of edge s (the ptychographic reconstruction pixel);
  voxel (iz, iy, ix) sits at ``origin_A + s·(iz, iy, ix)`` (z, y, x), and the box centre
  origin + s·n/2 is c, so that :func:`tembench.physics.rotation.euler_rotate` (which turns about n/2
  in voxel units) turns about the same point as the simulation.
* Alignment of tilt k: Euler angles Θ_k = (rot, tilt, psi) degrees (RELION ZYZ, You eq 11; the nominal
  tilt θ_k about y is (0, θ_k, 0)) and a translation τ_k = (τ_y, τ_x) Å of the projection:
  projection_k(r) = P[R_{Θ_k} V](r − τ_k) — the content moves by +τ_k (You eq 12, A_{0,τ} B_N A_{Θ,0}).
  In the ptychographic model a shift of the object by +τ is a shift of the probe positions by −τ.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from tembench.backend import fft2, get_array_module, ifft2
from tembench.errors import TembenchError
from tembench.physics.grid import spatial_frequencies
from tembench.physics.rotation import bin_slices, bin_slices_adjoint, euler_rotate, euler_rotate_adjoint


@dataclass(frozen=True)
class TomoGrid:
    """Voxel grid of the reconstructed volume: ``shape`` (nz, ny, nx), cubic ``voxel_A``, ``origin_A``
    (z, y, x) of voxel 0 in the sample frame; its centre origin + s·n/2 is the rotation centre."""

    shape: tuple[int, int, int]
    voxel_A: float
    origin_A: tuple[float, float, float]

    @property
    def centre_A(self) -> tuple[float, float, float]:
        return tuple(o + self.voxel_A * n / 2.0 for o, n in zip(self.origin_A, self.shape))

    @property
    def origin_yx_A(self) -> tuple[float, float]:
        return self.origin_A[1], self.origin_A[2]


def rotation_centre_zyx_A(geometry) -> tuple[float, float, float]:
    """The tilt series' rotation centre (z, y, x) Å from ``geometry.extra['rotation_centre_A']`` (x, y, z)."""
    c = (geometry.extra or {}).get("rotation_centre_A")
    if c is None:
        raise TembenchError("tomography needs geometry.extra['rotation_centre_A'] (x, y, z) Å, the point the "
                            "tilt series turns about (recorded by stem4d / stem4d_tilt_series)")
    x, y, z = (float(v) for v in c)
    return z, y, x


def tomo_grid(field_gpts, voxel_A: float, rotation_centre_zyx_A, nz: int | None = None) -> TomoGrid:
    """Grid of (ny, nx) = ``field_gpts`` lateral voxels (and ``nz`` = max(ny, nx) along the beam by
    default) of edge ``voxel_A``, centred on the rotation centre (z, y, x) Å."""
    ny, nx = (int(n) for n in field_gpts)
    nz = max(ny, nx) if nz is None else int(nz)
    if min(nz, ny, nx) < 2:
        raise TembenchError(f"tomography grid ({nz}, {ny}, {nx}) is too small")
    s = float(voxel_A)
    if not s > 0:
        raise TembenchError(f"voxel_A must be > 0, got {voxel_A}")
    origin = tuple(float(c) - s * n / 2.0 for c, n in zip(rotation_centre_zyx_A, (nz, ny, nx)))
    return TomoGrid(shape=(nz, ny, nx), voxel_A=s, origin_A=origin)


def nominal_euler_deg(geometry) -> np.ndarray:
    """(n_tilts, 3) Euler angles (rot, tilt, psi) deg of the nominal tilts: (0, θ, 0) about y, (90, θ, −90)
    about x (R_z(−90) R_y(θ) R_z(90) is the rotation by θ about +x)."""
    angles = geometry.tilt_angles_deg
    if not angles:
        raise TembenchError("tomography needs geometry.tilt_angles_deg (a tilt series)")
    axis = geometry.tilt_axis or "y"
    a = np.asarray(angles, np.float64)
    z = np.zeros_like(a)
    if axis == "y":
        return np.stack([z, a, z], axis=1)
    if axis == "x":
        return np.stack([z + 90.0, a, z - 90.0], axis=1)
    raise TembenchError(f"tomography: tilt_axis must be 'x' or 'y', got {axis!r}")


def fourier_shift(image, shift_yx_A, sampling_A: float, xp=None, derivatives: bool = False):
    """``image`` (…, ny, nx) with its content moved by +shift (y, x) Å by a Fourier phase ramp (periodic), in the
    image's precision (complex128 for float64/complex128 input, else complex64); a real image stays real. With
    ``derivatives``: also ∂/∂shift_y, ∂/∂shift_x (per Å) of the shifted image, stacked (2, …). Unitary; its
    adjoint is the shift by −shift."""
    xp = xp or get_array_module(image)
    ny, nx = image.shape[-2:]
    ky, kx = spatial_frequencies((ny, nx), (sampling_A, sampling_A), xp=xp)
    ctype = xp.complex128 if image.dtype in (np.float64, np.complex128) else xp.complex64
    ky = ky.astype(np.float64)
    kx = kx.astype(np.float64)
    dy, dx = float(shift_yx_A[0]), float(shift_yx_A[1])
    f = fft2(xp.asarray(image, ctype)) * xp.exp(-2j * math.pi * (ky * dy + kx * dx)).astype(ctype)

    def back(spec):
        out = ifft2(spec)
        return out.astype(image.dtype) if xp.iscomplexobj(image) else out.real.astype(image.dtype)

    if not derivatives:
        return back(f)
    return back(f), xp.stack([back(f * (-2j * math.pi * ky).astype(ctype)),
                              back(f * (-2j * math.pi * kx).astype(ctype))])


def shift_image(image, shift_yx_A, sampling_A: float, xp=None):
    """:func:`fourier_shift` without derivatives; a zero shift returns a copy (no FFT round trip)."""
    if float(shift_yx_A[0]) == 0.0 and float(shift_yx_A[1]) == 0.0:
        return image.copy()
    return fourier_shift(image, shift_yx_A, sampling_A, xp)


def resample_to_grid(image, image_origin_yx_A, grid: TomoGrid, xp=None):
    """An image (ny, nx) whose pixel i sits at ``image_origin_yx_A`` + i·s, resampled (Fourier shift) onto the
    lateral pixels of ``grid`` (same shape and pixel size)."""
    if tuple(image.shape[-2:]) != tuple(grid.shape[1:]):
        raise TembenchError(f"resample_to_grid: image {image.shape[-2:]} and grid {grid.shape[1:]} differ in shape")
    d = (float(image_origin_yx_A[0]) - grid.origin_A[1], float(image_origin_yx_A[1]) - grid.origin_A[2])
    return shift_image(image, d, grid.voxel_A, xp)


def slabs(volume, euler_deg, n_bin: int, voxel_A: float, xp=None):
    """Projected-potential slabs (⌈nz/n_bin⌉, ny, nx) V·Å of the volume (V) turned by ``euler_deg``:
    s · B_{n_bin} A_{Θ,0} V (You eqs 12, 14). ``n_bin = nz`` gives the projection (one slab)."""
    return float(voxel_A) * bin_slices(euler_rotate(volume, euler_deg, xp=xp), n_bin, xp=xp)


def slabs_adjoint(grad_slabs, euler_deg, n_bin: int, voxel_A: float, nz: int, xp=None):
    """Exact adjoint of :func:`slabs`: s · A_Θ† B_{n_bin}† (a gradient w.r.t. the slabs → w.r.t. V)."""
    return float(voxel_A) * euler_rotate_adjoint(bin_slices_adjoint(grad_slabs, n_bin, nz, xp=xp), euler_deg, xp=xp)


def tilt_measurement(measurement, k: int):
    """Tilt k of a ``4dstem_tilt_series`` as a ``4dstem`` measurement (same geometry with the one tilt;
    ``extras['pattern_mask']`` kept — it is the same for every tilt)."""
    if measurement.kind != "4dstem_tilt_series":
        raise TembenchError(f"expected a '4dstem_tilt_series' measurement, got {measurement.kind!r}")
    g = measurement.geometry
    n = np.shape(measurement.data)[0]
    if not 0 <= k < n:
        raise TembenchError(f"tilt index {k} outside 0..{n - 1}")
    geo = dataclasses.replace(g, tilt_angles_deg=[g.tilt_angles_deg[k]] if g.tilt_angles_deg else None,
                              extra=dict(g.extra or {}))
    extras = {}
    if "pattern_mask" in measurement.extras:
        extras["pattern_mask"] = measurement.extras["pattern_mask"]
    return measurement.replace(kind="4dstem", data=measurement.data[k], axes=measurement.axes[1:], geometry=geo,
                               extras=extras, provenance=[])


def msp_tilt_series(measurement, msp_params, xp=np, progress=None):
    """Multislice ptychography (Alg. 1) of every tilt: step 1 of You's sequential workflow.

    Returns a list of (``MSPResult``, indices of the patterns used) per tilt; all tilts share the nominal scan,
    so their object fields share one grid (the whole scan lays it out, also for a masked subset).
    """
    from tembench_you2025.msp import MSPParams, present_patterns, reconstruct_msp

    p = msp_params if isinstance(msp_params, MSPParams) else MSPParams(**(msp_params or {}))
    n = np.shape(measurement.data)[0]
    all_pos = np.asarray(measurement.geometry.scan_positions_A, np.float64).reshape(-1, 2)
    out = []
    for k in range(n):
        m = tilt_measurement(measurement, k)
        patterns, pos, present, _ = present_patterns(m, "msp")
        res = reconstruct_msp(patterns, pos, m.geometry, p, xp=xp, frame_positions_A=all_pos)
        out.append((res, present))
        if progress is not None:
            progress(k + 1, n)
    return out
