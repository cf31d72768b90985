"""Reports of a run: a self-contained interactive HTML page and a markdown summary.

The page answers "who won?" first and shows the evidence after:

1. **Verdict** — for every swept point, the best method per headline metric (declared by the
   quantifiers, :mod:`tembench.metrics`) with its mean ± standard error over repeats, and whether
   its lead over the runner-up is significant (95 % confidence interval of the paired difference
   over repeats, which share their noise realisation); then a ranking over the whole sweep.
2. **Results** — one interactive plotly panel per metric, unit and direction in the axis label;
   ∞ and null sweep values have their own ticks at the end of the axis; log axes where values span
   decades; a second swept parameter becomes small multiples; a zip sweep of many parameters
   becomes one row per configuration, labelled by what differs from the most common setting.
   Metrics that are not comparable across methods get one panel per method.
3. **Reconstructions** (images; volumes as xy, xz, yz sections), **convergence** curves labelled by
   the swept values, **diagnostics** (ground-truth statistics, solver residuals) apart from results,
   **cost**, failures, plugin sections and the scenario.

plotly.js is embedded once per page, so the file opens offline. ``report.md`` holds the verdict
and the tables, with static figures in ``figures/``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tembench.errors import TembenchError
from tembench.metrics import UNKNOWN, Metric, MetricCatalog, annotate_parquet, catalog_for, catalog_for_spec
from tembench.store import MANIFEST, atomic_write_bytes, atomic_write_text, load_table

#: changes whenever the page's structure changes; committed examples must carry the current one
REPORT_FORMAT = "2"

BOOKKEEPING = {"point_index", "repeat", "recon_cache_hit", "artifacts", "error", "traceback", "status", "error_stage",
               "reconstructor_seed", "emd_file"}  # the derived seed is an input, not a result
COST_PREFIXES = ("time_", "peak_memory_", "wall_time")
#: colour-blind-safe palette (Okabe–Ito, then Tol's muted)
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#882255", "#44AA99",
           "#999933", "#AA4499", "#332288"]
CONFIG = "configuration"   # x of a zip sweep over many parameters


def _manifest(run_dir: Path) -> dict[str, Any]:
    p = Path(run_dir) / MANIFEST
    return json.loads(p.read_text()) if p.exists() else {}


# --- columns -----------------------------------------------------------------------------------
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


# --- formatting --------------------------------------------------------------------------------
_SUP = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, (float, np.floating)) and math.isinf(x):
        return "∞" if x > 0 else "−∞"
    if not isinstance(x, (int, float, np.integer, np.floating)) or isinstance(x, bool):
        return str(x)
    ax = abs(x)
    if ax != 0 and (ax < 1e-3 or ax >= 1e5):
        return f"{x:.3g}"
    return f"{x:.4g}"


def _pm(mean: float, err: float) -> str:
    """``0.352 ± 0.024``: the mean to the precision of its uncertainty (two significant digits)."""
    if not (err == err) or math.isinf(err) or not (mean == mean) or math.isinf(mean):
        return _fmt(mean)
    if err == 0:
        return f"{_fmt(mean)} ± 0"
    dec = max(0, 1 - int(math.floor(math.log10(abs(err)))))
    if dec > 6 or abs(mean) >= 1e5:
        return f"{mean:.3g} ± {err:.2g}"
    return f"{mean:.{dec}f} ± {err:.{dec}f}"


def _ci(lo: float, hi: float) -> str:
    half = abs(hi - lo) / 2
    if not (half == half) or half == 0:
        return f"[{_fmt(lo)}, {_fmt(hi)}]"
    dec = max(0, 1 - int(math.floor(math.log10(half))))
    return f"[{lo:.{dec}f}, {hi:.{dec}f}]" if dec <= 6 else f"[{lo:.2g}, {hi:.2g}]"


def _fmt_tick(x: float) -> str:
    """Axis tick text: ∞, and 5·10⁴ instead of 5e+04."""
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    ax = abs(x)
    if ax >= 1e4 or (0 < ax < 1e-2):
        e = int(math.floor(math.log10(ax)))
        m = x / 10 ** e
        mant = f"{m:.2g}"
        return (f"10{str(e).translate(_SUP)}" if mant in ("1", "1.0") else f"{mant}·10{str(e).translate(_SUP)}")
    return f"{x:.4g}"


def _value_text(v: Any) -> str:
    if isinstance(v, (float, np.floating)) and not math.isnan(v):
        return _fmt_tick(float(v)) if math.isinf(v) or abs(v) >= 1e4 else _fmt(float(v))
    text = str(v)
    if text.startswith("[") and text.endswith("]"):  # a list value (JSON in the table): short form if long
        items = [i.strip() for i in text[1:-1].split(",") if i.strip()]
        text = "[" + ", ".join(items) + "]"
        if len(items) > 4:
            text = f"[{items[0]}, {items[1]} … {items[-1]}] ({len(items)})"
    return text


def _short(path: str) -> str:
    return path.split(".")[-1]


def _with_null_labels(table: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """Swept columns holding None/NaN (YAML ``null``) get the label "null" so they group and plot."""
    out = table.copy()
    for c in cols:
        if c in out and out[c].isna().any():
            out[c] = out[c].astype(object).where(out[c].notna(), "null")
    return out


def _ok(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["status"] == "ok"] if "status" in table else table


def _h(text: Any) -> str:
    return html.escape(str(text))


# --- the shape of the sweep --------------------------------------------------------------------
@dataclass
class Layout:
    """How the swept parameters map onto a figure: x, small multiples, the rest in hover text."""

    x: str | None = None                    # a swept column, CONFIG, or None (nothing varies)
    facet: str | None = None                # a swept column shown as small multiples
    extra: list[str] = field(default_factory=list)      # other varying columns: one trace each per method
    companions: list[str] = field(default_factory=list)  # zip partners of x: shown with it
    varying: list[str] = field(default_factory=list)
    config_labels: dict[int, str] = field(default_factory=dict)  # point_index -> label (CONFIG)
    baseline: str = ""


def _numeric(values: pd.Series) -> bool:
    if any(isinstance(v, (bool, np.bool_)) for v in values):
        return False
    v = pd.to_numeric(values.astype(object).where(values.astype(str) != "null"), errors="coerce")
    non_null = values.astype(str) != "null"
    return bool(non_null.any()) and bool(v[non_null].notna().all())


def sweep_layout(table: pd.DataFrame, swept: list[str], zipped: list[str] | None = None) -> Layout:
    """Choose x, facets and the rest from the swept columns that take more than one value."""
    t = _with_null_labels(table, swept)
    varying = [s for s in swept if s in t and t[s].astype(str).nunique() > 1]
    zipped = [s for s in (zipped or []) if s in varying]
    grid = [s for s in varying if s not in zipped]
    lay = Layout(varying=varying)
    if not varying:
        return lay
    if zipped:
        points = t.drop_duplicates("point_index") if "point_index" in t else t
        n = points[zipped].astype(str).drop_duplicates().shape[0]
        distinct = [s for s in zipped if _numeric(points[s]) and points[s].astype(str).nunique() == n]
        if distinct and (len(zipped) <= 3):
            lay.x = distinct[0]
            lay.companions = [s for s in zipped if s != lay.x]
        else:
            lay.x = CONFIG
            lay.config_labels, lay.baseline = _config_labels(points, zipped)
        rest = grid
    else:
        numeric = [s for s in grid if _numeric(t[s])]
        lay.x = numeric[0] if numeric else grid[0]
        rest = [s for s in grid if s != lay.x]
    if rest:
        lay.facet = rest[0]
        lay.extra = rest[1:]
    return lay


def _config_labels(points: pd.DataFrame, cols: list[str]) -> tuple[dict[int, str], str]:
    """Each zip entry named by what differs from the most common value of every column."""
    base = {c: points[c].astype(str).value_counts(sort=True).index[0] for c in cols}
    labels = {}
    for _, row in points.iterrows():
        diff = [f"{_short(c)}={_value_text(row[c])}" for c in cols if str(row[c]) != base[c]]
        labels[int(row["point_index"])] = ", ".join(diff) or "baseline"
    first = points.iloc[0]
    ex = {c: next(v for v in points[c] if str(v) == base[c]) for c in cols}
    baseline = ", ".join(f"{_short(c)}={_value_text(ex[c])}" for c in cols)
    del first
    return labels, baseline


@dataclass
class Axis:
    positions: dict[str, float]     # str(value) -> position
    tickvals: list[float]
    ticktext: list[str]
    log: bool = False
    title: str = ""
    breaks: list[float] = field(default_factory=list)   # where a dashed line separates ∞ / null


def x_axis(values: pd.Series, title: str = "") -> Axis:
    """Positions of swept values on one axis: ∞ one step past the largest finite value and null one
    step before the smallest, both with their own tick (per axes, not per line); log when the
    finite values span ≥ 50×."""
    vals = list(dict.fromkeys(values.tolist()))
    keys = [str(v) for v in vals]
    nums = pd.to_numeric(pd.Series([None if k == "null" else v for k, v in zip(keys, vals)], dtype=object),
                         errors="coerce")
    non_null = [k != "null" for k in keys]
    if any(non_null) and not any(isinstance(v, (bool, np.bool_)) for v in vals) and all(nums[i] == nums[i] for i in range(len(vals)) if non_null[i]):
        f = np.array([nums[i] for i in range(len(vals)) if non_null[i]], float)
        finite = np.unique(f[np.isfinite(f)])
        log = len(finite) >= 2 and finite.min() > 0 and finite.max() / finite.min() >= 50
        if len(finite) >= 2:
            step = ((finite.max() / finite.min()) ** (1 / (len(finite) - 1)) if log
                    else (finite.max() - finite.min()) / (len(finite) - 1))
            step = max(step, 3.0) if log else step
        else:
            step = 10.0 if log else (abs(finite[0]) * 0.5 if len(finite) and finite[0] else 1.0)
        hi = finite.max() if len(finite) else 0.0
        lo = finite.min() if len(finite) else 0.0
        above = (lambda v: v * step) if log else (lambda v: v + step)
        below = (lambda v: v / step) if log else (lambda v: v - step)
        pos: dict[str, float] = {}
        for k, v, nn in zip(keys, nums, non_null):
            if not nn:
                pos[k] = below(lo) if len(finite) else -1.0
            elif math.isinf(v):
                pos[k] = above(hi) if v > 0 else below(lo)
            else:
                pos[k] = float(v)
        if not len(finite):  # only ∞/null: two categories
            pos = {k: float(i) for i, k in enumerate(sorted(pos, key=lambda k: pos[k]))}
        shown = list(finite)
        if len(shown) > 10:
            shown = [shown[i] for i in np.unique(np.linspace(0, len(shown) - 1, 8).round().astype(int))]
        tickvals, ticktext, breaks = [float(v) for v in shown], [_fmt_tick(float(v)) for v in shown], []
        for k, v, nn in zip(keys, nums, non_null):
            if not nn or math.isinf(v):
                tickvals.append(pos[k])
                ticktext.append("null" if not nn else _fmt_tick(float(v)))
                if len(finite):
                    breaks.append(math.sqrt(pos[k] * (hi if pos[k] > hi else lo)) if log
                                  else 0.5 * (pos[k] + (hi if pos[k] > hi else lo)))
        return Axis(pos, tickvals, ticktext, log, title, breaks)
    order = sorted(range(len(vals)), key=lambda i: (str(type(vals[i])), vals[i]) if isinstance(vals[i], (int, float, str))
                   else ("~", str(vals[i])))
    pos = {keys[i]: float(j) for j, i in enumerate(order)}
    return Axis(pos, [pos[k] for k in keys], [_value_text(v) for v in vals], False, title)


# --- aggregated data -------------------------------------------------------------------------
def prepared(table: pd.DataFrame, swept: list[str], lay: Layout) -> pd.DataFrame:
    """Successful rows with ``_x``, ``_facet``, ``_series`` (method + extra values) and ``_point``."""
    ok = _with_null_labels(_ok(table), swept).copy()
    if ok.empty:
        return ok
    if "reconstructor" not in ok:
        ok["reconstructor"] = "method"
    if lay.x == CONFIG:
        ok["_x"] = ok["point_index"].map(lay.config_labels)
    elif lay.x:
        ok["_x"] = ok[lay.x]
    else:
        ok["_x"] = ""
    ok["_facet"] = (ok[lay.facet].map(lambda v: f"{_short(lay.facet)} = {_value_text(v)}") if lay.facet else "")
    ok["_series"] = ok["reconstructor"].astype(str)
    for c in lay.extra:
        ok["_series"] = ok["_series"] + " · " + ok[c].map(lambda v, c=c: f"{_short(c)}={_value_text(v)}")

    def point_label(r) -> str:
        if lay.x == CONFIG:
            parts = [lay.config_labels.get(int(r["point_index"]), "")]
        else:
            parts = [f"{_short(c)}={_value_text(r[c])}" for c in ([lay.x] if lay.x else []) + lay.companions]
        parts += [f"{_short(c)}={_value_text(r[c])}" for c in ([lay.facet] if lay.facet else []) + lay.extra]
        return ", ".join(p for p in parts if p) or "(single point)"

    ok["_point"] = ok.apply(point_label, axis=1)
    ok["_hover"] = ok.apply(lambda r: "<br>".join(f"{_short(c)} = {_value_text(r[c])}" for c in lay.varying), axis=1)
    return ok


def _stats(d: pd.DataFrame, metric: str, keys: list[str]) -> pd.DataFrame:
    d = d[pd.to_numeric(d[metric], errors="coerce").notna()]
    g = d.groupby(keys, sort=False, dropna=False)
    s = g[metric].agg(["mean", "std", "count"]).reset_index()
    s["hover"] = g["_hover"].first().to_numpy() if len(s) else []
    s["order"] = g["point_index"].min().to_numpy() if len(s) else []
    return s


def pivot(table: pd.DataFrame, metric: str, swept: list[str], lay: Layout | None = None) -> pd.DataFrame:
    """Metric mean ± std over repeats: rows = swept points, columns = reconstructors."""
    lay = lay or sweep_layout(table, swept)
    d = prepared(table, swept, lay)
    if d.empty or metric not in d:
        return pd.DataFrame()
    s = _stats(d, metric, ["_point", "_series"])
    if s.empty:
        return pd.DataFrame()
    s["cell"] = [_pm(m, sd) if n > 1 and sd == sd else _fmt(m) for m, sd, n in
                 zip(s["mean"], s["std"], s["count"])]
    order = list(dict.fromkeys(s.sort_values("order", kind="stable")["_point"]))
    out = s.pivot(index="_point", columns="_series", values="cell").reindex(order)
    out = out[list(dict.fromkeys(s["_series"]))]
    out.index.name = ", ".join(_short(c) for c in lay.varying) if lay.x != CONFIG else CONFIG
    out.columns.name = None
    return out.fillna("–")


# --- the verdict -------------------------------------------------------------------------------
@dataclass
class Lead:
    point: str
    metric: str
    best: str | None
    mean: float = float("nan")
    sem: float = float("nan")
    n: int = 0
    runner_up: str | None = None
    diff: float = float("nan")     # lead over the runner-up, positive = better
    ci: tuple[float, float] = (float("nan"), float("nan"))
    n_pairs: int = 0
    significant: bool | None = None   # None: no uncertainty (one repeat) or one method
    note: str = ""


def _t95(dof: int) -> float:
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, dof))
    except Exception:  # noqa: BLE001
        return 1.96


def verdict_metrics(columns: list[str], catalog: MetricCatalog) -> list[str]:
    """Headline metrics present in the table; else every rankable result."""
    head = [c for c in columns if catalog.get(c).headline and catalog.get(c).rankable]
    return head or [c for c in columns if catalog.get(c).rankable]


def leads(d: pd.DataFrame, metric: str, m: Metric) -> list[Lead]:
    """Per swept point: the best method by mean, and its paired lead over the runner-up."""
    out = []
    d = d[pd.to_numeric(d[metric], errors="coerce").notna()]
    order = d.groupby("_point", sort=False)["point_index"].min().sort_values(kind="stable").index
    sign = 1.0 if m.direction == "higher" else -1.0
    for point in order:
        g = d[d["_point"] == point]
        by = {s: gg.groupby("repeat")[metric].mean() for s, gg in g.groupby("_series", sort=False)}
        means = sorted(((s, float(v.mean())) for s, v in by.items()), key=lambda kv: -sign * kv[1])
        if not means:
            continue
        best, mean = means[0]
        v = by[best]
        tied = [s for s, val in means if val == mean]
        rest = [(s, val) for s, val in means if val != mean]
        lead = Lead(point, metric, " = ".join(tied), mean,
                    float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan"), len(v))
        if len(tied) > 1 and not rest:
            lead.note = "tied"
        elif rest:
            means = [(best, mean), rest[0]]
            lead.runner_up = means[1][0]
            w = by[lead.runner_up]
            common = v.index.intersection(w.index)
            diffs = sign * (v.loc[common] - w.loc[common])
            lead.n_pairs = len(common)
            lead.diff = float(diffs.mean()) if len(common) else sign * (mean - means[1][1])
            if len(common) >= 2:
                sd = float(diffs.std(ddof=1))
                half = _t95(len(common) - 1) * sd / math.sqrt(len(common))
                lead.ci = (lead.diff - half, lead.diff + half)
                lead.significant = bool(lead.ci[0] > 0)
                if sd == 0:
                    lead.note = "identical in every repeat"
            else:
                lead.note = "one repeat: no confidence interval"
        else:
            lead.note = "only method"
        out.append(lead)
    return out


def ranking(d: pd.DataFrame, metrics: list[str], catalog: MetricCatalog) -> pd.DataFrame:
    """Mean rank (1 = best) of every method per metric over the swept points, and its wins."""
    rows = {}
    for metric in metrics:
        m = catalog.get(metric)
        s = _stats(d, metric, ["_point", "_series"])
        if s.empty:
            continue
        s["rank"] = s.groupby("_point")["mean"].rank(ascending=(m.direction == "lower"), method="min")
        wins = s[s["rank"] == 1].groupby("_series").size()
        r = s.groupby("_series", sort=False)["rank"].agg(["mean", "count"])
        for series, row in r.iterrows():
            rows.setdefault(series, {})[metric] = (row["mean"], int(wins.get(series, 0)), int(row["count"]))
    if not rows:
        return pd.DataFrame()
    out = pd.DataFrame({s: {k: v for k, v in vals.items()} for s, vals in rows.items()}).T
    out["_overall"] = [np.nanmean([v[0] for v in vals.values()]) for vals in rows.values()]
    return out.sort_values("_overall", kind="stable")


def _metric_head(metric: str, m: Metric) -> str:
    unit = f" [{m.unit}]" if m.unit else ""
    return f"{metric}{unit} {m.arrow}".strip()


def verdict_html(d: pd.DataFrame, metrics: list[str], catalog: MetricCatalog, n_methods: int) -> tuple[str, list[str]]:
    """(HTML of the verdict and ranking tables, markdown lines)."""
    if not metrics:
        msg = ("No metric of this run declares a direction (higher or lower is better), so there is no verdict; "
               "the results are below.")
        return f'<table id="verdict" class="verdict"><tr><td>{_h(msg)}</td></tr></table>', [msg, ""]
    all_leads = {metric: {ld.point: ld for ld in leads(d, metric, catalog.get(metric))} for metric in metrics}
    points = list(dict.fromkeys(p for metric in metrics for p in all_leads[metric]))
    order = d.groupby("_point")["point_index"].min()
    points.sort(key=lambda p: order.get(p, 0))
    head = "".join(f'<th title="{_h(catalog.get(mt).description)}">{_h(_metric_head(mt, catalog.get(mt)))}</th>'
                   for mt in metrics)
    rows_html, md = [], ["| point | " + " | ".join(_metric_head(mt, catalog.get(mt)) for mt in metrics) + " |",
                         "|:--|" + "--:|" * len(metrics)]
    for p in points:
        cells, mcells = [], []
        for mt in metrics:
            ld = all_leads[mt].get(p)
            if ld is None or ld.best is None:
                cells.append("<td>–</td>")
                mcells.append("–")
                continue
            val = _pm(ld.mean, ld.sem)
            if ld.runner_up is None:
                sub, cls, msub = (ld.note if n_methods > 1 else ""), "", ""
            elif ld.significant is None:
                sub = f"lead {_fmt(ld.diff)} over {ld.runner_up} (one repeat: no interval)"
                cls, msub = "unsure", f" (lead {_fmt(ld.diff)}, n=1)"
            else:
                ci = _ci(ld.ci[0], ld.ci[1])
                lead_txt = _pm(ld.diff, (ld.ci[1] - ld.ci[0]) / 2).split(" ± ")[0]
                mark = "✓ significant" if ld.significant else "✗ not significant"
                sub = f"lead {lead_txt} {ci} over {ld.runner_up}: {mark}" + (f" ({ld.note})" if ld.note else "")
                cls = "sig" if ld.significant else "ns"
                msub = f" (lead {lead_txt} {ci} {'✓' if ld.significant else 'n.s.'})"
            who = f"<b>{_h(ld.best)}</b> " if n_methods > 1 else ""
            cells.append(f'<td class="{cls}">{who}{_h(val)}'
                         + (f'<div class="lead">{_h(sub)}</div>' if sub else "") + "</td>")
            mcells.append((f"**{ld.best}** " if n_methods > 1 else "") + f"{val}{msub}")
        rows_html.append(f'<tr><th class="pt">{_h(p)}</th>{"".join(cells)}</tr>')
        md.append(f"| {p} | " + " | ".join(mcells) + " |")
    out = [f'<table id="verdict" class="verdict"><thead><tr><th>swept point</th>{head}</tr></thead>'
           f'<tbody>{"".join(rows_html)}</tbody></table>']
    md.append("")
    if n_methods > 1:
        rk = ranking(d, metrics, catalog)
        if not rk.empty:
            cols = [c for c in rk.columns if c != "_overall"]
            hdr = "".join(f"<th>{_h(_metric_head(c, catalog.get(c)))}</th>" for c in cols)
            body = []
            mdr = ["| method | " + " | ".join(_metric_head(c, catalog.get(c)) for c in cols) + " | mean rank |",
                   "|:--|" + "--:|" * (len(cols) + 1)]
            for i, (series, row) in enumerate(rk.iterrows()):
                cells = []
                for c in cols:
                    v = row[c]
                    cells.append("–" if not isinstance(v, tuple) else f"{v[0]:.2g} ({v[1]}/{v[2]} best)")
                body.append(f"<tr><th>{i + 1}. {_h(series)}</th>" + "".join(f"<td>{_h(c)}</td>" for c in cells)
                            + f"<td><b>{row['_overall']:.2g}</b></td></tr>")
                mdr.append(f"| {i + 1}. {series} | " + " | ".join(cells) + f" | {row['_overall']:.2g} |")
            out.append('<h3>Ranking over the sweep</h3><p class="note">Mean rank of each method at the swept points '
                       '(1 = best, ties share the better rank; in brackets how often it was best). Sorted by the mean over the headline '
                       'metrics.</p>'
                       f'<table id="ranking" class="verdict"><thead><tr><th>method</th>{hdr}<th>mean rank</th></tr>'
                       f'</thead><tbody>{"".join(body)}</tbody></table>')
            md += ["### Ranking over the sweep", "", *mdr, ""]
    return "\n".join(out), md


# --- interactive figures (plotly) --------------------------------------------------------------
def _colors(series: list[str], methods: list[str]) -> dict[str, str]:
    base = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)}
    return {s: base.get(s.split(" · ")[0], PALETTE[i % len(PALETTE)]) for i, s in enumerate(series)}


def _dashes(series: list[str]) -> dict[str, str]:
    styles = ["solid", "dash", "dot", "dashdot", "longdash"]
    out, seen = {}, {}
    for s in series:
        m = s.split(" · ")[0]
        out[s] = styles[seen.get(m, 0) % len(styles)]
        seen[m] = seen.get(m, 0) + 1
    return out


def _log_y(values: np.ndarray) -> bool:
    v = values[np.isfinite(values)]
    return len(v) >= 2 and v.min() > 0 and v.max() / v.min() >= 100


def metric_figure(d: pd.DataFrame, metric: str, m: Metric, lay: Layout, methods: list[str]):
    """One panel (or small multiples) of ``metric`` vs the sweep, one trace per method."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    d = d[pd.to_numeric(d[metric], errors="coerce").notna()]
    if d.empty:
        return None
    facet_col = "_facet" if lay.facet else None
    per_method = not m.comparable and d["reconstructor"].nunique() > 1
    if per_method:
        d = d.assign(_facet=d["reconstructor"].astype(str) + (" · " + d["_facet"] if lay.facet else ""))
        facet_col = "_facet"
    facets = list(dict.fromkeys(d[facet_col])) if facet_col else [""]
    ncols = min(len(facets), 4 if lay.x != CONFIG else 3)
    nrows = math.ceil(len(facets) / ncols)
    horizontal = lay.x == CONFIG
    s = _stats(d, metric, ["_facet", "_series", "_x"] if facet_col else ["_series", "_x"])
    if not facet_col:
        s["_facet"] = ""
    series = sorted(dict.fromkeys(d["_series"]), key=lambda x: (methods.index(x.split(" · ")[0])
                                                                 if x.split(" · ")[0] in methods else len(methods), x))
    colors, dashes = _colors(series, methods), _dashes(series)
    ax = x_axis(d.sort_values("point_index")["_x"]) if lay.x else None
    if horizontal and ax is not None:  # configurations top to bottom in sweep order
        order = list(dict.fromkeys(d.sort_values("point_index")["_x"].astype(str)))
        ax = Axis({k: float(len(order) - 1 - i) for i, k in enumerate(order)},
                  [float(len(order) - 1 - i) for i in range(len(order))], order)
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=[f for f in facets] if facet_col else None,
                        shared_xaxes=not horizontal, shared_yaxes=(not per_method) or horizontal,
                        horizontal_spacing=0.06 if not per_method else 0.09, vertical_spacing=0.14 / max(nrows, 1) * 2)
    label = m.axis_label(metric)
    shown: set[str] = set()
    for i, fct in enumerate(facets):
        r, c = i // ncols + 1, i % ncols + 1
        for ser in series:
            g = s[(s["_facet"] == fct) & (s["_series"] == ser)]
            if g.empty:
                continue
            if ax is not None:
                g = g.assign(_pos=[ax.positions.get(str(v), np.nan) for v in g["_x"]]).sort_values("_pos")
            err = g["std"].where(g["count"] > 1).to_numpy()
            has_err = bool(np.isfinite(err).any())
            custom = np.stack([g["_x"].map(_value_text).to_numpy(), g["std"].map(_fmt).to_numpy(),
                               g["count"].to_numpy(), g["hover"].to_numpy()], axis=-1)
            common = dict(name=ser, legendgroup=ser, showlegend=ser not in shown, customdata=custom,
                          marker=dict(color=colors[ser], size=8), line=dict(color=colors[ser], dash=dashes[ser]))
            shown.add(ser)
            if horizontal:
                tr = go.Scatter(x=g["mean"], y=g["_pos"], mode="markers",
                                error_x=dict(type="data", array=err, visible=has_err, color=colors[ser]),
                                hovertemplate=f"<b>{_h(ser)}</b><br>%{{customdata[3]}}<br>{_h(metric)} = %{{x:.4g}} "
                                              "± %{customdata[1]} (n=%{customdata[2]})<extra></extra>", **common)
            else:
                xs = g["_pos"] if ax is not None else [0] * len(g)
                tr = go.Scatter(x=xs, y=g["mean"], mode="lines+markers",
                                error_y=dict(type="data", array=err, visible=has_err, color=colors[ser]),
                                hovertemplate=f"<b>{_h(ser)}</b><br>%{{customdata[3]}}<br>{_h(metric)} = %{{y:.4g}} "
                                              "± %{customdata[1]} (n=%{customdata[2]})<extra></extra>", **common)
            fig.add_trace(tr, row=r, col=c)
        if ax is not None:
            axis_kw = dict(tickmode="array", tickvals=ax.tickvals, ticktext=ax.ticktext,
                           type="log" if ax.log else "linear", showgrid=True, automargin=True)
            if horizontal:
                fig.update_yaxes(row=r, col=c, **axis_kw, range=[-0.6, len(ax.tickvals) - 0.4])
            else:
                fig.update_xaxes(row=r, col=c, **axis_kw,
                                 title_text=(_short(lay.x) if r == nrows else None) if lay.x != CONFIG else None)
            for b in ax.breaks:
                if not horizontal:
                    fig.add_vline(x=b, row=r, col=c, line=dict(color="#999", dash="dot",
                                                                                           width=1))
        vals = s["mean"].to_numpy(float)
        val_axis = fig.update_xaxes if horizontal else fig.update_yaxes
        val_kw: dict[str, Any] = dict(automargin=True, showgrid=True)
        sub = s[s["_facet"] == fct]["mean"].to_numpy(float) if per_method else vals
        if _log_y(sub):
            val_kw.update(type="log", dtick="D2", exponentformat="power")
        fin = sub[np.isfinite(sub)]
        if len(fin) and np.ptp(fin) <= 1e-9 * max(abs(fin).max(), 1e-300) and fin[0] != 0:  # a constant: show it
            val_kw["range"] = sorted([0.0, 1.25 * float(fin[0])])
        if (horizontal and r == nrows) or (not horizontal and c == 1) or per_method:
            val_kw["title_text"] = label if (c == 1 or horizontal or per_method) else None
        val_axis(row=r, col=c, **val_kw)
    height = (max(240, 27 * len(ax.tickvals) + 120) * nrows if horizontal else 330 * nrows + 90)
    fig.update_layout(template="plotly_white", height=height, font=dict(size=13),
                      margin=dict(l=10, r=10, t=40 if facet_col else 30, b=10),
                      legend=dict(orientation="v", yanchor="top", y=1.0, xanchor="left", x=1.01, font=dict(size=13)),
                      showlegend=len(series) > 1 and not per_method, hoverlabel=dict(font_size=13))
    if facet_col:
        fig.update_annotations(font_size=13)
    return fig


