"""Crystals: build by name or file, orient to a zone axis, fill boxes and shapes.

Conventions: positions (x, y, z) in Å with z along the beam. A zone axis [u v w] is a
real-space lattice direction in the basis of the cell the crystal was built with (for
``ase.build.bulk(..., cubic=True)`` that is the conventional cubic cell, so [112] means
a(1, 1, 2)). Rotations are proper (det = +1) and map crystal Cartesian coordinates to the lab
frame as ``r_lab = R @ r_crystal`` (row vectors: ``positions @ R.T``).
"""

from __future__ import annotations

from functools import reduce
from math import gcd
from pathlib import Path

import numpy as np

from tembench.errors import TembenchError

SHAPES = ("box", "sphere", "cube", "needle")


def _perovskite(a_A: float | None, c_A: float | None, symbols=("Sr", "Ti", "O"), a0=3.905):
    from ase.spacegroup import crystal

    a = a_A or a0
    return crystal(list(symbols), basis=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0)], spacegroup=221,
                   cellpar=[a, a, a, 90, 90, 90])


def _corundum(a_A: float | None, c_A: float | None):
    from ase.spacegroup import crystal

    # α-Al2O3 (R-3c, hexagonal setting): Al 12c z = 0.35216, O 18e x = 0.30624 (Lewis et al. 1982)
    return crystal(["Al", "O"], basis=[(0, 0, 0.35216), (0.30624, 0, 0.25)], spacegroup=167,
                   cellpar=[a_A or 4.7602, a_A or 4.7602, c_A or 12.9933, 90, 90, 120])


# Structures ase.build.bulk has no reference for, by name (a_A / c_A override the lattice constants).
KNOWN_STRUCTURES = {
    "SrTiO3": _perovskite,
    "BaTiO3": lambda a, c: _perovskite(a, c, ("Ba", "Ti", "O"), 4.00),
    "Al2O3": _corundum,
}


def bulk_atoms(material: str | None = None, crystalstructure: str | None = None, a_A: float | None = None,
               c_A: float | None = None, cubic: bool = True, file: str | None = None):
    """An ``ase.Atoms`` unit cell from an ASE bulk name (e.g. "Si", "Pt", "MgO") or a structure file."""
    import ase.build
    import ase.io

    if file:
        path = Path(file).expanduser()
        if not path.exists():
            raise TembenchError(f"crystal file {str(path)!r} does not exist; give a path to a CIF/XYZ/POSCAR file "
                                "readable by ase.io.read, or use `material` for an ASE bulk crystal.")
        try:
            atoms = ase.io.read(str(path))
        except Exception as exc:  # noqa: BLE001 - ase raises many kinds
            raise TembenchError(f"crystal file {str(path)!r} could not be read by ase.io.read "
                                f"({type(exc).__name__}: {str(exc) or 'no detail'}); check that it is a valid CIF, XYZ or "
                                "POSCAR file") from exc
        if not atoms.cell.rank == 3:
            raise TembenchError(f"crystal file {str(path)!r} has no 3D cell; add cell vectors (CIF or extended XYZ).")
        return atoms
    if not material:
        raise TembenchError("crystal: give either `material` (an ASE bulk name such as 'Si', 'Pt', 'MgO') "
                            "or `file` (a CIF/XYZ path).")
    if material in KNOWN_STRUCTURES and not crystalstructure:
        return KNOWN_STRUCTURES[material](a_A, c_A)
    if material == "MgO" and not crystalstructure:
        crystalstructure, a_A = "rocksalt", a_A or 4.212
    kwargs = {}
    if crystalstructure:
        kwargs["crystalstructure"] = crystalstructure
    if a_A is not None:
        kwargs["a"] = a_A
    if c_A is not None:
        kwargs["c"] = c_A
    try:
        return ase.build.bulk(material, cubic=cubic, **kwargs)
    except Exception as exc:  # noqa: BLE001 - ase raises ValueError/KeyError/RuntimeError
        raise TembenchError(
            f"crystal: ase.build.bulk({material!r}, crystalstructure={crystalstructure!r}, a={a_A}, "
            f"cubic={cubic}) failed: {exc}. Give `crystalstructure` and `a_A` for elements or compounds ASE "
            "has no reference structure for (e.g. crystalstructure: rocksalt, a_A: 4.21 for MgO), or use "
            "`file`.") from exc


