"""Multislice forward models: plane-wave HRTEM tilt × defocus series (Ren 2020 Alg. 1) and 4D-STEM
scans with batch cropping and mixed-state probes (You 2025 eqs 7–10), per tilt.

Both rotate the *atoms* about the cell centre for each tilt and build the tilted potential slices
directly (no voxel interpolation), so simulated data do not share the reconstructors' rotation
operator (no inverse crime). Conventions: Δf = −C10 (> 0 underfocus), defocus values refer to the
plane z = cell_z (the exit face of the untilted cell) whatever the tilt; images have mean 1 in
vacuum; a diffraction pattern is the fraction of the probe's electrons per detector pixel.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from tembench import ForwardModel, Geometry, Measurement, Params, hookimpl
from tembench.backend import asnumpy
from tembench.errors import TembenchError
from tembench.physics import memory
from tembench.physics.coherence import bin_image, partially_coherent_hrtem_images
from tembench.physics.grid import fft_friendly
from tembench.physics.multislice import hrtem_images
from tembench.physics.optics import normalize_aberrations
from tembench.physics.potentials import PARAMETRIZATIONS, projected_potential
from tembench.physics.prism import prism_scan, prism_window
from tembench.physics.rotation import axis_rotation_matrix, rotate_points
from tembench.physics.stem import (
    _check_probe_in_window,
    check_sampling_for_aperture,
    make_probe_modes,
    max_scattering_angle_mrad,
    scan_positions,
    scan_shape,
    stem_scan,
    window_gpts_for,
)


def _tilt_angles(params) -> list[float]:
    if params.tilt_angles_deg is not None:
        return [float(a) for a in params.tilt_angles_deg]
    if params.tilt_range_deg is not None:
        lo, hi = params.tilt_range_deg
        return [float(a) for a in np.linspace(lo, hi, params.n_tilts)]
    return [0.0]


def _field(sample, sampling_A: float, factor: int = 1):
    """Grid over the cell (y, x): n = round(cell/s)·factor pixels, sampling cell/n (keeps periodicity)."""
    return _field_of_cell(sample.cell_A, sampling_A, factor)


def _field_of_cell(cell_A, sampling_A: float, factor: int = 1):
    ny = max(1, int(round(cell_A[1] / sampling_A))) * factor
    nx = max(1, int(round(cell_A[0] / sampling_A))) * factor
    return (ny, nx), (cell_A[1] / ny, cell_A[0] / nx)


def _stem_field(cell_A, p):
    """stem4d's grid: :func:`_field_of_cell`, except that PRISM rounds each side to a multiple of its
    interpolation factor f (the nearest one; the sampling becomes cell/n as always)."""
    if p.algorithm != "prism":
        return _field_of_cell(cell_A, p.sampling_A)
    fy, fx = (int(v) for v in np.broadcast_to(np.asarray(p.prism_interpolation), (2,)))
    ny = max(fy, fy * int(round(cell_A[1] / (p.sampling_A * fy))))
    nx = max(fx, fx * int(round(cell_A[0] / (p.sampling_A * fx))))
    return (ny, nx), (cell_A[1] / ny, cell_A[0] / nx)


def _check_angles(p, sampling) -> None:
    """stem4d's angle checks on the grid it will use: the aperture and every detector inside the band limit.

    Shared by ``simulate`` and ``preflight`` (so ``tembench validate`` refuses what the run would)."""
    check_sampling_for_aperture(sampling, p.energy_keV, p.semiangle_mrad, p.band_limit)
    amax = max_scattering_angle_mrad(sampling, p.energy_keV, p.band_limit)
    for name, (inner, outer) in p.detectors.items():
        if inner is not None and inner >= amax:
            raise TembenchError(
                f"stem4d: detector {name!r} starts at {inner} mrad but sampling_A {p.sampling_A} Å keeps angles "
                f"only up to {amax:.1f} mrad; use sampling_A <= {p.sampling_A * amax / inner / 1.05:.4f} Å"
            )
        if outer is not None and outer > amax * 1.01:
            # a silently truncated annulus would under-count high-angle scattering (HAADF vs thickness)
            raise TembenchError(
                f"stem4d: detector {name!r} reaches {outer} mrad but sampling_A {p.sampling_A} Å keeps angles "
                f"only up to {amax:.1f} mrad (2/3 band limit); use sampling_A <= "
                f"{p.sampling_A * amax / outer:.4f} Å, or outer angle null (= up to {amax:.0f} mrad)"
            )


def _tilted_stack(sample, angles, axis, dz, margin_A=2.0, matrices=None, translations_xyz_A=None):
    """Rotated positions per tilt and one common slab (z0, n_slices) that holds all of them.

    ``matrices`` (n, 3, 3) replace the rotations about ``axis`` by ``angles`` (e.g. Euler angles with
    errors); ``translations_xyz_A`` (n, 3) then move the turned atoms of each tilt (stem4d_tilt_series)."""
    centre = sample.cell_A / 2.0
    if matrices is None:
        matrices = [axis_rotation_matrix(a, axis) for a in angles]
    rotated = [rotate_points(sample.positions_A, m, centre) for m in matrices]
    if translations_xyz_A is not None:
        rotated = [r + np.asarray(t, np.float64) for r, t in zip(rotated, translations_xyz_A)]
    reach = max((float(np.abs(p[:, 2] - centre[2]).max()) for p in rotated if len(p)), default=0.0) + margin_A
    reach = max(reach, sample.cell_A[2] / 2.0)
    n_slices = max(1, int(math.ceil(2 * reach / dz)))
    z0 = centre[2] - n_slices * dz / 2.0
    return rotated, z0, n_slices


def _check_common(sample, p, who):
    if p.slice_thickness_A > sample.cell_A[2]:
        raise TembenchError(
            f"{who}: slice_thickness_A {p.slice_thickness_A} Å is thicker than the sample (cell z = "
            f"{sample.cell_A[2]:.2f} Å); use slice_thickness_A <= {sample.cell_A[2]:.2f} Å (typically 1-2 Å)"
        )


def _rms(sample, params):
    if params.rms_displacement_A is not None:
        return params.rms_displacement_A
    return sample.rms_displacement_A


def _footprint_grid(upstream, sampling_A: float, factor: int = 1):
    """(ny, nx) of :func:`_field` from a sample's preflight footprint, or None when its cell is unknown."""
    if upstream is None or upstream.cell_A is None:
        return None
    return _field_of_cell(upstream.cell_A, sampling_A, factor)[0]


