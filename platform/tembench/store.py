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
    <run-id>/results.parquet|csv      the tidy table (rebuilt from rows/)
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

    def write_row(self, row_key: str, row: dict[str, Any]) -> None:
        atomic_write_text(self.row_path(row_key), dumps(row))

    def write_artifacts(self, row_key: str, arrays: dict[str, np.ndarray]) -> str | None:
        if not arrays:
            return None
        buf = io.BytesIO()
        np.savez_compressed(buf, **{k: np.asarray(v) for k, v in arrays.items()})
        path = self.artifacts_dir / f"{row_key}.npz"
        atomic_write_bytes(path, buf.getvalue())
        return str(path.relative_to(self.run_dir))

    def read_rows(self) -> list[dict[str, Any]]:
        if not self.rows_dir.exists():
            return []
        rows = []
        for p in sorted(self.rows_dir.glob("*.json")):
            try:
                rows.append(json.loads(p.read_text()))
            except json.JSONDecodeError:  # cannot happen with atomic writes; be safe anyway
                continue
        return rows

    def table(self) -> pd.DataFrame:
        return rows_to_table(self.read_rows())

    def write_tables(self) -> pd.DataFrame:
        table = self.table()
        buf = io.BytesIO()
        table.to_parquet(buf, index=False)
        atomic_write_bytes(self.run_dir / "results.parquet", buf.getvalue())
        atomic_write_text(self.run_dir / "results.csv", table.to_csv(index=False))
        return table


def rows_to_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame(rows)
    sort_cols = [c for c in ("point_index", "repeat", "reconstructor") if c in table.columns]
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
