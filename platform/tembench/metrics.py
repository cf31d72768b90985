"""What a metric means: unit, which direction is better, range, and whether methods can be compared on it.

Quantifiers (and reconstructors, for the values their histories leave in the table) declare the
columns they produce in a class variable::

    class CrossCorrelation(Quantifier):
        metrics = {"ncc": Metric("", "higher", (-1, 1), headline=True, description="…"),
                   "gt_std": Metric("truth units", diagnostic=True, description="…")}

A key may be a shell pattern (``"rms_error_*_pm"``, ``"final_*"``) for families of columns. The
report reads the declarations through a :class:`MetricCatalog`: headline metrics make the verdict,
other results get a plot each, diagnostics (ground-truth statistics, solver residuals) are kept in
the table but shown apart. A column nobody declared is shown with no unit and no direction and is
left out of the verdict. ``results.parquet`` carries the same metadata per column
(:func:`annotate_parquet`), so other tools read units without tembench.
"""

from __future__ import annotations

import fnmatch
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

Direction = Literal["higher", "lower"]


@dataclass(frozen=True)
class Metric:
    """Metadata of one result column.

    unit        unit of the values ("" for dimensionless, "%" for percentages)
    direction   "higher" or "lower" is better; None when neither is (a descriptive statistic)
    range       (low, high) the values can take; None for either end that is open
    comparable  False when values of different methods are in different units or scales (e.g. an
                RMSE in a reconstruction's own units when one method returns electron fractions)
    diagnostic  a ground-truth statistic, solver residual or flag: kept in the table, shown apart
    headline    one of the few metrics the verdict ranks methods by
    """

    unit: str = ""
    direction: Direction | None = None
    range: tuple[float | None, float | None] | None = None
    comparable: bool = True
    diagnostic: bool = False
    headline: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if self.direction not in (None, "higher", "lower"):
            raise ValueError(f"Metric direction must be 'higher', 'lower' or None, got {self.direction!r}")

    @property
    def arrow(self) -> str:
        return {"higher": "↑", "lower": "↓"}.get(self.direction or "", "")

    @property
    def rankable(self) -> bool:
        """Usable in the verdict: a direction, comparable across methods, not a diagnostic."""
        return self.direction is not None and self.comparable and not self.diagnostic

    def axis_label(self, name: str) -> str:
        """``ncc · ↑ higher is better`` / ``position_error_mean_pm [pm] · ↓ lower is better``."""
        unit = f" [{self.unit}]" if self.unit else ""
        better = f" · {self.arrow} {self.direction} is better" if self.direction else ""
        return f"{name}{unit}{better}"

    def summary(self) -> str:
        """One line for ``tembench list -v``."""
        parts = [f"unit {self.unit!r}" if self.unit else "dimensionless"]
        if self.direction:
            parts.append(f"{self.arrow} {self.direction} is better")
        if self.range is not None:
            lo, hi = self.range
            parts.append(f"range {'−∞' if lo is None else f'{lo:g}'} … {'∞' if hi is None else f'{hi:g}'}")
        if not self.comparable:
            parts.append("not comparable across methods")
        if self.diagnostic:
            parts.append("diagnostic")
        if self.headline:
            parts.append("headline")
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["range"] = list(self.range) if self.range is not None else None
        return d


#: a column nobody declared: shown, never ranked
UNKNOWN = Metric(description="no metadata declared for this column")

#: columns the core itself puts in the table (the runner's ``final_<history>`` values)
CORE_METRICS: dict[str, Metric] = {
    "final_*": Metric(diagnostic=True, description="last value of the reconstructor's convergence history "
                                                   "(a solver residual or cost, in the solver's own units)"),
    # the runner's cost columns (the report shows them apart from results, never in the verdict)
    "time_*_s": Metric("s", "lower", (0.0, None), description="wall time of one stage of the unit"),
    "wall_time_s": Metric("s", "lower", (0.0, None), description="wall time of the whole unit"),
    "peak_memory_*_MB": Metric("MB", "lower", (0.0, None),
                               description="peak memory traced while the stage ran (tracemalloc; NaN when off)"),
}


def _is_pattern(key: str) -> bool:
    return any(ch in key for ch in "*?[")


