"""You et al. 2025: the Pt@Al2O3 core–shell nanocube of the simulation benchmark."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from tembench import Params, SampleModel, hookimpl
from tembench._lazy import lazy_import
from tembench.structures import amorphous as am
from tembench.structures import crystal as cr
from tembench.types import Sample

_spatial = lazy_import("scipy.spatial")  # k-d trees; loaded on first use (fast start-up)

Vec3i = tuple[int, int, int]
AL2O3_MOLAR_MASS_G = 2 * 26.9815 + 3 * 15.9994


class PtAl2O3Nanocube(SampleModel):
    """Pt@Al2O3 core–shell nanocube (You 2025): an fcc Pt cube inside a cubic Al2O3 shell.

    The paper gives neither sizes nor the shell structure. ``shell: corundum`` (default) cuts
    α-Al2O3 ([0001] along the beam) into the shell, so light Al/O columns stack above and below
    the heavy Pt core along the beam at 0° tilt, as in the paper's Fig. 2; ``amorphous`` fills
    it with a random dense packing relaxed in a periodic block at ``al2o3_density_g_cm3`` and cut
    to the shell (no chemical order; min distances Al–O 1.75, O–O 2.5, Al–Al 2.7 Å). Shell atoms closer than ``min_core_shell_distance_A`` to a
    Pt atom are removed. Labels: "core" / "shell".
    """

    name = "pt_al2o3_nanocube"

    class Params(Params):
        core_edge_A: float = Field(20.0, gt=0, description="edge of the Pt core cube in Å")
        shell_thickness_A: float = Field(8.0, ge=0, description="Al2O3 shell thickness on every face in Å")
        a_pt_A: float = Field(3.924, gt=0, description="Pt lattice constant in Å")
        core_zone_axis: Vec3i = Field((0, 0, 1), description="Pt direction along the beam (z)")
        shell: Literal["corundum", "amorphous"] = "corundum"
        al2o3_density_g_cm3: float = Field(3.1, gt=0, description="density of the amorphous shell (g/cm³)")
        min_core_shell_distance_A: float = Field(2.0, ge=0, description="shell atoms closer to Pt are removed (Å)")
        padding_A: float = Field(5.0, ge=0, description="vacuum around the cube in Å")
        rms_displacement_A: float | dict[str, float] | None = Field(
            None, description="rms thermal displacement per axis in Å: one value or {symbol: Å}")

        @model_validator(mode="after")
        def _sizes(self):
            if self.core_edge_A < self.a_pt_A:
                raise ValueError(f"core_edge_A = {self.core_edge_A} Å must be at least one Pt cell ({self.a_pt_A} Å)")
            return self

    @classmethod
    def preflight(cls, params: Params, upstream=None):
        """Cell and atom count from the geometry (Pt 4 atoms per a³, Al2O3 ≈ 0.117 atoms/Å³ at 3.99 g/cm³)."""
        from tembench.preflight import BYTES_PER_ATOM, Footprint

        e, t = params.core_edge_A, params.shell_thickness_A
        outer = e + 2 * t
        n = int(e**3 * 4 / params.a_pt_A**3 + (outer**3 - e**3) * 0.117)
        side = float(outer + 2 * params.padding_A)
        return Footprint(peak_bytes=n * BYTES_PER_ATOM * 2, n_atoms=n, cell_A=(side, side, side),
                         what=f"pt_al2o3_nanocube: about {n:,} atoms in a {side:.0f} Å cube",
                         fix="Use a smaller core_edge_A / shell_thickness_A.")

    def build(self, params: Params, rng: np.random.Generator) -> Sample:
        p = params
        e, t = p.core_edge_A, p.shell_thickness_A
        pt = cr.bulk_atoms("Pt", "fcc", p.a_pt_A, cubic=True)
        rot, _ = cr.zone_axis_frame(pt.cell.array, p.core_zone_axis)
        # offset the lattice by a quarter cell so no atom sits exactly on a cube face
        core, core_z, _ = cr.fill_box(pt, rot, (e / 2,) * 3, origin_frac=(0.25, 0.25, 0.25))
        outer = e + 2 * t
        shell = np.zeros((0, 3))
        shell_z = np.zeros(0, np.int64)
        if t > 0:
            def in_shell(q):
                return np.any(np.abs(q) >= e / 2, axis=1) & np.all(np.abs(q) < outer / 2, axis=1)

            if p.shell == "corundum":
                al2o3 = cr.bulk_atoms("Al2O3")
                r_s, _ = cr.zone_axis_frame(al2o3.cell.array, (0, 0, 1))
                shell, shell_z, _ = cr.fill_box(al2o3, r_s, (outer / 2,) * 3)
                keep = in_shell(shell)
                shell, shell_z = shell[keep], shell_z[keep]
            else:
                # a periodic glass block (no walls to pile up against) cut to the shell, like the corundum
                # case; the density target then refers to bulk glass
                block = am.Region(lo=(-outer / 2,) * 3, hi=(outer / 2,) * 3, periodic=True)
                shell, shell_z = am.amorphous_dense(
                    block, rng, {13: 2, 8: 3}, AL2O3_MOLAR_MASS_G, p.al2o3_density_g_cm3,
                    {(13, 8): 1.75, (8, 8): 2.5, (13, 13): 2.7})
                keep = in_shell(shell)
                shell, shell_z = shell[keep], shell_z[keep]
            if len(core) and p.min_core_shell_distance_A > 0:
                dist, _ = _spatial.cKDTree(core).query(shell, distance_upper_bound=p.min_core_shell_distance_A)
                shell, shell_z = shell[np.isinf(dist)], shell_z[np.isinf(dist)]
        pos = np.concatenate([core, shell])
        numbers = np.concatenate([core_z, shell_z]).astype(np.int64)
        labels = np.array(["core"] * len(core) + ["shell"] * len(shell))
        cell = np.full(3, outer + 2 * p.padding_A)
        pos = np.clip(pos + cell / 2, 0.0, np.nextafter(cell, 0))
        return Sample(positions_A=pos, numbers=numbers, cell_A=cell, name="pt_al2o3_nanocube", labels=labels,
                      rms_displacement_A=cr.rms_per_atom(numbers, p.rms_displacement_A),
                      metadata={"core_edge_A": e, "shell_thickness_A": t, "shell": p.shell,
                                "shell_volume_A3": float(outer**3 - e**3)})


@hookimpl
def tembench_register_samples():
    return [PtAl2O3Nanocube]
