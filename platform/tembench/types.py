"""The data that flows through a scenario: Sample → Measurement → Reconstruction → metrics.

Conventions (see DESIGN.md): lengths in Å, energies in keV, optical angles in mrad, tilt angles
in degrees, dose in e/Å². Atom positions are (x, y, z) as in ASE with z along the beam; arrays
are indexed (z, y, x), 4D-STEM data (scan_y, scan_x, k_y, k_x). Arrays held by these objects
are numpy arrays on the host: components convert from cupy before returning.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tembench.errors import TembenchError


@dataclass
class Sample:
    """Atoms in an orthorhombic box: the ground truth of a scenario.

    Attributes
    ----------
    positions_A : (N, 3) float64, Cartesian (x, y, z) in Å, z along the beam.
    numbers : (N,) int, atomic numbers Z.
    cell_A : (3,) float64, box lengths (x, y, z) in Å; the box spans [0, cell) on each axis.
    rms_displacement_A : (N,) float64 or None, isotropic rms thermal displacement per atom
        (per axis) in Å, used by frozen-phonon simulations.
    labels : optional per-atom labels (e.g. "core", "shell") for region-of-interest scoring.
    """

    positions_A: np.ndarray
    numbers: np.ndarray
    cell_A: np.ndarray
    name: str = "sample"
    rms_displacement_A: np.ndarray | None = None
    labels: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.positions_A = np.asarray(self.positions_A, dtype=np.float64).reshape(-1, 3)
        self.numbers = np.asarray(self.numbers, dtype=np.int64).reshape(-1)
        self.cell_A = np.asarray(self.cell_A, dtype=np.float64).reshape(3)
        n = len(self.numbers)
        if len(self.positions_A) != n:
            raise TembenchError(
                f"Sample {self.name!r}: {len(self.positions_A)} positions but {n} atomic numbers"
            )
        if np.any(self.cell_A <= 0):
            raise TembenchError(f"Sample {self.name!r}: cell lengths must be > 0 Å, got {self.cell_A}")
        if np.any((self.numbers < 1) | (self.numbers > 118)):
            bad = sorted(set(self.numbers[(self.numbers < 1) | (self.numbers > 118)].tolist()))
            raise TembenchError(f"Sample {self.name!r}: unknown atomic numbers {bad}")
        if self.rms_displacement_A is not None:
            rms = np.asarray(self.rms_displacement_A, dtype=np.float64)
            self.rms_displacement_A = np.broadcast_to(rms, (n,)).copy()
        if self.labels is not None:
            self.labels = np.asarray(self.labels).reshape(-1)
            if len(self.labels) != n:
                raise TembenchError(f"Sample {self.name!r}: {len(self.labels)} labels for {n} atoms")

    def __len__(self) -> int:
        return len(self.numbers)

    @property
    def elements(self) -> list[int]:
        """Distinct atomic numbers, ascending."""
        return sorted(set(self.numbers.tolist()))

    @property
    def symbols(self) -> list[str]:
        from ase.data import chemical_symbols

        return [chemical_symbols[z] for z in self.numbers]

    # --- interoperability ------------------------------------------------------------------
    def to_ase(self):
        """Return an ``ase.Atoms`` with the same positions, numbers and (orthorhombic) cell."""
        from ase import Atoms

        atoms = Atoms(numbers=self.numbers, positions=self.positions_A, cell=np.diag(self.cell_A), pbc=True)
        if self.rms_displacement_A is not None:
            atoms.set_array("rms_displacement_A", self.rms_displacement_A)
        if self.labels is not None:
            atoms.set_array("labels", self.labels.astype(str))
        atoms.info["name"] = self.name
        return atoms

    @classmethod
    def from_ase(cls, atoms, name: str | None = None, rms_displacement_A=None) -> Sample:
        """Build a Sample from ``ase.Atoms``; the cell must be orthorhombic.

        Non-orthogonal cells are rejected rather than silently changed: make them orthogonal
        first (``ase.build.make_supercell`` / ``orthogonalize``) or cut a box with a sample
        plugin.
        """
        cell = np.asarray(atoms.cell.array, dtype=np.float64)
        if not np.allclose(cell, np.diag(np.diag(cell)), atol=1e-8):
            raise TembenchError(
                "Sample.from_ase needs an orthorhombic cell (a diagonal cell matrix); got "
                f"{cell.round(4).tolist()}. Orthogonalise the structure first, e.g. with "
                "ase.build.make_supercell or by cutting a box."
            )
        if rms_displacement_A is None and "rms_displacement_A" in atoms.arrays:
            rms_displacement_A = atoms.get_array("rms_displacement_A")
        labels = atoms.get_array("labels") if "labels" in atoms.arrays else None
        return cls(
            positions_A=atoms.get_positions(),
            numbers=atoms.get_atomic_numbers(),
            cell_A=np.diag(cell),
            name=name or atoms.info.get("name", atoms.get_chemical_formula()),
            rms_displacement_A=rms_displacement_A,
            labels=labels,
        )

    def copy(self) -> Sample:
        return dataclasses.replace(
            self,
            positions_A=self.positions_A.copy(),
            numbers=self.numbers.copy(),
            cell_A=self.cell_A.copy(),
            rms_displacement_A=None if self.rms_displacement_A is None else self.rms_displacement_A.copy(),
            labels=None if self.labels is None else self.labels.copy(),
            metadata=dict(self.metadata),
        )

    # --- ground-truth helpers (seen only by quantifiers) ------------------------------------
    def projected_potential(self, sampling_A: float | tuple[float, float], gpts: tuple[int, int] | None = None,
                            parametrization: str = "lobato") -> np.ndarray:
        """Ground-truth projected potential (ny, nx) in V·Å over the whole cell, summed along z."""
        from tembench.physics.potentials import projected_potential

        sy, sx = _pair(sampling_A)
        if gpts is None:
            gpts = (int(round(self.cell_A[1] / sy)), int(round(self.cell_A[0] / sx)))
        v = projected_potential(self.positions_A, self.numbers, gpts=gpts,
                                sampling_A=(self.cell_A[1] / gpts[0], self.cell_A[0] / gpts[1]),
                                parametrization=parametrization)
        return np.asarray(v).sum(axis=0)

    def potential_volume(self, sampling_A: float, parametrization: str = "lobato") -> np.ndarray:
        """Ground-truth electrostatic potential on a voxel grid (nz, ny, nx) in V, voxel = sampling_A³."""
        from tembench.physics.potentials import potential_volume

        return np.asarray(potential_volume(self, sampling_A=sampling_A, parametrization=parametrization))


def _pair(value) -> tuple[float, float]:
    if np.ndim(value) == 0:
        return float(value), float(value)
    a, b = value
    return float(a), float(b)


@dataclass
class Geometry:
    """Everything a reconstructor may legitimately know about how data were acquired.

    Fields that do not apply to a measurement kind stay ``None``; anything not covered by a
    named field goes into ``extra`` (documented by the forward model that writes it).
    """

    energy_keV: float | None = None
    sampling_A: tuple[float, float] | None = None          # real-space pixel size (y, x) of images
    tilt_angles_deg: list[float] | None = None
    tilt_axis: str | None = None                          # e.g. "y": rotation about the y axis
    defocus_A: list[float] | None = None                  # C10-convention defocus values (see physics.optics)
    aberrations_A: dict[str, float] | None = None          # C12, phi12, C30, ... (Å / rad)
    semiangle_mrad: float | None = None                   # probe-forming / objective aperture
    scan_step_A: tuple[float, float] | None = None
    scan_positions_A: np.ndarray | None = None             # (N, 2) probe positions (y, x)
    detector_sampling_mrad: tuple[float, float] | None = None
    slice_thickness_A: float | None = None
    dose_e_per_A2: float | None = None                     # dose per image / per scan (not total)
    electrons_per_pattern: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def replace(self, **changes) -> Geometry:
        return dataclasses.replace(self, **changes)


@dataclass
class Measurement:
    """Data as a detector delivers it, with its acquisition geometry and no ground truth.

    ``kind`` names the layout (e.g. ``phase_object_image``, ``hrtem_tilt_series``, ``4dstem``,
    ``adf_image``, ``eer``); ``axes`` names each axis of ``data``. ``counted`` is True once
    dose noise has turned intensities into electron counts. ``provenance`` lists the
    components that produced it, in order.
    """

    kind: str
    data: np.ndarray
    axes: tuple[str, ...]
    geometry: Geometry = field(default_factory=Geometry)
    counted: bool = False
    provenance: list[dict[str, Any]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.data is not None and len(self.axes) != np.ndim(self.data):
            raise TembenchError(
                f"Measurement of kind {self.kind!r}: {np.ndim(self.data)}-D data but axes {self.axes}"
            )

    def replace(self, **changes) -> Measurement:
        return dataclasses.replace(self, **changes)

    @property
    def nbytes(self) -> int:
        n = 0 if self.data is None else int(np.asarray(self.data).nbytes)
        for v in self.extras.values():
            for item in (v.values() if isinstance(v, dict) else (v,)):  # e.g. extras["half_sets"]
                nb = getattr(item, "nbytes", None)  # arrays and array-backed objects such as ElectronEvents
                if isinstance(nb, (int, np.integer)):
                    n += int(nb)
        return n


RECONSTRUCTION_KINDS = ("image", "volume")


@dataclass
class Reconstruction:
    """What a reconstructor returns.

    ``kind`` is ``"image"`` (ny, nx) or ``"volume"`` (nz, ny, nx). ``quantity`` says what the
    values are (``phase_rad``, ``projected_potential_VA``, ``potential_V``, ``intensity``);
    ``sampling_A`` is per axis, ``origin_A`` the position of pixel/voxel 0 in the sample frame
    (same axis order). ``history`` holds convergence curves (e.g. ``{"cost": [...]}``),
    ``extras`` refined probes, positions, alignment, ….
    """

    kind: str
    data: np.ndarray
    sampling_A: tuple[float, ...]
    quantity: str
    origin_A: tuple[float, ...] | None = None
    history: dict[str, list[float]] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in RECONSTRUCTION_KINDS:
            raise TembenchError(f"Reconstruction kind {self.kind!r} is not one of {RECONSTRUCTION_KINDS}")
        want = 2 if self.kind == "image" else 3
        if np.ndim(self.data) != want:
            raise TembenchError(f"Reconstruction of kind {self.kind!r} needs {want}-D data, got shape {np.shape(self.data)}")
        self.sampling_A = tuple(float(s) for s in np.broadcast_to(np.asarray(self.sampling_A, float), (want,)))
        if self.origin_A is None:
            self.origin_A = (0.0,) * want
        self.origin_A = tuple(float(s) for s in self.origin_A)


# --- half sets ---------------------------------------------------------------------------------
# The ``half_sets`` noise step (tembench.builtin.half_sets) splits a measurement into two
# independent halves A and B and stores what distinguishes them in ``extras[HALF_SETS]``, a dict
# with ``split`` and either
#   * ``split: "dose"``: ``data_a`` — half A's counts (smallest unsigned dtype); B = data − A, so
#     the full counts and A are kept, never three copies. For ``eer`` data: ``events_a``, a bool
#     per electron event (True = the event belongs to A). ``noise_free: True`` at an infinite
#     dose: both halves are the (noise-free) data.
#   * ``split: "positions"``: ``mask_a`` — bool (scan_y, scan_x), True where half A has its
#     pattern (a checkerboard); B has the others, or, with ``n_subsets`` > 2 (sub-sampling), the
#     patterns of ``mask_b``. The data array is shared, not copied.
# :func:`half_measurement` builds half 0 (A) or 1 (B) on demand. The runner reconstructs both
# halves with every reconstructor and hands the two reconstructions to quantifiers as
# ``reconstruction.extras[HALF_SETS] = [A, B]``.
HALF_SETS = "half_sets"
#: name of the noise step that makes the split (``tembench.builtin.half_sets``); it must end the noise chain
HALF_SETS_STEP = "half_sets"
#: bool (scan_y, scan_x) in a positions half set: True where the pattern is present (the data of
#: absent patterns is still in the array and must be ignored). Same mask for every tilt.
PATTERN_MASK = "pattern_mask"


def has_half_sets(measurement: Measurement) -> bool:
    """True if ``measurement`` was split by the ``half_sets`` step."""
    return isinstance(measurement.extras.get(HALF_SETS), dict)


def full_measurement(measurement: Measurement) -> Measurement:
    """The data of a measurement split by the ``half_sets`` step exactly as before the split: no
    ``extras["half_sets"]`` and no provenance entry of the split, so a reconstruction of it (and its cache key)
    does not depend on how the data were split. A measurement without half sets is returned as is."""
    if not has_half_sets(measurement):
        return measurement
    return measurement.replace(
        extras={k: v for k, v in measurement.extras.items() if k != HALF_SETS},
        provenance=[p for p in measurement.provenance if HALF_SETS_STEP not in (p.get("component"), p.get("name"))])


def half_measurement(measurement: Measurement, index: int) -> Measurement:
    """Half ``index`` (0 = A, 1 = B) of a measurement split by the ``half_sets`` step.

    ``split: dose`` — the half's counts (A, or full − A), with ``dose_e_per_A2``,
    ``electrons_per_pattern`` and ``extra["electrons_per_unit_intensity"]`` /
    ``extra["dose_total_e_per_A2"]`` halved. ``split: positions`` — the same data with
    ``extras["pattern_mask"]`` marking the half's patterns; each present pattern keeps its full
    dose (``dose_e_per_A2``, ``electrons_per_pattern`` unchanged); the total dose
    ``extra["dose_total_e_per_A2"]`` is scaled by ``extra["pattern_fraction"]``, the fraction of
    patterns present (½; on a grid with an odd number of positions A has one more). Both: ``geometry.extra["half_set"] = {"split", "index"}``,
    ``extras["half_index"] = index``, and no ``extras["half_sets"]``.
    """
    spec = measurement.extras.get(HALF_SETS)
    if not isinstance(spec, dict):
        raise TembenchError(f"measurement {measurement.kind!r} has no half sets; put the `half_sets` step last in "
                            "the scenario's noise chain")
    if index not in (0, 1):
        raise TembenchError(f"half set index must be 0 (A) or 1 (B), got {index!r}")
    split = spec.get("split")
    g = measurement.geometry
    extra = dict(g.extra)
    extras = {k: v for k, v in measurement.extras.items() if k != HALF_SETS}
    extras["half_index"] = index
    changes: dict[str, Any] = {}
    data = measurement.data
    if split == "dose":
        for name in ("dose_e_per_A2", "electrons_per_pattern"):
            if getattr(g, name) is not None:
                changes[name] = getattr(g, name) / 2
        for name in ("electrons_per_unit_intensity", "dose_total_e_per_A2"):
            if isinstance(extra.get(name), (int, float)) and not isinstance(extra.get(name), bool):
                extra[name] = extra[name] / 2
        if spec.get("noise_free"):
            pass  # infinite dose: both halves are the noise-free data
        elif "events_a" in spec:
            from tembench.eer import ElectronEvents

            ev = measurement.extras["events"]
            keep = np.asarray(spec["events_a"], dtype=bool)
            keep = keep if index == 0 else ~keep
            kept_before = np.zeros(len(keep) + 1, dtype=np.int64)
            np.cumsum(keep, out=kept_before[1:])
            offsets = kept_before[ev.offsets.astype(np.int64)]
            extras["events"] = ElectronEvents(offsets.astype(ev.offsets.dtype), ev.indices[keep], ev.scan_shape,
                                              ev.detector_shape, sorted_within_frames=ev.sorted_within_frames)
        else:
            full = np.asarray(data)
            a = spec["data_a"]
            data = (np.asarray(a).astype(full.dtype) if index == 0
                    else np.asarray(np.subtract(full, a, dtype=full.dtype)))
    elif split == "positions":
        mask_a = np.asarray(spec["mask_a"], dtype=bool)
        # n_subsets > 2 (You 2025 sub-sampling): B is its own subset ``mask_b``; else B = the complement of A
        mask = mask_a if index == 0 else (np.asarray(spec["mask_b"], dtype=bool) if "mask_b" in spec else ~mask_a)
        extras[PATTERN_MASK] = mask
        if isinstance(extra.get("dose_total_e_per_A2"), (int, float)):
            extra["dose_total_e_per_A2"] = extra["dose_total_e_per_A2"] * float(mask.mean())
        extra["pattern_fraction"] = float(mask.mean())
    else:
        raise TembenchError(f"extras['half_sets'] has an unknown split {split!r} (expected 'dose' or 'positions')")
    extra["half_set"] = {"split": split, "index": index}
    return measurement.replace(
        data=data, geometry=g.replace(extra=extra, **changes), extras=extras,
        provenance=[*measurement.provenance, {"component": "half_sets", "half": "AB"[index], "split": split}])


def pattern_mask(measurement: Measurement) -> np.ndarray | None:
    """The bool (scan_y, scan_x) mask of present patterns of a positions half set, else None."""
    mask = measurement.extras.get(PATTERN_MASK)
    return None if mask is None else np.asarray(mask, dtype=bool)


def require_full_scan(measurement: Measurement, who: str) -> None:
    """Refuse a measurement with absent patterns (a positions half set); for grid-only reconstructors.

    The runner already refuses to hand a positions half set to a reconstructor whose
    ``supports_pattern_mask`` is False; call this where a component passes data on itself
    (e.g. a composite reconstructor calling a grid-only one).
    """
    mask = pattern_mask(measurement)
    if mask is not None and not mask.all():
        raise TembenchError(
            f"{who} needs every probe position of the scan grid, but this measurement is a positions half set "
            f"(extras['pattern_mask'] marks {int(mask.sum())} of {mask.size} patterns present). Use "
            "`half_sets` with `split: dose`, or a reconstructor that handles scattered positions "
            "(Reconstructor.supports_pattern_mask = True).")
