"""Refuse before running: cheap estimates of what each stage of a scenario will need.

Validation already checks every parameter of every point; this module checks what a parameter
check cannot see — a structure file that is missing or does not parse, a sample of tens of
millions of atoms, a simulation grid of 10⁵ × 10⁵ pixels — without building anything large, so
that a run that cannot succeed is refused before a single file is written.

Components take part through an optional classmethod::

    @classmethod
    def preflight(cls, params, upstream: Footprint | None) -> Footprint | None

A sample returns what it will hold (atom count, cell) and its build memory; a forward model
receives the sample's footprint and returns its own peak memory and the size of its data
(``output_bytes``; ``on_disk`` if it streams them to a file); a reconstructor receives
``Footprint(output_bytes=…, on_disk=…)`` of the data it will be handed and returns its working set
beyond them (a reconstructor that reads a memory map chunk by chunk says so by returning a small
one; without ``preflight`` it is counted as reading all the data into RAM). Returning ``None``
means "unknown" and is always allowed. Errors about inputs (a missing file) are raised as
:class:`~tembench.errors.ScenarioError` from ``preflight`` itself. Noise models take part through
the class attribute ``streams_disk_data`` (read and write a memory-mapped input chunk by chunk).

:func:`unit_estimate` adds the parts up to the peak resident memory of one (point, repeat) as the
runner runs it — the process's own baseline, the simulation, the noise chain, the reconstructors
and the half sets — within 25 % of the peak RSS measured on the shipped quick scenarios and on
4D-STEM data in RAM, with half sets and streamed to disk (tests/core/test_memory_estimate.py).

A stage — or a whole unit — whose estimate exceeds the memory limit (``TEMBENCH_MAX_MEMORY_GB``,
else 80 % of the memory the OS reports available; a forward model's own ``max_memory_GB``
parameter overrides it for that stage) is refused with the estimate, the parameter to change and
the point it occurs at.
``tembench run --ignore-memory-estimate`` skips this check for users who know better.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tembench.errors import ResourceError, ScenarioError

#: bytes of peak memory per atom while a sample is built (ASE supercell + our arrays; measured
#: 89–177 B/atom for Si boxes and periodic supercells of 0.4–2 million atoms)
BYTES_PER_ATOM = 200
#: sweep points a scenario may expand to before ``--max-points`` must be raised
MAX_POINTS = 10_000


@dataclass
class Footprint:
    """What validation learns about one stage without running it."""

    peak_bytes: int | None = None
    what: str = ""                   # e.g. "stem4d: 512 x 512 px field, 40 slices, 4096 probes"
    fix: str = ""                    # the parameter(s) to change
    n_atoms: int | None = None       # samples: atoms the sample will hold
    cell_A: tuple[float, float, float] | None = None  # samples: (x, y, z) extent in Å
    limit_bytes: int | None = None   # a stage's own memory limit (e.g. forward max_memory_GB)
    output_bytes: int | None = None  # forward models: size of the measurement's data array
    on_disk: bool | None = None      # forward models: the data are streamed to a file (None: from patterns_path)


#: a dense noise step in RAM holds its output (float32, the data's size) and one chunk of float64/int64
#: temporaries (tembench.builtin.noise.CHUNK_ELEMS = 2²⁰ elements × ≈ 30 B); on data streamed to disk it
#: holds the temporaries only (the output is written to a new file chunk by chunk)
NOISE_FACTOR = 1.0
NOISE_TEMPORARIES_BYTES = 32 * 2**20
#: resident memory of a runner process once one small unit has run: interpreter, numpy/scipy/pandas/
#: pyarrow, pydantic, the plugins, the libraries a unit imports on first use (pyFFTW plans and threads,
#: scipy.ndimage/optimize, ASE), tracemalloc's bookkeeping of the stage timings. Measured 200–225 MiB
#: for the quick scenarios that load no numba on Linux/CPython 3.11 (tests/core/test_memory_estimate.py);
#: the estimate uses the larger of this (+ numba's, below) and what the validating process already holds
RUNTIME_BASE_BYTES = 215 * 2**20
#: … plus numba's own (its compiler, LLVM and the loaded kernels) when a component of the scenario declares
#: ``runs_numba_kernels``: the quick scenarios with numba kernels peaked at 341–349 MiB before numba was
#: deferred (session 10), those without it at 200–225 MiB after
NUMBA_RUNTIME_BYTES = 125 * 2**20
#: a reconstructor that declares no ``preflight`` is counted with this working set (measured 1–50 MiB for
#: SSB, DPC, iCOM, virtual detectors, msp, Ren's AET on the quick scenarios, 3.3–4.9 × their 9–12 MB of
#: data) — plus the whole data when the data are on disk (it is assumed to read them into RAM)
RECON_WORKING_BYTES = 48 * 2**20
#: … or this many times the data if that is less (the small working set of a reconstructor on small data)
RECON_FACTOR = 4


def count_points(sweep) -> int:
    """Number of sweep points (grid product × zip length) without expanding them."""
    n = 1
    for values in sweep.grid.values():
        n *= len(values)
    if sweep.zip:
        n *= len(next(iter(sweep.zip.values())))
    return n


def check_point_count(spec, where: str, max_points: int | None = None) -> int:
    limit = MAX_POINTS if max_points is None else int(max_points)
    n = count_points(spec.sweep)
    if n > limit:
        sizes = " × ".join(f"{k} ({len(v)})" for k, v in spec.sweep.grid.items())
        if spec.sweep.zip:
            sizes += (" × " if sizes else "") + f"zip ({len(next(iter(spec.sweep.zip.values())))})"
        raise ScenarioError(
            f"{where}: sweep: {n:,} points ({sizes}) is more than the limit of {limit:,}. Sweep fewer values, split "
            f"the scenario, or raise the limit with `--max-points {n}` if you mean it.")
    return n


def _fmt_gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**28 else f"{nbytes / 2**20:.0f} MiB"


def check_resources(points, registry, where: str, *, concurrent: int = 1, limit_bytes: int | None = None) -> list[
        dict[str, Any]]:
    """Estimate sample and forward stages for each distinct (sample, forward) setting; refuse what cannot fit.

    Returns the estimates (one dict per distinct setting) for the plan printed by ``validate``.
    """
    from tembench.physics.memory import memory_limit_bytes

    limit = memory_limit_bytes() if limit_bytes is None else int(limit_bytes)
    seen: dict[str, dict[str, Any]] = {}
    from tembench.scenario import stable_hash

    for point in points:
        spec = point.spec
        key = stable_hash({"s": spec.sample, "f": spec.forward, "n": spec.noise, "r": spec.reconstructors})
        if key in seen:
            continue
        mine = {k: v for k, v in point.values.items() if k.split(".")[0] in ("sample", "forward")}
        at = f" (at sweep point {mine})" if mine else ""
        s_cls = registry.get("sample", spec.sample.name)
        f_cls = registry.get("forward_model", spec.forward.name)
        s_fp = _call(s_cls, spec.sample.params, None, f"{where}: sample", at)
        f_fp = _call(f_cls, spec.forward.params, s_fp, f"{where}: forward", at)
        unit = unit_estimate(spec, registry, s_fp, f_fp)
        n_fp = None
        if spec.noise and unit is not None and unit["noise"]:
            streamed = " (streamed from and to disk)" if unit["noise"] <= NOISE_TEMPORARIES_BYTES else ""
            n_fp = Footprint(peak_bytes=unit["noise"],
                             what=f"the noise chain ({' → '.join(n.name for n in spec.noise)}) on "
                                  f"{_fmt_gib(f_fp.output_bytes)} of data from {f_fp.what}{streamed}",
                             fix="Make the measurement smaller (a coarser sampling_A or scan_step_A, fewer tilts "
                                 "or defocus values, a binned or cropped detector), stream the data to disk "
                                 "(patterns_path) or run fewer workers.")
        u_fp = None
        if unit is not None:
            parts = ", ".join(f"{k} {_fmt_gib(unit[k])}" for k in ("baseline", "forward", "noise", "reconstruct", "halves")
                              if unit[k])
            readers = unit["whole_data_readers"]
            fix = ("Make the measurement smaller (a coarser scan_step_A, a binned or cropped detector), stream it to "
                   "disk (patterns_path), or run fewer workers.")
            if readers:
                fix = (f"The data stay on disk up to the reconstructors, but {', '.join(readers)} declare no chunked "
                       "reading (a reconstructor's preflight) and are counted as reading all of it into RAM. " + fix)
            u_fp = Footprint(peak_bytes=unit["anonymous"], what=f"one point of the run on {_fmt_gib(unit['data'])} of "
                                                                f"data from {f_fp.what} ({parts})", fix=fix)
        for section, fp in (("sample", s_fp), ("forward", f_fp), ("noise", n_fp), ("unit", u_fp)):
            if fp is None or fp.peak_bytes is None:
                continue
            stage_limit = fp.limit_bytes if fp.limit_bytes is not None else limit
            need = fp.peak_bytes * max(1, concurrent)
            if need > stage_limit:
                par = f" × {concurrent} concurrent workers" if concurrent > 1 else ""
                raise ResourceError(
                    f"{where}: {section}: {fp.what} needs about {_fmt_gib(fp.peak_bytes)}{par} but the memory limit is "
                    f"{_fmt_gib(stage_limit)} (TEMBENCH_MAX_MEMORY_GB, a forward model's max_memory_GB, else 80 % of "
                    f"available memory){at}. {fp.fix} Nothing was run or written; if you know the estimate is wrong, "
                    "run with --ignore-memory-estimate.")
        seen[key] = {"values": point.values,
                     "sample_bytes": getattr(s_fp, "peak_bytes", None), "sample_atoms": getattr(s_fp, "n_atoms", None),
                     "forward_bytes": getattr(f_fp, "peak_bytes", None), "forward": getattr(f_fp, "what", ""),
                     "noise_bytes": getattr(n_fp, "peak_bytes", None),
                     "unit_bytes": None if unit is None else unit["total"], "unit": unit}
    return list(seen.values())


def process_rss_bytes() -> int | None:
    """Resident memory of this process now (Linux /proc/self/status VmRSS), else None."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _forward_on_disk(spec, f_fp: Footprint | None) -> bool:
    if f_fp is not None and f_fp.on_disk is not None:
        return bool(f_fp.on_disk)
    return bool(spec.forward.params.get("patterns_path")) and spec.forward.params.get("output", "patterns") == "patterns"


