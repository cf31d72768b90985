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

import hashlib
import json
import math
import os
import tempfile
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


#: elements per chunk of a noise draw (4 MiB of float32 input; ≈ 30 MiB of float64/int64 temporaries).
#: Every draw is one sequential stream of the step's generator — numpy's Poisson and normal samplers
#: take the bit stream one variate at a time — so the chunk size, and whether the data are in RAM or
#: streamed from disk, never changes the numbers (tests/builtin/test_noise_streaming.py).
CHUNK_ELEMS = 1 << 20


def stream_token(data, *parts) -> str | None:
    """A name for the streamed output of a step on disk-backed ``data``, else None (the step runs in RAM).

    ``data`` is disk-backed when it is a memory map over a whole ``.npy`` file (what ``stem4d``
    streamed to ``patterns_path``, a big array read from the stage cache). The token hashes the input
    file's identity and ``parts`` (step name, parameters, the generator's state before drawing), so a
    re-run of the same step on the same file replaces its own output instead of piling up copies.
    """
    from tembench.cache import npy_backing_file

    backing = npy_backing_file(data)
    if backing is None:
        return None
    st = os.stat(backing[0])
    text = json.dumps([backing[0], st.st_size, st.st_mtime_ns, *parts], sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _stream_path(src: str, tag: str, token: str) -> str:
    """Where a streamed output goes: next to a user's file, or in a temp folder of the cache it was read from.

    In a cache, ``.cache/<stage>/.tmp-stream-<token>/`` — the noise stage's own cache entry hard-links
    the file, and ``tembench cache prune`` removes the folder once it is an hour old.
    """
    from tembench.cache import TMP_PREFIX, cache_entry_of

    entry = cache_entry_of(src)
    if entry is not None:
        folder = entry.parent / f"{TMP_PREFIX}stream-{token}"
        folder.mkdir(exist_ok=True)
        return str(folder / f"{tag}.npy")
    base = os.path.basename(src)
    base = base[:-4] if base.endswith(".npy") else base
    return os.path.join(os.path.dirname(os.path.abspath(src)), f"{base}.{tag}-{token}.npy")


def _pread_into(fd: int, buf: np.ndarray, offset: int) -> None:
    mv = memoryview(buf).cast("B")
    got = 0
    while got < len(mv):
        n = os.preadv(fd, [mv[got:]], offset + got)
        if n <= 0:
            raise TembenchError(f"streamed input ended early at byte {offset + got} (the file was truncated?)")
        got += n


def iter_chunks(data, chunk_elems: int = CHUNK_ELEMS):
    """Flat C-order chunks of ``data``: views in RAM, or plain reads of its ``.npy`` file if disk-backed.

    Reads (not memory-map page faults) keep a streamed file out of the process's resident memory;
    a yielded buffer is reused for the next chunk.
    """
    from tembench.cache import npy_backing_file

    backing = npy_backing_file(data)
    if backing is None:
        flat = np.asarray(data).reshape(-1)
        for start in range(0, flat.size, chunk_elems):
            yield flat[start:start + chunk_elems]
        return
    src, offset = backing
    n = int(np.prod(np.shape(data), dtype=np.int64))
    buf = np.empty(min(chunk_elems, max(n, 1)), dtype=data.dtype)
    fd = os.open(src, os.O_RDONLY)
    try:
        for start in range(0, n, chunk_elems):
            view = buf[:min(chunk_elems, n - start)]
            _pread_into(fd, view, offset + start * data.dtype.itemsize)
            yield view
    finally:
        os.close(fd)


def map_chunks(data, fn, dtype, *, token: str | None = None, tag: str = "noise",
               chunk_elems: int = CHUNK_ELEMS) -> np.ndarray:
    """``fn`` applied to flat chunks of ``data`` in order, into a new array of ``dtype`` and ``data``'s shape.

    In RAM unless ``token`` (from :func:`stream_token`) is given: then the input is read chunk by
    chunk from its file and the output written chunk by chunk to a new ``.npy`` file (a temp name
    renamed into place, as ``stem4d`` does) and returned memory-mapped copy-on-write — the stage cache
    hard-links that file instead of copying it. Both paths call ``fn`` on the same chunks in the same
    order, so the values are identical.
    """
    dtype = np.dtype(dtype)
    shape = tuple(np.shape(data))
    if token is None:
        out = np.empty(shape, dtype)
        flat_out = out.reshape(-1)
        start = 0
        for chunk in iter_chunks(data, chunk_elems):
            flat_out[start:start + chunk.size] = fn(chunk)
            start += chunk.size
        return out
    from tembench.cache import npy_backing_file

    src = npy_backing_file(data)[0]
    final = _stream_path(src, tag, token)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(final), prefix=f".{os.path.basename(final)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fo:
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(fo, header)
            for chunk in iter_chunks(data, chunk_elems):
                fo.write(np.ascontiguousarray(np.asarray(fn(chunk)).astype(dtype, copy=False)).data)
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return np.load(final, mmap_mode="c")  # copy-on-write: the file stays as written


def poisson_counts(intensity: np.ndarray, electrons_per_unit: float, rng: np.random.Generator,
                   chunk_elems: int = CHUNK_ELEMS, token: str | None = None, tag: str = "poisson_dose") -> np.ndarray:
    """Counts ~ Poisson(max(I, 0) × electrons_per_unit) as float32, drawn chunk by chunk (bounded int64 memory).

    With a ``token`` (disk-backed input, :func:`stream_token`) the counts are streamed to a new file.
    """

    def draw(chunk):
        if not np.all(np.isfinite(chunk)):
            raise TembenchError("poisson_dose: the measurement contains NaN or inf intensities; check the "
                                "forward model.")
        lam = np.clip(chunk.astype(np.float64), 0.0, None) * electrons_per_unit
        return rng.poisson(lam)

    return map_chunks(intensity, draw, np.float32, token=token, tag=tag, chunk_elems=chunk_elems)


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
    #: on data in a file (a memory map), reads and writes chunk by chunk (tembench.preflight counts a chunk)
    streams_disk_data = True

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
        token = stream_token(m.data, self.name, self.version, params.model_dump(mode="json"),
                             rng.bit_generator.state)
        counts = poisson_counts(m.data, n_e, rng, token=token, tag=self.name)
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
