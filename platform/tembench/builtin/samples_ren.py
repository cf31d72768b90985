"""Ren et al. 2020 §2.1: the Si/SiO2 core–shell needle tip (with the §3.5 vacancy and App. A2 W variants)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from tembench import Params, SampleModel, hookimpl
from tembench._lazy import lazy_import
from tembench.errors import TembenchError
from tembench.structures import amorphous as am
from tembench.structures import crystal as cr
from tembench.types import Sample

_spatial = lazy_import("scipy.spatial")  # k-d trees; loaded on first use (fast start-up)

Vec3i = tuple[int, int, int]
Region = Literal["all", "core", "shell"]


class SiSiO2Needle(SampleModel):
    """Ren 2020 needle: diamond-Si core (cylinder along y, hemispherical tip) in an amorphous SiO2 shell.

    The core is cut from bulk Si with ``zone_axis`` along the beam (z) and ``needle_axis`` along
    y (the tilt axis). The shell covers the sides and the tip with a random tetrahedral a-SiO2
    network (tembench.structures.amorphous: Si–O ≈ 1.6 Å, SiO4 tetrahedra, target density
    2.2 g/cm³) standing in for the DFT model the paper used; shell atoms closer than
    ``min_core_shell_distance_A`` (1.2 Å in the paper) to a core atom are removed. The default
    sizes (10 nm tip diameter, 2 nm shell) give ≈1.5·10⁵ atoms like the paper; scale the radii
    and length down for quick runs. Options: random vacancies (§3.5, 5 %), Si → W (App. A2).
    Labels: "core" / "shell".
    """

    name = "si_sio2_needle"

    class Params(Params):
        core_radius_A: float = Field(50.0, gt=0, description="radius of the crystalline Si core (tip radius) in Å")
        shell_thickness_A: float = Field(20.0, ge=0, description="amorphous SiO2 shell thickness in Å")
        core_length_A: float = Field(170.0, gt=0, description="core length along y (base to apex) in Å, ≥ radius")
        a_A: float = Field(5.431, gt=0, description="Si lattice constant in Å")
        zone_axis: Vec3i = Field((1, 1, 0), description="Si direction along the beam (z) at zero tilt")
        needle_axis: Vec3i = Field((0, 0, 1), description="Si direction along the needle / tilt axis (y)")
        sio2_density_g_cm3: float = Field(2.2, gt=0, description="target mass density of the a-SiO2 shell")
        min_core_shell_distance_A: float = Field(1.2, ge=0, description="shell atoms closer than this to a core "
                                                 "atom are removed (Ren 2020: 1.2 Å)")
        relax_iterations: int = Field(150, ge=0, description="gradient steps relaxing the SiO2 network")
        padding_A: float = Field(5.0, ge=0, description="vacuum around the needle (all sides) in Å")
        vacancies: bool = Field(False, description="remove a random fraction of atoms (Ren §3.5)")
        vacancy_fraction: float = Field(0.05, ge=0, lt=1, description="fraction removed when vacancies: true")
        vacancy_region: Region = Field("all", description="where vacancies go: all | core | shell")
        substitute_si_with: str | None = Field(None, description="element replacing Si (Ren App. A2: 'W')")
        substitution_fraction: float = Field(1.0, ge=0, le=1, description="fraction of Si replaced")
        substitution_region: Region = Field("all", description="where Si is replaced: all | core | shell")
        rms_displacement_A: float | dict[str, float] | None = Field(
            None, description="rms thermal displacement per axis in Å, one value or {symbol: Å}")

        @model_validator(mode="after")
        def _geometry(self):
            if self.core_length_A < self.core_radius_A:
                raise ValueError(f"core_length_A = {self.core_length_A} must be ≥ core_radius_A = "
                                 f"{self.core_radius_A} (the tip is a hemisphere of that radius)")
            return self

    def build(self, params: Params, rng: np.random.Generator) -> Sample:
        return build_needle(params, rng)

    @classmethod
    def preflight(cls, params: Params, upstream=None):
        """Cell and atom count from the geometry (Si 0.0499 atoms/Å³, a-SiO2 ≈ 0.066 atoms/Å³ at 2.2 g/cm³)."""
        from tembench.preflight import BYTES_PER_ATOM, Footprint

        R, t, L, pad = params.core_radius_A, params.shell_thickness_A, params.core_length_A, params.padding_A
        extent = np.array([2 * (R + t), L + t, 2 * (R + t)])
        cell = tuple(float(v) for v in extent + 2 * pad)
        core = np.pi * R**2 * (L - R) + 2 / 3 * np.pi * R**3
        outer = np.pi * (R + t) ** 2 * (L - R) + 2 / 3 * np.pi * (R + t) ** 3
        n = int(core * 8 / params.a_A**3 + (outer - core) * 0.0662 * params.sio2_density_g_cm3 / 2.2)
        return Footprint(peak_bytes=n * BYTES_PER_ATOM * 2, n_atoms=n, cell_A=cell,
                         what=f"si_sio2_needle: about {n:,} atoms in a {cell[0]:.0f} x {cell[1]:.0f} x {cell[2]:.0f} Å cell",
                         fix="Use a smaller core_radius_A / core_length_A / shell_thickness_A.")


def build_needle(p: SiSiO2Needle.Params, rng: np.random.Generator) -> Sample:
    R, t, L, pad = p.core_radius_A, p.shell_thickness_A, p.core_length_A, p.padding_A
    atoms = cr.bulk_atoms("Si", "diamond", p.a_A, cubic=True)
    rot, _ = cr.zone_axis_frame(atoms.cell.array, p.zone_axis, y_axis=p.needle_axis)
    # Core centred on the lattice origin; needle frame: axis along y, base at y = -L/2.
    core, core_z, _ = cr.fill_box(atoms, rot, (R, L / 2, R))
    keep = cr.needle_distance(core, R, L) <= 1e-9
    core, core_z = core[keep], core_z[keep]

    shell = np.zeros((0, 3))
    shell_z = np.zeros(0, np.int64)
    stats: dict = {}
    if t > 0:
        def in_shell(q):
            d = cr.needle_distance(q, R, L)
            return (d > 0) & (d <= t)

        region = am.Region(lo=(-R - t, -L / 2, -R - t), hi=(R + t, L / 2 + t, R + t), contains=in_shell)
        near = core[cr.needle_distance(core, R, L) > -4.0]  # only surface core atoms can touch the shell
        shell, shell_z, stats = am.amorphous_sio2(region, rng, p.sio2_density_g_cm3, obstacles=near,
                                                  obstacle_min_A=2.0, n_iter=p.relax_iterations)
        # Ren 2020: enforce a minimum core–shell distance by removing offending shell atoms; also drop
        # atoms the relaxation pushed below the base plane.
        ok = shell[:, 1] >= -L / 2
        if len(near) and p.min_core_shell_distance_A > 0:
            dist, _ = _spatial.cKDTree(near).query(shell, distance_upper_bound=p.min_core_shell_distance_A)
            ok &= np.isinf(dist)
        stats["removed_close_to_core"] = int((~ok).sum())
        shell, shell_z = shell[ok], shell_z[ok]

    pos = np.concatenate([core, shell])
    numbers = np.concatenate([core_z, shell_z]).astype(np.int64)
    labels = np.array(["core"] * len(core) + ["shell"] * len(shell))

    region_mask = {"all": np.ones(len(numbers), bool), "core": labels == "core", "shell": labels == "shell"}
    if p.substitute_si_with:
        from ase.data import atomic_numbers

        if p.substitute_si_with not in atomic_numbers:
            raise TembenchError(f"si_sio2_needle: substitute_si_with = {p.substitute_si_with!r} is not an element "
                                "symbol; use e.g. 'W' (Ren 2020 App. A2).")
        cand = region_mask[p.substitution_region] & (numbers == 14)
        idx = np.flatnonzero(cand)
        n_sub = int(round(p.substitution_fraction * len(idx)))
        numbers[rng.choice(idx, size=n_sub, replace=False)] = atomic_numbers[p.substitute_si_with]
    if p.vacancies and p.vacancy_fraction > 0:
        keep = cr.remove_fraction(len(numbers), p.vacancy_fraction, rng, candidates=region_mask[p.vacancy_region])
        stats["vacancies"] = int((~keep).sum())
        pos, numbers, labels = pos[keep], numbers[keep], labels[keep]

    # Lab box: needle axis along y, vacuum padding on every side (base included).
    extent = np.array([2 * (R + t), L + t, 2 * (R + t)])
    cell = extent + 2 * pad
    shift = np.array([R + t + pad, L / 2 + pad, R + t + pad])
    pos = np.clip(pos + shift, 0.0, np.nextafter(cell, 0))
    return Sample(positions_A=pos, numbers=numbers, cell_A=cell, name="si_sio2_needle",
                  rms_displacement_A=cr.rms_per_atom(numbers, p.rms_displacement_A), labels=labels,
                  metadata={"core_radius_A": R, "shell_thickness_A": t, "core_length_A": L,
                            "needle_axis_y_from_A": pad, "zone_axis": list(p.zone_axis), **stats})


@hookimpl
def tembench_register_samples():
    return [SiSiO2Needle]
