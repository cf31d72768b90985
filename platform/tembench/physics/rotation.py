"""Rotations of voxel volumes with exact adjoints, Euler angles, and Ren's slice binning B_N.

Rotation convention
-------------------
Volumes are indexed (z, y, x) with voxel i at coordinate i·s; rotations act about the volume
centre c = n/2 (voxel units, the centre of the [0, n·s) box). A rotation matrix R acts on
column vectors (x, y, z): the rotated volume is W(r) = V(Rᵀ (r − c) + c), i.e. the object is
turned by R. ``tilt_matrix(θ, "y")`` is a right-handed rotation by θ about +y:
x' = x cosθ + z sinθ, z' = −x sinθ + z cosθ.

Euler angles (rot, tilt, psi) follow RELION (ZYZ, You 2025 eq 11):
R = R_z(psi) · R_y(tilt) · R_z(rot).

The operator is trilinear interpolation written as a sparse matrix A (one row per output voxel,
8 weights), so ``rotate`` applies A and ``rotate_adjoint`` applies Aᵀ exactly: the dot-product test
⟨A x, y⟩ = ⟨x, Aᵀ y⟩ holds to rounding. Samples that fall outside the box read zero. Rotation
about a coordinate axis uses 2D bilinear interpolation of each plane (4 weights), shared by all
planes along that axis.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from tembench._lazy import lazy_import
from tembench.backend import get_array_module
from tembench.errors import TembenchError

sp = lazy_import("scipy.sparse")  # loaded with the first rotation operator (fast start-up)

AXES = ("x", "y", "z")


def axis_rotation_matrix(angle_deg: float, axis: str = "y") -> np.ndarray:
    """Right-handed rotation (3×3, acting on (x, y, z)) by ``angle_deg`` about ``axis``."""
    a = math.radians(float(angle_deg))
    c, s = math.cos(a), math.sin(a)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    if axis == "z":
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    raise TembenchError(f"tilt_axis must be one of {AXES}; got {axis!r}")


def euler_matrix(rot_deg: float, tilt_deg: float, psi_deg: float) -> np.ndarray:
    """RELION ZYZ Euler rotation R = R_z(psi) R_y(tilt) R_z(rot) acting on (x, y, z)."""
    return axis_rotation_matrix(psi_deg, "z") @ axis_rotation_matrix(tilt_deg, "y") @ axis_rotation_matrix(rot_deg, "z")


def rotate_points(points_xyz, matrix, centre_xyz) -> np.ndarray:
    """Rotate points (N, 3) (x, y, z) about ``centre_xyz`` by ``matrix``: r' = R (r − c) + c."""
    p = np.asarray(points_xyz, dtype=np.float64)
    c = np.asarray(centre_xyz, dtype=np.float64)
    return (p - c) @ np.asarray(matrix, dtype=np.float64).T + c


def _linear_weights(coord: np.ndarray, n: int):
    """Lower index, upper index and weights for linear interpolation; outside → weight 0."""
    i0 = np.floor(coord).astype(np.int64)
    f = coord - i0
    out = []
    for idx, w in ((i0, 1.0 - f), (i0 + 1, f)):
        ok = (idx >= 0) & (idx < n)
        out.append((np.where(ok, idx, 0), np.where(ok, w, 0.0)))
    return out


# Plane operators are cached per (plane shape, angle): a tilt series calls rotate and its adjoint
# once per tilt and sweep, so the cache must hold a whole series (Ren: 60 tilts). One operator holds
# ≤ 4·na·nb float32 weights + int32 indices (≈ 0.3 MB at 96², 2 MB at 256²); 128 of them ≤ 40 MB
# at 96², 260 MB at 256².
@lru_cache(maxsize=128)
def _plane_operator(shape2, angle_deg: float, centre2):
    """float32 CSR copy of :func:`_plane_matrix` (cached)."""
    return _plane_matrix(shape2, angle_deg, centre2).astype(np.float32)