def _footprint_slices(upstream, angles, axis, dz) -> int:
    from tembench.preflight import tilted_extent

    return max(1, int(math.ceil((tilted_extent(upstream.cell_A, angles, axis) + 4.0) / dz)))


def _explicit_window(p, sampling):
    """The probe window a stem4d scenario fixes (window_gpts, or detector_sampling_mrad), else None."""
    if p.window_gpts is not None:
        return (p.window_gpts, p.window_gpts) if isinstance(p.window_gpts, int) else tuple(p.window_gpts)
    if p.detector_sampling_mrad is not None:
        return window_gpts_for(p.detector_sampling_mrad, sampling, p.energy_keV)
    return None


def _phonon_potentials(n_conf: int, make, prefetch: bool):
    """``make(c)`` for c = 0 … n_conf − 1, in order. With ``prefetch`` the next configuration's potential
    is built in a worker thread while the caller propagates the current one: configurations are
    independent (each has its own seed), so the potentials, and everything computed from them in
    the caller's order, are those of the plain loop."""
    if not prefetch or n_conf < 2:
        for c in range(n_conf):
            yield make(c)
        return
    pool = _prefetch_pool()
    ahead = pool.submit(make, 0)
    for c in range(n_conf):
        current = ahead.result()
        if c + 1 < n_conf:
            ahead = pool.submit(make, c + 1)
        yield current


_PREFETCH: dict = {}


def _prefetch_pool():
    """One worker thread per process, kept between calls (its FFT plans are reused); a forked child
    (the `processes` executor) makes its own, as the parent's thread does not exist there."""
    from concurrent.futures import ThreadPoolExecutor

    pid = os.getpid()
    pool = _PREFETCH.get(pid)
    if pool is None:
        _PREFETCH.clear()
        pool = _PREFETCH[pid] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tembench-potential")
    return pool


def _can_prefetch(xp, n_conf: int, potential_bytes: int, peak_bytes: int, limit) -> bool:
    """Prefetch one potential ahead (CPU only) when a second potential fits the memory limit as well."""
    from tembench.errors import ResourceError

    if xp is not np or n_conf < 2:
        return False
    try:
        memory.check_memory(peak_bytes + potential_bytes, "prefetch", "", limit)
    except ResourceError:
        return False
    return True


def _limit(p):
    return None if p.max_memory_GB is None else int(p.max_memory_GB * 2**30)


class _Common(Params):
    energy_keV: float = Field(300.0, gt=0, le=3000, description="beam energy (keV)")
    slice_thickness_A: float = Field(2.0, gt=0, le=50, description="multislice slice thickness (Å)")
    tilt_angles_deg: list[float] | None = Field(None, description="tilt angles (deg); overrides tilt_range_deg")
    tilt_range_deg: tuple[float, float] | None = Field(None, description="(first, last) tilt (deg), with n_tilts")
    n_tilts: int = Field(1, ge=1, le=2000, description="number of tilts spread evenly over tilt_range_deg")
    tilt_axis: Literal["x", "y", "z"] = Field("y", description="rotation axis of the tilt series")
    aberrations: dict[str, float] = Field(default_factory=dict,
                                          description="aberrations C12, phi12, C21, ..., C30 (Å, rad); see physics.optics")
    frozen_phonons: int = Field(0, ge=0, le=200, description="0: static lattice; N: average intensities over N "
                                "frozen-phonon configurations (sample.rms_displacement_A or rms_displacement_A)")
    rms_displacement_A: float | None = Field(None, ge=0, le=1, description="rms thermal displacement per axis (Å), "
                                             "overrides the sample's")
    phonon_seed: int = Field(0, ge=0, description="seed of the frozen-phonon configurations")
    propagator: Literal["fresnel", "exact"] = Field("fresnel", description="Fresnel or exact angular-spectrum propagator")
    band_limit: float = Field(2.0 / 3.0, gt=0, le=1, description="anti-aliasing cut-off (fraction of Nyquist)")
    bandlimit_transmission: bool = Field(True, description="band-limit each transmission function (Kirkland/abTEM)")
    parametrization: Literal[PARAMETRIZATIONS] = Field("lobato", description="atomic potential parametrisation")
    max_memory_GB: float | None = Field(None, gt=0, description="memory limit for this simulation (default: 80 % of "
                                        "available, or TEMBENCH_MAX_MEMORY_GB)")

    @model_validator(mode="after")
    def _check(self):
        normalize_aberrations(self.aberrations)
        if self.tilt_range_deg is not None and self.tilt_angles_deg is None and self.n_tilts < 1:
            raise ValueError("n_tilts must be >= 1 with tilt_range_deg")
        return self