def history_figure(curves: list[tuple[str, str, int, np.ndarray]], name: str):
    """Convergence of one history (e.g. ``residual``): a panel per method, a line per swept point."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    from plotly.colors import sample_colorscale

    methods = list(dict.fromkeys(c[0] for c in curves))
    points = list(dict.fromkeys(c[1] for c in sorted(curves, key=lambda c: c[2])))
    ncols = min(len(methods), 3)
    nrows = math.ceil(len(methods) / ncols)
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=methods,
                        shared_yaxes=False, horizontal_spacing=0.07)
    cols = sample_colorscale("Viridis", [0.9 * i / max(len(points) - 1, 1) for i in range(len(points))])
    shown: set[str] = set()
    all_pos = all((np.asarray(c[3]) > 0).all() for c in curves)
    for method, point, _, y in curves:
        i = methods.index(method)
        col = cols[points.index(point)]
        fig.add_trace(go.Scatter(x=np.arange(1, len(y) + 1), y=y, mode="lines", name=point, legendgroup=point,
                                 showlegend=point not in shown, line=dict(color=col, width=2),
                                 hovertemplate=f"{_h(method)}, {_h(point)}<br>iteration %{{x}}: %{{y:.4g}}<extra></extra>"),
                      row=i // ncols + 1, col=i % ncols + 1)
        shown.add(point)
    fig.update_xaxes(title_text="iteration", automargin=True)
    fig.update_yaxes(automargin=True, **({"type": "log", "dtick": "D2", "exponentformat": "power"} if all_pos else {}))
    fig.update_yaxes(title_text=name, row=1, col=1)
    long = max((len(p) for p in points), default=0) > 28
    legend = (dict(orientation="h", yanchor="top", y=-0.12 - 0.1 / nrows, xanchor="left", x=0, font=dict(size=12)) if long
              else dict(orientation="v", yanchor="top", y=1.0, xanchor="left", x=1.01, font=dict(size=13)))
    fig.update_layout(template="plotly_white", height=320 * nrows + 110 + (24 * len(points) if long else 0),
                      margin=dict(l=10, r=10, t=40, b=10), hoverlabel=dict(font_size=13), legend=legend)
    return fig


_PLOT_CONFIG = {"displaylogo": False, "responsive": True, "toImageButtonOptions": {"format": "png", "scale": 2}}


def _fig_html(fig, div_id: str) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=_PLOT_CONFIG)


# --- static figures for report.md ---------------------------------------------------------------
def plot_metric(d: pd.DataFrame, metric: str, m: Metric, lay: Layout, path: Path) -> Path | None:
    """A static PNG of the same panel (markdown summary): same axes, facets as subplots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = d[pd.to_numeric(d[metric], errors="coerce").notna()]
    if d.empty:
        return None
    facets = list(dict.fromkeys(d["_facet"])) if lay.facet else [""]
    horizontal = lay.x == CONFIG
    series = list(dict.fromkeys(d["_series"]))
    colors = _colors(series, list(dict.fromkeys(d["reconstructor"].astype(str))))
    ax_info = x_axis(d.sort_values("point_index")["_x"]) if lay.x else None
    if horizontal and ax_info is not None:
        order = list(dict.fromkeys(d.sort_values("point_index")["_x"].astype(str)))
        ax_info = Axis({k: float(len(order) - 1 - i) for i, k in enumerate(order)},
                       [float(len(order) - 1 - i) for i in range(len(order))], order)
    n = len(facets)
    h = max(3.2, 0.32 * len(ax_info.tickvals) + 1.2) if horizontal and ax_info else 3.4
    fig, axes = plt.subplots(1, n, figsize=(min(4.6 * n + 2.2, 16), h), dpi=100, squeeze=False, sharey=True)
    s = _stats(d, metric, ["_facet", "_series", "_x"])
    for ax, fct in zip(axes[0], facets):
        for ser in series:
            g = s[(s["_facet"] == fct) & (s["_series"] == ser)]
            if g.empty:
                continue
            pos = np.array([ax_info.positions.get(str(v), np.nan) for v in g["_x"]]) if ax_info else np.zeros(len(g))
            o = np.argsort(pos)
            err = g["std"].where(g["count"] > 1).to_numpy()[o]
            err = None if not np.isfinite(err).any() else np.nan_to_num(err)
            if horizontal:
                ax.errorbar(g["mean"].to_numpy()[o], pos[o], xerr=err, fmt="o", capsize=3, color=colors[ser], label=ser)
            else:
                ax.errorbar(pos[o], g["mean"].to_numpy()[o], yerr=err, marker="o", capsize=3, color=colors[ser],
                            label=ser)
        if ax_info is not None:
            if horizontal:
                ax.set_yticks(ax_info.tickvals, ax_info.ticktext, fontsize=8)
            else:
                if ax_info.log:
                    ax.set_xscale("log")
                ax.set_xticks(ax_info.tickvals, ax_info.ticktext)
                ax.minorticks_off()
                for b in ax_info.breaks:
                    ax.axvline(b, color="#999", ls=":", lw=1)
                ax.set_xlabel(_short(lay.x))
        if _log_y(s["mean"].to_numpy(float)):
            (ax.set_xscale if horizontal else ax.set_yscale)("log")
        if fct:
            ax.set_title(fct, fontsize=10)
        ax.grid(alpha=0.3)
    (axes[0][0].set_xlabel if horizontal else axes[0][0].set_ylabel)(m.axis_label(metric), fontsize=9)
    if len(series) > 1:
        axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # long configuration labels: bbox_inches makes room
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


