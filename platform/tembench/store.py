"""On-disk state of runs: the stage cache, row files, results tables and manifests.

Everything is written atomically (a temporary file in the same folder, then ``os.replace``),
so a killed run leaves either the old file or the new one, never half of one. Nothing here
deletes or overwrites a finished result: row files are keyed by (point, repeat,
reconstructor) and a re-run skips keys that exist.

Layout under an output root (default ``reports/<scenario>/``)::

    .cache/<stage>/<key>/             stage results keyed by content hash (shared by runs): plain
                                      .npy arrays + entry.json, never pickles (tembench.cache)
    <run-id>/manifest.json            scenario text, versions, git commit, machine, status
    <run-id>/rows/<row-key>.json      one finished row each
    <run-id>/artifacts/<row-key>.npz  previews and curves for the report
    <run-id>/artifacts/<row-key>.scores.json
                                      what each aggregating quantifier's score() returned (scalars
                                      exactly; arrays by their key in the row's .npz), read back
                                      by the aggregate step
    <run-id>/results.parquet|csv      the tidy table (rebuilt from rows/)
    <run-id>/aggregates/rows/<key>.json, aggregates/artifacts/<key>.npz
                                      one row per point × reconstructor × aggregating quantifier
    <run-id>/aggregates.parquet|csv   the aggregates table (rebuilt from aggregates/rows/;
                                      only when the scenario has an aggregating quantifier)
    <run-id>/report.html|md
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tembench.errors import RunDirectoryError

MANIFEST = "manifest.json"
ROOT_MARKER = ".tembench-output.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=_json_default, allow_nan=True)


# --- stage cache ---------------------------------------------------------------------------
# array-native and pickle-free; it lives in tembench.cache and is re-exported here for the runner
from tembench.cache import StageCache, register_cache_type  # noqa: E402, F401


# --- run folder ------------------------------------------------------------------------------
class RunStore:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.rows_dir = self.run_dir / "rows"
        self.artifacts_dir = self.run_dir / "artifacts"
        self.aggregates_dir = self.run_dir / "aggregates"

    # manifest
    def read_manifest(self) -> dict[str, Any] | None:
        p = self.run_dir / MANIFEST
        if not p.exists():
            return None
        return json.loads(p.read_text())

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_text(self.run_dir / MANIFEST, dumps(manifest))

    # rows
    def row_path(self, row_key: str) -> Path:
        return self.rows_dir / f"{row_key}.json"

    def has_row(self, row_key: str) -> bool:
        return self.row_path(row_key).exists()

    def write_row(self, row_key: str, row: dict[str, Any]) -> bool:
        """Write a row once: the first writer wins, a later one (a task that a distributed scheduler
        ran again after its worker died, or two attempts racing) leaves the finished row untouched.
        The row appears whole (written to a temporary file, then hard-linked in place only if the
        name is free). Returns True when this call wrote the row."""
        path = self.row_path(row_key)
        if path.exists():
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(dumps(row).encode("utf-8"))
            try:
                os.link(tmp, path)  # atomic and fails if the name exists, also on NFS
                return True
            except FileExistsError:
                return False
            except OSError:  # a file system without hard links: claim the name exclusively instead
                try:
                    with open(path, "xb"):
                        pass
                except FileExistsError:
                    return False
                os.replace(tmp, path)
                return True
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def read_row(self, row_key: str) -> dict[str, Any]:
        return json.loads(self.row_path(row_key).read_text())

    def write_artifacts(self, row_key: str, arrays: dict[str, np.ndarray], folder: Path | None = None) -> str | None:
        if not arrays:
            return None
        buf = io.BytesIO()
        np.savez_compressed(buf, **{k: np.asarray(v) for k, v in arrays.items()})
        path = (folder or self.artifacts_dir) / f"{row_key}.npz"
        atomic_write_bytes(path, buf.getvalue())
        return str(path.relative_to(self.run_dir))

    # per-repeat scores of aggregating quantifiers
    def scores_path(self, row_key: str) -> Path:
        return self.artifacts_dir / f"{row_key}.scores.json"

    def write_scores(self, row_key: str, scores: dict[str, dict[str, Any]]) -> None:
        """``scores[q_key] = {"scalars": {metric: value}, "arrays": {metric: key in the row's .npz},
        "order": [metric, …]}`` (written before the row, so a finished row always has it)."""
        atomic_write_text(self.scores_path(row_key), dumps(scores))

    def read_scores(self, row_key: str, row: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """What each aggregating quantifier's ``score`` returned for this row: {q_key: metrics}.

        Scalars come back as JSON gives them (floats exact, nan/inf kept), arrays exactly from the
        row's artifacts (0-d arrays as Python scalars); metrics in the order ``score`` returned them.
        """
        path = self.scores_path(row_key)
        if not path.exists():
            raise RunDirectoryError(f"{path} is missing: the per-repeat scores of row {row_key!r} were not stored "
                                    "(a row written by an older tembench?); delete the row to recompute it")
        doc = json.loads(path.read_text())
        npz = None
        try:
            out: dict[str, dict[str, Any]] = {}
            for q_key, d in doc.items():
                metrics: dict[str, Any] = {}
                for mk in d.get("order", [*d["scalars"], *d["arrays"]]):
                    if mk in d["arrays"]:
                        if npz is None:
                            npz = np.load(self.run_dir / row["artifacts"], allow_pickle=False)
                        a = npz[d["arrays"][mk]]
                        metrics[mk] = a.item() if a.ndim == 0 else a
                    else:
                        metrics[mk] = d["scalars"][mk]
                out[q_key] = metrics
            return out
        finally:
            if npz is not None:
                npz.close()

    # aggregates: one row per point × reconstructor × aggregating quantifier
    def aggregate_path(self, key: str) -> Path:
        return self.aggregates_dir / "rows" / f"{key}.json"

    def has_aggregate(self, key: str) -> bool:
        return self.aggregate_path(key).exists()

    def write_aggregate(self, key: str, row: dict[str, Any]) -> None:
        atomic_write_text(self.aggregate_path(key), dumps(row))

    def write_aggregate_artifacts(self, key: str, arrays: dict[str, np.ndarray]) -> str | None:
        return self.write_artifacts(key, arrays, folder=self.aggregates_dir / "artifacts")

    def read_aggregates(self) -> list[dict[str, Any]]:
        return _read_json_rows(self.aggregates_dir / "rows")

    def write_aggregate_tables(self) -> pd.DataFrame:
        """Rebuild aggregates.parquet / .csv from aggregates/rows/ (nothing is written if there are none)."""
        table = aggregates_to_table(self.read_aggregates())
        if len(table):
            buf = io.BytesIO()
            table.to_parquet(buf, index=False)
            atomic_write_bytes(self.run_dir / "aggregates.parquet", buf.getvalue())
            atomic_write_text(self.run_dir / "aggregates.csv", table.to_csv(index=False))
        return table

    def read_rows(self) -> list[dict[str, Any]]:
        return _read_json_rows(self.rows_dir)

    def table(self) -> pd.DataFrame:
        return rows_to_table(self.read_rows())

    def write_tables(self, catalog=None) -> pd.DataFrame:
        """Write ``results.parquet`` and ``results.csv`` atomically; with a metric ``catalog``
        (:class:`tembench.metrics.MetricCatalog`) the parquet columns carry units and directions."""
        table = self.table()
        if catalog is not None:
            from tembench.metrics import parquet_bytes

            data = parquet_bytes(table, catalog)
        else:
            buf = io.BytesIO()
            table.to_parquet(buf, index=False)
            data = buf.getvalue()
        atomic_write_bytes(self.run_dir / "results.parquet", data)
        atomic_write_text(self.run_dir / "results.csv", table.to_csv(index=False))
        return table


def _read_json_rows(folder: Path) -> list[dict[str, Any]]:
    if not folder.exists():
        return []
    rows = []
    for p in sorted(folder.glob("*.json")):
        try:
            rows.append(json.loads(p.read_text()))
        except json.JSONDecodeError:  # cannot happen with atomic writes; be safe anyway
            continue
    return rows


def rows_to_table(rows: list[dict[str, Any]], sort: tuple[str, ...] = ("point_index", "repeat", "reconstructor")
                  ) -> pd.DataFrame:
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame(rows)
    sort_cols = [c for c in sort if c in table.columns]
    table = table.sort_values(sort_cols, kind="stable").reset_index(drop=True)
    for col in table.columns:
        # mixed inf/str/number columns from YAML ('.inf') become floats where possible
        if table[col].dtype == object:
            converted = pd.to_numeric(table[col], errors="coerce")
            if converted.notna().sum() == table[col].notna().sum() and table[col].notna().any():
                table[col] = converted
    return table


def load_table(run_dir: Path) -> pd.DataFrame:
    run_dir = Path(run_dir)
    if (run_dir / "results.parquet").exists():
        return pd.read_parquet(run_dir / "results.parquet")
    rows = RunStore(run_dir).read_rows()
    if not rows:
        raise RunDirectoryError(f"{run_dir} holds no results (no results.parquet and no rows/); is it a tembench run folder?")
    return rows_to_table(rows)


def aggregates_to_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return rows_to_table(rows, sort=("point_index", "reconstructor", "quantifier"))


def load_aggregates(run_dir: Path) -> pd.DataFrame:
    """The aggregates table of a run (one row per point × reconstructor × aggregating quantifier).

    Empty if the scenario has no aggregating quantifier (or none has finished yet).
    """
    run_dir = Path(run_dir)
    if (run_dir / "aggregates.parquet").exists():
        return pd.read_parquet(run_dir / "aggregates.parquet")
    if not (run_dir / MANIFEST).exists() and not (run_dir / "rows").exists():
        raise RunDirectoryError(f"{run_dir} is not a tembench run folder (no manifest.json, no rows/)")
    return aggregates_to_table(RunStore(run_dir).read_aggregates())


def check_output_folder(root: Path | str, what: str = "output folder") -> Path:
    """Refuse an output folder that exists as a file (before anything is written)."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise RunDirectoryError(f"{what} {str(root)!r} is a file; give a folder (it is created if missing). "
                                "Nothing was written.")
    return root


def check_output_root(root: Path, scenario_name: str) -> None:
    """An output folder belongs to one scenario; refuse to mix another scenario's runs into it."""
    marker = Path(root) / ROOT_MARKER
    if marker.exists():
        owner = json.loads(marker.read_text()).get("scenario")
        if owner != scenario_name:
            raise RunDirectoryError(
                f"output folder {str(root)!r} already holds runs of scenario {owner!r}, not {scenario_name!r}. "
                f"Nothing was written. Choose another folder with `--out` (or `output:` in the scenario)."
            )
    else:
        atomic_write_text(marker, dumps({"scenario": scenario_name}))


def finite_or_none(x: Any) -> Any:
    if isinstance(x, float) and (math.isnan(x)):
        return None
    return x
