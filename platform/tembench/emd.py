"""Reconstructions and measurements as HDF5 files in the EMD 1.0 layout (py4DSTEM's ``emdfile``).

The layout, as ``emdfile`` writes it and ``emdfile``/py4DSTEM and HyperSpy (rosettasciio's EMD
reader) read it::

    /                       attrs emd_group_type="file", version_major=1, version_minor=0, UUID,
                                  authoring_program="tembench"
    /<root>/                attrs emd_group_type="root", python_class="Root"
    /<root>/<array>/        attrs emd_group_type="array", python_class="Array"
        data                the values; attr units ("rad", "V", …)
        dim0, dim1, …       calibration of each axis: [origin, origin + step] for a linear axis
                            (or every coordinate for an irregular one, e.g. tilt angles);
                            attrs name ("z", "y", "x", "scan_y", …) and units ("A", "mrad", "deg")
        metadatabundle/<name>/  attrs emd_group_type="metadata"; one dataset per item, attr type

Lengths are in Å, written "A" as py4DSTEM does (rosettasciio shows them as Å).

A scenario asks for files with ``save: {reconstructions: emd, measurements: false}``; the runner
calls :func:`save_outputs` once per (point, repeat, reconstructor) after scoring.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Iterable

import numpy as np

EMD_VERSION = (1, 0)
#: units of a reconstruction's values by its ``quantity``
QUANTITY_UNITS = {"phase_rad": "rad", "projected_potential_VA": "V*A", "potential_V": "V", "potential_au": "a.u.",
                  "intensity": "a.u."}
#: subfolder of the run folder holding the files
EMD_DIR = "emd"


class Dim:
    """Calibration of one axis: name, units and either (origin, step) or every coordinate."""

    def __init__(self, name: str, units: str = "pixels", origin: float = 0.0, step: float = 1.0,
                 values: Iterable[float] | None = None) -> None:
        self.name, self.units = name, units
        self.values = None if values is None else np.asarray(list(values), np.float64)
        self.origin, self.step = float(origin), float(step)

    def vector(self) -> np.ndarray:
        return self.values if self.values is not None else np.array([self.origin, self.origin + self.step])


def _write_metadata(group, name: str, items: dict[str, Any]) -> None:
    bundle = group.require_group("metadatabundle")
    bundle.attrs["emd_group_type"] = "metadatabundle"
    md = bundle.create_group(name)
    md.attrs["emd_group_type"] = "metadata"
    md.attrs["python_class"] = "Metadata"
    for key, value in items.items():
        if value is None:
            md.create_dataset(key, data="None")
            md[key].attrs["type"] = "None"
        elif isinstance(value, bool):
            md.create_dataset(key, data=bool(value))
            md[key].attrs["type"] = "bool"
        elif isinstance(value, (int, float, np.integer, np.floating)):
            md.create_dataset(key, data=value)
            md[key].attrs["type"] = "number"
        elif isinstance(value, str):
            md.create_dataset(key, data=value)
            md[key].attrs["type"] = "string"
        elif isinstance(value, (list, tuple, np.ndarray)) and np.asarray(value).dtype.kind in "biuf":
            md.create_dataset(key, data=np.asarray(value))
            md[key].attrs["type"] = "array"
        else:  # anything else as JSON text
            md.create_dataset(key, data=json.dumps(value, default=str))
            md[key].attrs["type"] = "string"


def write_emd(path: str | Path, arrays: dict[str, tuple[np.ndarray, str, list[Dim], dict[str, Any]]],
              root: str = "tembench") -> Path:
    """Write ``{name: (data, units, dims, metadata)}`` as Arrays under one root; atomic."""
    import os

    import h5py

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["emd_group_type"] = "file"
            f.attrs["version_major"] = EMD_VERSION[0]
            f.attrs["version_minor"] = EMD_VERSION[1]
            f.attrs["UUID"] = str(uuid.uuid4())
            f.attrs["authoring_program"] = "tembench"
            f.attrs["authoring_user"] = ""
            g_root = f.create_group(root)
            g_root.attrs["emd_group_type"] = "root"
            g_root.attrs["python_class"] = "Root"
            for name, (data, units, dims, meta) in arrays.items():
                data = np.asarray(data)
                if len(dims) != data.ndim:
                    raise ValueError(f"{name}: {data.ndim}-D data but {len(dims)} axis calibrations")
                g = g_root.create_group(name)
                g.attrs["emd_group_type"] = "array"
                g.attrs["python_class"] = "Array"
                ds = g.create_dataset("data", data=data, compression="gzip", compression_opts=4, shuffle=True)
                ds.attrs["units"] = units
                for i, d in enumerate(dims):
                    dd = g.create_dataset(f"dim{i}", data=d.vector())
                    dd.attrs["name"] = d.name
                    dd.attrs["units"] = d.units
                if meta:
                    _write_metadata(g, "tembench", meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def reconstruction_dims(recon) -> list[Dim]:
    names = ("y", "x") if recon.kind == "image" else ("z", "y", "x")
    origin = recon.origin_A or (0.0,) * len(names)
    return [Dim(n, "A", o, s) for n, o, s in zip(names, origin, recon.sampling_A)]


def measurement_dims(measurement) -> list[Dim]:
    """Calibrations from the measurement's axis names and geometry; unknown axes in pixels."""
    g = measurement.geometry
    shape = np.shape(measurement.data)
    dims = []
    for i, name in enumerate(measurement.axes):
        n = shape[i]
        d = Dim(name)
        if name in ("y", "x") and g.sampling_A:
            d = Dim(name, "A", 0.0, g.sampling_A[0 if name == "y" else 1])
        elif name in ("scan_y", "scan_x") and g.scan_step_A:
            d = Dim(name, "A", 0.0, g.scan_step_A[0 if name == "scan_y" else 1])
        elif name in ("k_y", "k_x") and g.detector_sampling_mrad:
            step = g.detector_sampling_mrad[0 if name == "k_y" else 1]
            d = Dim(name, "mrad", -(n // 2) * step, step)
        elif name == "tilt" and g.tilt_angles_deg is not None and len(g.tilt_angles_deg) == n:
            d = Dim(name, "deg", values=g.tilt_angles_deg)
        elif name == "defocus" and g.defocus_A is not None and len(g.defocus_A) == n:
            d = Dim(name, "A", values=g.defocus_A)
        dims.append(d)
    return dims


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in values.items():
        if isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


def save_reconstruction(path: str | Path, recon, measurement=None, metadata: dict[str, Any] | None = None) -> Path:
    """One file: the reconstruction (array ``reconstruction``) and, optionally, the noisy measurement
    (array ``measurement``) with their calibrations and ``metadata`` (swept values, method, …)."""
    meta = {"quantity": recon.quantity, "kind": recon.kind, "sampling_A": list(recon.sampling_A),
            "origin_A": list(recon.origin_A or ()), **_plain(metadata or {})}
    arrays = {"reconstruction": (np.asarray(recon.data), QUANTITY_UNITS.get(recon.quantity, recon.quantity),
                                 reconstruction_dims(recon), meta)}
    if measurement is not None and measurement.data is not None:
        g = measurement.geometry
        mmeta = {"kind": measurement.kind, "counted": bool(measurement.counted), "energy_keV": g.energy_keV,
                 "dose_e_per_A2": g.dose_e_per_A2, "electrons_per_pattern": g.electrons_per_pattern,
                 "semiangle_mrad": g.semiangle_mrad,
                 "provenance": [{k: p.get(k) for k in ("kind", "name", "version", "params")}
                                for p in measurement.provenance]}
        arrays["measurement"] = (np.asarray(measurement.data), "counts" if measurement.counted else "a.u.",
                                 measurement_dims(measurement), mmeta)
    return write_emd(path, arrays)


def save_outputs(run_dir: str | Path, row_key: str, spec, recon, measurement, values: dict[str, Any] | None = None,
                 reconstructor: str = "") -> str | None:
    """What the runner calls after scoring a unit: writes ``<run_dir>/emd/<row_key>.emd`` if the
    scenario's ``save.reconstructions`` is ``"emd"`` (with the measurement if
    ``save.measurements``); returns the path relative to the run folder, or None."""
    save = getattr(spec, "save", None)
    if save is None or getattr(save, "reconstructions", None) != "emd":
        return None
    run_dir = Path(run_dir)
    path = run_dir / EMD_DIR / f"{row_key}.emd"
    meta = {"scenario": spec.name, "reconstructor": reconstructor, "row_key": row_key,
            **{f"swept:{k}": v for k, v in _plain(values or {}).items()}}
    save_reconstruction(path, recon, measurement if save.measurements else None, meta)
    return str(path.relative_to(run_dir))


def read_emd(path: str | Path) -> dict[str, dict[str, Any]]:
    """Minimal reader of the files above: ``{array: {data, units, dims: [(name, units, vector)], metadata}}``."""
    import h5py

    out: dict[str, dict[str, Any]] = {}
    with h5py.File(path, "r") as f:
        for root in f.values():
            if not (isinstance(root, h5py.Group) and root.attrs.get("emd_group_type") == "root"):
                continue
            for name, g in root.items():
                if g.attrs.get("emd_group_type") != "array":
                    continue
                dims = []
                i = 0
                while f"dim{i}" in g:
                    d = g[f"dim{i}"]
                    dims.append((_s(d.attrs.get("name")), _s(d.attrs.get("units")), d[()]))
                    i += 1
                meta = {}
                if "metadatabundle/tembench" in g:
                    for k, v in g["metadatabundle/tembench"].items():
                        val = v[()]
                        meta[k] = val.decode() if isinstance(val, bytes) else val
                out[name] = {"data": g["data"][()], "units": _s(g["data"].attrs.get("units")), "dims": dims,
                             "metadata": meta}
    return out


def _s(v: Any) -> Any:
    return v.decode() if isinstance(v, bytes) else v
