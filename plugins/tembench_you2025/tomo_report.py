"""Report sections of You 2025 tomography runs (``joint_linear_tomo``, ``e2e_ptycho_tomo``): metrics vs the
sweep, depth (xz) sections beside the truth, recovered vs true alignment per tilt (the FSC curves are the
core's section).

Reads only the run folder: the results table and each row's ``artifacts/<row>.npz`` — ``depth_elongation.*``
(xz depth sections of the volume and the truth), ``alignment_error.*`` (recovered and true alignment per tilt)
and ``fsc.*`` (FSC curves).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tembench_you2025.report import _img, _label, _mpl, _npz, _swept, _uri, comparison
from tembench_you2025.tomo_scores import volume_shift_part

TOMO_METHODS = ("joint_linear_tomo", "e2e_ptycho_tomo")
TOMO_METRICS = ("fsc_gt_resolution_A", "fsc_half_resolution_A", "depth_elongation_rel",
                "depth_elongation_true_sites_rel", "depth_wedge_cc_axial", "depth_wedge_cc_lateral",
                "position_error_mean_pm", "pct_atoms_found", "pct_false_positives",
                "translation_error_median_A", "translation_error_max_A", "rotation_error_max_deg")


def _rows(table):
    ok = table[(table.get("status") == "ok") & (table.get("repeat", 0) == 0)]
    return ok.sort_values(["point_index", "reconstructor"]) if "point_index" in ok else ok


def _section_arrays(arrs: dict, name: str):
    k = next((a for a in arrs if a == name or a.endswith("." + name)), None)
    return None if k is None else arrs[k]


def depth_sections(table, swept, run_dir, max_points: int = 8) -> str | None:
    """One row per sweep point: the truth's xz section, then each method's, on one grey scale per row."""
    plt = _mpl()
    points: dict = {}
    for _, r in _rows(table).iterrows():
        arrs = _npz(run_dir, r.get("artifacts"))
        if not arrs:
            continue
        xz = _section_arrays(arrs, "depth_section_xz")
        gxz = _section_arrays(arrs, "depth_section_xz_truth")
        if xz is None or gxz is None:
            continue
        key = r.get("point_index", 0)
        d = points.setdefault(key, {"label": _label(r, swept), "truth": gxz, "methods": []})
        d["methods"].append((str(r["reconstructor"]), xz))
    if not points:
        return None
    blocks = []
    for key in sorted(points)[:max_points]:
        d = points[key]
        n = 1 + len(d["methods"])
        fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.8), squeeze=False)
        lo, hi = np.percentile(d["truth"], [0.5, 99.8])
        for ax, (title, img) in zip(axes[0], [("truth", d["truth"])] + d["methods"]):
            ax.imshow(img, cmap="gray", vmin=min(lo, 0.0), vmax=hi, origin="upper")
            ax.set_title(title, fontsize=8)
            ax.set_xlabel("x", fontsize=7)
            ax.set_ylabel("z (beam)", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(d["label"], fontsize=9, y=1.02)
        blocks.append(_img(_uri(fig), f"depth sections {d['label']}"))
    return ("<p>Depth sections (xz, normal to the tilt axis y, through the box centre, mean over ±1 Å in y): the "
            "missing wedge stretches atoms along z (the beam, vertical). Potential in V, one grey scale per row "
            "(the truth's).</p>" + "".join(blocks))


def alignment_figure(table, swept, run_dir, max_rows: int = 6) -> str | None:
    """Recovered vs true translation per tilt (the unmeasurable volume-shift part removed) per method and point."""
    plt = _mpl()
    items = []
    for _, r in _rows(table).iterrows():
        arrs = _npz(run_dir, r.get("artifacts"))
        if not arrs:
            continue
        t = _section_arrays(arrs, "translations_recovered_A")
        tt = _section_arrays(arrs, "translations_true_A")
        te = _section_arrays(arrs, "euler_true_deg")
        if t is None or tt is None or te is None:
            continue
        if any(lab == _label(r, swept) and np.array_equal(t, prev) for _, lab, prev, _, _ in items):
            continue  # e2e holds Alg. 2's alignment fixed: the same panel once per point
        items.append((str(r["reconstructor"]), _label(r, swept), t, tt, te))
    if not items:
        return None
    items = items[:max_rows]
    ncols = min(3, len(items))
    nrows = -(-len(items) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.ravel()[len(items):]:
        ax.axis("off")
    for ax, (meth, lab, t, tt, te) in zip(axes.ravel(), items):
        _, resid = volume_shift_part(t - tt, te)
        shown = tt + resid          # recovered minus the volume-shift part the data cannot fix
        x = te[:, 1]                # the tilt angle
        for a, name, col in ((0, "τ_y", "C0"), (1, "τ_x", "C1")):
            ax.plot(x, tt[:, a], color=col, lw=1, ls="--", label=f"{name} true")
            ax.plot(x, shown[:, a], color=col, marker="o", ms=3, lw=0, label=f"{name} recovered")
        err = np.linalg.norm(resid, axis=1)
        ax.set_title(f"{meth}: {lab}\nmedian |error| {np.median(err):.2f} Å, max {err.max():.2f} Å", fontsize=9)
        ax.set_xlabel("tilt (deg)")
        ax.set_ylabel("translation (Å)")
        ax.grid(alpha=0.3)
    axes[0][ncols - 1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.tight_layout()
    return ("<p>Global translation of each tilt, recovered (dots) vs simulated (dashed), after removing the part "
            "equivalent to a 3D shift of the whole volume (not measurable). The paper reports half the tilts "
            "within 0.4 Å and all within 0.8 Å.</p>" + _img(_uri(fig), "alignment"))


def tomo_report_sections(table, scenario, run_dir) -> list[dict]:
    """Sections for runs with a You 2025 tomography reconstructor."""
    if table is None or table.empty or "reconstructor_name" not in table:
        return []
    if not table["reconstructor_name"].isin(TOMO_METHODS).any():
        return []
    run_dir = Path(run_dir)
    swept = _swept(table, scenario)
    out = []
    cmp = comparison(table, swept, TOMO_METRICS, note=(
        "<p>Mean over repeats, one line per method: FSC resolution vs the truth and between half sets (Å; "
        "lower is better), depth elongation (median axial / lateral Gaussian width relative to the truth's; "
        "1 = no missing-wedge stretch) at the traced atoms (false-positive peaks included) and at the true atom "
        "sites of the registered volume (atoms whose fit fails left out), the Fourier correlation with the truth "
        "inside the ±30° wedge about the beam that no tilt range up to ±60° measures (axial) and outside it "
        "(lateral) — information recovered in the missing wedge raises the axial one — atom tracing and "
        "alignment errors.</p>"))
    if cmp:
        out.append({"title": "You 2025 tomography: methods vs sweep", "html": cmp[0], "markdown": cmp[1]})
    # (FSC curves: the core's "Fourier shell / ring correlation" section shows them)
    ds = depth_sections(table, swept, run_dir)
    if ds:
        out.append({"title": "You 2025 tomography: depth sections (xz)", "html": ds,
                    "markdown": "Depth sections: see report.html."})
    al = alignment_figure(table, swept, run_dir)
    if al:
        out.append({"title": "You 2025 tomography: alignment", "html": al, "markdown": "Alignment: see report.html."})
    return out