class HRTEMTiltSeries(ForwardModel):
    """Plane-wave multislice HRTEM tilt × defocus series (Ren 2020 Alg. 1), with partial coherence and frozen phonons.

    For each tilt the atoms are rotated about the cell centre, sliced into projected potentials,
    propagated by band-limited multislice, and imaged through the objective at every defocus.
    Optional: a finer simulation grid binned to the detector pixels (Ren App. A1.1), defocus spread
    and illumination-angle spread as incoherent sums (A1.2–A1.3), frozen-phonon averaging.
    """

    name = "hrtem_tilt_series"
    produces = "hrtem_tilt_series"
    version = "1"

    class Params(_Common):
        sampling_A: float = Field(0.5, gt=0, le=5, description="detector pixel size (Å); field of view = sample cell")
        defocus_values_A: list[float] = Field(default_factory=lambda: [0.0],
                                              description="defocus Δf = −C10 (Å), > 0 underfocus, at z = cell_z")
        semiangle_mrad: float | None = Field(None, gt=0, description="objective aperture semiangle (mrad); None = none")
        focal_spread_A: float = Field(0.0, ge=0, description="rms defocus spread (Å), incoherent sum (Ren A1.2)")
        n_focal: int | None = Field(None, ge=1, le=151, description="defocus points over the spread (default: "
                                    "enough to resolve the band limit)")
        illumination_rms_mrad: float = Field(0.0, ge=0, description="rms illumination angle per axis (mrad), "
                                             "incoherent sum over beam tilts (Ren A1.3)")
        n_illumination: int = Field(3, ge=1, le=9, description="Gauss–Hermite points per axis over the angle spread")
        simulation_factor: int = Field(1, ge=1, le=8, description="simulate on a grid this many times finer, then "
                                       "average to the detector pixels (Ren A1.1)")

    @classmethod
    def preflight(cls, params, upstream=None):
        from tembench.preflight import Footprint

        p = params
        gpts = _footprint_grid(upstream, p.sampling_A, p.simulation_factor)
        if gpts is None:
            return None
        angles = _tilt_angles(p)
        n_slices = _footprint_slices(upstream, angles, p.tilt_axis, p.slice_thickness_A)
        nbytes = memory.hrtem_tilt_series_bytes(gpts, n_slices, len(angles), len(p.defocus_values_A),
                                                upstream.n_atoms or 0)
        det = _footprint_grid(upstream, p.sampling_A)
        return Footprint(
            peak_bytes=nbytes, limit_bytes=_limit(p),
            output_bytes=len(angles) * len(p.defocus_values_A) * det[0] * det[1] * 4,
            what=f"hrtem_tilt_series ({len(angles)} tilts x {len(p.defocus_values_A)} defocus, {gpts[0]} x {gpts[1]} px, "
                 f"{n_slices} slices)",
            fix="Use a coarser sampling_A, thicker slice_thickness_A, a smaller simulation_factor, fewer tilts or a "
                "smaller sample.")

    def simulate(self, sample, params, xp) -> Measurement:
        p = params
        _check_common(sample, p, self.name)
        angles = _tilt_angles(p)
        (ny, nx), det_sampling = _field(sample, p.sampling_A)
        if p.semiangle_mrad is not None:
            amax = max_scattering_angle_mrad(det_sampling, p.energy_keV, p.band_limit) * p.simulation_factor
            if p.semiangle_mrad > amax:
                raise TembenchError(
                    f"hrtem_tilt_series: the {p.semiangle_mrad} mrad objective aperture lies beyond the "
                    f"{amax:.1f} mrad the grid keeps at sampling_A {p.sampling_A} Å x simulation_factor "
                    f"{p.simulation_factor}; use a finer sampling_A or a larger simulation_factor")
        gpts, sim_sampling = _field(sample, p.sampling_A, p.simulation_factor)
        rotated, z0, n_slices = _tilted_stack(sample, angles, p.tilt_axis, p.slice_thickness_A)
        limit = None if p.max_memory_GB is None else int(p.max_memory_GB * 2**30)
        memory.check_memory(
            memory.hrtem_tilt_series_bytes(gpts, n_slices, len(angles), len(p.defocus_values_A), len(sample)),
            f"hrtem_tilt_series ({len(angles)} tilts x {len(p.defocus_values_A)} defocus, {gpts[0]}x{gpts[1]} px, "
            f"{n_slices} slices)",
            "Use a coarser sampling_A, thicker slices, a smaller simulation_factor or fewer tilts.", limit)
        z_exit = z0 + n_slices * p.slice_thickness_A
        # defocus values refer to z = cell_z: the wave there is the exit wave propagated back by (z_exit − cell_z)
        shift = z_exit - sample.cell_A[2]
        ab = normalize_aberrations(p.aberrations)
        ab["C10"] = ab.get("C10", 0.0) - shift
        rms = _rms(sample, p)
        n_conf = max(1, p.frozen_phonons) if rms is not None else 1
        data = np.zeros((len(angles), len(p.defocus_values_A), ny, nx), np.float32)
        kw = dict(energy_keV=p.energy_keV, sampling_A=sim_sampling, defocus_values_A=p.defocus_values_A,
                  aberrations=ab, semiangle_mrad=p.semiangle_mrad, propagator=p.propagator,
                  band_limit=p.band_limit, bandlimit_transmission=p.bandlimit_transmission)
        # binned detector pixel i averages fine points i·f … i·f + f − 1; shifting the atoms by half that
        # span puts its centre at i·s, where the Geometry (and every reconstructor) places it
        pixel_shift = np.array([0.5 * (p.simulation_factor - 1) * sim_sampling[1],
                                0.5 * (p.simulation_factor - 1) * sim_sampling[0], 0.0])
        prefetch = _can_prefetch(xp, n_conf, n_slices * gpts[0] * gpts[1] * 4, memory.hrtem_tilt_series_bytes(
            gpts, n_slices, len(angles), len(p.defocus_values_A), len(sample)), limit)
        for i, pos in enumerate(rotated):
            pos = pos + pixel_shift
            acc = None

            def potential(c, pos=pos, i=i):
                rng = np.random.default_rng([p.phonon_seed, i, c]) if (p.frozen_phonons and rms is not None) else None
                return projected_potential(pos, sample.numbers, gpts=gpts, sampling_A=sim_sampling,
                                           slice_thickness_A=p.slice_thickness_A,
                                           z_range_A=(z0, z0 + n_slices * p.slice_thickness_A),
                                           parametrization=p.parametrization, rms_displacement_A=rms, rng=rng, xp=xp)

            for v in _phonon_potentials(n_conf, potential, prefetch):
                if p.focal_spread_A > 0 or p.illumination_rms_mrad > 0:
                    img = partially_coherent_hrtem_images(
                        v, p.slice_thickness_A, focal_spread_A=p.focal_spread_A, n_focal=p.n_focal,
                        illumination_rms_mrad=p.illumination_rms_mrad, n_illumination=p.n_illumination, **kw)
                else:
                    img = hrtem_images(v, p.slice_thickness_A, **kw)
                acc = img if acc is None else acc + img
            data[i] = asnumpy(bin_image(acc / n_conf, p.simulation_factor))
        geometry = Geometry(
            energy_keV=p.energy_keV, sampling_A=det_sampling, tilt_angles_deg=angles, tilt_axis=p.tilt_axis,
            defocus_A=list(p.defocus_values_A), aberrations_A={k: v for k, v in normalize_aberrations(p.aberrations).items()},
            semiangle_mrad=p.semiangle_mrad, slice_thickness_A=p.slice_thickness_A,
            extra={"rotation_centre_A": (sample.cell_A / 2).tolist(), "defocus_reference_z_A": float(sample.cell_A[2]),
                   "slab_z_range_A": (float(z0), float(z_exit)),
                   "field_of_view_A": (ny * det_sampling[0], nx * det_sampling[1]),
                   "focal_spread_A": p.focal_spread_A, "illumination_rms_mrad": p.illumination_rms_mrad,
                   "simulation_factor": p.simulation_factor, "simulation_sampling_A": sim_sampling,
                   "detector_pixel_offset_A": (0.0, 0.0), "n_slices_simulated": n_slices, "propagator": p.propagator, "band_limit": p.band_limit,
                   "parametrization": p.parametrization, "frozen_phonons": n_conf if rms is not None else 0})
        return Measurement(kind="hrtem_tilt_series", data=data, axes=("tilt", "defocus", "y", "x"), geometry=geometry)