def _plane_matrix(shape2, angle_deg: float, centre2):
    """Sparse bilinear rotation of an (na, nb) plane by angle (deg) about centre; rows = output pixels (float64).

    The plane axes are (a, b) = (z, x) for a tilt about y, with a' = −b sinθ + a cosθ and
    b' = b cosθ + a sinθ, so the pull-back samples V at Rᵀ(r − c) + c.
    """
    na, nb = shape2
    t = math.radians(angle_deg)
    c, s = math.cos(t), math.sin(t)
    ca, cb = centre2
    a, b = np.meshgrid(np.arange(na, dtype=np.float64) - ca, np.arange(nb, dtype=np.float64) - cb, indexing="ij")
    # source = Rᵀ (output − c) + c in the (b, a) = (x, z) plane: x_src = c x + (−s) z ... (see module doc)
    b_src = c * b - s * a + cb
    a_src = s * b + c * a + ca
    rows = np.arange(na * nb)
    ia = _linear_weights(a_src.ravel(), na)
    ib = _linear_weights(b_src.ravel(), nb)
    data, cols, rr = [], [], []
    for ja, wa in ia:
        for jb, wb in ib:
            w = wa * wb
            keep = w != 0
            data.append(w[keep])
            cols.append((ja * nb + jb)[keep])
            rr.append(rows[keep])
    m = sp.csr_matrix((np.concatenate(data), (np.concatenate(rr), np.concatenate(cols))),
                      shape=(na * nb, na * nb))
    m.sum_duplicates()
    return m


@lru_cache(maxsize=8)
def _volume_operator(shape, matrix_key, centre):
    """Sparse trilinear operator for a general rotation (8 weights per output voxel)."""
    nz, ny, nx = shape
    R = np.array(matrix_key, dtype=np.float64).reshape(3, 3)
    cx, cy, cz = centre
    z, y, x = np.meshgrid(np.arange(nz) - cz, np.arange(ny) - cy, np.arange(nx) - cx, indexing="ij")
    out = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)
    src = out @ R + np.array([cx, cy, cz])  # Rᵀ applied to row vectors: r Rᵀᵀ = r R
    rows = np.arange(out.shape[0])
    wx = _linear_weights(src[:, 0], nx)
    wy = _linear_weights(src[:, 1], ny)
    wz = _linear_weights(src[:, 2], nz)
    data, cols, rr = [], [], []
    for jz, az in wz:
        for jy, ay in wy:
            for jx, ax in wx:
                w = az * ay * ax
                keep = w != 0
                data.append(w[keep])
                cols.append(((jz * ny + jy) * nx + jx)[keep])
                rr.append(rows[keep])
    n = nz * ny * nx
    return sp.csr_matrix((np.concatenate(data).astype(np.float32), (np.concatenate(rr), np.concatenate(cols))),
                         shape=(n, n))


def _centre(shape):
    return tuple(n / 2.0 for n in shape)


def _axis_plane(volume_shape, axis):
    nz, ny, nx = volume_shape
    if axis == "y":
        return (nz, nx)  # planes (z, x), one per y
    if axis == "x":
        return (nz, ny)
    return (ny, nx)


def _to_planes(vol, axis, xp):
    nz, ny, nx = vol.shape[-3:]
    if axis == "y":
        return xp.moveaxis(vol, -2, 0).reshape(ny, nz * nx)
    if axis == "x":
        return xp.moveaxis(vol, -1, 0).reshape(nx, nz * ny)
    return vol.reshape(nz, ny * nx)


def _from_planes(planes, axis, shape, xp):
    nz, ny, nx = shape
    if axis == "y":
        return xp.moveaxis(planes.reshape(ny, nz, nx), 0, -2)
    if axis == "x":
        return xp.moveaxis(planes.reshape(nx, nz, ny), 0, -1)
    return planes.reshape(nz, ny, nx)


def _plane_angle(angle_deg, axis):
    # in-plane angle with the (a, b) plane axes of _axis_plane so that the 3D matrix is axis_rotation_matrix
    if axis == "y":
        return float(angle_deg)  # (a, b) = (z, x): x' = x c + z s
    if axis == "x":
        return -float(angle_deg)  # (a, b) = (z, y): y' = y c − z s
    return -float(angle_deg)  # (a, b) = (y, x): x' = x c − y s


def _sparse_apply(m, planes, xp, transpose=False):
    if xp is not np:  # pragma: no cover - GPU
        import cupyx.scipy.sparse as csp

        m = csp.csr_matrix(m)
    op = m.T if transpose else m
    return xp.asarray((op @ planes.T).T)


