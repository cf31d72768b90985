"""Friedrich 2023 samples: Pt bulk / nanoparticle / edge dislocation (Ch. 2.3), SrTiO3, MgO, MoS2 and graphene (Ch. 4)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from tembench import Params, SampleModel, hookimpl
from tembench.builtin.samples import Crystal, build_crystal, crystal_footprint, place_in_box
from tembench.errors import TembenchError
from tembench.structures import crystal as cr
from tembench.structures import layers as ly
from tembench.structures.defects import edge_dislocation_displacement
from tembench.types import Sample

Vec3i = tuple[int, int, int]
A_PT = 3.924
RMS_PT_A = 0.065  # Pt at 300 K: B ≈ 0.33 Å², rms = sqrt(B / 8π²)
RMS_TABLE_4_1_A = 0.08  # Friedrich Table 4.1 (training data)


class _CrystalBacked(SampleModel):
    """A sample that is a :class:`Crystal` with derived params (``crystal_params``): its pre-run estimate is the crystal's."""

    @classmethod
    def preflight(cls, params, upstream=None):
        return crystal_footprint(cls.crystal_params(params), cls.name)


class PtBulk(_CrystalBacked):
    """Pt bulk crystal in [001] (Friedrich 2023 §2.3, Fig. 2.7): thickness in unit cells (2…75), periodic laterally."""

    name = "pt_bulk"

    class Params(Params):
        thickness_cells: int = Field(10, ge=1, le=500, description="thickness along the beam in unit cells "
                                     "(thesis: 2…75)")
        lateral_cells: int = Field(5, ge=1, description="unit cells along x and y (periodic)")
        a_A: float = Field(A_PT, gt=0, description="Pt lattice constant in Å")
        zone_axis: Vec3i = Field((0, 0, 1), description="direction along the beam")
        rms_displacement_A: float | None = Field(RMS_PT_A, ge=0, description="rms thermal displacement per axis (Å)")

    @staticmethod
    def crystal_params(params: Params) -> Crystal.Params:
        return Crystal.Params(material="Pt", crystalstructure="fcc", a_A=params.a_A, zone_axis=params.zone_axis,
                              repeat=(params.lateral_cells, params.lateral_cells, params.thickness_cells),
                              rms_displacement_A=params.rms_displacement_A)

    def build(self, params: Params, rng: np.random.Generator) -> Sample:
        s = build_crystal(self.crystal_params(params), rng, name="pt_bulk")
        s.metadata["thickness_A"] = float(s.cell_A[2])
        return s