def _int_vector(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.int64).reshape(3)
    if not v.any():
        raise TembenchError(f"a lattice direction must not be [0 0 0], got {v.tolist()}")
    g = reduce(gcd, (abs(int(x)) for x in v))
    return v // g


def _lattice_candidates(max_index: int) -> np.ndarray:
    r = np.arange(-max_index, max_index + 1)
    g = np.stack(np.meshgrid(r, r, r, indexing="ij"), axis=-1).reshape(-1, 3)
    return g[np.any(g != 0, axis=1)]


def _shortest_perpendicular(cell: np.ndarray, normals: list[np.ndarray], prefer: np.ndarray,
                            max_index: int) -> np.ndarray | None:
    """Shortest integer lattice vector perpendicular to every Cartesian vector in ``normals``.

    Ties (equal length) go to the vector most aligned with ``prefer`` (Cartesian), so [001]
    keeps a → x.
    """
    cand = _lattice_candidates(max_index)
    cart = cand @ cell
    length = np.linalg.norm(cart, axis=1)
    ok = np.ones(len(cand), bool)
    for n in normals:
        n = n / np.linalg.norm(n)
        ok &= np.abs(cart @ n) < 1e-6 * length
    if not ok.any():
        return None
    cand, cart, length = cand[ok], cart[ok], length[ok]
    align = cart @ (prefer / np.linalg.norm(prefer)) / length
    order = np.lexsort((-align, np.round(length, 6)))
    return cand[order[0]]


