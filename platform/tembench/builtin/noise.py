"""Electron dose: turn noise-free intensities into Poisson electron counts.

Intensity contract (DESIGN.md): a plane-wave image has mean 1 per pixel in vacuum, so a pixel
of area sy·sx Å² at dose D e/Å² receives D·sy·sx electrons times its intensity; a 4D-STEM
pattern is the fraction of the probe's electrons per detector pixel and an ADF/BF image value
the fraction of the probe's electrons hitting the detector, so each probe position receives
N_e = D·step_y·step_x electrons (or ``electrons_per_pattern``) times that fraction.

Partial coherence (focal spread, source size in HRTEM) cannot be added to an already simulated
coherent measurement: it is a parameter of the forward models (focal spread / source size of
the physics engine). For STEM images, the source-size *convolution* of Friedrich Table 2.1 is
the ``source_size`` model in :mod:`tembench.builtin.scan_distortions`.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from tembench import NoiseModel, Params, hookimpl
from tembench.errors import TembenchError
from tembench.types import Measurement

PIXEL_AXES = ("y", "x", "k_y", "k_x")
SCAN_AXES = ("scan_y", "scan_x")
PROBE_KIND_PREFIXES = ("4dstem", "adf", "haadf", "maadf", "bf", "abf", "stem", "dpc", "icom")
INF_STRINGS = {"inf", ".inf", "+inf", "+.inf", "infinity", "+infinity"}


def parse_inf(value):
    """Accept YAML's ``.inf`` / ``inf`` given as a string for a float parameter."""
    if isinstance(value, str) and value.strip().lower() in INF_STRINGS:
        return math.inf
    return value


def is_probe_measurement(m: Measurement) -> bool:
    """True if values are fractions of a scanned probe's electrons (4D-STEM patterns, ADF/BF images)."""
    return m.kind.lower().startswith(PROBE_KIND_PREFIXES) or any(a in m.axes for a in SCAN_AXES)


def n_exposures(m: Measurement) -> int:
    """Number of separately exposed images/scans: the product of the non-pixel, non-scan axes."""
    return int(np.prod([n for a, n in zip(m.axes, np.shape(m.data)) if a not in PIXEL_AXES + SCAN_AXES], dtype=np.int64))


def probe_area_A2(m: Measurement) -> float:
    """Area per probe position (Å²): scan_step_A, or the image sampling for scanned images."""
    step = m.geometry.scan_step_A or (m.geometry.sampling_A if not any(a.startswith("k_") for a in m.axes) else None)
    if step is None:
        raise TembenchError(
            f"poisson_dose: measurement {m.kind!r} has no Geometry.scan_step_A, so a dose in e/Å² cannot be "
            "converted to electrons per probe position. Give `electrons_per_pattern` instead, or have the "
            "forward model record scan_step_A.")
    sy, sx = (float(step), float(step)) if np.ndim(step) == 0 else (float(step[0]), float(step[1]))
    return sy * sx


def poisson_counts(intensity: np.ndarray, electrons_per_unit: float, rng: np.random.Generator,
                   chunk_elems: int = 1 << 22) -> np.ndarray:
    """Counts ~ Poisson(max(I, 0) × electrons_per_unit) as float32, drawn chunk by chunk (bounded int64 memory)."""
    data = np.asarray(intensity)
    if not np.all(np.isfinite(data)):
        raise TembenchError("poisson_dose: the measurement contains NaN or inf intensities; check the forward model.")
    out = np.empty(data.shape, dtype=np.float32)
    flat_in, flat_out = data.reshape(-1), out.reshape(-1)
    for start in range(0, flat_in.size, chunk_elems):
        lam = np.clip(flat_in[start:start + chunk_elems].astype(np.float64), 0.0, None) * electrons_per_unit
        flat_out[start:start + chunk_elems] = rng.poisson(lam)
    return out


class DoseParams(Params):
    """Dose parameters shared by every model that turns intensities into electron counts."""

    dose_e_per_A2: float = Field(math.inf, gt=0, description="dose in e/Å² per image (per_image) or for the "
                                 "whole series (total_budget); inf = noise-free")
    dose_mode: Literal["per_image", "total_budget"] = Field(
        "per_image", description="per_image: every image/scan gets dose_e_per_A2; total_budget: split evenly")
    electrons_per_pattern: float | None = Field(
        None, gt=0, description="scanned data only: electrons per probe position (overrides dose_e_per_A2)")

    @field_validator("dose_e_per_A2", mode="before")
    @classmethod
    def _inf(cls, v):
        return parse_inf(v)


