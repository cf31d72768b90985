"""The reconstruction's forward model and its gradient (Ren 2020 Algs. 1–2, eqs 1–5, App. A3–A4).

For tilt θ_k the volume V (nz, ny, nx) in V is rotated and binned into N_B-voxel slabs,
W_k = s_z · B_{N_B}{R_{θ_k}[V]} (V·Å), propagated through by multislice, imaged at every
defocus, and compared with the measured amplitudes (eq 5). The gradient w.r.t. V is
s_z · R†_{θ_k} B†_{N_B} ∇_W e_k (Alg. 3 line 10), using the physics core's exact adjoints.

Frames. Voxel (iz, iy, ix) sits at ``origin_A + (iz·s_z, iy·s_y, ix·s_x)`` in the sample frame
(as ``Sample.potential_volume``): the lateral grid is the detector grid (pixel i at i·s), and
the z grid is centred on the tilt-series rotation centre, so that ``physics.rotation.rotate``
(which turns about the box centre n/2) turns about the same point as the forward model. The
voxel along z equals the detector pixel along the in-plane partner of the tilt axis (x for a
tilt about y), because the rotation works in voxel units.

Slab placement. Each binned slab acts as one phase screen at its centre (not at its entrance),
followed by propagation to the next centre; the last propagation ends at the bottom face of the
volume, and the defocus reference plane of the measurement is reached by adding the remaining
distance to C10. This removes the half-slab (2.5 Å at N_B = 10) depth bias of entrance screens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from tembench.backend import get_array_module, plan_fft2
from tembench.errors import TembenchError
from tembench.physics.constants import interaction_constant, wavelength_A
from tembench.physics.multislice import (
    amplitude_loss,
    defocus_ctfs,
    multislice,
    multislice_backward,
    plane_wave,
    transmission_function,
)
from tembench.physics.grid import spatial_frequencies
from tembench.physics.optics import fourier_shift_phase, normalize_aberrations
from tembench.physics.rotation import rotate_bin_operator

PARTNER = {"y": 2, "x": 1}    # volume axis whose pixel size the z voxel must match
# Storage order of the volume: the tilt axis last. Rotation and binning act plane by plane with
# the tilt axis as the batch of one sparse product per tilt (TiltSeriesProblem.rotate_bin_operator);
# storing (z, x, y) for a tilt about y makes that batch contiguous, so no transposing copy of the
# volume is made (rotate at 96³: 0.5 ms stored vs 2.5 ms from a (z, y, x) C array).
STORAGE = {"y": (0, 2, 1), "x": (0, 1, 2)}


def to_storage(volume_zyx, axis: str, xp=np):
    """Contiguous copy of a (z, y, x) volume in the storage order of ``axis`` (tilt axis last)."""
    return xp.ascontiguousarray(volume_zyx.transpose(STORAGE[axis]))


def zyx_view(stored, axis: str):
    """(z, y, x) view of a volume held in the storage order of ``axis`` (the permutation is an involution)."""
    return stored.transpose(STORAGE[axis])


@dataclass
class TiltSeriesProblem:
    """Everything the reconstruction needs to evaluate eq 5 and its gradient for one data set."""

    shape: tuple[int, int, int]                # (nz, ny, nx)
    voxel_A: tuple[float, float, float]        # (s_z, s_y, s_x)
    origin_A: tuple[float, float, float]       # position of voxel 0 (z, y, x) in the sample frame
    energy_keV: float
    tilt_angles_deg: list[float]
    tilt_axis: str
    defocus_A: list[float]
    slice_binning: int
    slab_distances_A: np.ndarray               # propagation after each binned slab (Å)
    ctfs: object                               # (n_defocus, ny, nx) complex64, defocus reference folded in
    propagator: str = "exact"
    band_limit: float | None = None
    extra: dict = field(default_factory=dict)
    _operators: dict = field(default_factory=dict, repr=False, compare=False)

    def rotate_bin_operator(self, k: int, xp=np):
        """Fused B_{N_B} ∘ R_{θ_k} of tilt k (``physics.rotation.rotate_bin_operator``), built once per problem.

        Acts on the storage-ordered volume reshaped to (nz·nb, n_axis); its transpose is the exact
        adjoint. Memory for a whole series: :meth:`operator_bytes` (8 bytes per weight, ≤ 4·nz·nb
        weights per tilt; 60 tilts at 96³: 9 MB = 1.3 complex volumes at N_B = 10, 17 MB = 2.5 at N_B = 1).
        """
        key = (int(k), xp.__name__)
        m = self._operators.get(key)
        if m is None:
            m = self._operators.get((int(k), "numpy"))
            if m is None:
                m = rotate_bin_operator(self.shape, self.tilt_angles_deg[k], self.tilt_axis, self.slice_binning)
                self._operators[(int(k), "numpy")] = m
            if xp is not np:  # pragma: no cover - GPU
                import cupyx.scipy.sparse as csp

                m = csp.csr_matrix(m)
                self._operators[key] = m
        return m

    def operator_bytes(self) -> int:
        """Bytes held by the cached rotate-and-bin operators (host copies)."""
        return sum(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes
                   for (k, name), m in self._operators.items() if name == "numpy" and isinstance(k, int))

    @property
    def sigma(self) -> float:
        """Interaction constant σ (rad/(V·Å))."""
        return interaction_constant(self.energy_keV)

    @property
    def n_slabs(self) -> int:
        return len(self.slab_distances_A)

    @property
    def sampling_yx(self) -> tuple[float, float]:
        return self.voxel_A[1], self.voxel_A[2]

    def lipschitz_per_tilt(self) -> float:
        """Curvature bound of one tilt's eq-5 term w.r.t. V (1/V²): 2·N_f·(σ s_z)²·N_B.

        Weak-phase bound: d|ψ_j|/dφ has norm ≤ 1 per defocus image, φ = σ s_z Σ_{N_B voxels} V.
        """
        return 2.0 * len(self.defocus_A) * (self.sigma * self.voxel_A[0]) ** 2 * self.slice_binning


def detector_offset_A(geometry) -> tuple[float, float]:
    """Where detector pixel i sits, minus i·s (y, x) Å, as the forward model recorded it.

    ``hrtem_tilt_series`` centres its binned pixels at i·s also when it simulates on a finer grid
    and records ``extra["detector_pixel_offset_A"] = (0, 0)``; data from a detector whose pixels
    sit elsewhere say so in the same field. Absent, pixels are taken to sit at i·s.
    """
    oy, ox = (geometry.extra or {}).get("detector_pixel_offset_A") or (0.0, 0.0)
    return float(oy), float(ox)


def build_problem(measurement, *, slice_binning: int = 10, thickness_A: float | None = None,
                  propagator: str = "exact", band_limit: float | None = None, pixel_offset_A=None,
                  xp=np) -> TiltSeriesProblem:
    """Reconstruction grid and optics from a ``hrtem_tilt_series`` measurement's Geometry.

    ``pixel_offset_A`` (y, x): detector pixel centres relative to i·s; None infers it
    (:func:`detector_offset_A`). It is applied as a sub-pixel shift of the image waves, folded into
    the transfer functions, so the volume stays on the i·s grid that the rotation centre needs.
    """
    g = measurement.geometry
    data = measurement.data
    if np.ndim(data) != 4:
        raise TembenchError(f"ren2020_multislice_aet: expected data (n_tilt, n_defocus, ny, nx), got shape "
                            f"{np.shape(data)}; use the hrtem_tilt_series forward model")
    n_tilt, n_def, ny, nx = np.shape(data)
    if g.energy_keV is None or g.sampling_A is None:
        raise TembenchError("ren2020_multislice_aet: the measurement Geometry lacks energy_keV or sampling_A")
    angles = [float(a) for a in (g.tilt_angles_deg or [0.0])]
    defocus = [float(d) for d in (g.defocus_A or [0.0])]
    if len(angles) != n_tilt or len(defocus) != n_def:
        raise TembenchError(f"ren2020_multislice_aet: data has {n_tilt} tilts × {n_def} defocus values but the "
                            f"Geometry lists {len(angles)} tilt angles and {len(defocus)} defocus values")
    axis = g.tilt_axis or "y"
    if axis not in PARTNER:
        raise TembenchError(f"ren2020_multislice_aet: tilt_axis must be 'x' or 'y' (a tilt series turns the sample "
                            f"about an axis normal to the beam); got {axis!r}")
    sy, sx = (float(g.sampling_A), float(g.sampling_A)) if np.ndim(g.sampling_A) == 0 else map(float, g.sampling_A)
    sz = sx if PARTNER[axis] == 2 else sy
    extra = g.extra or {}
    centre = extra.get("rotation_centre_A")                      # (x, y, z)
    cx, cy = nx * sx / 2.0, ny * sy / 2.0
    if centre is not None:
        cx_g, cy_g, cz = (float(c) for c in centre)
        lateral = {"y": [(cx_g, cx, "x")], "x": [(cy_g, cy, "y")]}[axis]
        for got, want, name in lateral:
            if abs(got - want) > 0.25 * sx:
                raise TembenchError(
                    f"ren2020_multislice_aet: the tilt series turns about {name} = {got:.3f} Å but the reconstruction "
                    f"grid turns about the field-of-view centre {name} = {want:.3f} Å; only centred tilt series "
                    "are supported")
    else:
        cz = (thickness_A or nx * sz) / 2.0
    if thickness_A is None:
        thickness_A = 2.0 * cz if centre is not None else nx * sz
    nz = max(1, int(round(thickness_A / sz)))
    z0 = cz - nz * sz / 2.0                                        # voxel 0 sits at z0: rotate() turns about nz/2
    z_ref = float(extra.get("defocus_reference_z_A", 2.0 * cz))

    n_bin = int(slice_binning)
    if n_bin < 1:
        raise TembenchError(f"ren2020_multislice_aet: slice_binning must be >= 1; got {slice_binning}")
    counts = np.full(-(-nz // n_bin), n_bin)
    counts[-1] = nz - (len(counts) - 1) * n_bin
    top = z0 - sz / 2.0
    edges = top + np.concatenate([[0], np.cumsum(counts)]) * sz
    centres = 0.5 * (edges[:-1] + edges[1:])
    bottom = edges[-1]
    dist = np.append(np.diff(centres), bottom - centres[-1])

    ab = normalize_aberrations(g.aberrations_A)
    # the exit wave is at `bottom`; the measured defocus refers to z_ref (Δf = −C10 convention)
    ab["C10"] = ab.get("C10", 0.0) - (bottom - z_ref)
    ctfs = defocus_ctfs((ny, nx), (sy, sx), g.energy_keV, defocus, ab, g.semiangle_mrad, xp)
    offset = detector_offset_A(g) if pixel_offset_A is None else tuple(float(o) for o in pixel_offset_A)
    if any(offset):
        ky, kx = spatial_frequencies((ny, nx), (sy, sx), xp=xp, dtype=np.float64)
        ctfs = ctfs * fourier_shift_phase(ky, kx, (-offset[0], -offset[1]))[None]   # pixel i shows i·s + offset
    return TiltSeriesProblem(
        shape=(nz, ny, nx), voxel_A=(sz, sy, sx), origin_A=(z0, 0.0, 0.0), energy_keV=float(g.energy_keV),
        tilt_angles_deg=angles, tilt_axis=axis, defocus_A=defocus, slice_binning=n_bin, slab_distances_A=dist,
        ctfs=ctfs, propagator=propagator, band_limit=band_limit,
        extra={"defocus_reference_z_A": z_ref, "pixel_offset_A": offset, "exit_plane_z_A": float(bottom),
               "wavelength_A": wavelength_A(g.energy_keV)})


def measured_intensities(measurement, k: int, xp=np):
    """I of tilt k (n_defocus, ny, nx) float32, counts converted back to intensity (mean 1 in vacuum)."""
    img = xp.asarray(np.asarray(measurement.data[k], dtype=np.float32))
    if measurement.counted:
        n_e = float((measurement.geometry.extra or {}).get("electrons_per_unit_intensity", math.nan))
        if not (n_e > 0 and math.isfinite(n_e)):
            raise TembenchError("ren2020_multislice_aet: counted data without Geometry.extra"
                                "['electrons_per_unit_intensity']; apply dose noise with poisson_dose")
        img = img * np.float32(1.0 / n_e)
    return img


def tilt_loss_and_gradient(volume, intensities, k: int, problem: TiltSeriesProblem, xp=None,
                           want_gradient: bool = True, step: float | None = None):
    """Eq 5 for tilt k and its gradient w.r.t. the volume (Alg. 3 lines 4–10 without the update).

    ``volume`` is indexed (z, y, x) (any memory layout; a :func:`zyx_view` of storage-ordered
    memory is fastest); ``intensities`` = I_k (n_defocus, ny, nx). Returns ``(loss, grad)`` with
    grad (nz, ny, nx) float32 in 1/V, a :func:`zyx_view` of storage-ordered memory (None if not
    ``want_gradient``). Rotation and binning are one sparse product per tilt
    (:meth:`TiltSeriesProblem.rotate_bin_operator`) on the storage-ordered volume.

    ``step`` = α (V²): instead of returning the gradient, take the gradient step V ← V − α·grad in
    place (``volume`` must then be a :func:`zyx_view` of C-contiguous storage) and return
    ``(loss, None)``: the adjoint product accumulates straight into the volume (Alg. 3 line 10).
    """
    xp = xp or get_array_module(volume)
    p = problem
    axis = p.tilt_axis
    perm = STORAGE[axis]
    nz, ny, nx = volume.shape
    stored = xp.ascontiguousarray(volume.transpose(perm))                   # a view when already stored
    _, nb, nt = stored.shape
    m = p.rotate_bin_operator(k, xp)
    sz = np.float32(p.voxel_A[0])
    w = rotate_bin_apply(m, stored, axis, sz, xp)                           # s_z B_N R_θ V (V·Å), (z, y, x)
    # t_m = exp(iσ W_m) once per tilt, shared by the forward pass and its adjoint (no band limit on t)
    t = transmission_function(w, p.sigma, xp)
    del w
    kw = dict(energy_keV=p.energy_keV, sampling_A=p.sampling_yx, propagator=p.propagator,
              band_limit=p.band_limit, bandlimit_transmission=False, xp=xp)
    res = multislice(plane_wave(volume.shape[1:], xp), p.slab_distances_A, transmissions=t,
                     keep_waves=want_gradient, **kw)
    psi = _image_waves(res.exit_wave, p, xp)
    loss, g_psi = amplitude_loss(psi, intensities)
    if not want_gradient:
        return loss, None
    g_exit = _image_waves_adjoint(g_psi, p, xp)
    g_w, _ = multislice_backward(g_exit, res.waves, p.slab_distances_A, transmissions=t, **kw)
    del res, t
    if step is not None:
        if _owner(stored) is not _owner(volume):
            raise TembenchError("tilt_loss_and_gradient(step=...): the volume must be a zyx_view of storage-ordered "
                                "C-contiguous memory")
        rotate_bin_adjoint_add(m, g_w, stored, axis, -float(step) * float(sz), xp)   # V −= α s_z R†B† g
        return loss, None
    grad = xp.zeros_like(stored)
    rotate_bin_adjoint_add(m, g_w, grad, axis, float(sz), xp)              # R_θ† B_N† (exact transpose)
    return loss, zyx_view(grad, axis)


def predict_intensities(volume, k: int, problem: TiltSeriesProblem, xp=None):
    """The model's images of tilt k, |ψ_{k,j}|² (n_defocus, ny, nx) float32, for a (z, y, x) volume in V.

    The forward half of :func:`tilt_loss_and_gradient`. With ``problem.slice_binning = 1`` and the
    ground-truth potential on the voxel grid this is how Ren's own code made the paper's data
    (``AETGenerateMeasurement``: the solver's forward model at ``slice_binning_factor = 1`` applied
    to the 480³, 0.5 Å potential stack); :func:`paper_protocol_series` builds such a series.
    """
    xp = xp or get_array_module(volume)
    p = problem
    stored = xp.ascontiguousarray(volume.transpose(STORAGE[p.tilt_axis]), dtype=xp.float32)
    w = rotate_bin_apply(p.rotate_bin_operator(k, xp), stored, p.tilt_axis, np.float32(p.voxel_A[0]), xp)
    t = transmission_function(w, p.sigma, xp)
    res = multislice(plane_wave(volume.shape[1:], xp), p.slab_distances_A, transmissions=t, keep_waves=False,
                     energy_keV=p.energy_keV, sampling_A=p.sampling_yx, propagator=p.propagator,
                     band_limit=p.band_limit, bandlimit_transmission=False, xp=xp)
    psi = _image_waves(res.exit_wave, p, xp)
    return (psi.real ** 2 + psi.imag ** 2).astype(xp.float32)


def paper_protocol_series(measurement, sample, xp=np):
    """``measurement`` with its data replaced by Ren's data protocol (a controlled experiment, not a forward model).

    The sample's potential on the reconstruction's own voxel grid (``Sample.potential_volume`` at
    the detector pixel), imaged by :func:`predict_intensities` with one voxel per slice (N_B = 1),
    the exact propagator and no band limit. Only the geometry of ``measurement`` (a noise-free
    ``hrtem_tilt_series`` of the same sample) is used. Refuses a grid that does not cover the cell.
    """
    if measurement.counted:
        raise TembenchError("paper_protocol_series: give the noise-free measurement; apply poisson_dose afterwards")
    problem = build_problem(measurement, slice_binning=1, xp=xp)
    volume = np.asarray(sample.potential_volume(problem.voxel_A[0]), np.float32)
    if volume.shape != problem.shape or abs(problem.origin_A[0]) > 1e-6 * problem.voxel_A[0]:
        raise TembenchError(f"paper_protocol_series: the potential grid {volume.shape} does not coincide with the "
                            f"reconstruction grid {problem.shape} (origin {problem.origin_A}); use a cubic cell that "
                            "is a whole number of detector pixels")
    v = xp.asarray(volume)
    data = np.stack([np.asarray(predict_intensities(v, k, problem, xp).get() if xp is not np
                                else predict_intensities(v, k, problem, xp))
                     for k in range(len(problem.tilt_angles_deg))])
    return measurement.replace(data=data, provenance=[*measurement.provenance,
                                                      {"component": "ren2020.paper_protocol_series", "slice_binning": 1}])


def _owner(a):
    return a if a.base is None else a.base


def rotate_bin_apply(m, stored, axis: str, scale: float, xp):
    """scale · (m applied to the storage-ordered volume) as C-contiguous (n_out, ny, nx) float32 slabs.

    Each output is Σ_j m[r, j]·x[j, t] summed in the order of row r's stored entries from 0, then scaled (scipy's CSR
    product, the order of the numba kernel this replaced: the same bits)."""
    nz, nb, nt = stored.shape
    n_out = m.shape[0] // nb
    w = xp.ascontiguousarray((m @ stored.reshape(nz * nb, nt)).reshape(n_out, nb, nt).transpose(STORAGE[axis]),
                             dtype=xp.float32)
    w *= np.float32(scale)
    return w


def rotate_bin_adjoint_add(m, g_zyx, stored, axis: str, scale: float, xp):
    """stored += scale · mᵀ g for slabs g (n_out, ny, nx) (any float dtype) and a C-contiguous stored volume.

    On the CPU the products are added into ``stored`` in place, row r of m after row r − 1 and each row's entries in
    stored order (scipy's ``csc_matvecs`` on m's CSR arrays, read as mᵀ in CSC form: no temporary volume, and the
    order, so the bits, of the numba kernel this replaced). Elsewhere mᵀ g is formed and then added."""
    nz, nb, nt = stored.shape
    n_out = m.shape[0] // nb
    g = (xp.ascontiguousarray(g_zyx.transpose(STORAGE[axis]), dtype=xp.float32) * np.float32(scale))  # a new array
    g = g.reshape(n_out * nb, nt)
    if (xp is np and _csc_matvecs is not None and stored.flags.c_contiguous
            and m.dtype == np.float32 and stored.dtype == np.float32):
        _csc_matvecs(m.shape[1], m.shape[0], nt, m.indptr, m.indices, m.data, g.reshape(-1), stored.reshape(-1))
        return
    stored.reshape(nz * nb, nt)[...] += m.T @ g


try:  # scipy's own kernel of mᵀ·g accumulated into its output (private, stable since scipy 0.14): in-place adjoint
    from scipy.sparse._sparsetools import csc_matvecs as _csc_matvecs
except ImportError:  # pragma: no cover - a future scipy: form mᵀ g, then add
    _csc_matvecs = None


def _image_waves(exit_wave, p: TiltSeriesProblem, xp):
    """``multislice.image_waves`` (ψ_j = F⁻¹{H_j F{ψ_exit}}) with planned in-place FFTs; a new array."""
    one = plan_fft2(exit_wave.shape, xp=xp, tag="ren2020-exit")
    one.buffer[...] = exit_wave
    spec = one.forward()
    many = plan_fft2(p.ctfs.shape, xp=xp, tag="ren2020-images")
    xp.multiply(p.ctfs, spec[None], out=many.buffer)
    return many.inverse().copy()


def _image_waves_adjoint(grad_waves, p: TiltSeriesProblem, xp):
    """``multislice.image_waves_adjoint`` (Σ_j F⁻¹{conj(H_j) F{g_j}}) with planned in-place FFTs."""
    hc = p._operators.get(("ctfs_conj", xp.__name__))
    if hc is None:
        hc = p._operators[("ctfs_conj", xp.__name__)] = xp.conj(p.ctfs)
    many = plan_fft2(grad_waves.shape, xp=xp, tag="ren2020-images")
    many.buffer[...] = grad_waves
    spec = many.forward()
    spec *= hc
    one = plan_fft2(grad_waves.shape[1:], xp=xp, tag="ren2020-exit")
    xp.sum(spec, axis=0, out=one.buffer)
    return one.inverse().copy()


def fft_count_per_tilt(problem: TiltSeriesProblem) -> int:
    """2D FFTs of (ny, nx) that one tilt's loss and gradient cannot do without.

    Multislice forward and back-propagation: 2 per slab each; image formation: 1 forward and N_f
    inverse transforms; its adjoint: N_f forward and 1 inverse. The "FFT floor" of a benchmark.
    """
    return 4 * problem.n_slabs + 2 * (len(problem.defocus_A) + 1)


def tilt_series_loss_and_gradient(volume, measurement, problem: TiltSeriesProblem, xp=None):
    """Σ_k Σ_j e²_{k,j} (eq 5) over the whole series at fixed ``volume``, and its full gradient (1/V)."""
    xp = xp or get_array_module(volume)
    total, grad = 0.0, xp.zeros(volume.shape, dtype=xp.float32)
    for k in range(len(problem.tilt_angles_deg)):
        loss, g = tilt_loss_and_gradient(volume, measured_intensities(measurement, k, xp), k, problem, xp)
        total += loss
        grad += g
    return total, grad