def _runs_numba_kernels(spec, registry) -> bool:
    """A component of the scenario declares ``runs_numba_kernels`` (numba loads in the unit's process)."""
    from tembench import _jit

    if not _jit.numba_enabled():
        return False
    parts = [("sample", spec.sample), ("forward_model", spec.forward), *(("noise_model", s) for s in spec.noise),
             *(("reconstructor", r) for r in spec.reconstructors), *(("quantifier", q) for q in spec.quantifiers)]
    for kind, comp in parts:
        try:
            if getattr(registry.get(kind, comp.name), "runs_numba_kernels", False):
                return True
        except Exception:  # noqa: BLE001 - validation reports unknown components
            continue
    return False


def unit_estimate(spec, registry, s_fp: Footprint | None, f_fp: Footprint | None,
                  baseline: int | None = None) -> dict[str, Any] | None:
    """Peak resident memory of one (point, repeat) as the runner runs it, part by part; None if the data size is unknown.

    The runner keeps the sample and the noise-free measurement while the noise chain runs, keeps the
    noisy measurement while every reconstructor runs, and reconstructs each half set after the full
    data; the allocator keeps freed memory for reuse, so the stages add up rather than overlap:

    * ``baseline``: the process itself — the larger of :data:`RUNTIME_BASE_BYTES` and what this
      process holds now;
    * ``forward``: the forward model's own estimate; for data streamed to a file, plus the written
      pages of the file mapping (resident, though the kernel may drop them: ``file_pages``);
    * ``noise``: a dense step in RAM holds its output and a chunk of temporaries (two outputs at once in
      a chain of several); a step with ``streams_disk_data`` on data in a file holds the chunk only;
    * ``reconstruct``: the largest working set of the reconstructors — their ``preflight(params, upstream)``
      if they declare one (``peak_bytes`` beyond the measurement they are handed; ``upstream.on_disk``
      says whether it is a memory map), else :data:`RECON_WORKING_BYTES`, plus the whole data when the
      data are in a file (an undeclared reconstructor is assumed to read them into RAM);
    * ``halves`` (``half_sets`` with ``split: dose``): the stored half A (uint8 counts: ¼ of the float32
      data) and one half made float32 in RAM at a time.

    ``total`` is the peak RSS: the larger of the simulation (its file mapping's written pages are
    resident until it ends) and everything after it; ``anonymous`` leaves out file pages the kernel
    can reclaim (what the memory limit is checked against). The figures are for a fresh run; a re-run
    from the stage cache needs less (arrays of 16 MiB or more come back memory-mapped, and a cached
    stage does not run).
    """
    data = None if f_fp is None else f_fp.output_bytes
    if not data:
        return None
    if baseline is None:
        numba = NUMBA_RUNTIME_BYTES if _runs_numba_kernels(spec, registry) else 0
        base = max(RUNTIME_BASE_BYTES + numba, process_rss_bytes() or 0)
    else:
        base = int(baseline)
    sample = int(getattr(s_fp, "peak_bytes", None) or 0)
    on_disk = forward_on_disk = _forward_on_disk(spec, f_fp)
    forward = int(f_fp.peak_bytes or 0)
    pages = data if forward_on_disk else 0  # written pages of the forward model's file mapping
    noise, held, half = 0, 0, None
    for step in spec.noise:
        if step.name == "half_sets":
            half = step
            continue
        try:
            cls = registry.get("noise_model", step.name)
        except Exception:  # noqa: BLE001 - validation reports unknown components
            cls = None
        temporaries = min(NOISE_TEMPORARIES_BYTES, 8 * data)  # a chunk: ≈ 30 B per 4-byte element
        if on_disk and getattr(cls, "streams_disk_data", False):
            noise = max(noise, temporaries)
            continue
        if on_disk:
            pages += data  # a step that reads the whole memory map (its pages become resident)
        on_disk = False
        held = min(held + 1, 2)
        noise = max(noise, int(NOISE_FACTOR * held * data) + temporaries)
    recon, readers = 0, []
    upstream = Footprint(output_bytes=data, on_disk=on_disk)
    for r in spec.reconstructors:
        declared = None
        try:
            r_cls = registry.get("reconstructor", r.name)
            fn = getattr(r_cls, "preflight", None)
            if fn is not None:
                declared = fn(r_cls.parse_params(r.params), upstream)
        except Exception:  # noqa: BLE001 - an estimate, never a refusal of its own
            declared = None
        if declared is not None and declared.peak_bytes is not None:
            recon = max(recon, int(declared.peak_bytes))
        else:
            # undeclared: assumed to read the whole data into RAM (a copy, or every page of the map)
            recon = max(recon, min(RECON_WORKING_BYTES, RECON_FACTOR * data) + (data if on_disk else 0))
            if on_disk:
                readers.append(r.key)
    halves = 0
    if half is not None and (half.params or {}).get("split", "dose") == "dose":
        # half A in the smallest unsigned dtype (uint8 below 256 counts: ¼ of float32) and one half
        # made float32 in RAM at a time (reconstructor working sets are counted once, above)
        halves = data // 4 + data
    anonymous = base + sample + forward + noise + recon + halves
    # the written pages of a forward model's file mapping are resident until it is unmapped at the end
    # of the simulation (they do not add to the later stages); a non-streaming step's reads of the map do
    streaming = base + sample + forward + (data if forward_on_disk else 0)
    total = max(streaming, anonymous + pages - (data if forward_on_disk else 0))
    return {"baseline": base, "sample": sample, "forward": forward, "noise": noise, "reconstruct": recon,
            "halves": halves, "file_pages": pages, "anonymous": anonymous, "total": total,
            "data": data, "on_disk": forward_on_disk, "whole_data_readers": readers}


def _call(cls, params: dict[str, Any], upstream: Footprint | None, loc: str, at: str) -> Footprint | None:
    fn = getattr(cls, "preflight", None)
    if fn is None:
        return None
    try:
        return fn(cls.parse_params(params), upstream)
    except (ScenarioError, ResourceError) as exc:
        raise type(exc)(f"{loc}.params: {exc}{at}") from None
    except Exception as exc:  # noqa: BLE001 - an input the component cannot read is the user's to fix
        from tembench.errors import TembenchError

        if isinstance(exc, TembenchError):
            raise ScenarioError(f"{loc}.params: {exc}{at}") from None
        raise ScenarioError(f"{loc}.params [{cls.name}]: {type(exc).__name__}: {exc}{at}") from None


def tilted_extent(cell_A, angles_deg, axis: str) -> float:
    """Extent along the beam (Å) of the cell's bounding box rotated by the largest tilt about ``axis``."""
    cx, cy, cz = (float(c) for c in cell_A)
    if axis == "z" or not angles_deg:
        return cz
    lateral = cx if axis == "y" else cy
    return max(abs(lateral * math.sin(math.radians(a))) + abs(cz * math.cos(math.radians(a))) for a in angles_deg)