class PtNanoparticle(_CrystalBacked):
    """Spherical Pt nanoparticle, 11 unit cells in diameter, in [100], in vacuum (Friedrich Fig. 2.9: 333 columns).

    The thesis gives the shape (sphere), size (11 unit cells across), orientation ([100]) and
    the count, 333 atomic columns, but not the construction. The defaults reproduce all four:
    the sphere is centred like a cube of 11 × 11 × 11 unit cells, on an octahedral interstice
    (``centre: octahedral``), and ``atoms_inside: whole`` keeps the atoms that lie wholly inside
    it — atoms as touching hard spheres of radius a/(2√2), half the nearest-neighbour distance —
    so the particle's outer surface, not its outermost atom centres, is 11 cells across (333
    columns, 2310 atoms; any diameter of 10.25–10.34 cells for the atom centres gives 333).
    ``atoms_inside: centre`` keeps every atom centre within the sphere (an atom-centred 11-cell
    sphere then has 373 columns). The column count along the beam is in metadata.
    """

    name = "pt_nanoparticle"
    version = "2"  # v1 default: atom-centred sphere of atom centres, 373 columns at 11 cells

    class Params(Params):
        diameter_cells: float = Field(11.0, gt=0, description="particle diameter in unit cells of a_A (thesis: 11)")
        a_A: float = Field(A_PT, gt=0, description="Pt lattice constant in Å")
        zone_axis: Vec3i = Field((1, 0, 0), description="direction along the beam")
        centre: Literal["atom", "octahedral"] = Field("octahedral", description="site at the sphere centre: an "
                                                      "octahedral interstice (centre of a block of unit cells) or an atom")
        atoms_inside: Literal["whole", "centre"] = Field("whole", description="keep atoms lying wholly inside the "
                                                         "sphere (hard-sphere radius a/2√2) or every atom centre in it")
        padding_A: float = Field(5.0, ge=0, description="vacuum around the particle in Å")
        rms_displacement_A: float | None = Field(RMS_PT_A, ge=0, description="rms thermal displacement per axis (Å)")

    @staticmethod
    def crystal_params(params: Params) -> Crystal.Params:
        shift = (0.0, 0.0, 0.0) if params.centre == "atom" else (0.5, 0.0, 0.0)
        radius = params.diameter_cells * params.a_A / 2
        if params.atoms_inside == "whole":
            radius -= params.a_A / (2 * np.sqrt(2))
        if radius <= 0:
            raise TembenchError(f"pt_nanoparticle: diameter_cells {params.diameter_cells} is too small to hold a whole "
                                "atom; use atoms_inside: centre or a larger diameter.")
        return Crystal.Params(material="Pt", crystalstructure="fcc", a_A=params.a_A, zone_axis=params.zone_axis,
                              shape="sphere", radius_A=float(radius),
                              origin_shift_frac=shift, padding_A=params.padding_A,
                              rms_displacement_A=params.rms_displacement_A)

    def build(self, params: Params, rng: np.random.Generator) -> Sample:
        s = build_crystal(self.crystal_params(params), rng, name="pt_nanoparticle")
        cols = np.unique(np.round(s.positions_A[:, :2] / 0.05).astype(np.int64), axis=0)
        s.metadata["n_columns"] = int(len(cols))
        return s


class PtEdgeDislocation(SampleModel):
    """Pt in [112] with a ½[1-10](11-1) edge dislocation from the isotropic elastic field (Friedrich Fig. 2.8).

    The slab is cut with [112] (the dislocation line) along the beam z, b = a/2 [1-10] along x
    and the (11-1) glide plane normal along y (the thesis' "½[110] in (111)"); atoms are moved
    by the Hirth–Lothe displacement field (tembench.structures.defects), as Atomsk does. The
    core sits between atomic planes near the centre of the slab; its position is in metadata.
    The slab is periodic along z only.
    """

    name = "pt_edge_dislocation"

    class Params(Params):
        size_x_A: float = Field(50.0, gt=0, description="slab width along b (x) in Å")
        size_y_A: float = Field(50.0, gt=0, description="slab height along the glide-plane normal (y) in Å")
        thickness_cells: int = Field(6, ge=1, description="thickness in [112] cells (a√6 = 9.61 Å each)")
        a_A: float = Field(A_PT, gt=0, description="Pt lattice constant in Å")
        poisson_ratio: float = Field(0.38, gt=-1, lt=0.5, description="Poisson ratio ν of Pt")
        padding_A: float = Field(2.0, ge=0, description="vacuum on the x and y faces in Å (≥ b/2 keeps atoms in the box)")
        dislocation: bool = Field(True, description="false gives the perfect reference slab")
        rms_displacement_A: float | None = Field(RMS_PT_A, ge=0, description="rms thermal displacement per axis (Å)")

    @classmethod
    def preflight(cls, params: Params, upstream=None):
        from tembench.preflight import BYTES_PER_ATOM, Footprint

        lz = params.thickness_cells * params.a_A * np.sqrt(6)
        n = int(params.size_x_A * params.size_y_A * lz * 4 / params.a_A**3)
        cell = (params.size_x_A + 2 * params.padding_A, params.size_y_A + 2 * params.padding_A, float(lz))
        return Footprint(peak_bytes=n * BYTES_PER_ATOM, n_atoms=n, cell_A=cell,
                         what=f"pt_edge_dislocation: about {n:,} atoms", fix="Use a smaller size_x_A / size_y_A / "
                         "thickness_cells.")

    def build(self, params: Params, rng: np.random.Generator) -> Sample:
        a = params.a_A
        atoms = cr.bulk_atoms("Pt", "fcc", a, cubic=True)
        rot, _ = cr.zone_axis_frame(atoms.cell.array, (1, 1, 2), x_axis=(1, -1, 0))
        lz = params.thickness_cells * a * np.sqrt(6)
        extent = np.array([params.size_x_A, params.size_y_A, lz])
        pos, numbers, _ = cr.fill_box(atoms, rot, extent / 2)
        b = a / np.sqrt(2)
        x0 = _between_planes(pos[:, 0])
        y0 = _between_planes(pos[:, 1])
        if params.dislocation:
            ux, uy = edge_dislocation_displacement(pos[:, 0] - x0, pos[:, 1] - y0, b, params.poisson_ratio)
            pos = pos + np.column_stack([ux, uy, np.zeros_like(ux)])
        pad = (params.padding_A, params.padding_A, 0.0)
        pos, cell = place_in_box(pos, extent, pad)
        pos[:, 2] = np.mod(pos[:, 2], cell[2])
        core = np.array([x0, y0]) + cell[:2] / 2
        return Sample(positions_A=pos, numbers=numbers, cell_A=cell, name="pt_edge_dislocation",
                      rms_displacement_A=cr.rms_per_atom(numbers, params.rms_displacement_A),
                      metadata={"burgers_vector_A": [b, 0.0, 0.0], "core_xy_A": core.tolist(),
                                "line_direction": [1, 1, 2], "glide_plane": [1, 1, -1],
                                "poisson_ratio": params.poisson_ratio})


