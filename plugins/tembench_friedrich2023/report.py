"""Report sections of Friedrich 2023 runs: precision vs the CRLB, count maps vs truth, raw vs restored; the
phase-method sections (riCOM, AIRPI, Table 5.1) are in :mod:`tembench_friedrich2023.report_phase`.

Reads only the run folder: ``aggregates.parquet`` (rows of the ``crlb`` quantifier) and the per-row
artifacts ``artifacts/<row>.npz`` (``column_fit.*`` fitted/true columns and counts, ``recon_preview``
the fitted column model, ``dislocation_field.*`` displacements).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tembench.report import figure_uri, img_tag, pyplot, swept_columns

RESTORE_KEY = "noise.cnn_restore.enabled"


_mpl = pyplot
_uri = figure_uri
_img = img_tag
_swept = swept_columns


def _short(k: str) -> str:
    return {"dose_e_per_A2": "dose", "thickness_cells": "cells", "enabled": "restored"}.get(k.split(".")[-1],
                                                                                            k.split(".")[-1])


def _label(row, keys) -> str:
    def fmt(v):
        return f"{v:.0e}" if isinstance(v, float) and v >= 1e3 else str(v)
    return ", ".join(f"{_short(k)}={fmt(row[k])}" for k in keys)


def _npz(run_dir: Path, rel) -> dict | None:
    if not isinstance(rel, str) or not rel:
        return None
    p = Path(run_dir) / rel
    if not p.exists():
        return None
    with np.load(p, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _load_aggregates(run_dir: Path) -> pd.DataFrame:
    try:
        from tembench.store import load_aggregates

        return load_aggregates(run_dir)
    except Exception:  # noqa: BLE001 — a report never fails on a missing table
        return pd.DataFrame()


def precision_section(agg: pd.DataFrame, swept: list[str]) -> tuple[str, str] | None:
    """Precision ratio (std / √CRLB) and std vs √CRLB vs thickness, one line per reconstructor × other sweeps."""
    if agg.empty or "quantifier_name" not in agg:
        return None
    a = agg[(agg["quantifier_name"] == "crlb") & (agg.get("status", "ok") == "ok")].copy()
    if a.empty or "precision_ratio_position" not in a:
        return None
    xkey = "sample.thickness_cells" if "sample.thickness_cells" in a else None
    others = [k for k in swept if k != xkey and k in a]
    a["_line"] = a.apply(lambda r: r["reconstructor"] + (", " + _label(r, others) if others else ""), axis=1)
    plt = _mpl()
    fig, axs = plt.subplots(1, 3, figsize=(16, 5.4))
    x = (lambda d: d[xkey]) if xkey else (lambda d: d["point_index"])
    cmap = plt.get_cmap("tab10")
    for i, (name, d) in enumerate(sorted(a.groupby("_line"), key=lambda t: t[0])):
        d = d.sort_values(xkey or "point_index")
        c = cmap(i % 10)
        for ax, k in ((axs[0], "position"), (axs[1], "scs")):
            y = d[f"precision_ratio_{k}_pooled"].to_numpy(float) if f"precision_ratio_{k}_pooled" in d else \
                d[f"precision_ratio_{k}"].to_numpy(float)
            lo = d.get(f"precision_ratio_{k}_ci_low", pd.Series(np.nan, d.index)).to_numpy(float)
            hi = d.get(f"precision_ratio_{k}_ci_high", pd.Series(np.nan, d.index)).to_numpy(float)
            yerr = np.vstack([np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)])
            ax.errorbar(x(d), y, yerr=np.nan_to_num(yerr), marker="o", capsize=3, color=c, label=name)
        axs[2].plot(x(d), d["std_position_median_pm"], "o", color=c, label=f"{name}: std")
        axs[2].plot(x(d), d["crlb_position_median_pm"], "-", color=c, alpha=0.6, label=f"{name}: √CRLB")
    for ax, t in ((axs[0], "position: std / √CRLB (pooled, 95 % χ² CI)"), (axs[1], "SCS: std / √CRLB (pooled)")):
        ax.axhline(1.0, color="k", lw=1)
        ax.axhspan(0.9, 1.1, color="0.85", zorder=0)
        ax.set_title(t, fontsize=10)
        ax.set_ylabel("precision ratio (1 = efficient)")
    axs[2].set_yscale("log")
    axs[2].set_title("position precision (markers) and √CRLB (lines)", fontsize=10)
    axs[2].set_ylabel("pm")
    for ax in axs:
        ax.set_xlabel("thickness (unit cells)" if xkey else "point")
    fig.tight_layout(rect=(0, 0.12 + 0.03 * (a["_line"].nunique() // 4), 1, 1))
    h, lab = axs[0].get_legend_handles_labels()
    fig.legend(h, lab, loc="lower center", ncol=4, fontsize=9, frameon=False)
    cols = ["reconstructor", *[k for k in swept if k in a], "n_repeats_scored", "n_columns_scored",
            "precision_ratio_position", "precision_ratio_position_pooled", "precision_ratio_position_ci_low",
            "precision_ratio_position_ci_high", "precision_ratio_scs", "precision_ratio_scs_pooled",
            "std_position_median_pm", "crlb_position_median_pm"]
    tab = a[[c for c in cols if c in a]].sort_values([c for c in cols[:1 + len(swept)] if c in a]).copy()
    for k in ("position", "scs"):
        pc = f"precision_ratio_{k}_pooled"
        if pc in tab and f"precision_ratio_{k}_ci_low" in tab:
            tab[pc] = [f"{v:.2f} [{lo:.2f}, {hi:.2f}]" for v, lo, hi in
                       zip(tab[pc], tab[f"precision_ratio_{k}_ci_low"], tab[f"precision_ratio_{k}_ci_high"])]
            tab = tab.drop(columns=[f"precision_ratio_{k}_ci_low", f"precision_ratio_{k}_ci_high"], errors="ignore")
    tab = tab.rename(columns={c: _short(c) if "." in c else c.replace("precision_ratio_", "ratio ")
                              .replace("_median_pm", " (pm)").replace("n_repeats_scored", "repeats")
                              .replace("n_columns_scored", "columns") for c in tab.columns})
    note = ("<p>Standard deviation of each column's fitted position / SCS over the noise repeats divided by the "
            "square root of its Cramér–Rao lower bound (Friedrich eqs 2.25–2.29), pooled over columns with a 95 % "
            "χ² interval; grey band: within 10 % of the bound. Right: the same in pm, measured (markers) "
            "and bound (lines).</p>")
    return (note + _img(_uri(fig), "precision vs CRLB") + tab.to_html(index=False, float_format=lambda v: f"{v:.3g}"),
            tab.to_markdown(index=False, floatfmt=".3g") if _has_tabulate() else tab.to_string(index=False))


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


def _first_rows(table: pd.DataFrame, key: str, max_rows: int) -> pd.DataFrame:
    t = table[(table.get("status", "ok") == "ok")]
    if "repeat" in t:
        t = t[t["repeat"] == t["repeat"].min()]
    t = t[t["artifacts"].apply(lambda v: isinstance(v, str) and bool(v))] if "artifacts" in t else t.iloc[:0]
    return t.head(max_rows)


def count_maps(table, swept, run_dir, max_rows: int = 4) -> str | None:
    """Columns coloured by atom count: truth, library, GMM (fitted positions), first repeat of each point."""
    rows = []
    for _, r in _first_rows(table, "column_fit.counts", 50).iterrows():
        z = _npz(run_dir, r["artifacts"])
        if z and "column_fit.counts" in z and len(z["column_fit.counts"]) and \
                (np.any(np.asarray(z["column_fit.counts"]) >= 0) or "column_fit.gmm_counts" in z):
            rows.append((r, z))
    if not rows:
        return None
    rows = rows[:max_rows]
    plt = _mpl()
    fig, axs = plt.subplots(len(rows), 3, figsize=(12, 3.9 * len(rows)), squeeze=False)
    for (r, z), ax in zip(rows, axs):
        n_true = z["column_fit.n_atoms_true"]
        lib = z["column_fit.counts"]
        gmm = z.get("column_fit.gmm_counts")
        if np.all(np.asarray(lib) < 0):
            lib, gmm = gmm, None
        allc = np.concatenate([np.ravel(v) for v in (n_true, lib, gmm) if v is not None]).astype(float)
        allc = allc[np.isfinite(allc) & (allc >= 0)]
        vmin, vmax = float(allc.min()) - 0.5, float(allc.max()) + 0.5
        cmap = plt.get_cmap("viridis", int(vmax - vmin))
        panels = [("truth", z["column_fit.true_x_A"], z["column_fit.true_y_A"], n_true),
                  ("library" if gmm is not None else "counts", z["column_fit.fit_x_A"],
                   z["column_fit.fit_y_A"], lib)]
        if gmm is not None:
            panels.append(("GMM/ICL", z["column_fit.fit_x_A"], z["column_fit.fit_y_A"], gmm))
        for a_, (name, xx, yy, cc) in zip(ax, panels):
            sc = a_.scatter(xx, yy, c=cc, cmap=cmap, vmin=vmin, vmax=vmax, s=38, edgecolors="k", linewidths=0.3)
            if name != "truth":
                wrong = np.asarray(cc) != np.asarray(n_true)
                a_.scatter(np.asarray(xx)[wrong], np.asarray(yy)[wrong], s=90, facecolors="none", edgecolors="r")
                a_.set_title(f"{name}: {100 * np.mean(~wrong):.0f} % exact ({_label(r, swept)})", fontsize=9)
            else:
                a_.set_title(f"true atoms per column ({_label(r, swept)})", fontsize=9)
            a_.set_aspect("equal")
            a_.invert_yaxis()
            a_.set_xlabel("x (Å)")
            cb = fig.colorbar(sc, ax=a_, fraction=0.046, label="atoms per column")
            cb.set_ticks(np.arange(vmin + 0.5, vmax))
        for a_ in ax[len(panels):]:
            a_.axis("off")
    fig.tight_layout()
    return ("<p>Atoms per column: truth at the true positions; counts at the fitted positions; red rings: counted "
            "wrong. First repeat of each point.</p>" + _img(_uri(fig), "count maps"))


def raw_vs_restored(table, swept, run_dir, max_pairs: int = 4) -> str | None:
    """Fitted column models (recon_preview) of raw and restored images of the same point, side by side."""
    if RESTORE_KEY not in table:
        return None
    t = _first_rows(table, "recon_preview", 200)
    others = [k for k in swept if k != RESTORE_KEY and k in t]
    keys = others + (["reconstructor"] if "reconstructor" in t else [])
    pairs = []
    for _, g in (t.groupby(keys, sort=True) if keys else [((), t)]):
        raw, res = g[g[RESTORE_KEY] == False], g[g[RESTORE_KEY] == True]  # noqa: E712
        if len(raw) and len(res):
            pairs.append((raw.iloc[0], res.iloc[0]))
    if not pairs:
        return None
    pairs = pairs[:max_pairs]
    plt = _mpl()
    fig, axs = plt.subplots(len(pairs), 2, figsize=(9, 4.2 * len(pairs)), squeeze=False)
    for (a, b), ax in zip(pairs, axs):
        for r, a_, name in ((a, ax[0], "raw"), (b, ax[1], "restored")):
            z = _npz(run_dir, r["artifacts"]) or {}
            img = z.get("recon_preview")
            if img is None:
                a_.axis("off")
                continue
            a_.imshow(img, cmap="gray")
            fx, fy = z.get("column_fit.fit_x_A"), z.get("column_fit.fit_y_A")
            extra = ""
            if "position_mae_A" in r and np.isfinite(r["position_mae_A"]):
                extra = f", MAE {r['position_mae_A'] * 100:.1f} pm"
            if "disp_error_mae_A" in r and np.isfinite(r.get("disp_error_mae_A", np.nan)):
                extra += f", |Δu| {r['disp_error_mae_A'] * 100:.1f} pm"
            a_.set_title(f"{name}" + (f": {_label(r, others)}" if others else "") + extra, fontsize=9)
            a_.axis("off")
            del fx, fy
    fig.tight_layout()
    return ("<p>Column model fitted to the raw (left) and CNN-restored (right) image of the same noise realisation "
            "(the run keeps the fitted model image as its preview, not the measurement itself).</p>"
            + _img(_uri(fig), "raw vs restored"))


def displacement_section(table, swept, run_dir) -> str | None:
    """Fitted vs true displacement vectors around the dislocation (first repeat per point)."""
    rows = []
    for _, r in _first_rows(table, "dislocation_field.u_fit_x_A", 50).iterrows():
        z = _npz(run_dir, r["artifacts"])
        if z and "dislocation_field.u_fit_x_A" in z:
            rows.append((r, z))
    if not rows:
        return None
    rows = rows[:4]
    plt = _mpl()
    fig, axs = plt.subplots(1, len(rows), figsize=(5.5 * len(rows), 5), squeeze=False)
    for (r, z), a_ in zip(rows, axs[0]):
        x0, y0 = z["dislocation_field.ref_x_A"], z["dislocation_field.ref_y_A"]
        s = 3.0
        du = np.hypot(z["dislocation_field.u_fit_x_A"] - z["dislocation_field.u_true_x_A"],
                      z["dislocation_field.u_fit_y_A"] - z["dislocation_field.u_true_y_A"])
        sc = a_.scatter(x0, y0, c=du * 100, cmap="magma_r", vmin=0, vmax=40, s=60, zorder=0)
        fig.colorbar(sc, ax=a_, fraction=0.046, label="|u_fit − u_true| (pm)")
        a_.quiver(x0, y0, z["dislocation_field.u_true_x_A"] * s, z["dislocation_field.u_true_y_A"] * s,
                  angles="xy", scale_units="xy", scale=1, color="k", width=0.004, label="true u (×3)")
        a_.quiver(x0, y0, z["dislocation_field.u_fit_x_A"] * s, z["dislocation_field.u_fit_y_A"] * s,
                  angles="xy", scale_units="xy", scale=1, color="r", width=0.003, alpha=0.8, label="fitted u (×3)")
        a_.set_aspect("equal")
        a_.invert_yaxis()
        a_.set_title(f"{_label(r, swept)}: |Δu| MAE {r.get('disp_error_mae_A', np.nan) * 100:.1f} pm", fontsize=9)
        a_.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return ("<p>Displacement of each column from its perfect-lattice site: the elastic field the sample was built "
            "with (black) and the fitted one (red), arrows × 3; dots coloured by the error |u_fit − u_true|.</p>" + _img(_uri(fig), "displacement field"))


def report_sections(table, scenario, run_dir) -> list[dict]:
    """Phase-method sections for runs with a ricom or airpi reconstructor (report_phase); the column-fit
    sections for runs with a column_fit reconstructor."""
    from tembench_friedrich2023.report_phase import phase_sections, wants_phase_sections

    if table is None or table.empty or "reconstructor_name" not in table:
        return []
    run_dir = Path(run_dir)
    swept = _swept(table, scenario)
    out = phase_sections(table, swept, scenario, run_dir) if wants_phase_sections(table) else []
    if not (table["reconstructor_name"] == "column_fit").any():
        return out
    prec = precision_section(_load_aggregates(run_dir), swept)
    if prec:
        out.append({"title": "Friedrich 2023: precision vs the Cramér–Rao bound", "html": prec[0], "markdown": prec[1]})
    cm = count_maps(table, swept, run_dir)
    if cm:
        out.append({"title": "Friedrich 2023: atom counts vs truth", "html": cm, "markdown": "Count maps: see report.html."})
    dsp = displacement_section(table, swept, run_dir)
    if dsp:
        out.append({"title": "Friedrich 2023: displacement field", "html": dsp,
                    "markdown": "Displacement field: see report.html."})
    rr = raw_vs_restored(table, swept, run_dir)
    if rr:
        out.append({"title": "Friedrich 2023: raw vs restored", "html": rr, "markdown": "Raw vs restored: see report.html."})
    return out