def rotate(volume, angle_deg: float = 0.0, axis: str = "y", matrix=None, xp=None):
    """Rotated volume (trilinear): about ``axis`` by ``angle_deg`` or by a general 3×3 ``matrix``."""
    xp = xp or get_array_module(volume)
    shape = tuple(volume.shape)
    if matrix is None:
        if axis not in AXES:
            raise TembenchError(f"tilt_axis must be one of {AXES}; got {axis!r}")
        if float(angle_deg) == 0.0:
            return volume.copy()
        m = _plane_operator(_axis_plane(shape, axis), _plane_angle(angle_deg, axis),
                            _centre(_axis_plane(shape, axis)))
        planes = _to_planes(volume, axis, xp)
        return xp.ascontiguousarray(_from_planes(_sparse_apply(m, planes, xp), axis, shape, xp),
                                    dtype=volume.dtype)
    m = _volume_operator(shape, tuple(np.asarray(matrix, float).ravel().round(12)), _centre(shape[::-1]))
    return _sparse_apply(m, volume.reshape(1, -1), xp).reshape(shape).astype(volume.dtype, copy=False)


def rotate_adjoint(volume, angle_deg: float = 0.0, axis: str = "y", matrix=None, xp=None):
    """Exact adjoint (transpose) of :func:`rotate` with the same arguments."""
    xp = xp or get_array_module(volume)
    shape = tuple(volume.shape)
    if matrix is None:
        if float(angle_deg) == 0.0:
            return volume.copy()
        m = _plane_operator(_axis_plane(shape, axis), _plane_angle(angle_deg, axis),
                            _centre(_axis_plane(shape, axis)))
        planes = _to_planes(volume, axis, xp)
        return xp.ascontiguousarray(_from_planes(_sparse_apply(m, planes, xp, transpose=True), axis, shape, xp),
                                    dtype=volume.dtype)
    m = _volume_operator(shape, tuple(np.asarray(matrix, float).ravel().round(12)), _centre(shape[::-1]))
    return _sparse_apply(m, volume.reshape(1, -1), xp, transpose=True).reshape(shape).astype(volume.dtype,
                                                                                             copy=False)


def euler_rotate(volume, euler_deg, xp=None):
    """Turn the object by the RELION Euler rotation R = R_z(psi) R_y(tilt) R_z(rot) (``euler_deg`` =
    (rot, tilt, psi) degrees) as three plane rotations (bilinear, one 2D operator each, shared by all
    planes): rot about z, then tilt about y, then psi about z; zero angles are skipped (no blur).

    Memory: three cached plane operators (≤ 4·n² weights each) instead of one trilinear volume
    operator (8·n³ weights: 57 MB at 96³), so a tilt series with per-tilt Euler angles fits.
    Slightly blurrier than :func:`rotate` with ``matrix`` (three interpolations instead of one).
    """
    rot, tilt, psi = (float(a) for a in euler_deg)
    v = volume
    for angle, axis in ((rot, "z"), (tilt, "y"), (psi, "z")):
        if angle != 0.0:
            v = rotate(v, angle, axis, xp=xp)
    return v.copy() if v is volume else v


def euler_rotate_adjoint(volume, euler_deg, xp=None):
    """Exact adjoint (transpose) of :func:`euler_rotate`: the plane adjoints in reverse order."""
    rot, tilt, psi = (float(a) for a in euler_deg)
    v = volume
    for angle, axis in ((psi, "z"), (tilt, "y"), (rot, "z")):
        if angle != 0.0:
            v = rotate_adjoint(v, angle, axis, xp=xp)
    return v.copy() if v is volume else v


