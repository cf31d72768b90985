"""Independent-atom electrostatic potentials from a published scattering-factor parameterisation.

Parameterisations (tables ship as data in ``physics/data``):

* ``"lobato"`` — I. Lobato & D. Van Dyck, Acta Cryst. A70 (2014) 636–649:
  f_e(q) = Σ_i a_i (2 + b_i q²) / (1 + b_i q²)², q in 1/Å.
* ``"kirkland"`` — E. J. Kirkland, *Advanced Computing in Electron Microscopy* (2010), App. C:
  f_e(q) = Σ_i a_i / (q² + b_i) + c_i exp(−d_i q²).

The potential is V(r) = K ∫ f_e(q) exp(2πi q·r) d³q with K = h²/(2π m0 e) = 2π a0 e/(4πε0)
= 47.878 V·Å² (Kirkland eq 5.9); the projected potential v(ρ) = ∫ V dz has the 2D transform
K f_e(q⊥, q_z = 0).

Method
------
Each slice's projected potential is assembled in Fourier space: per element, the analytic
projected scattering factor times the exact structure factor Σ_j exp(−2πi q·r_j) of the atoms
whose centre lies in the slice (the "infinite projection", as abTEM's default). The structure
factor is separable, Σ_j e_y(j, q_y) e_x(j, q_x), and is evaluated as one complex matrix
product per (slice, element) — exact sub-pixel placement, no cut-off radius (the grid is
periodic in x and y, so tails wrap), and fast (BLAS) for 10⁵ atoms. The output is the
band-limited (trigonometric-interpolant) sampling of v: pixel (iy, ix) sits at (iy·sy, ix·sx);
on even grids the Nyquist frequencies are left out (they are ambiguous for a real function).
The volume (:func:`potential_volume`) is built the same way in 3D.

For many atoms on large grids (frozen phonons, large cells) the structure factors come instead from
atom spreading, a type-1 non-uniform FFT (:mod:`tembench.physics._spread`): each atom is deposited on
a 1.25× oversampled grid with an 8-point exponential-of-semicircle kernel, one FFT per pair of slices
and element, the kernel's transform divided out. Cost atoms·64 + FFTs instead of atoms × pixels, and
the same band-limited potential to ≈ 1e-5 relative L2 (``method=`` in :func:`projected_potential`,
rule in :func:`choose_method`).
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from tembench.backend import ifftn, plan_irfft2
from tembench.errors import ResourceError, TembenchError
from tembench.physics.constants import SCATTERING_FACTOR_TO_POTENTIAL_V_A2 as _K
from tembench.physics.grid import check_gpts, check_sampling

PARAMETRIZATIONS = ("lobato", "kirkland")
_DATA = Path(__file__).parent / "data"
# Work arrays of one matrix-product chunk stay below this many bytes.
_CHUNK_BYTES = 64 * 2**20


@lru_cache(maxsize=None)
def _table(parametrization: str) -> dict[str, np.ndarray]:
    if parametrization not in PARAMETRIZATIONS:
        raise TembenchError(
            f"parametrization must be one of {PARAMETRIZATIONS}; got {parametrization!r}"
        )
    raw = json.loads((_DATA / f"{parametrization}.json").read_text())
    return {k: np.asarray(v, dtype=np.float64) for k, v in raw.items() if not k.startswith("_")}


def _symbol(Z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[int(Z)]


def element_parameters(Z: int, parametrization: str = "lobato") -> np.ndarray:
    """Coefficient array of element Z; raises for elements the table does not cover."""
    table = _table(parametrization)
    sym = _symbol(Z) if 0 < int(Z) < 119 else None
    if sym is None or sym not in table:
        covered = max(i for i in range(1, 119) if _symbol(i) in table)
        raise TembenchError(
            f"element Z={Z} is not in the {parametrization!r} parameterisation (it covers Z = 1..{covered}); "
            "remove or replace those atoms"
        )
    return table[sym]


def check_elements(numbers, parametrization: str = "lobato") -> list[int]:
    numbers = np.asarray(numbers).reshape(-1)
    if numbers.size > 1000 and numbers.dtype.kind in "iu" and 0 <= numbers.min() and numbers.max() < 1000:
        zs = [int(z) for z in np.flatnonzero(np.bincount(numbers))]  # O(n), no sort (10⁵-atom samples)
    else:
        zs = [int(z) for z in np.unique(numbers)]
    bad = []
    for z in zs:
        try:
            element_parameters(z, parametrization)
        except TembenchError:
            bad.append(z)
    if bad:
        raise TembenchError(
            f"unknown elements (atomic numbers {bad}) for the {parametrization!r} parameterisation; "
            "it covers Z = 1..103"
        )
    return zs


def scattering_factor(Z: int, q, parametrization: str = "lobato", xp=np):
    """Electron scattering factor f_e(q) in Å at |q| in 1/Å (float64)."""
    p = element_parameters(Z, parametrization)
    q2 = xp.asarray(q, dtype=xp.float64) ** 2
    f = xp.zeros_like(q2)
    if parametrization == "lobato":
        for a, b in zip(p[0], p[1]):
            d = 1.0 + b * q2
            f = f + a * (2.0 + b * q2) / (d * d)
    else:
        a, b, c, d = _kirkland_abcd(p)
        for i in range(3):
            f = f + a[i] / (q2 + b[i]) + c[i] * xp.exp(-d[i] * q2)
    return f


def _kirkland_abcd(p: np.ndarray):
    # kirkland.json holds the rows [a1..a3], [b1..b3], [c1..c3], [d1..d3] (abTEM's layout), not
    # the interleaved a1 b1 a2 b2 … order of Kirkland's fparams.dat; tests pin published values.
    p = np.asarray(p, dtype=np.float64).reshape(4, 3)
    return p[0], p[1], p[2], p[3]


def atom_potential(Z: int, r_A, parametrization: str = "lobato"):
    """Radial potential V(r) of a neutral atom in V at distances ``r_A`` (Å), analytic."""
    p = element_parameters(Z, parametrization)
    r = np.maximum(np.asarray(r_A, dtype=np.float64), 1e-12)
    v = np.zeros_like(r)
    if parametrization == "lobato":
        for a, b in zip(p[0], p[1]):
            sb = math.sqrt(b)
            v += a * (math.pi / b) * (1.0 / r + math.pi / sb) * np.exp(-2.0 * math.pi * r / sb)
    else:
        a, b, c, d = _kirkland_abcd(p)
        for i in range(3):
            v += math.pi * a[i] / r * np.exp(-2.0 * math.pi * r * math.sqrt(b[i]))
            v += c[i] * (math.pi / d[i]) ** 1.5 * np.exp(-(math.pi**2) * r * r / d[i])
    return _K * v


def atom_projected_potential(Z: int, rho_A, parametrization: str = "lobato"):
    """Infinite projection v(ρ) = ∫ V dz of one atom in V·Å at radii ``rho_A`` (Å), analytic."""
    from scipy.special import k0, k1

    p = element_parameters(Z, parametrization)
    rho = np.maximum(np.asarray(rho_A, dtype=np.float64), 1e-12)
    v = np.zeros_like(rho)
    if parametrization == "lobato":
        for a, b in zip(p[0], p[1]):
            sb = math.sqrt(b)
            x = 2.0 * math.pi * rho / sb
            v += a * (2.0 * math.pi / b) * (k0(x) + 0.5 * x * k1(x))
    else:
        a, b, c, d = _kirkland_abcd(p)
        for i in range(3):
            v += 2.0 * math.pi * a[i] * k0(2.0 * math.pi * rho * math.sqrt(b[i]))
            v += c[i] * math.pi / d[i] * np.exp(-(math.pi**2) * rho * rho / d[i])
    return _K * v


# --- slicing --------------------------------------------------------------------------------
def slice_edges(slice_thickness_A, z_range_A) -> np.ndarray:
    """Slice boundaries (n_slices + 1,) in Å covering ``z_range_A`` = (z0, z1).

    ``slice_thickness_A``: a float (the last slice is thinner if it does not divide the range),
    or a sequence of per-slice thicknesses (then the range starts at z0 and ends at their sum).
    """
    z0, z1 = (float(v) for v in z_range_A)
    if z1 < z0:
        raise TembenchError(f"z_range_A must be (z_min, z_max) with z_min <= z_max; got {z_range_A}")
    if np.ndim(slice_thickness_A) == 0:
        dz = float(slice_thickness_A)
        if not dz > 0:
            raise TembenchError(f"slice_thickness_A must be > 0 Å; got {slice_thickness_A}")
        n = max(1, int(math.ceil((z1 - z0) / dz - 1e-9)))
        edges = z0 + dz * np.arange(n + 1, dtype=np.float64)
        if z1 > z0:
            edges[-1] = min(edges[-1], z1)
        return edges
    dz = np.asarray(slice_thickness_A, dtype=np.float64).reshape(-1)
    if dz.size == 0 or np.any(dz <= 0):
        raise TembenchError(f"slice_thickness_A must be positive thicknesses in Å; got {slice_thickness_A}")
    return z0 + np.concatenate([[0.0], np.cumsum(dz)])


def slice_thicknesses(slice_thickness_A, z_range_A) -> np.ndarray:
    """Per-slice thicknesses (n_slices,) in Å of :func:`slice_edges`: pass these, not the nominal
    thickness, to the multislice functions, so a thinner last slice is propagated by its own Δz."""
    return np.diff(slice_edges(slice_thickness_A, z_range_A))


def sliced_potential(sample, *, gpts, sampling_A, slice_thickness_A, parametrization: str = "lobato",
                     rms_displacement_A=None, rng=None, xp=np, band_limit: float | None = None):
    """Slices of a :class:`~tembench.types.Sample` over its whole cell along the beam, z ∈ [0, cell_z).

    Returns ``(potentials (n, ny, nx) V·Å, thicknesses_A (n,))``; the last slice is thinner when the
    thickness does not divide the cell (e.g. 98 slices for a 48.87 Å cell at 0.5 Å, the last 0.37 Å),
    and the thicknesses say so, so the propagation matches the slicing by construction.
    """
    z_range = (0.0, float(sample.cell_A[2]))
    v = projected_potential(sample.positions_A, sample.numbers, gpts=gpts, sampling_A=sampling_A,
                            slice_thickness_A=slice_thickness_A, z_range_A=z_range, parametrization=parametrization,
                            rms_displacement_A=rms_displacement_A, rng=rng, xp=xp, band_limit=band_limit)
    return v, slice_thicknesses(slice_thickness_A, z_range)


def _assign_slices(z: np.ndarray, edges: np.ndarray) -> np.ndarray:
    idx = np.searchsorted(edges, z, side="right") - 1
    # atoms on/behind the boundaries (including frozen-phonon excursions) go to the end slices
    return np.clip(idx, 0, len(edges) - 2)


def _phase_factors(coord: np.ndarray, freq: np.ndarray, xp):
    """exp(−2πi q·c) as (n_atoms, n_freq) complex64; the phase is reduced mod 1 in float64."""
    cycles = np.multiply.outer(coord, freq)
    cycles -= np.round(cycles)
    phase = xp.asarray((cycles * (-2.0 * np.pi)).astype(np.float32))
    out = xp.empty(phase.shape, dtype=xp.complex64)
    parts = out.view(xp.float32).reshape(phase.shape + (2,))
    xp.cos(phase, out=parts[..., 0])  # float32 cos/sin are SIMD; complex exp is ~20x slower
    xp.sin(phase, out=parts[..., 1])
    return out


def _structure_factor_2d(yx: np.ndarray, ky: np.ndarray, kx: np.ndarray, xp):
    """Σ_j exp(−2πi (ky y_j + kx x_j)) on the (ny, nx) grid, via chunked complex matrix products."""
    ny, nx = ky.size, kx.size
    out = xp.zeros((ny, nx), dtype=xp.complex64)
    chunk = max(1, _CHUNK_BYTES // (8 * (ny + nx)))
    for s in range(0, len(yx), chunk):
        part = yx[s:s + chunk]
        ey = _phase_factors(part[:, 0], ky, xp)
        ex = _phase_factors(part[:, 1], kx, xp)
        out += ey.T @ ex
    return out


def projected_scattering_kernel(Z: int, gpts, sampling_A, parametrization: str = "lobato", xp=np):
    """Fourier-space kernel K f_e(q⊥)/(sy·sx) (ny, nx) float32: ifft2(kernel · S) = v in V·Å."""
    ny, nx = check_gpts(gpts)
    sy, sx = check_sampling(sampling_A)
    ky = np.fft.fftfreq(ny, d=sy)[:, None]
    kx = np.fft.fftfreq(nx, d=sx)[None, :]
    f = scattering_factor(Z, np.sqrt(ky**2 + kx**2), parametrization)
    return xp.asarray((_K * f / (sy * sx)).astype(np.float32))


def projected_potential(positions_A, numbers, *, gpts, sampling_A, slice_thickness_A=None, z_range_A=None,
                        parametrization: str = "lobato", rms_displacement_A=None, rng=None, xp=np,
                        band_limit: float | None = None, max_bytes: int | None = None, method: str = "auto"):
    """Projected potential of each slice, (n_slices, ny, nx) float32 in V·Å.

    Parameters
    ----------
    positions_A : (N, 3) atom positions (x, y, z) in Å; x maps to the last axis, y to axis −2.
        Pixel (iy, ix) is at (iy·sy, ix·sx); the grid is periodic in x and y (positions wrap).
    numbers : (N,) atomic numbers.
    gpts, sampling_A : grid (ny, nx) and pixel size (sy, sx) in Å (scalars allowed).
    slice_thickness_A : None → one slice holding every atom; a float or per-slice sequence → slices
        from ``z_range_A[0]`` (see :func:`slice_edges`). Each atom goes wholly into the slice
        containing its centre (infinite projection); atoms outside the range go to the end slices.
    z_range_A : (z0, z1) in Å. Default: from the lowest atom z over whole slices of a scalar
        ``slice_thickness_A`` (the last slice is never thinner, so propagating every slice by the
        nominal thickness is right); one slice from the lowest to the highest atom without slicing.
        With an explicit range that the thickness does not divide, the last slice is thinner:
        propagate with :func:`slice_thicknesses` (or use :func:`sliced_potential` for a Sample's
        whole cell).
    rms_displacement_A, rng : frozen phonons — if both are given, every atom is displaced by
        N(0, rms²) independently along x, y and z (rms scalar or per atom, Å).
    band_limit : if given, keep only |k| below this fraction of the Nyquist frequency (the multislice
        anti-aliasing mask, applied here at no cost because the potential is built in Fourier space).
    method : how the structure factors are computed — ``"exact"``: Σ_j exp(−2πi k·r_j) by matrix products
        (cost ∝ atoms × pixels; the reference); ``"spread"``: atoms deposited on a 1.25× oversampled
        grid with an 8 × 8-point exponential-of-semicircle kernel, one FFT per pair of slices and
        element, kernel divided out (cost ∝ atoms·64 + FFTs; ≈ 1e-5 relative L2 from the exact
        potential, bit-identical run to run); ``"auto"`` (default): the rule of :func:`choose_method`
        (spreading for many atoms on large grids, e.g. frozen phonons and large cells; exact below
        ≈ 20 ms of work).
    """
    if method not in METHODS:
        raise TembenchError(f"projected_potential: method must be one of {METHODS}; got {method!r}")
    ny, nx = check_gpts(gpts)
    sy, sx = check_sampling(sampling_A)
    pos = np.array(positions_A, dtype=np.float64).reshape(-1, 3)
    numbers = np.asarray(numbers, dtype=np.int64).reshape(-1)
    if len(numbers) != len(pos):
        raise TembenchError(f"projected_potential: {len(pos)} positions but {len(numbers)} atomic numbers")
    zs = check_elements(numbers, parametrization) if len(numbers) else []
    if rms_displacement_A is not None and rng is not None and len(pos):
        rms = np.broadcast_to(np.asarray(rms_displacement_A, dtype=np.float64), (len(pos),))
        pos = pos + rng.standard_normal(pos.shape) * rms[:, None]
    if z_range_A is None:
        z_range_A = (float(pos[:, 2].min()), float(pos[:, 2].max())) if len(pos) else (0.0, 0.0)
        if slice_thickness_A is not None and np.ndim(slice_thickness_A) == 0 and float(slice_thickness_A) > 0:
            dz = float(slice_thickness_A)
            n_whole = max(1, int(math.ceil((z_range_A[1] - z_range_A[0]) / dz - 1e-9)))
            z_range_A = (z_range_A[0], z_range_A[0] + n_whole * dz)
    if slice_thickness_A is None:
        edges = np.array([float(z_range_A[0]), float(z_range_A[1])])
    else:
        edges = slice_edges(slice_thickness_A, z_range_A)
    n_slices = len(edges) - 1
    need = n_slices * ny * nx * 4 + 3 * ny * nx * 8
    if max_bytes is not None and need > max_bytes:
        raise ResourceError(
            f"projected potential of {n_slices} slices x {ny}x{nx} needs {need / 2**30:.2f} GiB > limit "
            f"{max_bytes / 2**30:.2f} GiB; use thicker slices, a coarser sampling or a smaller field of view"
        )
    if not len(pos):
        return xp.zeros((n_slices, ny, nx), dtype=xp.float32)
    slice_idx = _assign_slices(pos[:, 2], edges)
    # Slices holding bitwise-identical atoms (x, y, Z) — a crystal without frozen phonons — have
    # identical potentials: compute each distinct slice once and copy it to its repeats.
    rep = _repeated_slices(pos, numbers, slice_idx, n_slices)
    unique = np.flatnonzero(rep == np.arange(n_slices))
    if unique.size < n_slices:
        keep = rep[slice_idx] == slice_idx
        pos, numbers = pos[keep], numbers[keep]
        slice_idx = np.searchsorted(unique, slice_idx[keep])
        target = unique
    else:
        target = None
    n_compute = unique.size
    yx = pos[:, [1, 0]]
    if method == "auto":
        method = choose_method(len(pos), (ny, nx), n_compute, len(zs), xp=xp)
    if method == "spread":
        # Every slice holding atoms (or repeating one that does) is written whole, so the output is not
        # zeroed first — only the empty slices are (a 25 MB np.zeros from the reused heap is a memset
        # costing ≈ 10 % of the 256² frozen-phonon build).
        out = xp.empty((n_slices, ny, nx), dtype=xp.float32)
        _spread_potential(yx, numbers, slice_idx, zs, n_compute, (ny, nx), (sy, sx), parametrization, band_limit,
                          out, target, xp)
        if target is not None:
            _copy_repeats(out, rep, slice_idx, unique)
        written = np.zeros(n_slices, dtype=bool)
        written[(np.arange(n_slices) if target is None else target)[np.unique(slice_idx)]] = True
        for m in np.flatnonzero(~written[rep]):
            out[m] = 0
        return out
    out = xp.zeros((n_slices, ny, nx), dtype=xp.float32)
    # v is real, so its spectrum is Hermitian: build only kx >= 0 (half the matrix products) and
    # invert with a real FFT
    ky = np.fft.fftfreq(ny, d=sy)
    kx = np.fft.rfftfreq(nx, d=sx)
    kernels = {z: _half_kernel(z, ky, kx, sy * sx, parametrization, xp) for z in zs}
    if band_limit is not None:
        from tembench.physics.propagation import band_limit_mask

        mask = band_limit_mask((ny, nx), (sy, sx), band_limit, xp=xp)[:, : kx.size]
        kernels = {z: k * mask for z, k in kernels.items()}
    nh = ny // 2 + 1
    ky_half = np.abs(ky[:nh])
    kernels_half = {z: xp.concatenate([k[:nh], k[:nh]], axis=0) for z, k in kernels.items()}
    # Small products run single-threaded: BLAS/FFT threads only add synchronisation there, and on a
    # busy 2-core machine that costs 10-100x (measured); large ones keep the BLAS threads.
    with _blas_threads(1 if len(pos) * ny * nx < 2**29 else None):
        # a fixed number of slices per batched inverse FFT (≈2 MB), so one FFT plan serves every call
        chunk = max(1, min(64, (2 * 2**20) // (8 * ny * kx.size)))
        for c0 in range(0, n_compute, chunk):
            c1 = min(n_compute, c0 + chunk)
            plan = plan_irfft2((chunk, ny, nx), tag="potential") if xp is np else None
            spec = plan.spectrum if plan is not None else xp.zeros((chunk, ny, kx.size), dtype=xp.complex64)
            spec[...] = 0
            for z in zs:
                sel = np.flatnonzero((numbers == z) & (slice_idx >= c0) & (slice_idx < c1))
                if sel.size:
                    rows = _half_ky_rows(yx[sel], slice_idx[sel] - c0, c1 - c0, ky_half, kx, xp)
                    rows *= kernels_half[z]  # |k|-dependent kernel: the same for +ky and −ky
                    _add_unfolded(rows, spec[: c1 - c0], ny)
            _drop_nyquist(spec, (ny, nx))
            dest = slice(c0, c1) if target is None else target[c0:c1]
            if plan is not None:
                out[dest] = plan()[: c1 - c0]
            else:  # pragma: no cover - GPU
                out[dest] = xp.fft.irfft2(spec, s=(ny, nx), axes=(-2, -1))[: c1 - c0]
    if target is not None:
        _copy_repeats(out, rep, slice_idx, unique)
    return out


def _copy_repeats(out, rep, slice_idx, unique):
    """out[m] = out[rep[m]] for the repeated slices, except repeats of an empty slice (already zero)."""
    filled = np.zeros(len(out), dtype=bool)
    filled[unique[np.unique(slice_idx)]] = True
    for m in np.flatnonzero(rep != np.arange(len(out))):
        if filled[rep[m]]:
            out[m] = out[rep[m]]


METHODS = ("auto", "exact", "spread")


def choose_method(n_atoms: int, gpts, n_slices: int, n_elements: int = 1, xp=np) -> str:
    """The ``method="auto"`` rule of :func:`projected_potential`: ``"spread"`` or ``"exact"``.

    Estimated single-thread costs (fitted on this project's 2-core benchmark machine, 64²-256² grids):
    exact ≈ 1 ns · atoms · ny · (nx/2 + 1) (matrix products and phase factors); spread ≈ 150 ns · atoms
    (64 deposits each) + 0.3 ns · slices · elements · My·Mx·log2(My·Mx) (FFTs on the oversampled
    My × Mx grid and back). ``"spread"`` is chosen when the exact estimate exceeds both the spreading
    estimate and 20 ms — below that the exact path costs nothing noticeable and stays the answer (small
    cells, the tests' crystals). Atoms and slices are those left after repeated slices are removed.
    Examples: a frozen-phonon Si block of 41 472 atoms on 256² × 98 slices → spread (≈ 30× cheaper);
    a 3×3×4-cell crystal (288 atoms) on 96² → exact. The GPU (cupy) always uses ``"exact"`` (the
    spreading kernels run on the CPU).
    """
    if xp is not np or n_atoms == 0:
        return "exact"
    from tembench.physics._spread import oversampled_size

    ny, nx = (int(g) for g in gpts)
    my, mx = oversampled_size(ny), oversampled_size(nx)
    exact = _COST_EXACT_NS * n_atoms * ny * (nx // 2 + 1)
    spread = (_COST_DEPOSIT_NS * n_atoms
              + _COST_FFT_NS * n_slices * max(1, n_elements) * my * mx * math.log2(max(2, my * mx)))
    return "spread" if exact > max(spread, _MIN_EXACT_NS) else "exact"


_SPREAD_BATCH_BYTES = 2**20  # one batch of complex planes and its spectrum stay in a 2 MB L2 cache
_COST_EXACT_NS = 1.0
_COST_DEPOSIT_NS = 150.0
_COST_FFT_NS = 0.3
_MIN_EXACT_NS = 20e6


@lru_cache(maxsize=8)  # one grid's elements (a 2048² multiplier is 16 MB)
def _spread_multiplier(Z: int, gpts: tuple, sampling: tuple, parametrization: str, band_limit, my: int, mx: int,
                       width: int, beta: float) -> np.ndarray:
    """(ny, nx) float32 filter from the kept spectrum of the oversampled deposit to the (unnormalised)
    inverse FFT of the potential: K f_e(|k|)/(sy·sx) (times the band limit), 1/(φ̂_y φ̂_x), the inverse
    FFT's 1/(ny·nx), and zero on the Nyquist row/column (as :func:`_drop_nyquist`). Cached: frozen-phonon
    configurations and repeated calls on one grid reuse it (read-only)."""
    from tembench.physics import _spread as S

    ny, nx = gpts
    sy, sx = sampling
    ky = np.fft.fftfreq(ny, d=sy)
    kx = np.fft.rfftfreq(nx, d=sx)
    half = _half_kernel(Z, ky, kx, sy * sx, parametrization, np)
    if band_limit is not None:
        from tembench.physics.propagation import band_limit_mask

        half = half * band_limit_mask((ny, nx), (sy, sx), band_limit, xp=np)[:, : kx.size]
    iky = np.fft.fftfreq(ny, d=1.0 / ny).round().astype(np.int64)
    ikx = np.fft.fftfreq(nx, d=1.0 / nx).round().astype(np.int64)
    corr = 1.0 / (np.multiply.outer(S.kernel_ft(tuple(iky), my, width, beta), S.kernel_ft(tuple(ikx), mx, width, beta))
                  * (ny * nx))
    # full (ny, nx) multiplier from the half kernel (|k|-dependent: column −k is column +k)
    m = half.astype(np.float64)[:, np.abs(ikx)] * corr
    if ny % 2 == 0:
        m[ny // 2] = 0.0
    if nx % 2 == 0:
        m[:, nx // 2] = 0.0
    m = np.ascontiguousarray(m.astype(np.float32))
    m.setflags(write=False)
    return m


def _spread_potential(yx, numbers, slice_idx, zs, n_compute, gpts, sampling, parametrization, band_limit, out,
                      target, xp):
    """Fill ``out`` with the potentials of the ``n_compute`` slices by atom spreading (:mod:`._spread`).

    Slices go in pairs through complex transforms (the real part carries one, the imaginary part the
    other: the filter K f_e(|k|)/φ̂ is real and even, so it maps each part to its own potential).
    The forward transform of the oversampled deposit is pruned: row FFTs on every row, column FFTs only
    on the columns whose frequencies the output keeps (``backend.PrunedFFT2Plan``; ≈ 13 % less work at
    σ = 1.25). Empty slices (between atomic planes) stay zero and cost nothing.
    """
    from tembench.backend import plan_fft2, plan_pruned_fft2
    from tembench.physics import _spread as S

    ny, nx = gpts
    sy, sx = sampling
    my, mx = S.oversampled_size(ny), S.oversampled_size(nx)
    width, beta = S.WIDTH, S.BETA
    mult = {z: _spread_multiplier(int(z), (ny, nx), (float(sy), float(sx)), parametrization,
                                  None if band_limit is None else float(band_limit), my, mx, width, beta) for z in zs}
    present = np.bincount(slice_idx, minlength=n_compute) > 0
    filled = np.flatnonzero(present)
    # atoms sorted by (element, slice): each chunk of slices reads contiguous runs
    rank = np.searchsorted(np.asarray(zs), numbers)
    key = rank.astype(np.int64) * n_compute + slice_idx
    small = np.int16 if len(zs) * n_compute < 2**15 else np.int64  # 16-bit keys: numpy sorts them by radix, O(n)
    order = np.argsort(key.astype(small), kind="stable")
    key = key[order]
    uy = np.mod(yx[order, 0] / (ny * sy), 1.0) * my
    ux = np.mod(yx[order, 1] / (nx * sx), 1.0) * mx
    slot = (np.cumsum(present) - 1)[slice_idx[order]]  # rank of the atom's slice among the filled ones
    pairs = max(1, min(32, _SPREAD_BATCH_BYTES // (8 * my * mx)))  # complex planes per batch
    chunk = 2 * pairs
    # the output keeps kx = 0 … ⌈nx/2⌉ − 1 and the negative ones; an even grid's Nyquist column is zeroed
    # by the multiplier, so its column FFT is skipped too
    keep_x = ((nx + 1) // 2, nx - (nx + 1) // 2 - (1 if nx % 2 == 0 else 0))
    fwd = plan_pruned_fft2((pairs, my, mx), keep_x, tag="potential-spread")
    inv = plan_fft2((pairs, ny, nx), tag="potential-spread")
    src_y, src_x = S.source_index(ny, my), S.source_index(nx, mx)
    fwd.buffer[...] = 0  # afterwards S.accumulate leaves it zeroed
    bounds = np.searchsorted(key, np.add.outer(np.arange(len(zs)) * n_compute, np.append(filled, n_compute)))
    for c0 in range(0, filled.size, chunk):
        c1 = min(filled.size, c0 + chunk)
        first = True
        for r, z in enumerate(zs):
            a, b = bounds[r, c0], bounds[r, c1]
            if a == b:
                continue
            S.spread(uy[a:b], ux[a:b], slot[a:b] - c0, fwd.buffer, width, beta)
            S.accumulate(fwd.forward_pruned(), mult[z], inv.buffer, first, src=(src_y, src_x))
            first = False
        res = inv.inverse_unnormalized()
        dest = filled[c0:c1] if target is None else target[filled[c0:c1]]
        if xp is np:
            S.split_pairs(res, out, dest)
        else:  # pragma: no cover - GPU
            out[dest[0::2]] = xp.asarray(res.real[: len(dest[0::2])])
            out[dest[1::2]] = xp.asarray(res.imag[: len(dest[1::2])])


def _repeated_slices(pos, numbers, slice_idx, n_slices):
    """For each slice, the first slice whose atoms have bitwise-identical (x, y, Z) (itself if none).

    Slices are candidates only when their atom count and the (atom-order) sums of x, y, Z, x·y and x²·y
    agree (bincounts: a frozen-phonon configuration stops here); candidates are then compared atom by
    atom, in input order first (a tiled crystal lists each slice's atoms in the same order) and
    sorted otherwise.
    """
    rep = np.arange(n_slices)
    if n_slices < 2 or not len(pos):
        return rep
    counts = np.bincount(slice_idx, minlength=n_slices)
    empty = counts == 0
    if empty.any():  # slices without atoms (between atomic planes) repeat the first of them
        rep[empty] = int(np.argmax(empty))
    x, y = pos[:, 0], pos[:, 1]
    # Σx·y and Σx²·y tell apart atomic planes with equal Σx and Σy (diamond [001]: (0,0)+(½,½) vs (½,0)+(0,½))
    sig = np.stack([counts.astype(np.float64), np.bincount(slice_idx, x, n_slices), np.bincount(slice_idx, y, n_slices),
                    np.bincount(slice_idx, numbers, n_slices), np.bincount(slice_idx, x * y, n_slices),
                    np.bincount(slice_idx, x * x * y, n_slices)], axis=1)
    _, first_of, inverse = np.unique(sig, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    candidates = (first_of[inverse] != np.arange(n_slices)) & ~empty
    if not candidates.any():
        return rep
    order = np.argsort(slice_idx.astype(np.int16) if n_slices < 2**15 else slice_idx, kind="stable")
    ends = np.cumsum(counts)
    rows = np.empty((len(pos), 3), dtype=np.float64)
    rows[:, 0] = pos[order, 0]
    rows[:, 1] = pos[order, 1]
    rows[:, 2] = numbers[order]
    atoms = [rows[ends[m] - counts[m]:ends[m]] for m in range(n_slices)]
    sorted_keys: dict[int, bytes] = {}

    def key(m):
        if m not in sorted_keys:
            r = atoms[m]
            sorted_keys[m] = r[np.lexsort((r[:, 0], r[:, 1], r[:, 2]))].tobytes()
        return sorted_keys[m]

    distinct: dict[int, list[int]] = {}  # signature group -> slices with distinct atoms seen so far
    for m in np.flatnonzero(~empty):
        seen = distinct.setdefault(int(inverse[m]), [])
        for f in seen:
            if np.array_equal(atoms[f], atoms[m]) or key(f) == key(m):
                rep[m] = f
                break
        else:
            seen.append(m)
    return rep


def _drop_nyquist(spec, shape):
    # The Nyquist row/column of an even grid has no ±k partner, so a real band-limited potential
    # cannot hold it unambiguously (complex-ifft-then-real and irfft disagree there); it is dropped.
    # Multislice removes it anyway (2/3 band limit).
    if shape[0] % 2 == 0:
        spec[..., shape[0] // 2, :] = 0
    if shape[1] % 2 == 0:
        spec[..., -1] = 0


def _cos_sin(coord: np.ndarray, freq: np.ndarray):
    """cos and sin of 2π·coord·freq, (n_atoms, n_freq) float32; the phase is reduced mod 1 in float64."""
    cycles = np.multiply.outer(coord, freq)
    cycles -= np.round(cycles)
    phase = (cycles * (2.0 * np.pi)).astype(np.float32)
    return np.cos(phase), np.sin(phase)


def _half_ky_rows(yx, slice_of_atom, n_slices, ky_half, kx, xp):
    """Σ_j [cos; sin](2π ky y_j) e_x(j, kx) per slice for ky >= 0: (n_slices, 2·nh, nkx) complex64.

    The structure factor is S(±ky, kx) = A ∓ iB with A (first nh rows) and B (last nh rows), so
    only half the ky rows are needed, and the product is real × complex, i.e. one real matrix
    product of half the size of the complex one (see :func:`_add_unfolded`).
    Atoms are packed into a (n_slices, C) table (C = most atoms in any slice, padding rows are
    zero); if the padding would exceed 4× the atoms, slices are done one by one.
    """
    nh, nkx = ky_half.size, kx.size
    counts = np.bincount(slice_of_atom, minlength=n_slices)
    c_max = int(counts.max())
    if n_slices * c_max > 4 * len(yx) + 64 or n_slices * c_max * (nh + nkx) * 8 > _CHUNK_BYTES:
        out = xp.zeros((n_slices, 2 * nh, nkx), dtype=xp.complex64)
        chunk = max(1, _CHUNK_BYTES // (8 * (nh + nkx)))
        for s in np.flatnonzero(counts):
            part_s = yx[slice_of_atom == s]
            for a in range(0, len(part_s), chunk):
                part = part_s[a:a + chunk]
                cy, sy = _cos_sin(part[:, 0], ky_half)
                y = xp.asarray(np.concatenate([cy, sy], axis=1))  # (c, 2nh)
                ex = _phase_factors(part[:, 1], kx, xp)
                out[s] += (y.T @ ex.view(xp.float32)).view(xp.complex64)
        return out
    order = np.argsort(slice_of_atom, kind="stable")
    rank = np.arange(len(yx)) - np.repeat(np.cumsum(counts) - counts, counts)
    s_sorted = slice_of_atom[order]
    y = np.zeros((n_slices, c_max, 2 * nh), dtype=np.float32)
    cy, sy = _cos_sin(yx[order, 0], ky_half)
    y[s_sorted, rank, :nh] = cy
    y[s_sorted, rank, nh:] = sy
    ex = xp.zeros((n_slices, c_max, nkx), dtype=xp.complex64)
    ex[s_sorted, rank] = _phase_factors(yx[order, 1], kx, xp)
    r = xp.matmul(xp.asarray(y).transpose(0, 2, 1), ex.view(xp.float32))
    return r.view(xp.complex64)


def _add_unfolded(rows, spec, ny):
    """spec (n, ny, nkx) += the structure factor S(ky, kx) from :func:`_half_ky_rows` output."""
    nh = ny // 2 + 1
    npos = (ny + 1) // 2  # rows 0 … npos−1 hold ky >= 0; row ny − j holds −ky_j (the Nyquist row is negative)
    nneg = ny - npos
    r = rows.view(np.float32) if rows.dtype == np.complex64 else rows
    a_re, a_im = r[:, :nh, 0::2], r[:, :nh, 1::2]
    b_re, b_im = r[:, nh:, 0::2], r[:, nh:, 1::2]
    sf = spec.view(np.float32)
    sf[:, :npos, 0::2] += a_re[:, :npos] + b_im[:, :npos]  # S(+ky) = A − iB
    sf[:, :npos, 1::2] += a_im[:, :npos] - b_re[:, :npos]
    if nneg:
        rev = slice(nneg, 0, -1)  # j = nneg … 1
        sf[:, npos:, 0::2] += a_re[:, rev] - b_im[:, rev]  # S(−ky) = A + iB
        sf[:, npos:, 1::2] += a_im[:, rev] + b_re[:, rev]


def _structure_factors_by_slice(yx, slice_of_atom, n_slices, ky, kx, xp):
    """Per-slice structure factors (n_slices, ny, nkx) complex64 (``ky`` in FFT order)."""
    ny = ky.size
    rows = _half_ky_rows(yx, slice_of_atom, n_slices, np.abs(ky[: ny // 2 + 1]), kx, xp)
    out = xp.zeros((n_slices, ny, kx.size), dtype=xp.complex64)
    _add_unfolded(rows, out, ny)
    return out


def _half_kernel(Z, ky, kx, pixel_area, parametrization, xp):
    f = scattering_factor(Z, np.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2), parametrization)
    return xp.asarray((_K * f / pixel_area).astype(np.float32))


def _blas_threads(n):
    """Context limiting BLAS threads to ``n`` (no-op for None or without threadpoolctl)."""
    import contextlib

    if n is None:
        return contextlib.nullcontext()
    global _THREADPOOL_CONTROLLER
    try:
        if _THREADPOOL_CONTROLLER is None:
            from threadpoolctl import ThreadpoolController

            _THREADPOOL_CONTROLLER = ThreadpoolController()  # library discovery once (~1 ms)
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return _THREADPOOL_CONTROLLER.limit(limits=n, user_api="blas")


_THREADPOOL_CONTROLLER = None


def potential_volume(sample, sampling_A: float, parametrization: str = "lobato", xp=np,
                     max_bytes: int | None = None):
    """Electrostatic potential (nz, ny, nx) float32 in V on a voxel grid over ``sample.cell_A``.

    Voxel (iz, iy, ix) is the point (ix·s, iy·s, iz·s) with s = ``sampling_A`` and n = round(cell/s)
    voxels per axis. Periodic in x and y like :func:`projected_potential`; along z the transform is
    padded so tails do not wrap. Band-limited samples: Σ_z V·s reproduces the projected potential.
    """
    s = float(sampling_A)
    if not s > 0:
        raise TembenchError(f"sampling_A must be a positive voxel size in Å; got {sampling_A}")
    cell = np.asarray(sample.cell_A, dtype=np.float64)
    nx, ny, nz = (max(1, int(round(c / s))) for c in cell)
    pad = int(math.ceil(5.0 / s))
    from tembench.physics.grid import fft_friendly

    nzp = fft_friendly(nz + 2 * pad)
    need = nzp * ny * nx * 8 * 2 + nz * ny * nx * 4
    if max_bytes is not None and need > max_bytes:
        raise ResourceError(
            f"potential volume {nz}x{ny}x{nx} (padded {nzp} in z) needs {need / 2**30:.2f} GiB > limit "
            f"{max_bytes / 2**30:.2f} GiB; use a coarser sampling_A"
        )
    pos = np.asarray(sample.positions_A, dtype=np.float64)
    numbers = np.asarray(sample.numbers)
    zs = check_elements(numbers, parametrization) if len(numbers) else []
    kz = np.fft.fftfreq(nzp, d=s)
    ky = np.fft.fftfreq(ny, d=s)
    kx = np.fft.fftfreq(nx, d=s)
    q = np.sqrt(kz[:, None, None] ** 2 + ky[None, :, None] ** 2 + kx[None, None, :] ** 2)
    spec = xp.zeros((nzp, ny, nx), dtype=xp.complex64)
    for z in zs:
        sel = numbers == z
        kern = xp.asarray((_K * scattering_factor(z, q, parametrization) / s**3).astype(np.float32))
        spec += kern * _structure_factor_3d(pos[sel] + np.array([0.0, 0.0, pad * s]), kz, ky, kx, xp)
    # x, y: drop the Nyquist planes, as projected_potential does (the periodic grids the slices share).
    # z is padded, its length nzp an arbitrary FFT size: its Nyquist plane stays, so the samples do not
    # depend on the parity of nzp (dropping it left a ±F(k_N)/N·(−1)^iz pattern: ±10 V for one Au atom
    # at 0.5 Å; tests/physics/test_physics_mutation_gaps.py)
    for axis, n in ((1, ny), (2, nx)):
        if n % 2 == 0:
            index = [slice(None)] * 3
            index[axis] = n // 2
            spec[tuple(index)] = 0
    vol = ifftn(spec).real[pad:pad + nz]
    return xp.ascontiguousarray(vol.astype(xp.float32))


def _structure_factor_3d(xyz: np.ndarray, kz, ky, kx, xp):
    nz, ny, nx = kz.size, ky.size, kx.size
    out = xp.zeros((nz * ny, nx), dtype=xp.complex64)
    chunk = max(1, _CHUNK_BYTES // (8 * (nz * ny + nx)))
    for s in range(0, len(xyz), chunk):
        part = xyz[s:s + chunk]
        ez = _phase_factors(part[:, 2], kz, xp)
        ey = _phase_factors(part[:, 1], ky, xp)
        ex = _phase_factors(part[:, 0], kx, xp)
        ezy = (ez[:, :, None] * ey[:, None, :]).reshape(len(part), nz * ny)
        out += ezy.T @ ex
    return out.reshape(nz, ny, nx)


__all__ = [
    "PARAMETRIZATIONS",
    "scattering_factor",
    "atom_potential",
    "atom_projected_potential",
    "projected_scattering_kernel",
    "projected_potential",
    "choose_method",
    "METHODS",
    "potential_volume",
    "slice_edges",
    "check_elements",
]
