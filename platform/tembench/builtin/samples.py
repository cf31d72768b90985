"""Generic samples: any ASE bulk crystal or structure file, oriented and cut to a shape."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from tembench import Params, SampleModel, hookimpl
from tembench.errors import TembenchError
from tembench.structures import crystal as cr
from tembench.types import Sample

Vec3i = tuple[int, int, int]
Vec3f = tuple[float, float, float]


def _padding3(padding_A) -> np.ndarray:
    pad = np.broadcast_to(np.asarray(padding_A, dtype=np.float64), (3,)).copy()
    if np.any(pad < 0):
        raise TembenchError(f"padding_A = {padding_A} must be ≥ 0 Å (vacuum added on both sides of each axis)")
    return pad


def place_in_box(positions_A: np.ndarray, extent_A, padding_A) -> tuple[np.ndarray, np.ndarray]:
    """Shift positions centred on 0 into a box of ``extent + 2 padding``; returns (positions, cell)."""
    pad = _padding3(padding_A)
    extent = np.asarray(extent_A, dtype=np.float64)
    cell = extent + 2 * pad
    pos = positions_A + cell / 2
    # Half-open shapes can leave an atom a rounding error above the top face.
    pos = np.clip(pos, 0.0, np.nextafter(cell, 0))
    return pos, cell


def wrap_into(positions_A: np.ndarray, cell_A) -> np.ndarray:
    """Periodic wrap into [0, cell) (np.mod can return exactly cell for tiny negative inputs)."""
    cell = np.asarray(cell_A, dtype=np.float64)
    pos = np.mod(positions_A, cell)
    return np.where(pos >= cell, pos - cell, pos)


class Crystal(SampleModel):
    """A crystal from an ASE bulk name or a CIF/XYZ file, oriented to a zone axis and cut to a shape.

    ``shape: periodic`` gives an orthorhombic periodic supercell (``repeat`` times the smallest
    orthogonal cell with ``zone_axis`` along the beam z); ``box``/``sphere``/``cube``/``needle``
    cut a finite piece from the infinite crystal, with the lattice origin at the shape centre,
    optionally rotated by ``rotation_deg`` about the beam, inside vacuum ``padding_A``.
    The needle is a cylinder along y (the usual tilt axis) with a hemispherical tip at +y.
    ``rms_displacement_A`` (per element) is recorded for frozen-phonon simulation; positions
    are the mean (undisplaced) sites.
    """

    name = "crystal"

    class Params(Params):
        material: str | None = Field("Si", description="ASE bulk name (element or formula, e.g. 'Si', 'Pt', 'MgO')")
        crystalstructure: str | None = Field(None, description="ASE crystal structure (fcc, diamond, rocksalt, "
                                             "perovskite needs `file`, ...); None = ASE reference")
        a_A: float | None = Field(None, gt=0, description="lattice constant a in Å (None = ASE reference)")
        c_A: float | None = Field(None, gt=0, description="lattice constant c in Å for hcp/hexagonal")
        cubic: bool = Field(True, description="build the conventional cubic cell (zone axes refer to it)")
        file: str | None = Field(None, description="CIF/XYZ/POSCAR file read with ase.io.read (overrides material)")
        zone_axis: Vec3i = Field((0, 0, 1), description="lattice direction [u v w] put along the beam (z)")
        x_axis: Vec3i | None = Field(None, description="lattice direction put along x (⟂ zone_axis); "
                                     "None = shortest perpendicular lattice vector")
        repeat: Vec3i = Field((1, 1, 1), description="periodic: repetitions of the oriented cell along x, y, z; "
                              "box without size_A: box size in oriented cells")
        shape: Literal["periodic", "box", "sphere", "cube", "needle"] = "periodic"
        size_A: Vec3f | None = Field(None, description="box: edge lengths (x, y, z) in Å")
        radius_A: float | None = Field(None, gt=0, description="sphere / needle radius in Å")
        edge_A: float | None = Field(None, gt=0, description="cube edge in Å")
        length_A: float | None = Field(None, gt=0, description="needle length along y (base to apex) in Å")
        rotation_deg: float = Field(0.0, description="rotation about the beam (z) in degrees (cut shapes only)")
        origin_shift_frac: Vec3f = Field((0.0, 0.0, 0.0), description="lattice point put at the shape centre, "
                                         "fractional coordinates of the unit cell")
        padding_A: float | Vec3f = Field(0.0, description="vacuum on both sides of x, y, z in Å")
        rms_displacement_A: float | dict[str, float] | None = Field(
            None, description="isotropic rms thermal displacement per axis in Å: one value or {symbol: Å}")
        vacancy_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of atoms removed at random")

        @field_validator("repeat")
        @classmethod
        def _positive_repeat(cls, v):
            if min(v) < 1:
                raise ValueError(f"repeat must be ≥ 1 along every axis, got {list(v)}")
            return v

    def build(self, params: Params, rng: np.random.Generator) -> Sample:
        return build_crystal(params, rng, name=params.material or "crystal")

    @classmethod
    def preflight(cls, params: Params, upstream=None):
        return crystal_footprint(params, cls.name)


def build_crystal(p: Crystal.Params, rng: np.random.Generator, name: str = "crystal") -> Sample:
    """Build the :class:`Crystal` sample from validated params (reused by the paper samples)."""
    atoms = cr.bulk_atoms(p.material, p.crystalstructure, p.a_A, p.c_A, p.cubic, p.file)
    if p.shape == "periodic":
        if p.rotation_deg % 360 != 0:
            raise TembenchError(f"crystal: rotation_deg = {p.rotation_deg} breaks the periodic supercell; "
                                "use shape: box (with size_A) to cut a rotated crystal, or set rotation_deg: 0.")
        sc = cr.oriented_supercell(atoms, p.zone_axis, p.x_axis).repeat(p.repeat)
        pos = sc.get_positions() - sc.get_cell().lengths() / 2  # centre so padding is symmetric
        pos, cell = place_in_box(pos, sc.get_cell().lengths(), p.padding_A)
        numbers = sc.get_atomic_numbers()
        if np.all(_padding3(p.padding_A) == 0):
            pos = wrap_into(sc.get_positions(), cell)
    else:
        R, P = cr.zone_axis_frame(atoms.cell.array, p.zone_axis, p.x_axis)
        R = cr.rotation_about_z(p.rotation_deg) @ R
        extent = _shape_extent(p, atoms, P)
        pos, numbers, _ = cr.fill_box(atoms, R, extent / 2, p.origin_shift_frac)
        mask = cr.shape_mask(pos, p.shape, size_A=extent, radius_A=p.radius_A, edge_A=p.edge_A, length_A=p.length_A)
        pos, numbers = pos[mask], numbers[mask]
        pos, cell = place_in_box(pos, extent, p.padding_A)
    if p.vacancy_fraction > 0:
        keep = cr.remove_fraction(len(numbers), p.vacancy_fraction, rng)
        pos, numbers = pos[keep], numbers[keep]
    if len(numbers) == 0:
        raise TembenchError(f"crystal: the {p.shape} is empty; enlarge size_A / radius_A / edge_A.")
    return Sample(positions_A=pos, numbers=numbers, cell_A=cell, name=name,
                  rms_displacement_A=cr.rms_per_atom(numbers, p.rms_displacement_A),
                  metadata={"zone_axis": list(p.zone_axis), "shape": p.shape})


def crystal_footprint(p: Crystal.Params, who: str = "crystal"):
    """Atoms, cell and build memory of :func:`build_crystal` from the unit cell alone (reads the file, if any)."""
    from tembench.preflight import BYTES_PER_ATOM, Footprint

    atoms = cr.bulk_atoms(p.material, p.crystalstructure, p.a_A, p.c_A, p.cubic, p.file)
    pad = _padding3(p.padding_A)
    if p.shape == "periodic":
        unit = cr.oriented_supercell(atoms, p.zone_axis, p.x_axis)
        extent = unit.get_cell().lengths() * np.asarray(p.repeat, dtype=np.float64)
        n_atoms = len(unit) * int(np.prod(np.asarray(p.repeat, dtype=np.int64)))
        fix = "Use a smaller `repeat`."
    else:
        _, P = cr.zone_axis_frame(atoms.cell.array, p.zone_axis, p.x_axis)
        extent = _shape_extent(p, atoms, P)
        volume = float(np.prod(extent))
        if p.shape == "sphere":
            volume *= np.pi / 6
        elif p.shape == "needle":
            r = extent[0] / 2
            volume = np.pi * r**2 * (extent[1] - r) + 2 / 3 * np.pi * r**3
        n_atoms = int(round(volume * len(atoms) / abs(atoms.cell.volume)))
        fix = "Use a smaller size_A / radius_A / edge_A / length_A."
    cell = tuple(float(v) for v in extent + 2 * pad)
    what = f"{who}: about {n_atoms:,} atoms in a {cell[0]:.0f} x {cell[1]:.0f} x {cell[2]:.0f} Å cell"
    return Footprint(peak_bytes=n_atoms * BYTES_PER_ATOM, what=what, fix=fix, n_atoms=n_atoms, cell_A=cell)


def _shape_extent(p: Crystal.Params, atoms, P) -> np.ndarray:
    def need(field: str):
        v = getattr(p, field)
        if v is None:
            raise TembenchError(f"crystal: shape {p.shape!r} needs `{field}` (Å)")
        return v

    if p.shape == "box":
        if p.size_A is not None:
            if min(p.size_A) <= 0:
                raise TembenchError(f"crystal: size_A = {list(p.size_A)} must be > 0 Å on every axis")
            return np.asarray(p.size_A, dtype=np.float64)
        lengths = np.linalg.norm((P if P is not None else np.eye(3)) @ atoms.cell.array, axis=1)
        return lengths * np.asarray(p.repeat)
    if p.shape == "sphere":
        return np.full(3, 2 * need("radius_A"))
    if p.shape == "cube":
        return np.full(3, need("edge_A"))
    r, length = need("radius_A"), need("length_A")
    if length < r:
        raise TembenchError(f"crystal: needle length_A = {length} must be ≥ radius_A = {r} (the tip is a hemisphere)")
    return np.array([2 * r, length, 2 * r])


@hookimpl
def tembench_register_samples():
    return [Crystal]