def _smatrix_bytes(p, gpts, sampling, window) -> int:
    """PRISM's scattering matrix: one complex64 field per plane wave inside the aperture (0 for multislice).

    The plane waves lie on the window's frequency grid (pixel 1/(w·s)), inside the disc of radius α/λ."""
    if p.algorithm != "prism":
        return 0
    from tembench.physics.constants import wavelength_A

    k_max = p.semiangle_mrad * 1e-3 / wavelength_A(p.energy_keV)
    n_k = math.pi * k_max**2 * (window[0] * sampling[0]) * (window[1] * sampling[1]) * 1.1 + 8  # + the soft edge
    from tembench.physics.prism import SMATRIX_BATCH_BYTES

    return int(n_k * gpts[0] * gpts[1] * 8 + 2 * SMATRIX_BATCH_BYTES)  # the matrix, a batch of plane waves


def _auto_window(field_gpts, sampling, energy_keV, semiangle_mrad, aberrations, xp):
    """Smallest FFT-friendly window (from a geometric estimate, grown ×1.25) that holds the probe."""
    lam_mrad = semiangle_mrad * 1e-3
    ab = normalize_aberrations(aberrations)
    from tembench.physics.constants import wavelength_A

    lam = wavelength_A(energy_keV)
    radius = abs(ab.get("C10", 0.0)) * lam_mrad + abs(ab.get("C30", 0.0)) * lam_mrad**3 + 4 * lam / lam_mrad
    w = [fft_friendly(max(32, int(math.ceil(2.5 * radius / s)))) for s in sampling]
    while True:
        w = [min(wi, fi) for wi, fi in zip(w, field_gpts)]
        modes = make_probe_modes(tuple(w), sampling, energy_keV, semiangle_mrad, aberrations, xp=xp)
        try:
            _check_probe_in_window(modes)
            return tuple(w)
        except TembenchError:
            if tuple(w) == tuple(field_gpts):
                raise TembenchError(
                    f"the probe ({semiangle_mrad} mrad, aberrations {aberrations}) is larger than the field of view "
                    f"{field_gpts} pixels: enlarge the sample cell (vacuum padding) or reduce the defocus"
                ) from None
            w = [fft_friendly(int(wi * 1.25) + 1) for wi in w]


