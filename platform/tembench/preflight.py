"""Refuse before running: cheap estimates of what each stage of a scenario will need.

Validation already checks every parameter of every point; this module checks what a parameter
check cannot see — a structure file that is missing or does not parse, a sample of tens of
millions of atoms, a simulation grid of 10⁵ × 10⁵ pixels — without building anything large, so
that a run that cannot succeed is refused before a single file is written.

Components take part through an optional classmethod::

    @classmethod
    def preflight(cls, params, upstream: Footprint | None) -> Footprint | None

A sample returns what it will hold (atom count, cell) and its build memory; a forward model
receives the sample's footprint and returns its own peak memory. Returning ``None`` means
"unknown" and is always allowed. Errors about inputs (a missing file) are raised as
:class:`~tembench.errors.ScenarioError` from ``preflight`` itself.

A stage whose estimate exceeds the memory limit (``TEMBENCH_MAX_MEMORY_GB``, else 80 % of the
memory the OS reports available; a forward model's own ``max_memory_GB`` parameter overrides it
for that stage) is refused with the estimate, the parameter to change and the point it occurs at.
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


#: a dense noise step holds its output (float32, the data's size), a finite-check mask (¼ of it) and
#: chunked float64/int64 temporaries; its input may be memory-mapped (cache, patterns_path)
NOISE_FACTOR = 2.25
NOISE_TEMPORARIES_BYTES = 64 * 2**20


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
        key = stable_hash({"s": spec.sample, "f": spec.forward})
        if key in seen:
            continue
        mine = {k: v for k, v in point.values.items() if k.split(".")[0] in ("sample", "forward")}
        at = f" (at sweep point {mine})" if mine else ""
        s_cls = registry.get("sample", spec.sample.name)
        f_cls = registry.get("forward_model", spec.forward.name)
        s_fp = _call(s_cls, spec.sample.params, None, f"{where}: sample", at)
        f_fp = _call(f_cls, spec.forward.params, s_fp, f"{where}: forward", at)
        n_fp = None
        if spec.noise and f_fp is not None and f_fp.output_bytes:
            n_fp = Footprint(peak_bytes=int(NOISE_FACTOR * f_fp.output_bytes) + NOISE_TEMPORARIES_BYTES,
                             what=f"the noise chain ({' → '.join(n.name for n in spec.noise)}) on "
                                  f"{_fmt_gib(f_fp.output_bytes)} of data from {f_fp.what}",
                             fix="Make the measurement smaller (a coarser sampling_A or scan_step_A, fewer tilts "
                                 "or defocus values, a binned or cropped detector) or run fewer workers.")
        for section, fp in (("sample", s_fp), ("forward", f_fp), ("noise", n_fp)):
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
                     "noise_bytes": getattr(n_fp, "peak_bytes", None)}
    return list(seen.values())


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