class MetricCatalog:
    """Metric metadata by column name, from the components of one run (first declaration wins,
    as the runner names a clashing column ``<quantifier label>.<metric>``)."""

    def __init__(self, entries: Iterable[tuple[str, str, Metric]] = ()) -> None:
        self._exact: dict[str, tuple[str, Metric]] = {}
        self._patterns: list[tuple[str, str, Metric]] = []
        self._by_owner: dict[str, dict[str, Metric]] = {}
        for owner, key, metric in entries:
            self.add(owner, key, metric)

    def add(self, owner: str, key: str, metric: Metric) -> None:
        self._by_owner.setdefault(owner, {})[key] = metric
        if _is_pattern(key):
            self._patterns.append((owner, key, metric))
        else:
            self._exact.setdefault(key, (owner, metric))

    def lookup(self, column: str) -> Metric | None:
        """The declared metadata of ``column`` or None; ``<label>.<name>`` columns are looked up by
        the owner's declarations first, then by ``<name>``."""
        if "." in column:
            owner, _, name = column.rpartition(".")
            own = self._by_owner.get(owner, {})
            if name in own:
                return own[name]
            for key, m in own.items():
                if _is_pattern(key) and fnmatch.fnmatchcase(name, key):
                    return m
            column = name
        if column in self._exact:
            return self._exact[column][1]
        for _, key, m in self._patterns:
            if fnmatch.fnmatchcase(column, key):
                return m
        return None

    def get(self, column: str) -> Metric:
        return self.lookup(column) or UNKNOWN

    def owners(self) -> dict[str, dict[str, Metric]]:
        return dict(self._by_owner)


def declared_metrics(cls: type) -> dict[str, Metric]:
    """A component's ``metrics`` class variable (empty when it declares none)."""
    metrics = getattr(cls, "metrics", None) or {}
    return {k: m for k, m in dict(metrics).items() if isinstance(m, Metric)}


def catalog_for(registry, quantifiers: Iterable[tuple[str, str]] | None = None,
                reconstructors: Iterable[str] | None = None) -> MetricCatalog:
    """Catalog of a run: its quantifiers ``(label, name)`` in scenario order and its reconstructors'
    names; with ``quantifiers=None`` every registered quantifier and reconstructor."""
    cat = MetricCatalog()

    def _components(kind: str) -> dict[str, type]:
        try:
            return registry.components(kind)
        except Exception:  # noqa: BLE001 - a report renders even with a broken registry
            return {}

    qs = _components("quantifier")
    rs = _components("reconstructor")
    if quantifiers is None:
        quantifiers = [(n, n) for n in sorted(qs)]
    if reconstructors is None:
        reconstructors = sorted(rs)
    for label, name in quantifiers:
        if name in qs:
            for key, m in declared_metrics(qs[name]).items():
                cat.add(label, key, m)
    for name in reconstructors:
        if name in rs:
            for key, m in declared_metrics(rs[name]).items():
                cat.add(name, key, m)
    for key, m in CORE_METRICS.items():
        cat.add("tembench", key, m)
    return cat


def catalog_for_spec(spec, registry) -> MetricCatalog:
    """Catalog of a validated :class:`~tembench.scenario.ScenarioSpec`."""
    return catalog_for(registry, [(q.key, q.name) for q in spec.quantifiers],
                       list(dict.fromkeys(r.name for r in spec.reconstructors)))


# --- metadata in results.parquet --------------------------------------------------------------
PARQUET_KEY = b"tembench_metrics"


def parquet_bytes(table, catalog: MetricCatalog, columns: Iterable[str] | None = None) -> bytes:
    """``table`` as parquet whose metric columns carry their metadata: field metadata ``unit``,
    ``direction``, ``comparable``, ``diagnostic``, ``description``, and the schema key
    ``tembench_metrics`` (JSON: column → metadata). Columns without a declaration are left bare."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    at = pa.Table.from_pandas(table, preserve_index=False)
    wanted = set(table.columns if columns is None else columns)
    fields, meta = [], {}
    for f in at.schema:
        m = catalog.lookup(f.name) if f.name in wanted else None
        if m is not None:
            md = {"unit": m.unit, "direction": m.direction or "", "comparable": str(m.comparable).lower(),
                  "diagnostic": str(m.diagnostic).lower(), "description": m.description}
            f = f.with_metadata({**(f.metadata or {}), **{k.encode(): v.encode() for k, v in md.items()}})
            meta[f.name] = m.to_json()
        fields.append(f)
    schema = pa.schema(fields, metadata={**(at.schema.metadata or {}), PARQUET_KEY: json.dumps(meta).encode()})
    at = pa.Table.from_arrays(at.columns, schema=schema)
    buf = io.BytesIO()
    pq.write_table(at, buf)
    return buf.getvalue()


def annotate_parquet(path: str | Path, catalog: MetricCatalog) -> bool:
    """Rewrite ``results.parquet`` in place (atomically) with the catalog's units; False if absent."""
    import pandas as pd

    from tembench.store import atomic_write_bytes

    path = Path(path)
    if not path.exists():
        return False
    atomic_write_bytes(path, parquet_bytes(pd.read_parquet(path), catalog))
    return True


def parquet_units(path: str | Path) -> dict[str, dict[str, Any]]:
    """Column → metadata as stored by :func:`parquet_bytes` (read with pyarrow only)."""
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    out = {}
    for f in schema:
        if f.metadata and b"unit" in f.metadata:
            out[f.name] = {k.decode(): v.decode() for k, v in f.metadata.items()}
    return out