class STEM4D(ForwardModel):
    """4D-STEM multislice scan (You 2025 eqs 7–10): batch-cropped probe windows, mixed-state probes, tilt series,
    virtual detectors streamed without holding the 4D array.

    ``output: patterns`` gives kind ``4dstem`` (scan_y, scan_x, k_y, k_x) or ``4dstem_tilt_series``
    with tilts; ``output: image`` integrates one virtual detector and gives ``adf_image``
    (scan_y, scan_x) (or (tilt, scan_y, scan_x)); further detectors go to ``extras["virtual_images"]``.
    """

    name = "stem4d"
    produces = "4dstem"
    # position_jitter_A is additive (default 0 = the same data bit for bit), so the version stays 1; the stage
    # cache keys change anyway with any core file (identity.component_fingerprint)
    version = "1"

    class Params(_Common):
        sampling_A: float = Field(0.1, gt=0, le=1, description="real-space pixel of the simulation grid (Å)")
        semiangle_mrad: float = Field(25.0, gt=0, le=200, description="probe-forming aperture semiangle (mrad)")
        defocus_A: float | None = Field(None, description="probe defocus Δf = −C10 (Å); overrides aberrations.C10")
        scan_step_A: float | tuple[float, float] = Field(0.5, description="scan step (Å), scalar or (y, x)")
        scan_start_A: tuple[float, float] | None = Field(None, description="first probe position (y, x) Å; default (0, 0)")
        scan_end_A: tuple[float, float] | None = Field(None, description="scan end (exclusive, y, x) Å; default the cell")
        detector_sampling_mrad: float | None = Field(None, gt=0, description="native detector pixel (mrad): sets the "
                                                     "probe window λ/(sampling·pixel); default: window from the probe size")
        window_gpts: int | tuple[int, int] | None = Field(None, description="probe window (pixels); overrides the above")
        detector_binning: int = Field(1, ge=1, le=16, description="bin b×b native detector pixels")
        detector_gpts: int | tuple[int, int] | None = Field(None, description="crop patterns to this size (after binning)")
        output: Literal["patterns", "image"] = Field("patterns", description="patterns: 4D data; image: only "
                                                     "virtual-detector images (no 4D array is held)")
        detectors: dict[str, tuple[float, float | None]] = Field(
            default_factory=lambda: {"haadf": (60.0, None)},
            description="virtual detectors {name: (inner, outer) mrad}; the first is the image for output=image")
        n_probe_modes: int = Field(1, ge=1, le=32, description="incoherent probe modes (You eq 10)")
        focal_spread_A: float = Field(0.0, ge=0, description="rms defocus spread (Å) represented by the probe modes")
        source_size_A: float = Field(0.0, ge=0, description="rms source size (Å) represented by the probe modes")
        patterns_path: str | None = Field(None, description="stream patterns to this .npy file (memory-mapped)")
        batch_size: int | None = Field(None, ge=1, description="probes per batch (default: from a 32 MB budget)")
        position_jitter_A: float = Field(0.0, ge=0, le=5, description="rms random offset (Å, per axis) of the true "
                                         "probe positions from the nominal grid, independent per position and tilt; "
                                         "the geometry records the nominal grid, the truth goes to the provenance "
                                         "(true_scan_positions_A)")
        position_jitter_seed: int = Field(0, ge=0, description="seed of the position jitter")
        algorithm: Literal["multislice", "prism"] = Field(
            "multislice", description="multislice: every probe through every slice; prism: the plane-wave "
                                      "scattering matrix (Ophus 2017), propagated once per plane wave in the "
                                      "aperture — faster for many probes; its window is the field / "
                                      "prism_interpolation")
        prism_interpolation: int | tuple[int, int] = Field(
            1, description="PRISM interpolation factor f (y, x): plane waves every f-th reciprocal pixel, "
                           "the probe window is the field / f (must divide it); f = 1 is exact multislice")

        @model_validator(mode="after")
        def _prism_window(self):
            if self.algorithm == "prism" and (self.window_gpts is not None or self.detector_sampling_mrad is not None):
                raise ValueError("algorithm: prism fixes the probe window to the field / prism_interpolation; "
                                 "leave window_gpts and detector_sampling_mrad unset (the detector pixel is "
                                 "λ/(window·sampling_A))")
            f = np.broadcast_to(np.asarray(self.prism_interpolation), (2,))
            if np.any(f < 1):
                raise ValueError(f"prism_interpolation must be >= 1, got {self.prism_interpolation}")
            return self

    @classmethod
    def output_kind(cls, params) -> str:
        if params.output == "image":
            return "adf_image"
        tilted = (params.tilt_angles_deg is not None and len(params.tilt_angles_deg) > 1) or (
            params.tilt_angles_deg is None and params.tilt_range_deg is not None)
        return "4dstem_tilt_series" if tilted else "4dstem"

    @classmethod
    def preflight(cls, params, upstream=None):
        """Peak memory from the field, slices, probe window (a lower bound when derived from the probe) and scan."""
        from tembench.preflight import Footprint

        p = params
        if upstream is None or upstream.cell_A is None:
            return None
        gpts, sampling = _stem_field(upstream.cell_A, p)
        _check_angles(p, sampling)  # refuse at validation what simulate() would refuse after the sample is built
        angles = _tilt_angles(p)
        n_slices = _footprint_slices(upstream, angles, p.tilt_axis, p.slice_thickness_A)
        if p.algorithm == "prism":
            try:
                window = prism_window(gpts, p.prism_interpolation)
            except TembenchError:
                return None  # simulate() gives the precise error
        else:
            explicit = _explicit_window(p, sampling)
            if explicit is not None and (explicit[0] > gpts[0] or explicit[1] > gpts[1]):
                raise TembenchError(
                    f"stem4d: the probe window {explicit} px is larger than the field of view {gpts} px "
                    f"({upstream.cell_A[1]:.1f} x {upstream.cell_A[0]:.1f} Å); pad the sample with vacuum, or use a "
                    "coarser detector_sampling_mrad / smaller window_gpts")
            window = explicit or (min(64, gpts[0]), min(64, gpts[1]))  # the probe's: ≥ this
        start = (0.0, 0.0) if p.scan_start_A is None else p.scan_start_A
        end = (upstream.cell_A[1], upstream.cell_A[0]) if p.scan_end_A is None else p.scan_end_A
        if np.any(np.asarray(p.scan_step_A, dtype=float) <= 0):
            return None  # simulate() gives the precise error
        sy, sx = scan_shape(start, end, p.scan_step_A)
        n_pos = sy * sx
        if p.detector_gpts is not None:
            det = (p.detector_gpts, p.detector_gpts) if isinstance(p.detector_gpts, int) else tuple(p.detector_gpts)
        else:
            det = (window[0] // p.detector_binning, window[1] // p.detector_binning)
        keep = p.output == "patterns" and p.patterns_path is None
        nbytes = memory.stem_bytes(gpts, n_slices, window, p.n_probe_modes, p.batch_size or 64, n_pos * len(angles),
                                   det[0] * det[1], keep) + _smatrix_bytes(p, gpts, sampling, window)
        out_bytes = n_pos * len(angles) * (det[0] * det[1] if p.output == "patterns" else 1) * 4
        return Footprint(
            peak_bytes=nbytes, limit_bytes=_limit(p), output_bytes=out_bytes,
            what=f"stem4d ({len(angles)} tilts x {n_pos:,} probes, {gpts[0]} x {gpts[1]} px field, {n_slices} slices, "
                 f"{det[0]} x {det[1]} px patterns)",
            fix="Use a coarser sampling_A or scan_step_A, stream the patterns to disk (patterns_path), ask for "
                "output: image, bin/crop the detector, or simulate a smaller sample.")

    def simulate(self, sample, params, xp) -> Measurement:
        p = params
        _check_common(sample, p, self.name)
        angles = _tilt_angles(p)
        kind = self.output_kind(p)
        gpts, sampling = _stem_field(sample.cell_A, p)
        ab = normalize_aberrations(p.aberrations)
        if p.defocus_A is not None:
            ab["C10"] = -float(p.defocus_A)
        _check_angles(p, sampling)
        amax = max_scattering_angle_mrad(sampling, p.energy_keV, p.band_limit)
        if p.algorithm == "prism":
            window = prism_window(gpts, p.prism_interpolation)
        else:
            window = _explicit_window(p, sampling) or _auto_window(gpts, sampling, p.energy_keV, p.semiangle_mrad,
                                                                   ab, xp)
        if window[0] > gpts[0] or window[1] > gpts[1]:
            raise TembenchError(
                f"stem4d: the probe window {window} px is larger than the field of view {gpts} px "
                f"({sample.cell_A[1]:.1f} x {sample.cell_A[0]:.1f} Å); pad the sample with vacuum, or use a coarser "
                "detector_sampling_mrad / smaller window_gpts")
        modes = make_probe_modes(window, sampling, p.energy_keV, p.semiangle_mrad, ab, n_modes=p.n_probe_modes,
                                 defocus_spread_A=p.focal_spread_A, source_size_A=p.source_size_A, xp=xp)
        start = (0.0, 0.0) if p.scan_start_A is None else p.scan_start_A
        end = (sample.cell_A[1], sample.cell_A[0]) if p.scan_end_A is None else p.scan_end_A
        grid = scan_positions(start, end, p.scan_step_A)
        sy, sx = grid.shape[:2]
        n_pos = sy * sx
        det_n = None if p.detector_gpts is None else (
            (p.detector_gpts, p.detector_gpts) if isinstance(p.detector_gpts, int) else tuple(p.detector_gpts))
        ky = det_n[0] if det_n else window[0] // p.detector_binning
        kx = det_n[1] if det_n else window[1] // p.detector_binning
        rotated, z0, n_slices = self._tilted_stack(sample, angles, p)
        keep = p.output == "patterns"
        limit = None if p.max_memory_GB is None else int(p.max_memory_GB * 2**30)
        memory.check_memory(
            memory.stem_bytes(gpts, n_slices, window, modes.shape[0], p.batch_size or 64, n_pos * len(angles), ky * kx,
                              keep and p.patterns_path is None) + _smatrix_bytes(p, gpts, sampling, window),
            f"stem4d ({len(angles)} tilts x {n_pos} probes, {window[0]}x{window[1]} window, {n_slices} slices)",
            "Stream the patterns to disk (patterns_path), ask for output: image, bin/crop the detector, or scan fewer "
            "positions.", limit)
        out = None
        tmp_path = None
        if keep and p.patterns_path is not None:
            # stream into a new file and rename it into place at the end: the stage cache hard-links the
            # finished file, and a later simulation to the same path (a sweep, a parallel worker) must
            # make a new file rather than rewrite the one a cache entry holds
            final = os.path.abspath(p.patterns_path)
            fd, tmp_path = tempfile.mkstemp(dir=os.path.dirname(final), prefix=f".{os.path.basename(final)}.",
                                            suffix=".tmp.npy")
            os.close(fd)
            out = np.lib.format.open_memmap(tmp_path, mode="w+", dtype=np.float32, shape=(len(angles), n_pos, ky, kx))
        elif keep:
            out = np.zeros((len(angles), n_pos, ky, kx), np.float32)
        try:
            return self._scan(sample, p, xp, angles, kind, gpts, sampling, ab, amax, window, modes, grid, sy, sx,
                              n_pos, det_n, ky, kx, rotated, z0, n_slices, keep, out, tmp_path)
        except BaseException:
            if tmp_path is not None and os.path.exists(tmp_path):
                os.unlink(tmp_path)
            raise

    def _tilted_stack(self, sample, angles, p):
        """Atoms per tilt and the common slab (z0, n_slices); stem4d_tilt_series adds alignment errors."""
        return _tilted_stack(sample, angles, p.tilt_axis, p.slice_thickness_A)

    def _scan(self, sample, p, xp, angles, kind, gpts, sampling, ab, amax, window, modes, grid, sy, sx, n_pos, det_n,
              ky, kx, rotated, z0, n_slices, keep, out, tmp_path) -> Measurement:
        images = {name: np.zeros((len(angles), n_pos), np.float32) for name in p.detectors}
        rms = _rms(sample, p)
        n_conf = max(1, p.frozen_phonons) if rms is not None else 1
        det_sampling = None
        limit = None if p.max_memory_GB is None else int(p.max_memory_GB * 2**30)
        prefetch = _can_prefetch(xp, n_conf, n_slices * gpts[0] * gpts[1] * 4, memory.stem_bytes(
            gpts, n_slices, window, modes.shape[0], p.batch_size or 64, n_pos * len(angles), ky * kx,
            keep and p.patterns_path is None), limit)
        # true probe positions: the nominal grid plus the jitter (geometry keeps the nominal grid)
        true_pos = grid.reshape(1, -1, 2) + position_jitter_offsets(len(angles), n_pos, p.position_jitter_A,
                                                                    p.position_jitter_seed)
        # the scan positions are in the untilted sample frame; probes scan the tilted projection in place
        for i, pos in enumerate(rotated):

            def potential(c, pos=pos, i=i):
                rng = np.random.default_rng([p.phonon_seed, i, c]) if (p.frozen_phonons and rms is not None) else None
                return projected_potential(pos, sample.numbers, gpts=gpts, sampling_A=sampling,
                                           slice_thickness_A=p.slice_thickness_A,
                                           z_range_A=(z0, z0 + n_slices * p.slice_thickness_A),
                                           parametrization=p.parametrization, rms_displacement_A=rms, rng=rng, xp=xp)

            for v in _phonon_potentials(n_conf, potential, prefetch):
                scan = stem_scan if p.algorithm == "multislice" else functools.partial(
                    prism_scan, interpolation=p.prism_interpolation)
                res = scan(v, p.slice_thickness_A, energy_keV=p.energy_keV, sampling_A=sampling,
                                positions_A=true_pos[i], probe=modes, detectors=dict(p.detectors),
                                return_patterns=False, out=out[i] if keep else None,
                                out_weight=1.0 / n_conf, detector_binning=p.detector_binning, detector_gpts=det_n,
                                batch_size=p.batch_size, propagator=p.propagator, band_limit=p.band_limit,
                                bandlimit_transmission=p.bandlimit_transmission, xp=xp)
                det_sampling = res.detector_sampling_mrad
                for name in p.detectors:
                    images[name][i] += res.images[name] / n_conf
        geometry = Geometry(
            energy_keV=p.energy_keV, sampling_A=sampling, semiangle_mrad=p.semiangle_mrad, aberrations_A=ab,
            defocus_A=[-ab.get("C10", 0.0)], scan_step_A=tuple(np.broadcast_to(np.asarray(p.scan_step_A, float), (2,))),
            scan_positions_A=grid.reshape(-1, 2), detector_sampling_mrad=det_sampling,
            slice_thickness_A=p.slice_thickness_A, tilt_angles_deg=angles, tilt_axis=p.tilt_axis,
            extra={"window_gpts": window, "detector_binning": p.detector_binning, "max_angle_mrad": amax,
                   # zero frequency sits in binned pixel n//2; with an even binning b it lies half a native
                   # pixel (0.5/b binned pixels) past that pixel's centre (physics.stem._bin_crop_indices)
                   "detector_centre_px": (ky // 2 + (0.5 / p.detector_binning if p.detector_binning % 2 == 0 else 0.0),
                                          kx // 2 + (0.5 / p.detector_binning if p.detector_binning % 2 == 0 else 0.0)),
                   "detectors_mrad": {k: list(v) for k, v in p.detectors.items()}, "n_probe_modes": modes.shape[0],
                   "focal_spread_A": p.focal_spread_A, "source_size_A": p.source_size_A,
                   "rotation_centre_A": (sample.cell_A / 2).tolist(), "n_slices_simulated": n_slices,
                   # z of the simulated stack's entrance plane (sample frame, after rotation): the probe's
                   # defocus refers to it
                   "entrance_z_A": float(z0),
                   "propagator": p.propagator, "parametrization": p.parametrization, "algorithm": p.algorithm,
                   "prism_interpolation": p.prism_interpolation if p.algorithm == "prism" else None,
                   "frozen_phonons": n_conf if rms is not None else 0})
        extras = {"virtual_images": {k: v.reshape(len(angles), sy, sx).squeeze(0) if len(angles) == 1 else
                                     v.reshape(len(angles), sy, sx) for k, v in images.items()}}
        provenance = []
        if p.position_jitter_A > 0:
            # ground truth for quantifiers (true_scan_positions_A); reconstructors get only the nominal grid
            d = true_pos - grid.reshape(1, -1, 2)
            provenance.append({"component": "stem4d_position_jitter", "rms_A": p.position_jitter_A,
                               "seed": p.position_jitter_seed, "realised_rms_A": float(np.sqrt((d**2).mean())),
                               "true_positions_A": true_pos.astype(np.float64)})
        if p.output == "image":
            first = next(iter(p.detectors))
            img = images[first].reshape(len(angles), sy, sx)
            data, axes = (img[0], ("scan_y", "scan_x")) if len(angles) == 1 else (img, ("tilt", "scan_y", "scan_x"))
            geometry.extra["image_detector"] = first
            return Measurement(kind=kind, data=data, axes=axes, geometry=geometry, extras=extras, provenance=provenance)
        if tmp_path is not None:
            out.flush()
            del out
            os.replace(tmp_path, os.path.abspath(p.patterns_path))
            out = np.load(os.path.abspath(p.patterns_path), mmap_mode="c")  # copy-on-write: the file stays as written
        data = out.reshape(len(angles), sy, sx, ky, kx)
        if kind == "4dstem":
            return Measurement(kind=kind, data=data[0], axes=("scan_y", "scan_x", "k_y", "k_x"), geometry=geometry,
                               extras=extras, provenance=provenance)
        return Measurement(kind=kind, data=data, axes=("tilt", "scan_y", "scan_x", "k_y", "k_x"), geometry=geometry,
                           extras=extras, provenance=provenance)


def position_jitter_offsets(n_tilts: int, n_pos: int, rms_A: float, seed: int) -> np.ndarray:
    """(n_tilts, n_pos, 2) offsets (y, x) Å of the true probe positions from the nominal grid: i.i.d. normal,
    ``rms_A`` per axis (zeros when 0)."""
    if rms_A <= 0:
        return np.zeros((n_tilts, n_pos, 2))
    return np.random.default_rng([int(seed), 0x5CA7]).normal(0.0, rms_A, (n_tilts, n_pos, 2))


def true_scan_positions_A(measurement) -> np.ndarray | None:
    """Ground truth for quantifiers: the true probe positions (n_tilts, N, 2) Å of a ``stem4d`` measurement
    simulated with ``position_jitter_A > 0`` (from its provenance), else None (true = nominal). Reconstructors
    must not call this: they get the nominal grid in ``geometry.scan_positions_A``."""
    for rec in reversed(getattr(measurement, "provenance", None) or []):
        if rec.get("component") == "stem4d_position_jitter":
            return np.asarray(rec["true_positions_A"], np.float64)
    return None


@hookimpl
def tembench_register_forward_models():
    return [HRTEMTiltSeries, STEM4D]