def _between_planes(coord: np.ndarray) -> float:
    """A coordinate midway between the two distinct atomic planes nearest to 0."""
    levels = np.unique(np.round(coord, 4))
    i = int(np.searchsorted(levels, 0.0))
    lo = levels[max(i - 1, 0)]
    hi = levels[min(i, len(levels) - 1)]
    if hi == lo:
        hi = levels[min(i + 1, len(levels) - 1)]
    return float((lo + hi) / 2)


class SrTiO3(Crystal):
    """SrTiO3 perovskite (a = 3.905 Å) in a low-index zone axis (Friedrich Figs 1.3, 3.5, 4.8); options as ``crystal``."""

    name = "srtio3"

    class Params(Crystal.Params):
        material: str | None = Field("SrTiO3", description="perovskite SrTiO3 (or BaTiO3)")
        repeat: Vec3i = Field((5, 5, 5), description="repetitions of the oriented cell along x, y, z")
        rms_displacement_A: float | dict[str, float] | None = Field(
            RMS_TABLE_4_1_A, description="rms thermal displacement per axis in Å (Table 4.1: 0.08)")

    def build(self, params: Params, rng: np.random.Generator) -> Sample:
        return build_crystal(params, rng, name="srtio3")


class MgO(Crystal):
    """MgO rock salt (a = 4.212 Å) in a low-index zone axis or cut to a particle (Friedrich Fig. 4.7); options as ``crystal``."""

    name = "mgo"

    class Params(Crystal.Params):
        material: str | None = Field("MgO", description="rock-salt MgO")
        repeat: Vec3i = Field((5, 5, 5), description="repetitions of the oriented cell along x, y, z")
        rms_displacement_A: float | dict[str, float] | None = Field(
            RMS_TABLE_4_1_A, description="rms thermal displacement per axis in Å (Table 4.1: 0.08)")

    def build(self, params: Params, rng: np.random.Generator) -> Sample:
        return build_crystal(params, rng, name="mgo")


