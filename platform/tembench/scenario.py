"""Scenario files: YAML → validated :class:`Scenario` → concrete :class:`Point` list.

A scenario names one sample, one forward model, a chain of noise/distortion models, one or
more reconstructors and the quantifiers that score them, plus a ``sweep`` over dotted
parameter paths::

    sweep:
      grid:                       # cartesian product
        noise.0.dose_e_per_A2: [100, 1000, .inf]
      zip:                        # paired lists (all the same length)
        forward.n_tilts:   [20, 60]
        forward.n_defocus: [9, 3]

A path is ``<section>.<selector>.<param>[.<key>…]``: the section is ``sample`` or ``forward``
(no selector) or ``noise`` / ``reconstructors`` / ``quantifiers`` (selector: list index,
label or component name). Everything — structure, component names, every parameter of every
point, kind compatibility — is validated before anything runs; errors name the file, the key
path and what is allowed.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from tembench.components import accepts_kind
from tembench.errors import KindMismatchError, ScenarioError
from tembench.registry import Registry, get_registry

LIST_SECTIONS = {"noise": "noise_model", "reconstructors": "reconstructor", "quantifiers": "quantifier"}
SINGLE_SECTIONS = {"sample": "sample", "forward": "forward_model"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ComponentSpec(_Strict):
    """One component: ``{name: ..., label: ..., params: {...}}`` or just the name as a string."""

    name: str
    label: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value):
        if isinstance(value, str):
            return {"name": value}
        return value

    @property
    def key(self) -> str:
        return self.label or self.name


class SweepSpec(_Strict):
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    zip: dict[str, list[Any]] = Field(default_factory=dict)

    @field_validator("zip")
    @classmethod
    def _same_length(cls, value: dict[str, list[Any]]):
        lengths = {k: len(v) for k, v in value.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"all `zip` lists must have the same length, got {lengths}")
        return value

    @field_validator("grid", "zip")
    @classmethod
    def _non_empty(cls, value: dict[str, list[Any]]):
        for k, v in value.items():
            if len(v) == 0:
                raise ValueError(f"sweep list {k!r} is empty")
        return value

    @property
    def paths(self) -> list[str]:
        return list(self.grid) + list(self.zip)


class ClusterSpec(BaseModel):
    """``executor.cluster``: dask workers started as batch jobs by dask-jobqueue. Keys other than
    ``kind`` and ``jobs`` (cores, memory, processes, queue, account, walltime, job_extra_directives,
    worker_extra_args, local_directory, ...) are passed to the jobqueue cluster class."""

    model_config = ConfigDict(extra="allow")
    kind: Literal["slurm", "pbs", "sge"]
    jobs: int = Field(1, ge=1, le=10_000, description="batch jobs to submit (each starts `processes` workers)")


class ExecutorSpec(_Strict):
    kind: Literal["serial", "processes", "dask"] = "serial"
    workers: int = Field(2, ge=1, le=512, description="worker processes (processes / dask LocalCluster)")
    address: str | None = Field(None, description="dask scheduler address; None starts a LocalCluster")
    threads_per_worker: int = Field(1, ge=1, le=512, description="threads per dask LocalCluster worker")
    memory_limit: str | float | None = Field(
        "auto", description="memory per dask LocalCluster worker ('4GB', bytes, 'auto' = share of RAM, null = none)")
    cluster: ClusterSpec | None = Field(None, description="dask workers started through an HPC batch system")
    resources: dict[str, float] = Field(
        default_factory=dict, description="dask resources every task needs, e.g. {gpu: 1} (device: gpu implies it)")


class SaveSpec(_Strict):
    """Files written next to the results: ``save: {reconstructions: emd, measurements: false}``."""

    reconstructions: Literal["emd"] | None = Field(
        "emd", description="write every reconstruction as HDF5 in the EMD 1.0 layout (run folder, emd/)")
    measurements: bool = Field(False, description="also write the noisy measurement into each file")


class ScenarioSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    seed: int = Field(0, ge=0)
    repeats: int = Field(1, ge=1, le=100_000)
    device: Literal["cpu", "gpu"] = "cpu"
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec)
    output: str | None = Field(None, description="output folder; default reports/<name>")
    sample: ComponentSpec
    forward: ComponentSpec
    noise: list[ComponentSpec] = Field(default_factory=list)
    reconstructors: list[ComponentSpec] = Field(min_length=1)
    quantifiers: list[ComponentSpec] = Field(default_factory=list)
    sweep: SweepSpec = Field(default_factory=SweepSpec)
    save: SaveSpec | None = Field(None, description="files to write besides the results table (tembench.emd)")

    @model_serializer(mode="wrap")
    def _omit_unset_save(self, handler):
        # a scenario without `save` dumps (and so hashes) exactly as before the option existed
        out = handler(self)
        if isinstance(out, dict) and out.get("save", 0) is None:
            out.pop("save")
        return out

    @model_validator(mode="before")
    @classmethod
    def _executor_shorthand(cls, value):
        if isinstance(value, dict) and isinstance(value.get("executor"), str):
            value = dict(value, executor={"kind": value["executor"]})
        return value


@dataclass
class Point:
    """One concrete parameter set after sweep expansion."""

    index: int
    values: dict[str, Any]          # swept path -> value
    spec: ScenarioSpec              # the scenario with the values applied
    point_id: str = ""

    def __post_init__(self) -> None:
        if not self.point_id:
            self.point_id = stable_hash(self.values)[:12]


@dataclass
class Scenario:
    spec: ScenarioSpec
    source: str                     # the YAML text
    path: Path | None
    points: list[Point] = field(default_factory=list)
    estimates: list[dict[str, Any]] = field(default_factory=list)  # preflight memory estimates per setting
    executor: str | None = None     # the executor the run will use (command-line override applied)
    workers: int | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def swept(self) -> list[str]:
        return self.spec.sweep.paths

    @property
    def n_units(self) -> int:
        return len(self.points) * self.spec.repeats

    @property
    def output_root(self) -> Path:
        """``output`` from the scenario (relative to the working directory), else reports/<name>."""
        return Path(self.spec.output) if self.spec.output else Path("reports") / self.spec.name

    def summary(self, registry: Registry | None = None, executor: str | None = None,
                workers: int | None = None) -> str:
        s = self.spec
        kind = executor or self.executor or s.executor.kind
        workers = workers or self.workers or s.executor.workers
        lines = [
            f"scenario {s.name!r}" + (f" — {s.description.strip()}" if s.description else ""),
            f"  sample:         {s.sample.name}",
            f"  forward model:  {s.forward.name}",
            f"  noise chain:    {' → '.join(n.name for n in s.noise) or '(none)'}",
            f"  reconstructors: {', '.join(r.key for r in s.reconstructors)}",
            f"  quantifiers:    {', '.join(q.key for q in s.quantifiers) or '(none)'}",
            f"  sweep:          {', '.join(f'{p} ({len(v)})' for p, v in {**s.sweep.grid, **s.sweep.zip}.items()) or '(none)'}",
            f"  points: {len(self.points)} × repeats {s.repeats} = {self.n_units} units, "
            f"{self.n_units * len(s.reconstructors)} result rows",
            f"  noise-free simulations: {len({forward_identity(p.spec) for p in self.points})}",
            f"  executor: {kind}" + (f" ({workers} workers)" if kind != "serial" else "") + f", device: {s.device}",
        ]
        sized = [e for e in self.estimates if e.get("sample_bytes") or e.get("forward_bytes")]
        if sized:
            peak = max(max(e.get("forward_bytes") or 0, e.get("noise_bytes") or 0) for e in sized)
            atoms = max((e.get("sample_atoms") or 0) for e in sized)
            lines.append(f"  estimated peak memory of a simulation or noise stage: {peak / 2**20:,.0f} MiB"
                         + (f" (largest sample ≈ {atoms:,} atoms)" if atoms else ""))
        return "\n".join(lines)


# --- hashing ----------------------------------------------------------------------------------
def _canonical(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return _canonical(obj.model_dump(mode="python"))
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, float):
        if math.isinf(obj) or math.isnan(obj):
            return repr(obj)
        return float(repr(obj)) if obj == obj else "nan"
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return _canonical(obj.tolist())
    return obj


def stable_hash(obj: Any) -> str:
    """SHA-256 of a canonical JSON form (dict order and float formatting do not matter)."""
    text = json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def forward_identity(spec: ScenarioSpec) -> str:
    return stable_hash({"sample": spec.sample, "forward": spec.forward, "seed": spec.seed})


# --- loading ------------------------------------------------------------------------------------
def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _pydantic_message(exc: ValidationError, prefix: str) -> str:
    parts = []
    for err in exc.errors():
        loc = _format_loc(tuple(err.get("loc", ())))
        msg = err.get("msg", "")
        if err.get("type") == "extra_forbidden":
            msg = "unknown key"
        if err.get("type") == "missing":
            msg = "required key is missing"
        ctx = err.get("input")
        shown = "" if err.get("type") in ("missing",) or isinstance(ctx, dict) else f" (got {ctx!r})"
        parts.append(f"{prefix}{loc}: {msg}{shown}")
    return "; ".join(parts)


def load_scenario(path: str | Path, registry: Registry | None = None, **checks: Any) -> Scenario:
    """Read and fully validate a scenario file; ``checks`` are passed on to :func:`parse_scenario`."""
    path = check_scenario_path(path)
    return parse_scenario(path.read_text(), path=path, registry=registry, **checks)


def check_scenario_path(path: str | Path) -> Path:
    """The scenario file must exist and be a file (checked before any plugin is loaded)."""
    path = Path(path)
    if not path.exists():
        raise ScenarioError(f"scenario file {str(path)!r} does not exist")
    if not path.is_file():
        raise ScenarioError(f"scenario {str(path)!r} is not a file; give the path of a scenario YAML file")
    return path


def parse_scenario(text: str, path: Path | None = None, registry: Registry | None = None, *,
                   max_points: int | None = None, check_resources: bool = True, executor: str | None = None,
                   workers: int | None = None) -> Scenario:
    """Parse and fully validate a scenario; raises :class:`ScenarioError` naming file and key path.

    Beyond the schema and every point's parameters, validation refuses what cannot run: more sweep
    points than ``max_points`` (default :data:`tembench.preflight.MAX_POINTS`, counted before
    expanding), an executor that does not exist here, and — unless ``check_resources`` is false —
    input files that are missing or do not parse and stages whose estimated memory exceeds the
    limit (:mod:`tembench.preflight`). ``executor`` / ``workers`` are the command line's overrides.
    """
    from tembench import preflight
    registry = registry or get_registry()
    where = str(path) if path else "<scenario>"
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        pos = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ScenarioError(f"{where}: malformed YAML{pos}: {problem}. Check indentation and quoting.") from None
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}: a scenario must be a YAML mapping with keys such as name, sample, forward, "
                            f"noise, reconstructors, quantifiers, sweep; got {type(raw).__name__}")
    try:
        spec = ScenarioSpec.model_validate(raw)
    except ValidationError as exc:
        raise ScenarioError(f"{where}: {_pydantic_message(exc, '')}") from None

    _check_components(spec, registry, where)
    _check_labels(spec, where)
    kind = executor or spec.executor.kind
    n_workers = workers if workers is not None else spec.executor.workers
    check_executor(kind, n_workers, where, spec.executor)
    preflight.check_point_count(spec, where, max_points)
    points = expand_points(spec, where)
    for point in points:
        _validate_params(point, registry, where)
    _check_kinds(points[0].spec, registry, where)
    estimates = []
    if check_resources:
        estimates = preflight.check_resources(points, registry, where,
                                              concurrent=n_workers if kind == "processes" or (
                                                  kind == "dask" and spec.executor.address is None
                                                  and spec.executor.cluster is None) else 1)
    remote = kind == "dask" and (spec.executor.address is not None or spec.executor.cluster is not None)
    if spec.device == "gpu" and not remote:  # a remote cluster's GPUs are checked when connecting
        from tembench.backend import get_array_module

        try:
            get_array_module("gpu")
        except Exception as exc:
            raise ScenarioError(f"{where}: device: {exc}") from None
    return Scenario(spec=spec, source=text, path=path, points=points, estimates=estimates,
                    executor=kind, workers=n_workers)


def check_executor(kind: str, workers: int, where: str = "<scenario>", options: ExecutorSpec | None = None) -> None:
    """Refuse an executor that is not available here, a worker count below 1, or dask settings that
    cannot work (a malformed scheduler address, both an address and a cluster, dask not installed)
    — before anything is written. ``options`` is the scenario's ``executor`` section."""
    if kind not in ("serial", "processes", "dask"):
        raise ScenarioError(f"{where}: executor: unknown executor {kind!r}; choose serial, processes or dask")
    if workers < 1:
        raise ScenarioError(f"{where}: executor: workers must be ≥ 1, got {workers}")
    if kind != "dask":
        return
    import importlib.util

    if importlib.util.find_spec("distributed") is None:
        raise ScenarioError(f"{where}: executor: 'dask' needs dask.distributed, which is not installed; "
                            "pip install 'tembench[dask]'")
    if options is None:
        return
    if options.address is not None and options.cluster is not None:
        raise ScenarioError(f"{where}: executor: give either `address` (an existing scheduler) or `cluster` "
                            "(workers started by a batch system), not both")
    if options.address is not None:
        from tembench.executors import check_address

        check_address(options.address, where)
    if options.cluster is not None and importlib.util.find_spec("dask_jobqueue") is None:
        raise ScenarioError(f"{where}: executor.cluster needs dask-jobqueue, which is not installed; "
                            "pip install 'tembench[dask]'")


