"""Report section of You 2025 runs: msp slices and probe modes, FRC curves, position errors, msp vs SSB/iCOM.

Reads only the run folder: the results table and each row's ``artifacts/<row>.npz`` — ``msp_state.*`` (slices,
probe-mode amplitudes and power fractions, stored by the ``msp_state`` quantifier, since the runner keeps only
the projected image), ``fsc.*`` (FRC curves of the ``fsc`` quantifier).
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from tembench.report import figure_uri, img_tag, pyplot, swept_columns

SWEEP_SKIP = ("point_", "repeat")


_mpl = pyplot
_uri = figure_uri
_img = img_tag
_swept = swept_columns


def _label(row, swept) -> str:
    parts = [f"{k.split('.')[-1]}={row[k]}" for k in swept]
    return ", ".join(parts) or "point " + str(row.get("point_index", ""))


def _npz(run_dir: Path, rel) -> dict | None:
    if not isinstance(rel, str) or not rel:
        return None
    p = Path(run_dir) / rel
    if not p.exists():
        return None
    with np.load(p, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _state_key(arrs: dict, name: str) -> str | None:
    return next((k for k in arrs if k.endswith("." + name)), None)


def slices_and_probes(table, swept, run_dir, max_rows: int = 12) -> str | None:
    """Each msp row (repeat 0): its slices (Re V, V·Å) and probe-mode amplitudes with power fractions."""
    plt = _mpl()
    blocks = []
    rows = table[(table.get("status") == "ok") & (table.get("repeat", 0) == 0)].sort_values("point_index")
    for _, r in rows.iterrows():
        arrs = _npz(run_dir, r.get("artifacts"))
        if not arrs:
            continue
        ks = _state_key(arrs, "slices_re_VA")
        kp = _state_key(arrs, "probe_amplitude")
        kf = _state_key(arrs, "probe_power_fraction")
        if ks is None or kp is None:
            continue
        sl, pa = arrs[ks], arrs[kp]
        frac = arrs[kf] if kf else np.full(len(pa), np.nan)
        n = sl.shape[0] + pa.shape[0]
        fig, axes = plt.subplots(1, n, figsize=(1.9 * n, 2.2), squeeze=False)
        lo, hi = np.percentile(sl, [0.5, 99.5])
        for i in range(sl.shape[0]):
            ax = axes[0][i]
            ax.imshow(sl[i], cmap="gray", vmin=lo, vmax=hi)
            ax.set_title(f"slice {i + 1}", fontsize=8)
            ax.axis("off")
        for j in range(pa.shape[0]):
            ax = axes[0][sl.shape[0] + j]
            h, w = pa[j].shape
            ax.imshow(pa[j][h // 4:h - h // 4, w // 4:w - w // 4], cmap="magma")  # central half of the window
            ax.set_title(f"probe {j + 1}: {100 * frac[j]:.1f} %", fontsize=8)
            ax.axis("off")
        fig.suptitle(f"{r['reconstructor']} — {_label(r, swept)}", fontsize=9, y=1.02)
        blocks.append(_img(_uri(fig), f"msp slices {r['reconstructor']}"))
        if len(blocks) >= max_rows:
            break
    if not blocks:
        return None
    return ("<p>Real part of each reconstructed slice (V·Å, common grey scale per row, over the scanned area) "
            "and the amplitude of each probe mode with its power fraction.</p>" + "".join(blocks))


def frc_figure(table, swept, run_dir) -> str | None:
    """FRC curves from the fsc quantifier: vs ground truth (solid) and half sets with the half-bit curve."""
    plt = _mpl()
    rows = table[(table.get("status") == "ok") & (table.get("repeat", 0) == 0)].sort_values("point_index")
    curves = []
    for _, r in rows.iterrows():
        arrs = _npz(run_dir, r.get("artifacts"))
        if not arrs:
            continue
        k = next((a for a in arrs if a.endswith(".fsc_k_invA")), None)
        if k is None:
            continue
        q = k[: -len(".fsc_k_invA")]
        curves.append((str(r["reconstructor"]), _label(r, swept), arrs, q))
    if not curves:
        return None
    methods = list(dict.fromkeys(c[0] for c in curves))
    fig, axes = plt.subplots(1, len(methods), figsize=(4.4 * len(methods), 3.2), squeeze=False, sharey=True)
    cmap = plt.get_cmap("viridis")
    labels = list(dict.fromkeys(c[1] for c in curves))
    for m, ax in zip(methods, axes[0]):
        for meth, lab, a, q in curves:
            if meth != m:
                continue
            col = cmap(0.9 * labels.index(lab) / max(len(labels) - 1, 1))
            if f"{q}.fsc_gt_curve" in a:
                ax.plot(a[f"{q}.fsc_k_invA"], a[f"{q}.fsc_gt_curve"], color=col, lw=1.5, label=f"{lab} vs truth")
            if f"{q}.fsc_half_curve" in a:
                ax.plot(a[f"{q}.fsc_half_k_invA"], a[f"{q}.fsc_half_curve"], color=col, lw=1, ls="--",
                        label=f"{lab} half sets")
                ax.plot(a[f"{q}.fsc_half_k_invA"], a[f"{q}.fsc_half_halfbit"], color="#999", lw=0.7, ls=":")
        ax.axhline(0.5, color="#c33", lw=0.6, ls=":")
        ax.set_title(m, fontsize=10)
        ax.set_xlabel("k (1/Å)")
        ax.grid(alpha=0.3)
        ax.set_ylim(-0.2, 1.05)
    axes[0][0].set_ylabel("FRC")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    return ("<p>Fourier ring correlation: solid vs the ground-truth projected potential/phase, dashed between "
            "reconstructions of two independent half sets, dotted the half-bit threshold; red dotted line 0.5.</p>"
            + _img(_uri(fig), "FRC curves"))


MSP_METRICS = ("ncc", "fsc_gt_resolution_A", "fsc_half_resolution_A", "position_error_before_A",
               "position_error_after_A")


def _tick(v) -> str:
    """A short tick label for a swept value: numbers as %g, a list of angles (e.g. tilt_angles_deg) as ±max (n)."""
    if isinstance(v, float):
        return f"{v:g}"
    text = str(v)
    try:
        nums = [float(t) for t in text.strip("[]() ").replace(",", " ").split()]
    except ValueError:
        return text
    if len(nums) > 2:
        return f"±{max(abs(a) for a in nums):g} ({len(nums)})"
    return text


def comparison(table, swept, candidates=MSP_METRICS, note: str | None = None,
               colors: int | None = None) -> tuple[str, str] | None:
    """Metric vs the first swept parameter, one line per method (by default NCC, FRC resolution, position
    error; ``candidates``: the columns to plot where present; ``colors``: palette-encode the figure, as
    :func:`tembench.report.figure_uri`)."""
    plt = _mpl()
    ok = table[table.get("status") == "ok"]
    # (rmse_scaled is left out: it is in each method's own units — V·Å for msp, rad for ssb/icom)
    metrics = [c for c in candidates if c in ok.columns and pd.to_numeric(ok[c], errors="coerce").notna().any()]
    if not metrics or not swept:
        return None
    x = swept[0]
    rest = swept[1:]
    groups = ok.groupby(rest, dropna=False) if rest else [((), ok)]
    ncols = min(4, len(metrics))
    nrows = -(-len(metrics) // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(3.9 * ncols, 3.0 * nrows), squeeze=False)
    for ax in grid.ravel()[len(metrics):]:
        ax.axis("off")
    axes = [list(grid.ravel()[:len(metrics)])]
    rows_md = []
    for gkey, g in groups:
        gl = "" if not rest else ", ".join(f"{k.split('.')[-1]}={v}" for k, v in zip(rest, np.atleast_1d(gkey)))
        for meth, d in g.groupby("reconstructor"):
            d = d.groupby(x, dropna=False)[metrics].mean(numeric_only=True).reset_index()
            xv = pd.to_numeric(d[x], errors="coerce").to_numpy(float)
            xv = np.where(np.isinf(xv), np.nan, xv)
            categorical = np.isnan(xv).any()  # e.g. an infinite dose: points at their rank, labelled
            for ax, m in zip(axes[0], metrics):
                ax.plot(np.arange(len(xv)) if categorical else xv, d[m], marker="o",
                        label=f"{meth}" + (f" ({gl})" if gl else ""))
                if categorical:
                    ax.set_xticks(np.arange(len(xv)), [_tick(v) for v in d[x]])
            for _, rr in d.iterrows():
                rows_md.append([gl, meth, rr[x]] + [rr[m] for m in metrics])
    for ax, m in zip(axes[0], metrics):
        ax.set_title(m, fontsize=9)
        ax.set_xlabel(x.split(".")[-1])
        vals = pd.to_numeric(ok[x], errors="coerce")
        if (vals > 0).all() and np.isfinite(vals).all() and vals.max() / vals.min() > 20:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    grid[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.tight_layout()
    head = ["group", "method", x.split(".")[-1]] + metrics
    md = "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n" + "\n".join(
        "| " + " | ".join(f"{v:.4g}" if isinstance(v, (float, np.floating)) else str(v) for v in r) + " |"
        for r in rows_md)
    tab = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{v:.4g}</td>" if isinstance(v, (float, np.floating)) else f"<td>{html.escape(str(v))}</td>"
                         for v in r) + "</tr>" for r in rows_md) + "</table>"
    note = note or ("<p>Mean over repeats, one line per method. NCC is taken on each method's own grid (msp: the "
                    "reconstruction pixel; ssb/icom: the scan step); FRC resolutions at Nyquist are bounds set by that "
                    "grid (flags <code>*_not_reached</code> in the table).</p>")
    return note + _img(_uri(fig, colors=colors), "metrics vs sweep") + tab, md


def report_sections(table, scenario, run_dir) -> list[dict]:
    """Sections only for runs with an msp reconstructor."""
    if table is None or table.empty or "reconstructor_name" not in table or not (table["reconstructor_name"] == "msp").any():
        return []
    run_dir = Path(run_dir)
    swept = _swept(table, scenario)
    out = []
    cmp = comparison(table, swept)
    if cmp:
        out.append({"title": "You 2025: methods vs sweep", "html": cmp[0], "markdown": cmp[1]})
    frc = frc_figure(table, swept, run_dir)
    if frc:
        out.append({"title": "You 2025: FRC curves", "html": frc, "markdown": "FRC curves: see report.html."})
    sp = slices_and_probes(table, swept, run_dir)
    if sp:
        out.append({"title": "You 2025: msp slices and probe modes", "html": sp,
                    "markdown": "msp slices and probe modes: see report.html."})
    return out