class TwistedBilayer(SampleModel):
    """Twisted bilayer (or monolayer) of MoS2, graphene or hBN (Friedrich Figs 4.5, 4.11).

    ``periodic: true`` picks the commensurate twist closest to ``twist_deg`` whose moiré period
    is ≤ ``max_period_A`` and builds the exact orthorhombic moiré cell (the realised angle is
    in metadata); ``periodic: false`` cuts both layers, rotated by ∓twist/2, to a ``size_A``
    rectangle with the exact angle (edges are not periodic). Stacking at zero twist: AA
    (graphene/hBN) or the 2H stacking of MoS2 (second layer rotated by 60°) with
    ``stacking: natural``; ``AB`` shifts graphene's second layer by (a1 + a2)/3.
    """

    name = "twisted_bilayer"

    class Params(Params):
        material: Literal["MoS2", "graphene", "hBN"] = "MoS2"
        n_layers: Literal[1, 2] = 2
        twist_deg: float = Field(9.43, description="twist of layer 2 relative to layer 1 (degrees)")
        stacking: Literal["natural", "AA", "AB"] = Field("natural", description="zero-twist stacking: natural = "
                                                         "2H for MoS2, AB for graphene/hBN")
        periodic: bool = Field(True, description="commensurate periodic moiré cell (else a finite rectangle)")
        max_period_A: float = Field(60.0, gt=0, description="largest moiré period accepted (periodic mode) in Å")
        repeat: tuple[int, int] = Field((1, 1), description="moiré cells along x, y (periodic mode)")
        size_A: tuple[float, float] = Field((50.0, 50.0), description="rectangle (x, y) in Å (finite mode)")
        a_A: float | None = Field(None, gt=0, description="in-plane lattice constant (None: MoS2 3.16, graphene "
                                  "2.46, hBN 2.504 Å)")
        interlayer_A: float | None = Field(None, gt=0, description="layer spacing (None: MoS2 6.15, graphene 3.35 Å)")
        vacuum_A: float = Field(5.0, ge=0, description="vacuum above and below along z in Å")
        rms_displacement_A: float | dict[str, float] | None = Field(
            RMS_TABLE_4_1_A, description="rms thermal displacement per axis in Å")

    @classmethod
    def preflight(cls, params: Params, upstream=None):
        """Cell and atom count from the moiré (or rectangle) geometry, without filling the layers."""
        from tembench.preflight import BYTES_PER_ATOM, Footprint

        p = params
        mono = ly.monolayer(p.material, p.a_A)
        a = float(np.linalg.norm(mono.cell.array[0]))
        if p.periodic:
            twist = p.twist_deg if p.n_layers == 2 else 0.0
            m, n, _ = ly.find_commensurate(twist, a, p.max_period_A) if twist else (1, 0, 0.0)
            v = np.array([m, n]) @ mono.cell.array[:2, :2]
            v60 = np.array([0.5 * v[0] - np.sqrt(3) / 2 * v[1], np.sqrt(3) / 2 * v[0] + 0.5 * v[1]])
            rect = (np.linalg.norm(v) * p.repeat[0], np.linalg.norm(2 * v60 - v) * p.repeat[1])
        else:
            rect = p.size_A
        per_area = len(mono) / abs(np.linalg.det(mono.cell.array[:2, :2]))
        n = int(rect[0] * rect[1] * per_area * p.n_layers)
        spacing = p.interlayer_A or ly.LAYERED[p.material]["interlayer_A"]
        zloc = mono.positions[:, 2]
        cell = (float(rect[0]), float(rect[1]),
                float((spacing if p.n_layers == 2 else 0.0) + np.ptp(zloc) + 2 * p.vacuum_A))
        return Footprint(peak_bytes=n * BYTES_PER_ATOM, n_atoms=n, cell_A=cell,
                         what=f"{cls.name}: about {n:,} atoms in a {cell[0]:.0f} x {cell[1]:.0f} Å layer",
                         fix="Use a smaller repeat / size_A / max_period_A.")

    def build(self, params: Params, rng: np.random.Generator) -> Sample:
        p = params
        mono = ly.monolayer(p.material, p.a_A)
        a = float(np.linalg.norm(mono.cell.array[0]))
        cell2d = mono.cell.array[:2, :2]
        frac = mono.get_scaled_positions(wrap=False)[:, :2]
        zloc = mono.positions[:, 2]
        numbers = mono.get_atomic_numbers()
        spacing = p.interlayer_A or ly.LAYERED[p.material]["interlayer_A"]
        twist = p.twist_deg if p.n_layers == 2 else 0.0
        extra_rot = 60.0 if (p.material == "MoS2" and p.stacking == "natural") else 0.0
        ab = p.stacking == "AB" or (p.stacking == "natural" and p.material != "MoS2")
        if p.periodic:
            m, n, angle = ly.find_commensurate(twist, a, p.max_period_A) if twist else (1, 0, 0.0)
            v = np.array([m, n]) @ cell2d
            c60, s60 = 0.5, np.sqrt(3) / 2
            v60 = np.array([c60 * v[0] - s60 * v[1], s60 * v[0] + c60 * v[1]])
            base = -np.degrees(np.arctan2(v[1], v[0]))
            rect = (np.linalg.norm(v) * p.repeat[0], np.linalg.norm(2 * v60 - v) * p.repeat[1])
            rot1, rot2 = base, base + angle
        else:
            angle, rect = twist, p.size_A
            rot1, rot2 = -twist / 2, twist / 2
        shift2 = np.zeros(2)
        if ab and p.n_layers == 2:
            shift2 = (cell2d[0] + cell2d[1]) / 3 @ _rot2(rot2).T
        z_lo = p.vacuum_A + (zloc.max() - zloc.min()) / 2
        pos1, num1 = ly.fill_layer(cell2d, frac, zloc + z_lo, numbers, rot1, np.zeros(2), rect, p.periodic)
        parts, nums, labels = [pos1], [num1], ["layer1"] * len(num1)
        if p.n_layers == 2:
            pos2, num2 = ly.fill_layer(cell2d, frac, zloc + z_lo + spacing, numbers, rot2 + extra_rot, shift2,
                                       rect, p.periodic)
            parts.append(pos2)
            nums.append(num2)
            labels += ["layer2"] * len(num2)
        pos = np.concatenate(parts)
        numbers_all = np.concatenate(nums)
        thickness = (spacing if p.n_layers == 2 else 0.0) + (zloc.max() - zloc.min())
        cell = np.array([rect[0], rect[1], thickness + 2 * p.vacuum_A])
        if len(numbers_all) == 0:
            raise TembenchError("twisted_bilayer: empty structure; enlarge size_A")
        return Sample(positions_A=pos, numbers=numbers_all, cell_A=cell, name=f"{p.material}_bilayer",
                      rms_displacement_A=cr.rms_per_atom(numbers_all, p.rms_displacement_A), labels=np.array(labels),
                      metadata={"twist_deg": float(angle), "requested_twist_deg": float(p.twist_deg),
                                "periodic": p.periodic, "a_A": a})


def _rot2(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, -s], [s, c]])


class Graphene(TwistedBilayer):
    """Graphene monolayer, or twisted bilayer graphene with ``n_layers: 2`` (Friedrich Fig. 4.5); options as ``twisted_bilayer``."""

    name = "graphene"

    class Params(TwistedBilayer.Params):
        material: Literal["MoS2", "graphene", "hBN"] = "graphene"
        n_layers: Literal[1, 2] = 1
        twist_deg: float = Field(1.05, description="twist of layer 2 (degrees), used when n_layers = 2")
        max_period_A: float = Field(140.0, gt=0, description="largest moiré period accepted (periodic mode) in Å")

    def build(self, params: Params, rng: np.random.Generator) -> Sample:
        return TwistedBilayer.build(self, params, rng)


@hookimpl
def tembench_register_samples():
    return [PtBulk, PtNanoparticle, PtEdgeDislocation, SrTiO3, MgO, TwistedBilayer, Graphene]