def _sections(spec: ScenarioSpec):
    yield "sample", None, spec.sample, "sample"
    yield "forward", None, spec.forward, "forward_model"
    for section, kind in LIST_SECTIONS.items():
        for i, comp in enumerate(getattr(spec, section)):
            yield section, i, comp, kind


def _check_components(spec: ScenarioSpec, registry: Registry, where: str) -> None:
    for section, i, comp, kind in _sections(spec):
        loc = section if i is None else f"{section}.{i}"
        try:
            cls = registry.get(kind, comp.name)
        except ScenarioError as exc:
            raise ScenarioError(f"{where}: {loc}.name: {exc}") from None
        reason = cls.unavailable_reason() if hasattr(cls, "unavailable_reason") else None
        if reason:
            raise ScenarioError(f"{where}: {loc}.name: {kind.replace('_', ' ')} {comp.name!r} is {reason}")


def _check_labels(spec: ScenarioSpec, where: str) -> None:
    for section in LIST_SECTIONS:
        keys = [c.key for c in getattr(spec, section)]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes and section != "noise":
            raise ScenarioError(f"{where}: {section}: {dupes} appear more than once; give each a distinct `label`")


def _resolve_path(spec_dict: dict[str, Any], path: str, where: str) -> tuple[dict[str, Any], list[str]]:
    """Return (component dict, param key chain) for a dotted sweep path."""
    parts = path.split(".")
    section = parts[0]
    if section in SINGLE_SECTIONS:
        comp, rest = spec_dict[section], parts[1:]
    elif section in LIST_SECTIONS:
        if len(parts) < 3:
            raise ScenarioError(f"{where}: sweep path {path!r}: expected {section}.<index|label>.<param>")
        comps = spec_dict[section]
        sel = parts[1]
        match = None
        if sel.isdigit() and int(sel) < len(comps):
            match = comps[int(sel)]
        else:
            named = [c for c in comps if (c.get("label") or c["name"]) == sel] or [c for c in comps if c["name"] == sel]
            if len(named) == 1:
                match = named[0]
            elif len(named) > 1:
                raise ScenarioError(f"{where}: sweep path {path!r}: {sel!r} matches several {section}; use the index")
        if match is None:
            options = [str(i) for i in range(len(comps))] + [c.get("label") or c["name"] for c in comps]
            raise ScenarioError(f"{where}: sweep path {path!r}: no {section} entry {sel!r}; choose one of {options}")
        comp, rest = match, parts[2:]
    else:
        allowed = list(SINGLE_SECTIONS) + list(LIST_SECTIONS)
        raise ScenarioError(f"{where}: sweep path {path!r}: must start with one of {allowed}")
    if not rest:
        raise ScenarioError(f"{where}: sweep path {path!r}: names a component, not a parameter")
    return comp, rest


