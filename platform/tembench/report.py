"""Reports of a run: a markdown summary and a self-contained HTML page with plots and images.

For every metric: a pivot table (mean ± std over repeats) of metric vs the swept parameters per
reconstructor, and a plot of metric vs the first swept parameter with one line per method.
Reconstruction previews are shown side by side per method across the sweep; convergence
curves where reconstructors recorded them. Plugins add sections through the
``tembench_report_sections`` hook.
"""

from __future__ import annotations

import base64
import html
import textwrap
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tembench.store import MANIFEST, atomic_write_bytes, atomic_write_text, load_table

BOOKKEEPING = {"point_index", "repeat", "recon_cache_hit", "artifacts", "error", "traceback", "status", "error_stage"}
COST_PREFIXES = ("time_", "peak_memory_", "wall_time")


def _manifest(run_dir: Path) -> dict[str, Any]:
    p = Path(run_dir) / MANIFEST
    return json.loads(p.read_text()) if p.exists() else {}


def metric_columns(table: pd.DataFrame, swept: list[str]) -> list[str]:
    cols = []
    for c in table.columns:
        if c in BOOKKEEPING or c in swept or c.endswith("_version") or c.startswith(COST_PREFIXES):
            continue
        if c.startswith("n_") or c == "run_id" or c.endswith("time_s"):  # e.g. atom tracing's trace_time_s: a cost
            continue
        if pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c]):
            cols.append(c)
    return cols


def cost_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if (c.startswith(COST_PREFIXES) or c.endswith("time_s"))
            and pd.api.types.is_numeric_dtype(table[c])]


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞" if x > 0 else "−∞"
    ax = abs(x)
    if ax != 0 and (ax < 1e-3 or ax >= 1e5):
        return f"{x:.3g}"
    return f"{x:.4g}"