def zone_axis_frame(cell, zone_axis, x_axis=None, max_index: int = 6, y_axis=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Rotation R putting lattice direction ``zone_axis`` along +z and ``x_axis`` (or ``y_axis``) along +x (+y).

    Returns ``(R, P)`` where P is the integer matrix whose rows are lattice vectors along the
    new x, y, z (an orthogonal supercell) or None when the lattice has no such vectors with
    indices up to ``max_index`` (then only a cut, not a periodic supercell, is possible).
    """
    cell = np.asarray(cell, dtype=np.float64)
    z_int = _int_vector(zone_axis)
    z_cart = z_int @ cell
    if y_axis is not None and x_axis is not None:
        raise TembenchError("give x_axis or y_axis, not both (the other follows from the zone axis)")
    if y_axis is not None:
        y_int = _int_vector(y_axis)
        y_cart = y_int @ cell
        if abs(y_cart @ z_cart) > 1e-6 * np.linalg.norm(y_cart) * np.linalg.norm(z_cart):
            raise TembenchError(f"y_axis {y_int.tolist()} is not perpendicular to zone_axis {z_int.tolist()} "
                                "in this lattice; choose a direction with zero dot product (Cartesian).")
        x_cart = np.cross(y_cart, z_cart)
        cand = _lattice_candidates(max_index)
        cc = cand @ cell
        par = np.linalg.norm(np.cross(cc, x_cart), axis=1) < 1e-6 * np.linalg.norm(cc, axis=1) * np.linalg.norm(x_cart)
        par &= cc @ x_cart > 0
        x_axis = cand[par][np.argmin(np.linalg.norm(cc[par], axis=1))] if par.any() else None
        if x_axis is None:
            ez, ey = z_cart / np.linalg.norm(z_cart), y_cart / np.linalg.norm(y_cart)
            return np.stack([np.cross(ey, ez), ey, ez]), None
    if x_axis is not None:
        x_int = _int_vector(x_axis)
        x_cart = x_int @ cell
        if abs(x_cart @ z_cart) > 1e-6 * np.linalg.norm(x_cart) * np.linalg.norm(z_cart):
            raise TembenchError(f"x_axis {x_int.tolist()} is not perpendicular to zone_axis {z_int.tolist()} "
                                "in this lattice; choose a direction with zero dot product (Cartesian).")
    else:
        x_int = _shortest_perpendicular(cell, [z_cart], prefer=cell[0] + 1e-3 * cell[1], max_index=max_index)
        if x_int is None:  # no lattice vector ⟂ zone axis: any perpendicular direction will do for a cut
            a = cell[0] if abs(cell[0] @ z_cart) < 0.99 * np.linalg.norm(cell[0]) * np.linalg.norm(z_cart) else cell[1]
            x_cart = a - (a @ z_cart) / (z_cart @ z_cart) * z_cart
        else:
            x_cart = x_int @ cell
    ez = z_cart / np.linalg.norm(z_cart)
    ex = x_cart / np.linalg.norm(x_cart)
    ey = np.cross(ez, ex)
    R = np.stack([ex, ey, ez])
    P = None
    if x_int is not None:
        y_int = _shortest_perpendicular(cell, [z_cart, x_cart], prefer=ey, max_index=max_index)
        if y_int is not None:
            if (y_int @ cell) @ ey < 0:
                y_int = -y_int
            P = np.stack([x_int, y_int, z_int])
    return R, P


def rotation_about_z(angle_deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def oriented_supercell(atoms, zone_axis, x_axis=None, max_index: int = 6):
    """Periodic orthorhombic supercell of ``atoms`` with ``zone_axis`` along z (ase.Atoms, diagonal cell)."""
    from ase.build import make_supercell

    R, P = zone_axis_frame(atoms.cell.array, zone_axis, x_axis, max_index)
    if P is None:
        raise TembenchError(
            f"zone_axis {list(zone_axis)}: this lattice has no orthogonal lattice vectors (indices ≤ {max_index}) "
            "perpendicular to it, so no periodic orthorhombic supercell exists. Cut a finite piece instead "
            "(shape: box with size_A and padding_A).")
    sc = make_supercell(atoms, P, wrap=True)
    pos = sc.get_positions() @ R.T
    lengths = np.linalg.norm(sc.cell.array, axis=1)
    sc.set_cell(np.diag(lengths), scale_atoms=False)
    sc.set_positions(pos)
    sc.wrap()
    return sc


def fill_box(atoms, rotation: np.ndarray, half_extent_A, origin_frac=(0.0, 0.0, 0.0)):
    """All atoms of the infinite crystal (rotated by ``rotation``) inside the lab box [-h, h).

    The lattice point ``origin_frac`` (fractional coordinates of the crystal cell) sits at the
    lab origin. Returns ``(positions (N, 3) Å, numbers (N,), site (N,) index into atoms)``.
    """
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    h = np.asarray(half_extent_A, dtype=np.float64).reshape(3)
    rotation = np.asarray(rotation, dtype=np.float64)
    corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * h
    frac_corners = (corners @ rotation) @ np.linalg.inv(cell) + np.asarray(origin_frac)
    lo = np.floor(frac_corners.min(axis=0)).astype(int) - 1
    hi = np.ceil(frac_corners.max(axis=0)).astype(int) + 1
    basis = atoms.get_scaled_positions(wrap=False) - np.asarray(origin_frac)
    numbers = atoms.get_atomic_numbers()
    out_pos, out_num, out_site = [], [], []
    ij = np.stack(np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1), indexing="ij"),
                  axis=-1).reshape(-1, 2)
    for k in range(lo[2], hi[2] + 1):  # one layer of cells at a time keeps memory at O(layer)
        t = np.column_stack([ij, np.full(len(ij), k)])
        frac = (t[:, None, :] + basis[None, :, :]).reshape(-1, 3)
        lab = (frac @ cell) @ rotation.T
        keep = np.all((lab >= -h - 1e-9) & (lab < h - 1e-9), axis=1)
        if keep.any():
            out_pos.append(lab[keep])
            out_num.append(np.tile(numbers, len(t))[keep])
            out_site.append(np.tile(np.arange(len(numbers)), len(t))[keep])
    if not out_pos:
        return np.zeros((0, 3)), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_pos), np.concatenate(out_num), np.concatenate(out_site)


def shape_mask(positions_A: np.ndarray, shape: str, size_A=None, radius_A: float | None = None,
               edge_A: float | None = None, length_A: float | None = None) -> np.ndarray:
    """Boolean mask of positions (relative to the shape centre) inside ``shape``.

    box: -size_A/2 ≤ x, y, z < size_A/2 (half-open, so periodic copies do not overlap).
    sphere: r ≤ radius_A. cube: -edge_A/2 ≤ x, y, z < edge_A/2.
    needle: a cylinder of radius_A along y with a hemispherical cap at +y; the total length
    along y (flat base to tip apex) is length_A, centred on 0.
    """
    p = np.asarray(positions_A, dtype=np.float64)
    if shape == "box":
        h = np.asarray(size_A, float) / 2
        return np.all((p >= -h - 1e-9) & (p < h - 1e-9), axis=1)
    if shape == "sphere":
        return np.einsum("ij,ij->i", p, p) <= radius_A**2 + 1e-9
    if shape == "cube":
        return np.all((p >= -edge_A / 2 - 1e-9) & (p < edge_A / 2 - 1e-9), axis=1)
    if shape == "needle":
        return needle_distance(p, radius_A, length_A) <= 1e-9
    raise TembenchError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def needle_distance(positions_A: np.ndarray, radius_A: float, length_A: float) -> np.ndarray:
    """Signed distance (Å, negative inside) to a needle: cylinder ‖(x, z)‖ ≤ R along y, cap at +y.

    The base is the plane y = -length/2, the apex is at y = +length/2, the cap centre at
    y = length/2 - R. Needs length_A ≥ radius_A.
    """
    p = np.asarray(positions_A, dtype=np.float64)
    y0 = length_A / 2 - radius_A
    rho = np.hypot(p[:, 0], p[:, 2])
    below = p[:, 1] <= y0
    d_cyl = rho - radius_A
    d_cap = np.sqrt(rho**2 + (p[:, 1] - y0) ** 2) - radius_A
    d = np.where(below, d_cyl, d_cap)
    d_base = -length_A / 2 - p[:, 1]  # outside if below the base plane
    return np.maximum(d, d_base)


def rms_per_atom(numbers: np.ndarray, rms) -> np.ndarray | None:
    """Per-atom rms displacement (Å) from a scalar or a {symbol: Å} mapping; None if not given."""
    if rms is None:
        return None
    numbers = np.asarray(numbers)
    if isinstance(rms, dict):
        from ase.data import atomic_numbers

        out = np.zeros(len(numbers))
        for sym, val in rms.items():
            if sym not in atomic_numbers:
                raise TembenchError(f"rms_displacement_A: unknown element symbol {sym!r}; use e.g. {{'Si': 0.076}}")
            if val < 0:
                raise TembenchError(f"rms_displacement_A[{sym!r}] = {val} must be ≥ 0 Å")
            out[numbers == atomic_numbers[sym]] = float(val)
        return out
    if float(rms) < 0:
        raise TembenchError(f"rms_displacement_A = {rms} must be ≥ 0 Å")
    return np.full(len(numbers), float(rms))


def remove_fraction(n_atoms: int, fraction: float, rng: np.random.Generator, candidates=None) -> np.ndarray:
    """Boolean keep-mask removing round(fraction × #candidates) atoms chosen uniformly without replacement."""
    keep = np.ones(n_atoms, bool)
    idx = np.arange(n_atoms) if candidates is None else np.flatnonzero(candidates)
    n_remove = int(round(fraction * len(idx)))
    if n_remove:
        keep[rng.choice(idx, size=n_remove, replace=False)] = False
    return keep