def expand_points(spec: ScenarioSpec, where: str = "<scenario>") -> list[Point]:
    """Cartesian product of ``grid`` × the rows of ``zip`` (a scenario with no sweep has one point)."""
    grid_keys = list(spec.sweep.grid)
    zip_keys = list(spec.sweep.zip)
    grid_rows = list(itertools.product(*(spec.sweep.grid[k] for k in grid_keys))) if grid_keys else [()]
    zip_rows = list(zip(*(spec.sweep.zip[k] for k in zip_keys))) if zip_keys else [()]
    overlap = set(grid_keys) & set(zip_keys)
    if overlap:
        raise ScenarioError(f"{where}: sweep: {sorted(overlap)} appear in both grid and zip")
    base = spec.model_dump(mode="python")
    points = []
    for g in grid_rows:
        for z in zip_rows:
            values = dict(zip(grid_keys, g)) | dict(zip(zip_keys, z))
            d = copy.deepcopy(base)
            for path, value in values.items():
                comp, chain = _resolve_path(d, path, where)
                target = comp.setdefault("params", {})
                for key in chain[:-1]:
                    nxt = target.setdefault(key, {})
                    if not isinstance(nxt, dict):
                        raise ScenarioError(f"{where}: sweep path {path!r}: {key!r} is not a mapping")
                    target = nxt
                target[chain[-1]] = value
            points.append(Point(index=len(points), values=values, spec=ScenarioSpec.model_validate(d)))
    return points