# --- reconstructions --------------------------------------------------------------------------
# --- helpers for plugins' report sections (tembench_report_sections hooks) -----------------------
def pyplot():
    """matplotlib.pyplot on the Agg backend (reports render without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def palette_png(data: bytes, colors: int = 64, grey: bool = False) -> bytes:
    """PNG bytes re-encoded with an adaptive palette of ``colors`` colours (``grey``: grey levels) — 3–4× smaller
    than RGBA for plots and noisy images, so reports that embed many figures (the committed examples) stay small.
    Returns the input unchanged without Pillow."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow ships with matplotlib
        return data
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("L" if grey else "RGB").quantize(colors).save(out, format="PNG", optimize=True)
    return out.getvalue()


def figure_uri(fig, dpi: int = 90, colors: int | None = None, grey: bool = False) -> str:
    """A matplotlib figure as a PNG data URI (the figure is closed); with ``colors``, palette-encoded
    (:func:`palette_png`)."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    data = buf.getvalue() if colors is None else palette_png(buf.getvalue(), colors, grey)
    return "data:image/png;base64," + base64.b64encode(data).decode()


def img_tag(uri: str, alt: str) -> str:
    """An <img> of a data URI that scales to the page width."""
    return f"<img alt='{html.escape(alt)}' src='{uri}' style='max-width:100%'>"


def swept_columns(table: pd.DataFrame, scenario) -> list[str]:
    """The scenario's swept parameters (grid, then zip) that are columns of ``table``."""
    try:
        keys = list(scenario.spec.sweep.grid) + list(scenario.spec.sweep.zip)
    except AttributeError:
        keys = []
    return [k for k in keys if k in table.columns]


