"""2D materials: monolayers and (twisted) bilayers in orthorhombic boxes.

A hexagonal monolayer (graphene, hBN, 2H-MoS2) has lattice a1 = a(1, 0), a2 = a(−1/2, √3/2).
A twisted bilayer is commensurate when a lattice vector v = m a1 + n a2 of layer 1 also
belongs to layer 2 = R(φ) layer 1; with w = n a1 + m a2 (|w| = |v|, a lattice vector of
layer 1) that holds for φ = the signed angle from w to v, since then R(φ) w = v.
The moiré cell is then spanned by v and R(60°)v; the orthorhombic cell used here has edges
X = v and Y = 2R(60°)v − v (|Y| = √3|v|), rotated so that X lies along x.
"""

from __future__ import annotations

import numpy as np

from tembench._lazy import lazy_import
from tembench.errors import TembenchError

_spatial = lazy_import("scipy.spatial")  # k-d trees; loaded on first use (fast start-up)

# a (Å), interlayer spacing (Å) of the bulk stacking, and the monolayer builder
LAYERED = {
    "graphene": {"a_A": 2.46, "interlayer_A": 3.35},
    "hBN": {"a_A": 2.504, "interlayer_A": 3.33},
    "MoS2": {"a_A": 3.16, "interlayer_A": 6.15},
}


def monolayer(material: str, a_A: float | None = None):
    """Monolayer unit cell as ``ase.Atoms`` (2D hexagonal cell, atoms centred on z = 0)."""
    from ase.build import graphene, mx2

    if material not in LAYERED:
        raise TembenchError(f"unknown 2D material {material!r}; choose one of {sorted(LAYERED)}")
    a = a_A or LAYERED[material]["a_A"]
    if material == "graphene":
        return graphene(formula="C2", a=a, vacuum=None)
    if material == "hBN":
        return graphene(formula="BN", a=a, vacuum=None)
    return mx2(formula="MoS2", kind="2H", a=a, thickness=3.17, vacuum=None)


def _rot(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, -s], [s, c]])


def commensurate_angle(m: int, n: int) -> float:
    """Twist angle (deg) in (0, 60) that makes m a1 + n a2 common to both layers."""
    a1, a2 = np.array([1.0, 0.0]), np.array([-0.5, np.sqrt(3) / 2])
    v, w = m * a1 + n * a2, n * a1 + m * a2
    ang = np.degrees(np.arctan2(w[0] * v[1] - w[1] * v[0], w @ v))
    return float(ang)


def find_commensurate(twist_deg: float, a_A: float, max_period_A: float) -> tuple[int, int, float]:
    """(m, n, angle) of the commensurate twist closest to ``twist_deg`` with moiré period |v| ≤ max_period_A.

    The hexagonal lattice is invariant under 60° rotations, so an angle φ found for (m, n) also
    works as φ + 60k; the returned angle is the equivalent closest to ``twist_deg`` (ties: the
    shorter period).
    """
    best = None
    # |m a1 + n a2|² = a²(m² + n² − mn) ≥ a² max(m, n)² · 3/4, so indices stay below 2/√3 · period/a
    nmax = int(max_period_A / a_A * 2 / np.sqrt(3)) + 2
    for m in range(0, nmax + 1):
        for n in range(1, nmax + 1):
            if m == n:
                continue
            length = a_A * np.sqrt(m * m + n * n - m * n)
            if length > max_period_A:
                continue
            ang = commensurate_angle(m, n)
            eq = ang + 60.0 * round((twist_deg - ang) / 60.0)
            key = (round(abs(twist_deg - eq), 9), round(length, 6))
            if best is None or key < best[0]:
                best = (key, m, n, eq)
    if best is None:
        raise TembenchError(f"no commensurate twist with a period ≤ max_period_A = {max_period_A} Å; raise max_period_A")
    return best[1], best[2], best[3]


def fill_layer(cell2d: np.ndarray, frac_xy: np.ndarray, z_A: np.ndarray, numbers: np.ndarray, rotation_deg: float,
               shift_A: np.ndarray, rect_A: tuple[float, float], periodic: bool) -> tuple[np.ndarray, np.ndarray]:
    """Atoms of one rotated layer inside the rectangle [0, Lx) × [0, Ly).

    The layer lattice is ``cell2d`` (2×2 rows a1, a2) with basis ``frac_xy`` (fractional) and
    heights ``z_A``, rotated by ``rotation_deg`` about the origin, then shifted by ``shift_A``.
    """
    lx, ly = rect_A
    R = _rot(rotation_deg)
    lat = cell2d @ R.T
    corners = np.array([[0, 0], [lx, 0], [0, ly], [lx, ly]]) - shift_A
    frac_c = corners @ np.linalg.inv(lat)
    lo = np.floor(frac_c.min(axis=0)).astype(int) - 2
    hi = np.ceil(frac_c.max(axis=0)).astype(int) + 2
    ii, jj = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1), indexing="ij")
    t = np.column_stack([ii.ravel(), jj.ravel()])
    frac = (t[:, None, :] + frac_xy[None, :, :]).reshape(-1, 2)
    xy = frac @ lat + shift_A
    zz = np.tile(z_A, len(t))
    nn = np.tile(numbers, len(t))
    if periodic:
        inside = np.all((xy > -0.5) & (xy < np.array([lx, ly]) + 0.5), axis=1)
        xy, zz, nn = xy[inside], zz[inside], nn[inside]
        xy = np.mod(xy, [lx, ly])
        xy = np.where(xy >= [lx, ly], xy - [lx, ly], xy)
        # periodic images of the same atom land on each other: keep one
        pts = np.column_stack([xy, zz])
        dup = _spatial.cKDTree(pts, boxsize=[lx, ly, 1e9]).query_pairs(1e-3, output_type="ndarray")
        keep = np.ones(len(pts), bool)
        keep[dup[:, 1]] = False
        xy, zz, nn = xy[keep], zz[keep], nn[keep]
    else:
        inside = np.all((xy >= 0) & (xy < np.array([lx, ly])), axis=1)
        xy, zz, nn = xy[inside], zz[inside], nn[inside]
    return np.column_stack([xy, zz]), nn