def _validate_params(point: Point, registry: Registry, where: str) -> None:
    at = f" (at sweep point {point.values})" if point.values else ""
    for section, i, comp, kind in _sections(point.spec):
        cls = registry.get(kind, comp.name)
        loc = f"{section}.params" if i is None else f"{section}.{i}.params"
        unknown = set(comp.params) - set(cls.Params.model_fields)
        if unknown:
            known = list(cls.Params.model_fields)
            hints = {u: difflib.get_close_matches(u, known, n=1) for u in unknown}
            hint = "; ".join(f"{u!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for u, h in hints.items())
            raise ScenarioError(f"{where}: {loc}: unknown parameter {hint} for {kind.replace('_', ' ')} "
                                f"{comp.name!r}; its parameters are {known}{at}")
        try:
            cls.parse_params(comp.params)
        except ValidationError as exc:
            raise ScenarioError(f"{where}: {_pydantic_message(exc, loc + '.')} [{comp.name}]{at}") from None


def output_kind(cls, params, input_kind: str | None = None) -> str:
    """The measurement kind a forward/noise model produces for these params."""
    fn = getattr(cls, "output_kind", None)
    if fn is not None:
        return fn(params) if input_kind is None else fn(params, input_kind)
    if input_kind is None:
        return cls.produces
    return cls.produces or input_kind


def _check_kinds(spec: ScenarioSpec, registry: Registry, where: str) -> None:
    fwd = registry.get("forward_model", spec.forward.name)
    kind = output_kind(fwd, fwd.parse_params(spec.forward.params))
    for i, n in enumerate(spec.noise):
        cls = registry.get("noise_model", n.name)
        if not accepts_kind(cls.accepts, kind):
            raise KindMismatchError(f"{where}: noise.{i} ({n.name!r}) accepts measurement kinds {list(cls.accepts)} "
                                    f"but receives {kind!r} from the step before it")
        kind = output_kind(cls, cls.parse_params(n.params), kind)
    recon_kinds = set()
    for i, r in enumerate(spec.reconstructors):
        cls = registry.get("reconstructor", r.name)
        if not accepts_kind(cls.accepts, kind):
            raise KindMismatchError(f"{where}: reconstructors.{i} ({r.name!r}) accepts measurement kinds "
                                    f"{list(cls.accepts)} but the forward model and noise chain produce {kind!r}")
        recon_kinds.add(cls.produces)
    for i, q in enumerate(spec.quantifiers):
        cls = registry.get("quantifier", q.name)
        if not any(accepts_kind(cls.accepts, k) for k in recon_kinds):
            raise KindMismatchError(f"{where}: quantifiers.{i} ({q.name!r}) scores reconstructions of kind "
                                    f"{list(cls.accepts)} but the reconstructors produce {sorted(recon_kinds)}")