# --- slice binning (Ren 2020 App. A4, eqs A.11–A.13) -----------------------------------------
def bin_slices(volume, n_bin: int, xp=None):
    """B_N: sum consecutive groups of ``n_bin`` slices along axis 0 (last group may be shorter).

    A volume in V with voxel depth s becomes projected potentials in V·Å after multiplying by s.
    """
    xp = xp or get_array_module(volume)
    n_bin = int(n_bin)
    if n_bin < 1:
        raise TembenchError(f"slice binning factor must be >= 1; got {n_bin}")
    nz = volume.shape[0]
    n_out = -(-nz // n_bin)
    pad = n_out * n_bin - nz
    if pad:
        volume = xp.concatenate([volume, xp.zeros((pad,) + volume.shape[1:], volume.dtype)])
    return volume.reshape((n_out, n_bin) + volume.shape[1:]).sum(axis=1)


def bin_slices_adjoint(binned, n_bin: int, nz: int, xp=None):
    """B_N†: copy each binned slice back to its ``n_bin`` source slices (Ren eq A.13)."""
    xp = xp or get_array_module(binned)
    rep = xp.repeat(binned, int(n_bin), axis=0)
    return rep[:nz]


# --- fused rotation and slice binning ---------------------------------------------------------
def rotate_bin_operator(volume_shape, angle_deg: float, axis: str = "y", n_bin: int = 1):
    """Sparse matrix of B_{n_bin} ∘ R_θ (rotation about ``axis``, then binning along z) on one plane.

    The planes normal to ``axis`` are (a, b) = (z, x) for a tilt about y and (z, y) about x; the
    matrix maps a plane flattened as a·nb + b (na·nb columns) to the binned plane o·nb + b
    (n_out·nb rows, n_out = ⌈nz/n_bin⌉). Applied to a volume stored (z, b, axis), reshaped to
    (nz·nb, n_axis), it gives the binned slabs as (n_out, nb, n_axis); its transpose is the exact
    adjoint R†B†. float32 CSR; the product is formed in float64. Memory ≤ 4·nz·nb weights
    (float32 + int32 index each), fewer after binning merges neighbours (≈ 0.3 MB at 96², N_B = 1).
    """
    if axis not in ("x", "y"):
        raise TembenchError(f"rotate_bin_operator: axis must be 'x' or 'y' (binning is along z); got {axis!r}")
    n_bin = int(n_bin)
    if n_bin < 1:
        raise TembenchError(f"slice binning factor must be >= 1; got {n_bin}")
    plane = _axis_plane(tuple(volume_shape), axis)
    na, nb = plane
    if float(angle_deg) == 0.0:
        rot = sp.identity(na * nb, dtype=np.float64, format="csr")
    else:
        rot = _plane_matrix(plane, _plane_angle(angle_deg, axis), _centre(plane))
    n_out = -(-na // n_bin)
    binz = sp.csr_matrix((np.ones(na), (np.arange(na) // n_bin, np.arange(na))), shape=(n_out, na))
    m = (sp.kron(binz, sp.identity(nb, dtype=np.float64), format="csr") @ rot).tocsr()
    m.sum_duplicates()
    m.sort_indices()
    return m.astype(np.float32)


def rotate_and_bin(volume, angle_deg: float, axis: str = "y", n_bin: int = 1, operator=None, xp=None):
    """B_{n_bin}{R_θ[V]} in one sparse product (= ``bin_slices(rotate(V, θ, axis), n_bin)``), (n_out, ny, nx).

    ``operator``: a precomputed :func:`rotate_bin_operator` of the same arguments.
    """
    xp = xp or get_array_module(volume)
    shape = tuple(volume.shape)
    m = operator if operator is not None else rotate_bin_operator(shape, angle_deg, axis, n_bin)
    n_out = m.shape[0] // _axis_plane(shape, axis)[1]
    out = _sparse_apply(m, _to_planes(volume, axis, xp), xp)
    return xp.ascontiguousarray(_from_planes(out, axis, (n_out,) + shape[1:], xp), dtype=volume.dtype)


def rotate_and_bin_adjoint(binned, angle_deg: float, axis: str = "y", n_bin: int = 1, nz: int | None = None,
                           operator=None, xp=None):
    """Exact adjoint R_θ† B_{n_bin}† of :func:`rotate_and_bin`: binned (n_out, ny, nx) → volume (nz, ny, nx)."""
    xp = xp or get_array_module(binned)
    n_out = binned.shape[0]
    nz = n_out * int(n_bin) if nz is None else int(nz)
    shape = (nz,) + tuple(binned.shape[1:])
    m = operator if operator is not None else rotate_bin_operator(shape, angle_deg, axis, n_bin)
    out = _sparse_apply(m, _to_planes(binned, axis, xp), xp, transpose=True)
    return xp.ascontiguousarray(_from_planes(out, axis, shape, xp), dtype=binned.dtype)


def binned_thicknesses(nz: int, n_bin: int, slice_thickness_A: float) -> np.ndarray:
    """Thickness of each binned slice (Å), the last one shorter if n_bin does not divide nz."""
    n_out = -(-nz // n_bin)
    counts = np.full(n_out, n_bin)
    counts[-1] = nz - (n_out - 1) * n_bin
    return counts * float(slice_thickness_A)