class PoissonDose(NoiseModel):
    """Electron shot noise at a given dose: counts = Poisson(intensity × electrons per pixel / probe position).

    Plane-wave images (``hrtem_image``, ``hrtem_tilt_series`` …): electrons per pixel =
    dose × pixel area. Scanned data (``4dstem``, ``4dstem_tilt_series``, ``adf_image`` …):
    electrons per probe position = dose × scan-step area, or ``electrons_per_pattern``.
    ``dose_mode: total_budget`` splits ``dose_e_per_A2`` evenly over every exposure of the
    series (Ren 2020 §2.3: N_θ × N_f images; for a 4D-STEM tilt series, N_θ scans).
    ``dose_e_per_A2: inf`` leaves the data noise-free (and not counted).
    """

    name = "poisson_dose"
    accepts = ("*",)

    class Params(DoseParams):
        pass

    def apply(self, measurement: Measurement, params: Params, rng: np.random.Generator) -> Measurement:
        m = measurement
        if m.kind == "eer":
            raise TembenchError("poisson_dose: an `eer` measurement is already a list of electron events; "
                                "put poisson_dose before the conversion to EER in the noise chain.")
        if m.counted:
            raise TembenchError(f"poisson_dose: measurement {m.kind!r} is already counted (provenance: "
                                f"{[p.get('component') for p in m.provenance]}); apply dose noise only once.")
        if any((p.get("component") or p.get("name")) == "fast_scan_smear" for p in m.provenance):
            raise TembenchError("poisson_dose: the input was already smeared by fast_scan_smear; the smear is the "
                                "detector's response to the counted electrons. Order the chain source_size → "
                                "scan_jitter → poisson_dose → fast_scan_smear.")
        n_e, geometry = dose_bookkeeping(m, params.dose_e_per_A2, params.dose_mode, params.electrons_per_pattern,
                                         who=self.name)
        record = {"component": self.name, "params": params.model_dump(),
                  "n_exposures": geometry.extra["n_exposures"], "electrons_per_unit_intensity": n_e}
        if math.isinf(n_e):  # noise-free: keep intensities as they are
            return m.replace(geometry=geometry, provenance=[*m.provenance, record])
        counts = poisson_counts(m.data, n_e, rng)
        extras = dict(m.extras)
        if "virtual_images" in extras:
            # noise-free detector images simulated alongside the 4D data would hand reconstructors
            # noise-free data; virtual detectors must be formed from the counted patterns instead
            extras.pop("virtual_images")
            record["dropped_extras"] = ["virtual_images"]
        return m.replace(data=counts, counted=True, geometry=geometry, extras=extras,
                         provenance=[*m.provenance, record])


def dose_bookkeeping(m: Measurement, dose_e_per_A2: float, dose_mode: str, electrons_per_pattern: float | None,
                     who: str = "poisson_dose"):
    """Electrons per unit intensity for ``m`` and its updated Geometry (dose per exposure recorded).

    Returns ``(n_e, geometry)``: n_e multiplies intensities to give expected electron counts
    (inf for an infinite dose); geometry.extra gains ``n_exposures``, ``dose_total_e_per_A2``
    and ``electrons_per_unit_intensity``.
    """
    n_exp = max(n_exposures(m), 1)
    probe = is_probe_measurement(m)
    geo_changes: dict = {}
    extra = dict(m.geometry.extra)
    if electrons_per_pattern is not None:
        if not probe:
            raise TembenchError(f"{who}: electrons_per_pattern applies to scanned (4D-STEM/ADF) data, "
                                f"not to {m.kind!r}; give dose_e_per_A2 instead.")
        if dose_mode != "per_image":
            raise TembenchError(f"{who}: electrons_per_pattern is a per-pattern value; use "
                                "dose_mode: per_image with it, or give a total dose_e_per_A2.")
        n_e = float(electrons_per_pattern)
        try:
            geo_changes["dose_e_per_A2"] = n_e / probe_area_A2(m)
        except TembenchError:
            geo_changes["dose_e_per_A2"] = None
        geo_changes["electrons_per_pattern"] = n_e
    else:
        dose = float(dose_e_per_A2)
        per_exposure = dose / n_exp if dose_mode == "total_budget" else dose
        extra["dose_total_e_per_A2"] = per_exposure * n_exp
        geo_changes["dose_e_per_A2"] = per_exposure
        if probe:
            n_e = per_exposure * probe_area_A2(m) if math.isfinite(per_exposure) else math.inf
            geo_changes["electrons_per_pattern"] = n_e
        else:
            s = m.geometry.sampling_A
            if s is None:
                raise TembenchError(f"{who}: measurement {m.kind!r} has no Geometry.sampling_A, so "
                                    "the electrons per pixel (dose × pixel area) are unknown.")
            sy, sx = (float(s), float(s)) if np.ndim(s) == 0 else (float(s[0]), float(s[1]))
            n_e = per_exposure * sy * sx
    extra["n_exposures"] = n_exp
    extra["electrons_per_unit_intensity"] = n_e
    return n_e, m.geometry.replace(extra=extra, **geo_changes)


@hookimpl
def tembench_register_noise_models():
    return [PoissonDose]