def _png_uri(img: np.ndarray) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = np.asarray(img, np.float64)
    finite = img[np.isfinite(img)]
    lo, hi = (np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0))
    buf = io.BytesIO()
    plt.imsave(buf, np.nan_to_num(img, nan=lo), cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def previews_html(d: pd.DataFrame, run_dir: Path, max_points: int = 12) -> str | None:
    """Repeat 0 of every method (columns) at each swept point (rows); volumes as xy, xz, yz sections."""
    if "artifacts" not in d or d["artifacts"].isna().all():
        return None
    ok = d[(d["repeat"] == 0) & d["artifacts"].notna()]
    if ok.empty:
        return None
    methods = list(dict.fromkeys(ok["_series"]))
    points = list(dict.fromkeys(ok.sort_values("point_index")["_point"]))
    if len(points) > max_points:
        points = [points[i] for i in np.unique(np.linspace(0, len(points) - 1, max_points).round().astype(int))]
    head = "".join(f"<th>{_h(m)}</th>" for m in methods)
    rows = []
    for p in points:
        cells = []
        for mth in methods:
            sel = ok[(ok["_point"] == p) & (ok["_series"] == mth)]
            if sel.empty:
                cells.append("<td></td>")
                continue
            try:
                with np.load(run_dir / sel.iloc[0]["artifacts"]) as npz:
                    if "recon_slice_xy" in npz.files:
                        imgs = [(k, npz[f"recon_slice_{k}"]) for k in ("xy", "xz", "yz") if f"recon_slice_{k}" in npz]
                    elif "recon_preview" in npz.files:
                        imgs = [("", npz["recon_preview"])]
                    else:
                        imgs = []
            except (OSError, ValueError, KeyError):
                imgs = []
            figs = "".join(f'<figure><img src="{_png_uri(a)}" alt="{_h(mth)} {_h(p)} {k}">'
                           + (f"<figcaption>{k}</figcaption>" if k else "") + "</figure>" for k, a in imgs)
            cells.append(f'<td><div class="secs">{figs}</div></td>')
        rows.append(f'<tr><th class="pt">{_h(p)}</th>{"".join(cells)}</tr>')
    return (f'<div class="scroll"><table class="previews"><thead><tr><th>swept point</th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def history_curves(d: pd.DataFrame, run_dir: Path) -> dict[str, list[tuple[str, str, int, np.ndarray]]]:
    out: dict[str, list] = {}
    if "artifacts" not in d:
        return out
    for _, row in d[(d["repeat"] == 0) & d["artifacts"].notna()].iterrows():
        try:
            with np.load(run_dir / row["artifacts"]) as npz:
                for k in npz.files:
                    if k.startswith("history_") and npz[k].size > 1:
                        out.setdefault(k[8:], []).append((row["_series"], row["_point"], int(row["point_index"]),
                                                          np.asarray(npz[k], float)))
        except (OSError, ValueError):
            continue
    return out


# --- cost --------------------------------------------------------------------------------------
def _cost_name(col: str) -> str:
    name = col
    for suffix, unit in (("_s", "s"), ("_MB", "MB")):
        if col.endswith(suffix):
            name = f"{col[: -len(suffix)]} [{unit}]"
    return name.replace("_", " ")


def cost_table(table: pd.DataFrame) -> pd.DataFrame:
    """Median cost per method: rows = quantities (with units), columns = methods."""
    cost = cost_columns(table)
    ok = _ok(table)
    if not cost or ok.empty or "reconstructor" not in ok:
        return pd.DataFrame()
    summary = ok.groupby("reconstructor", sort=False)[cost].median().T
    summary.index = [_cost_name(c) for c in summary.index]
    summary.columns.name = None
    return summary.map(_fmt)


# --- the page ----------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1360px;margin:1.5em auto;padding:0 1.2em;
color:#1d1d1f;font-size:15px;line-height:1.45}
h1{font-size:26px;margin-bottom:.2em}h2{font-size:21px;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
h3{font-size:17px;margin:1.2em 0 .3em}p.meta{color:#555;margin-top:0}.note{color:#555;font-size:14px;margin:.2em 0 .6em}
table{border-collapse:collapse;font-size:14px;margin:.5em 0}td,th{padding:5px 10px;border-bottom:1px solid #e3e3e3;
text-align:right;vertical-align:top}th{font-weight:600;background:#fafafa}thead th:first-child{text-align:left}th.pt{text-align:left;max-width:420px;font-weight:600}
table.verdict td{text-align:left;min-width:150px}table.verdict td .lead{font-size:12.5px;color:#555;margin-top:2px}
table.verdict td.sig{background:#eef8f0}table.verdict td.ns{background:#fdf6e9}table.verdict td.unsure{background:#f6f6f6}
.scroll{overflow-x:auto;max-width:100%}.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(620px,1fr));gap:18px}
.panel{border:1px solid #e6e6e6;border-radius:6px;padding:6px 8px;min-width:0}.panel h3{margin:.2em 0}
.panel .desc{font-size:13.5px;color:#555;margin:0 0 .3em}.wide{grid-column:1/-1}
.diag .panel{background:#fbfbfb}table.previews td{text-align:center;padding:4px}
.secs{display:flex;gap:4px;justify-content:center}.secs figure{margin:0}.secs img{width:150px;height:auto;
image-rendering:pixelated;border:1px solid #ddd}.secs figcaption{font-size:12px;color:#555}
pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:13px}details summary{cursor:pointer;font-weight:600}
.badge{display:inline-block;padding:0 6px;border-radius:4px;font-size:12.5px;background:#eee;margin-left:6px}
"""


def _scenario_of(manifest: dict[str, Any], registry):
    if not manifest.get("scenario_text"):
        return None
    try:
        from tembench.scenario import parse_scenario

        return parse_scenario(manifest["scenario_text"], registry=registry, check_resources=False)
    except Exception:  # noqa: BLE001 - a report must render even if a plugin is gone
        return None


def render_report(run_dir: str | Path, registry=None) -> tuple[Path, Path]:
    """Write report.md and report.html into the run folder; return their paths."""
    run_dir = Path(run_dir)
    table = load_table(run_dir)
    manifest = _manifest(run_dir)
    if registry is None:
        from tembench.registry import get_registry

        registry = get_registry()
    scenario = _scenario_of(manifest, registry)
    swept = [s for s in manifest.get("swept", []) if s in table.columns]
    catalog = catalog_for_spec(scenario.spec, registry) if scenario is not None else catalog_for(registry)
    try:
        annotate_parquet(run_dir / "results.parquet", catalog)
    except Exception:  # noqa: BLE001 - units in the parquet are a courtesy; the report goes on
        pass
    zipped = list(scenario.spec.sweep.zip) if scenario is not None else []
    lay = sweep_layout(table, swept, zipped)
    d = prepared(table, swept, lay)
    metrics = metric_columns(table, swept)
    results = [c for c in metrics if not catalog.get(c).diagnostic]
    diagnostics = [c for c in metrics if catalog.get(c).diagnostic]
    head_metrics = verdict_metrics(results, catalog)
    results.sort(key=lambda c: (c not in head_metrics, head_metrics.index(c) if c in head_metrics else 0))
    methods = list(dict.fromkeys(table["reconstructor"].astype(str))) if "reconstructor" in table else []
    figdir = run_dir / "figures"
    figdir.mkdir(exist_ok=True)
    for old in figdir.glob("*.png"):
        old.unlink()
    n_err = int((table["status"] == "error").sum()) if "status" in table else 0
    name = str(manifest.get("scenario", run_dir.parent.name))
    desc = scenario.spec.description if scenario is not None else ""

    meta1 = (f"run {manifest.get('run_id', run_dir.name)} ({manifest.get('status', '?')}), created "
             f"{manifest.get('created', '?')}, git {str(manifest.get('git_commit'))[:10]}")
    meta2 = (f"{len(table)} rows ({n_err} failed), {manifest.get('repeats', '?')} repeat(s) per point; swept: "
             f"{', '.join(_short(s) for s in lay.varying) or '(nothing)'}; methods: {', '.join(methods) or '–'}")
    md = [f"# tembench report — {name}", "", f"{desc}" if desc else "", f"- {meta1}", f"- {meta2}",
          "- interactive plots: `report.html`", ""]
    body = [f"<h1>tembench report — {_h(name)}</h1>", f'<p class="meta">{_h(desc)}<br>{_h(meta1)}<br>{_h(meta2)}</p>']

    # 1. verdict
    n_series = d["_series"].nunique() if not d.empty else 0
    v_html, v_md = verdict_html(d, head_metrics, catalog, n_series) if not d.empty else (
        '<table id="verdict" class="verdict"><tr><td>no successful rows</td></tr></table>', ["no successful rows", ""])
    expl = ("Best method per headline metric at each swept point: mean ± standard error over repeats. " if n_series > 1
            else "One method: its headline metrics at each swept point, mean ± standard error over repeats. ")
    expl += (
            ("The line below gives its lead over the runner-up (paired over repeats, which share their noise "
             "realisation) with a 95 % confidence interval; ✓ when the interval excludes 0. " if n_series > 1 else "")
            + (f"Configurations are named by what differs from the baseline ({lay.baseline}). " if lay.baseline else ""))
    body += ["<h2>Verdict</h2>", f'<p class="note">{_h(expl)}</p>', f'<div class="scroll">{v_html}</div>']
    md += ["## Verdict", "", expl, "", *v_md]

    # plugin sections: "top" ones right after the verdict (e.g. images beside the truth), the rest near the end
    plugin = _plugin_sections(registry, table, scenario, run_dir)
    for sec in plugin["top"]:
        md += [f"## {sec.get('title', '')}", "", sec.get("markdown", ""), ""]
        body += [f"<h2>{_h(sec.get('title', ''))}</h2>", sec.get("html", "")]

    # 2. results
    body.append("<h2>Results</h2>")
    md += ["## Results", ""]
    panels = []
    for i, metric in enumerate(results):
        m = catalog.get(metric)
        fig = metric_figure(d, metric, m, lay, methods)
        badge = ("" if m is not UNKNOWN else '<span class="badge">no metadata</span>') + (
            '<span class="badge">not comparable across methods: one panel per method</span>'
            if not m.comparable and len(methods) > 1 else "")
        wide = " wide" if (lay.facet or (not m.comparable and len(methods) > 1) or lay.x == CONFIG) else ""
        if fig is not None:
            panels.append(f'<div class="panel{wide}"><h3>{_h(metric)}{badge}</h3>'
                          f'<p class="desc">{_h(m.description)}</p>{_fig_html(fig, f"fig-{i}")}</div>')
        pv = pivot(table, metric, swept, lay)
        md += [f"## {metric}", "", f"{m.axis_label(metric)}. {m.description}".strip(), ""]
        if not pv.empty:
            md += [pv.to_markdown(), ""]
        png = plot_metric(d, metric, m, lay, figdir / f"metric_{_safe(metric)}.png") if not d.empty else None
        if png:
            md += [f"![{metric}](figures/{png.name})", ""]
    body.append(f'<div class="grid">{"".join(panels)}</div>')
    for metric in results:  # the tables, folded
        pv = pivot(table, metric, swept, lay)
        if not pv.empty:
            body.append(f"<details><summary>{_h(metric)}: table (mean ± std over repeats)</summary>"
                        f'<div class="scroll">{pv.to_html(classes="pivot", border=0)}</div></details>')

    # 3. reconstructions and convergence
    prev = previews_html(d, run_dir) if not d.empty else None
    if prev:
        body += ["<h2>Reconstructions (repeat 0)</h2>", '<p class="note">Grey scale per image (0.5–99.5 percentile). '
                 "Volumes: central xy, xz and yz sections (the missing wedge shows in xz).</p>", prev]
        md += ["## Reconstructions", "", "See `report.html`.", ""]
    curves = history_curves(d, run_dir) if not d.empty else {}
    if curves:
        body.append("<h2>Convergence</h2>")
        for j, (hname, cs) in enumerate(sorted(curves.items())):
            body.append(f'<div class="panel wide"><h3>{_h(hname)}</h3>{_fig_html(history_figure(cs, hname), f"hist-{j}")}'
                        "</div>")

    # 4. diagnostics
    if diagnostics:
        body += ["<h2>Diagnostics</h2>", '<p class="note">Ground-truth statistics, solver residuals and flags: they '
                 "describe the run, not how good a method is, and take no part in the verdict.</p>"]
        md += ["## Diagnostics", ""]
        dpanels = []
        for k, metric in enumerate(diagnostics):
            m = catalog.get(metric)
            fig = metric_figure(d, metric, m, lay, methods)
            if fig is not None:
                fig.update_layout(height=min(fig.layout.height or 360, 360 if lay.x != CONFIG else 600))
                dwide = " wide" if (lay.x == CONFIG or lay.facet) else ""
                dpanels.append(f'<div class="panel{dwide}"><h3>{_h(metric)}</h3><p class="desc">{_h(m.description)}</p>'
                               f'{_fig_html(fig, f"diag-{k}")}</div>')
            pv = pivot(table, metric, swept, lay)
            if not pv.empty:
                md += [f"### {metric}", "", pv.to_markdown(), ""]
        body.append(f'<div class="grid diag">{"".join(dpanels)}</div>')

    # 4b. metrics over a point's repeats (aggregating quantifiers: aggregates.parquet)
    agg_html, agg_md = _aggregates_section(run_dir, swept, zipped, catalog, methods)
    body += agg_html
    md += agg_md

    # 5. cost, failures, plugin sections, scenario
    ct = cost_table(table)
    if not ct.empty:
        md += ["## Cost (median per method)", "", ct.to_markdown(), ""]
        body += ["<h2>Cost (median per method)</h2>", f'<div class="scroll">{ct.to_html(border=0)}</div>']
    if n_err:
        errs = table[table["status"] == "error"][["point_index", "repeat", "reconstructor", "error"]]
        md += ["## Failures", "", errs.to_markdown(index=False), ""]
        body += ["<h2>Failures</h2>", f'<div class="scroll">{errs.to_html(index=False, border=0)}</div>']
    for sec in plugin["end"]:
        md += [f"## {sec.get('title', '')}", "", sec.get("markdown", ""), ""]
        body += [f"<h2>{_h(sec.get('title', ''))}</h2>", sec.get("html", "")]
    if manifest.get("scenario_text"):
        md += ["## Scenario", "", "```yaml", manifest["scenario_text"].rstrip(), "```", ""]
        body += ["<h2>Scenario</h2>", f"<pre>{_h(manifest['scenario_text'])}</pre>"]

    page = ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='tembench-report-format' content='{REPORT_FORMAT}'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>tembench report — {_h(name)}</title><style>{CSS}</style>"
            f"<script type='text/javascript'>{_plotly_js()}</script></head><body>"
            + "\n".join(body) + "</body></html>")
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    atomic_write_text(md_path, "\n".join(md))
    atomic_write_bytes(html_path, page.encode())
    return md_path, html_path


#: where a plugin's report section goes (``placement`` key of a tembench_report_sections dict)
SECTION_PLACEMENTS = ("top", "end")


def _plugin_sections(registry, table, scenario, run_dir) -> dict[str, list[dict]]:
    """The sections of every plugin's ``tembench_report_sections`` hook, in hook order, split by their
    ``placement``: "top" (after the verdict, before the core's results) or "end" (the default: after the cost
    table, before the scenario)."""
    out: dict[str, list[dict]] = {k: [] for k in SECTION_PLACEMENTS}
    for sections in registry.hook().tembench_report_sections(table=table, scenario=scenario, run_dir=run_dir):
        for sec in sections or []:
            where = sec.get("placement", "end")
            if where not in out:
                raise TembenchError(f"report section {sec.get('title', '')!r}: placement must be one of "
                                    f"{SECTION_PLACEMENTS}, got {where!r}")
            out[where].append(sec)
    return out


def _aggregates_section(run_dir: Path, swept: list[str], zipped: list[str], catalog: MetricCatalog,
                        methods: list[str]) -> tuple[list[str], list[str]]:
    """Panels and tables of ``aggregates.parquet`` (one row per point × method × aggregating quantifier)."""
    path = run_dir / "aggregates.parquet"
    if not path.exists():
        return [], []
    try:
        agg = pd.read_parquet(path)
        if agg.empty or "point_index" not in agg:
            return [], []
        agg = agg.assign(repeat=0)
        if "artifacts" not in agg:
            agg["artifacts"] = None
        sw = [c for c in swept if c in agg]
        cols = [c for c in metric_columns(agg, sw) if c not in ("quantifier_version",)]
        lay = sweep_layout(agg, sw, zipped)
        d = prepared(agg, sw, lay)
        if d.empty or not cols:
            return [], []
        html_out = ["<h2>Over the repeats of each point</h2>", '<p class="note">Metrics that need every repeat of a '
                    "point (e.g. the spread of an estimate over noise realisations), from aggregates.parquet.</p>"]
        md_out = ["## Over the repeats of each point", ""]
        panels = []
        for k, metric in enumerate(cols):
            m = catalog.get(metric)
            fig = metric_figure(d, metric, m, lay, methods)
            if fig is not None:
                panels.append(f'<div class="panel{" wide" if lay.facet or lay.x == CONFIG else ""}"><h3>{_h(metric)}'
                              f'</h3><p class="desc">{_h(m.description)}</p>{_fig_html(fig, f"agg-{k}")}</div>')
            pv = pivot(agg, metric, sw, lay)
            if not pv.empty:
                md_out += [f"### {metric}", "", pv.to_markdown(), ""]
        html_out.append(f'<div class="grid">{"".join(panels)}</div>')
        return html_out, md_out
    except Exception as exc:  # noqa: BLE001 - the rest of the report still renders
        return [f"<h2>Over the repeats of each point</h2><p>aggregates.parquet could not be shown: {_h(exc)}</p>"], []


def _plotly_js() -> str:
    """plotly.js, embedded once per page (the same as ``include_plotlyjs=True``): the page opens offline."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def compare(run_a: str | Path, run_b: str | Path, pairs: dict[str, str] | None = None) -> pd.DataFrame:
    """Side-by-side mean of every shared metric per (swept values, method) for two runs.

    Rows are matched by reconstructor label. ``pairs`` maps a label of run A to a label of run B to match two
    different methods (e.g. ``{"ren2020": "e2e_ptycho_tomo"}`` for the same sample reconstructed two ways); the
    row is then labelled ``"<A label> | <B label>"``. When each run holds exactly one method and the labels
    differ, they are paired without being asked (``compare.paired`` on the returned frame says so)."""
    ta, tb = load_table(Path(run_a)), load_table(Path(run_b))
    la = list(dict.fromkeys(ta["reconstructor"].dropna())) if "reconstructor" in ta else []
    lb = list(dict.fromkeys(tb["reconstructor"].dropna())) if "reconstructor" in tb else []
    pairs = dict(pairs or {})
    if not pairs and len(la) == 1 and len(lb) == 1 and la != lb:
        pairs = {la[0]: lb[0]}
    for a_label, b_label in pairs.items():
        from tembench.errors import RunDirectoryError

        if a_label not in la:
            raise RunDirectoryError(f"--pair {a_label}={b_label}: run A has no reconstructor {a_label!r} (it has {la})")
        if b_label not in lb:
            raise RunDirectoryError(f"--pair {a_label}={b_label}: run B has no reconstructor {b_label!r} (it has {lb})")
    if pairs:
        joined = {a: f"{a} | {b}" for a, b in pairs.items()}
        ta = ta.assign(reconstructor=ta["reconstructor"].replace(joined))
        tb = tb.assign(reconstructor=tb["reconstructor"].replace({b: joined[a] for a, b in pairs.items()}))
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
    out = out[[c for m in metrics for c in [(m, "A"), (m, "B"), (m, "B−A")]]]
    out.attrs["paired"] = pairs
    return out