def _with_null_labels(table: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """Swept columns holding None/NaN (YAML ``null``) get the label "null" so they group and plot."""
    out = table.copy()
    for c in cols:
        if c in out and out[c].isna().any():
            out[c] = out[c].astype(object).where(out[c].notna(), "null")
    return out


def pivot(table: pd.DataFrame, metric: str, swept: list[str]) -> pd.DataFrame:
    """Metric mean ± std over repeats: rows = swept values, columns = reconstructors."""
    ok = table[table.get("status", "ok") == "ok"] if "status" in table else table
    index = [s for s in swept if s in ok.columns] or ["point_index"]
    ok = _with_null_labels(ok, index)
    g = ok.groupby(index + ["reconstructor"], dropna=False, sort=False)[metric]
    mean, std, n = g.mean(), g.std(), g.count()
    cells = pd.Series({k: _fmt(mean[k]) + (f" ± {_fmt(std[k])}" if n[k] > 1 and not math.isnan(std[k]) else "")
                       for k in mean.index}, dtype=object)
    cells.index = pd.MultiIndex.from_tuples(cells.index, names=index + ["reconstructor"])
    out = cells.unstack("reconstructor")
    out.index = out.index.map(lambda v: ", ".join(_fmt(x) if isinstance(x, float) else str(x)
                                                  for x in (v if isinstance(v, tuple) else (v,))))
    out.index.name = ", ".join(_short(s) for s in index)
    return out


def _short(path: str) -> str:
    return path.split(".")[-1]


def _x_positions(values: pd.Series) -> tuple[np.ndarray, list[str], bool]:
    """Map swept values to plot positions; ∞ goes one decade past the largest finite value."""
    v = pd.to_numeric(values, errors="coerce")
    if v.notna().all():
        vals = v.to_numpy(float)
        finite = vals[np.isfinite(vals)]
        log = len(finite) > 1 and finite.min() > 0 and finite.max() / finite.min() >= 50
        if np.isinf(vals).any():
            top = finite.max() if len(finite) else 1.0
            vals = np.where(np.isinf(vals), top * 10 if log else top + (np.ptp(finite) if len(finite) > 1 else 1) * 0.3,
                            vals)
        return vals, [], log
    cats = list(dict.fromkeys(values.astype(str)))
    return np.array([cats.index(str(x)) for x in values], float), cats, False


def plot_metric(table: pd.DataFrame, metric: str, swept: list[str], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = table[table["status"] == "ok"] if "status" in table else table
    ok = ok[pd.to_numeric(ok[metric], errors="coerce").notna()]
    if ok.empty:
        return None
    ok = _with_null_labels(ok, swept)
    x_col = swept[0] if swept else None
    others = [s for s in swept[1:] if s in ok.columns]
    fig, ax = plt.subplots(figsize=(6.0, 3.8), dpi=110)
    groups = ok.groupby(["reconstructor"] + others, dropna=False, sort=False)
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        label = str(key[0]) + "".join(f", {_short(o)}={_fmt(k) if isinstance(k, float) else k}"
                                      for o, k in zip(others, key[1:]))
        if x_col is None:
            ax.bar(label, g[metric].mean(), yerr=g[metric].std() if len(g) > 1 else None)
            continue
        stats = g.groupby(x_col, dropna=False, sort=False)[metric].agg(["mean", "std", "count"]).reset_index()
        xs, cats, log = _x_positions(stats[x_col])
        order = np.argsort(xs)
        yerr = stats["std"].to_numpy()[order] if (stats["count"] > 1).any() else None
        ax.errorbar(xs[order], stats["mean"].to_numpy()[order], yerr=yerr, marker="o", capsize=3, label=label)
        if log:
            ax.set_xscale("log")
        if cats:
            ax.set_xticks(range(len(cats)), cats)
        xvals = pd.to_numeric(stats[x_col], errors="coerce")
        if xvals.notna().all() and np.isinf(xvals).any():
            # label the stand-in position of ∞ explicitly instead of with its number
            finite = sorted(set(xvals[np.isfinite(xvals)].tolist()))
            ticks = [xs[list(xvals).index(f)] for f in finite] + [xs[np.isinf(xvals.to_numpy())][0]]
            ax.set_xticks(ticks, [_fmt(f) for f in finite] + ["∞"])
            ax.minorticks_off()
    if x_col:
        ax.set_xlabel(_short(x_col))
        ax.legend(fontsize=7)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_previews(table: pd.DataFrame, run_dir: Path, swept: list[str], path: Path, max_cols: int = 6) -> Path | None:
    """Reconstruction previews: one row per reconstructor, one column per value of the first swept param."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "artifacts" not in table or table["artifacts"].isna().all():
        return None
    ok = table[(table.get("status") == "ok") & (table["repeat"] == 0) & table["artifacts"].notna()]
    if ok.empty:
        return None
    methods = list(dict.fromkeys(ok["reconstructor"]))
    cols = ok.drop_duplicates("point_index").head(max_cols)["point_index"].tolist()
    shown = ok[ok["point_index"].isin(cols)]
    # titles name only what differs between the panels shown (a zip of many paths would overflow)
    varying = [c for c in swept if c in shown and shown[c].astype(str).nunique() > 1][:3]
    fig, axes = plt.subplots(len(methods), len(cols), figsize=(2.2 * len(cols), 2.3 * len(methods)), dpi=100,
                             squeeze=False)
    for i, m in enumerate(methods):
        for j, p in enumerate(cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            sel = ok[(ok["reconstructor"] == m) & (ok["point_index"] == p)]
            if sel.empty:
                ax.set_visible(False)
                continue
            with np.load(run_dir / sel.iloc[0]["artifacts"]) as npz:
                img = npz["recon_preview"] if "recon_preview" in npz else None
            if img is None:
                continue
            lo, hi = np.percentile(img, [0.5, 99.5])
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
            if i == 0:
                label = ", ".join(f"{_short(s)}={_fmt(sel.iloc[0][s]) if isinstance(sel.iloc[0][s], float) else sel.iloc[0][s]}"
                                  for s in varying) or f"point {p}"
                ax.set_title(textwrap.fill(label, 30), fontsize=6)
            if j == 0:
                ax.set_ylabel(m, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_histories(table: pd.DataFrame, run_dir: Path, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = table[(table.get("status") == "ok") & table["artifacts"].notna()] if "artifacts" in table else table.iloc[:0]
    curves = []
    for _, row in ok[ok["repeat"] == 0].iterrows():
        with np.load(run_dir / row["artifacts"]) as npz:
            for k in npz.files:
                if k.startswith("history_") and npz[k].size > 1:
                    curves.append((f"{row['reconstructor']} p{row['point_index']}", k[8:], npz[k]))
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.0, 3.6), dpi=110)
    for label, name, y in curves[:12]:
        ax.semilogy(np.arange(1, len(y) + 1), np.maximum(y, 1e-30), label=f"{label} {name}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("history")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _img_tag(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(Path(path).stem)}">'


def render_report(run_dir: str | Path, registry=None) -> tuple[Path, Path]:
    """Write report.md and report.html into the run folder; return their paths."""
    run_dir = Path(run_dir)
    table = load_table(run_dir)
    manifest = _manifest(run_dir)
    swept = [s for s in manifest.get("swept", []) if s in table.columns]
    metrics = metric_columns(table, swept)
    figdir = run_dir / "figures"
    figdir.mkdir(exist_ok=True)
    n_err = int((table["status"] == "error").sum()) if "status" in table else 0

    md = [f"# tembench report — {manifest.get('scenario', run_dir.parent.name)}", "",
          f"- run: `{manifest.get('run_id', run_dir.name)}` ({manifest.get('status', '?')}), created "
          f"{manifest.get('created', '?')}, git {str(manifest.get('git_commit'))[:10]}",
          f"- rows: {len(table)} ({n_err} failed); swept: {', '.join(swept) or '(nothing)'}; "
          f"methods: {', '.join(dict.fromkeys(table['reconstructor'])) if 'reconstructor' in table else '–'}", ""]
    body = [f"<h1>tembench report — {html.escape(str(manifest.get('scenario', run_dir.parent.name)))}</h1>",
            f"<p>{html.escape(md[2][2:])}<br>{html.escape(md[3][2:])}</p>"]

    for metric in metrics:
        pv = pivot(table, metric, swept)
        md += [f"## {metric}", "", pv.to_markdown(), ""]
        body += [f"<h2>{html.escape(metric)}</h2>", pv.to_html(classes="pivot", border=0)]
        fig = plot_metric(table, metric, swept, figdir / f"metric_{_safe(metric)}.png")
        if fig:
            md += [f"![{metric}](figures/{fig.name})", ""]
            body.append(_img_tag(fig))

    cost = cost_columns(table)
    if cost:
        ok = table[table["status"] == "ok"] if "status" in table else table
        summary = ok.groupby("reconstructor")[cost].median()
        md += ["## Cost (median per method)", "", summary.map(_fmt).to_markdown(), ""]
        body += ["<h2>Cost (median per method)</h2>", summary.map(_fmt).to_html(border=0)]

    fig = plot_previews(table, run_dir, swept, figdir / "previews.png")
    if fig:
        md += ["## Reconstructions (repeat 0)", "", f"![previews](figures/{fig.name})", ""]
        body += ["<h2>Reconstructions (repeat 0)</h2>", _img_tag(fig)]
    fig = plot_histories(table, run_dir, figdir / "histories.png")
    if fig:
        md += ["## Convergence", "", f"![convergence](figures/{fig.name})", ""]
        body += ["<h2>Convergence</h2>", _img_tag(fig)]

    if n_err:
        errs = table[table["status"] == "error"][["point_index", "repeat", "reconstructor", "error"]]
        md += ["## Failures", "", errs.to_markdown(index=False), ""]
        body += ["<h2>Failures</h2>", errs.to_html(index=False, border=0)]

    if registry is None:
        from tembench.registry import get_registry

        registry = get_registry()
    try:
        from tembench.scenario import parse_scenario

        scenario = parse_scenario(manifest["scenario_text"], registry=registry) if manifest.get("scenario_text") else None
    except Exception:  # noqa: BLE001 - a report must render even if a plugin is gone
        scenario = None
    for sections in registry.hook().tembench_report_sections(table=table, scenario=scenario, run_dir=run_dir):
        for sec in sections or []:
            md += [f"## {sec.get('title', '')}", "", sec.get("markdown", ""), ""]
            body += [f"<h2>{html.escape(sec.get('title', ''))}</h2>", sec.get("html", "")]

    if manifest.get("scenario_text"):
        md += ["## Scenario", "", "```yaml", manifest["scenario_text"].rstrip(), "```", ""]
        body += ["<h2>Scenario</h2>", f"<pre>{html.escape(manifest['scenario_text'])}</pre>"]

    page = ("<!doctype html><html><head><meta charset='utf-8'><title>tembench report</title><style>"
            "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
            "table{border-collapse:collapse;font-size:13px;margin:0.5em 0}td,th{padding:3px 8px;border-bottom:1px solid #ddd;"
            "text-align:right}img{max-width:100%;margin:0.5em 0}pre{background:#f6f6f6;padding:1em;overflow:auto}"
            "</style></head><body>" + "\n".join(body) + "</body></html>")
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    atomic_write_text(md_path, "\n".join(md))
    atomic_write_bytes(html_path, page.encode())
    return md_path, html_path


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def compare(run_a: str | Path, run_b: str | Path) -> pd.DataFrame:
    """Side-by-side mean of every shared metric per (swept values, method) for two runs."""
    ta, tb = load_table(Path(run_a)), load_table(Path(run_b))
    ma, mb = _manifest(Path(run_a)), _manifest(Path(run_b))
    sa, sb = list(ma.get("swept", [])), list(mb.get("swept", []))
    for path in [p for p in sa if p not in sb] + [p for p in sb if p not in sa]:
        table, name, other = (ta, "A", "B") if path in sa else (tb, "B", "A")
        values = table[path].dropna().unique() if path in table else []
        if len(values) > 1:
            from tembench.errors import RunDirectoryError

            raise RunDirectoryError(
                f"run {name} sweeps {path!r} over {len(values)} values but run {other} does not sweep it, so the "
                f"comparison would average run {name}'s values together. Compare runs with the same sweep (A sweeps "
                f"{sa or 'nothing'}, B sweeps {sb or 'nothing'}).")
    swept = [s for s in dict.fromkeys(sa + sb) if s in ta and s in tb]
    metrics = [m for m in metric_columns(ta, swept) if m in metric_columns(tb, swept)]
    if not metrics:
        from tembench.errors import RunDirectoryError

        raise RunDirectoryError(f"runs {run_a} and {run_b} share no metric columns to compare")
    keys = swept + ["reconstructor"]

    def agg(t):
        t = t[t["status"] == "ok"] if "status" in t else t
        return t.groupby(keys, dropna=False)[metrics].mean()

    a, b = agg(ta), agg(tb)
    out = pd.concat({"A": a, "B": b}, axis=1).swaplevel(0, 1, axis=1).sort_index(axis=1, level=0, sort_remaining=False)
    for m in metrics:
        out[(m, "B−A")] = out[(m, "B")] - out[(m, "A")]
    return out[[c for m in metrics for c in [(m, "A"), (m, "B"), (m, "B−A")]]]
