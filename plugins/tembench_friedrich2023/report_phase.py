"""Report sections of Friedrich 2023 phase-method runs (riCOM, AIRPI and the Table 5.1 comparison).

(a) The reconstructed phase images side by side: one row per swept point (dose), one column per method,
the ground-truth phase σ·V_proj first; (b) NCC and resolution vs dose, one line per method (the core's
static metric panels); (c) a Table 5.1-style summary: NCC and resolution per dose, time per frame,
frames per second and peak memory of each method.

Reads the run folder only, plus the sample rebuilt from the scenario for the truth. With
``save: {reconstructions: emd}`` in the scenario the images come from the EMD files, with their
sampling and origin: every image is drawn over its true field of view (Å) and the truth is computed at
the pixels of the first scan-grid method, as ``cross_correlation`` pairs them. Without EMD files the
runner's ``recon_preview`` images are shown in pixels, and the truth over the sample's cell.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from tembench.report import figure_uri, img_tag, plot_metric, prepared, pyplot, sweep_layout

#: reconstructors whose run gets these sections
PHASE_METHODS = ("ricom", "airpi")
#: reconstructors whose image is on the scan grid (one pixel per probe position = per frame)
SCAN_GRID = ("ssb", "dpc", "icom", "ricom", "virtual_detector")


def wants_phase_sections(table: pd.DataFrame) -> bool:
    return (table is not None and not table.empty and "reconstructor_name" in table
            and table["reconstructor_name"].isin(PHASE_METHODS).any())


def _x_key(swept: list[str]) -> str | None:
    dose = [k for k in swept if "dose" in k]
    return dose[0] if dose else (swept[0] if swept else None)


def _varying(table: pd.DataFrame, swept: list[str]) -> list[str]:
    """The swept keys that take more than one value in the table, in the scenario's order."""
    return [k for k in swept if k in table and table[k].astype(str).nunique() > 1]


def _point_keys(table: pd.DataFrame, swept: list[str]) -> list[str]:
    """The keys that name a point: the dose alone for a dose sweep (as before), every varying key of a grid of two
    or more (e.g. scan step × dose, the step study of Fig. 4.7)."""
    var = _varying(table, swept)
    if len(var) > 1:
        return var
    x = _x_key(swept)
    return [x] if x else []


def _point_label(r, keys: list[str], short: bool = False) -> str:
    if len(keys) == 1:
        return _fmt_x(r[keys[0]])
    return ", ".join(f"{_short_name(k) if short else _axis_name(k)} {_fmt_x(r[k])}" for k in keys)


def _short_name(key: str) -> str:
    k = key.split(".")[-1]
    return {"dose_e_per_A2": "dose", "scan_step_A": "step"}.get(k, k)


def _fmt_x(v) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not np.isfinite(f):
        return "∞"
    return f"{f:g}" if f < 1e4 else f"{f:.3g}".replace("e+0", "e").replace("e+", "e")


def _axis_name(xkey: str | None) -> str:
    if not xkey:
        return "point"
    k = xkey.split(".")[-1]
    return {"dose_e_per_A2": "dose (e/Å²)", "scan_step_A": "scan step (Å)"}.get(k, k)


def _fmt_num(v) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "–" if not np.isfinite(f) else (f"{f:,.0f}" if abs(f) >= 1000 else f"{f:.3g}")


def _ok_rows(table: pd.DataFrame) -> pd.DataFrame:
    t = table[table["status"] == "ok"] if "status" in table else table
    if "repeat" in t:
        t = t[t["repeat"] == t["repeat"].min()]
    return t


def method_order(table: pd.DataFrame, scenario=None) -> list[str]:
    """The reconstructors of the table in the scenario's order (the table's order without a scenario)."""
    present = list(dict.fromkeys(table["reconstructor"].astype(str)))
    try:
        keys = [r.key for r in scenario.spec.reconstructors]
    except AttributeError:
        keys = []
    return [k for k in keys if k in present] + [k for k in present if k not in keys]


def load_image(run_dir: Path, row) -> dict | None:
    """{data, sampling_A, origin_A or None} of a row: the EMD reconstruction, else the runner's preview."""
    emd = row.get("emd_file")
    if isinstance(emd, str) and emd and (Path(run_dir) / emd).exists():
        from tembench.emd import read_emd

        try:
            arr = read_emd(Path(run_dir) / emd).get("reconstruction")
        except (OSError, KeyError, ValueError):
            arr = None
        if arr is not None and np.ndim(arr["data"]) == 2:
            meta = arr["metadata"]
            return {"data": np.asarray(arr["data"], np.float64),
                    "sampling_A": tuple(float(s) for s in np.atleast_1d(meta["sampling_A"])),
                    "origin_A": tuple(float(o) for o in np.atleast_1d(meta.get("origin_A", (0.0, 0.0)))),
                    "quantity": str(meta.get("quantity", ""))}
    rel = row.get("artifacts")
    if isinstance(rel, str) and rel and (Path(run_dir) / rel).exists():
        with np.load(Path(run_dir) / rel, allow_pickle=False) as z:
            if "recon_preview" in z.files and z["recon_preview"].ndim == 2:
                return {"data": np.asarray(z["recon_preview"], np.float64), "sampling_A": None, "origin_A": None,
                        "quantity": ""}
    return None


def _extent(img: dict):
    """imshow extent (left, right, bottom, top) in Å of pixel centres origin + i·sampling."""
    if img.get("sampling_A") is None:
        return None
    (sy, sx), (y0, x0) = img["sampling_A"], img["origin_A"]
    ny, nx = img["data"].shape
    return (x0 - sx / 2, x0 + (nx - 0.5) * sx, y0 + (ny - 0.5) * sy, y0 - sy / 2)


def rebuild_sample(scenario):
    """The run's sample, rebuilt as the runner built it (same stage key and generator)."""
    from tembench.registry import get_registry
    from tembench.runner import rng_for, stage_keys

    spec = scenario.points[0].spec if getattr(scenario, "points", None) else scenario.spec
    registry = get_registry()
    keys = stage_keys(spec, registry, 0)
    s_cls = registry.get("sample", spec.sample.name)
    return s_cls().build(s_cls.parse_params(spec.sample.params), rng_for(keys.sample_seed, spec.seed))


def truth_image(scenario, ref: dict | None) -> dict | None:
    """Ground-truth phase σ·V_proj (rad) at the pixels of ``ref`` (an image with sampling and origin; NaN at pixels
    outside the sample's cell, which ``cross_correlation`` leaves out too), or over the sample's cell at 0.1 Å
    without one; None when the scenario gives no beam energy or no sample."""
    from tembench.builtin.quantifiers_fsc import truth_on_reconstruction_grid

    try:
        energy = float(scenario.spec.forward.params["energy_keV"])
        sample = rebuild_sample(scenario)
    except Exception:  # noqa: BLE001 - a report never fails on a missing truth
        return None
    if ref is not None and ref.get("sampling_A") is not None:
        # pixel indices as the data: the crop returned says which pixels lie over the sample's cell
        index = np.arange(ref["data"].size, dtype=np.float64).reshape(ref["data"].shape)
        grid = SimpleNamespace(kind="image", quantity="phase_rad", data=index,
                               sampling_A=ref["sampling_A"], origin_A=ref["origin_A"])
        kept, gt = truth_on_reconstruction_grid(grid, sample, energy)
        full = np.full(index.shape, np.nan)
        full.flat[kept.astype(np.int64).ravel()] = gt.ravel()
        return {"data": full, "sampling_A": ref["sampling_A"], "origin_A": ref["origin_A"]}
    from tembench.physics import constants

    s = 0.1
    gt = np.asarray(sample.projected_potential(s, gpts=None), np.float64) * constants.interaction_constant(energy)
    cell = sample.cell_A
    return {"data": gt, "sampling_A": (float(cell[1]) / gt.shape[0], float(cell[0]) / gt.shape[1]),
            "origin_A": (0.0, 0.0)}


def _grey(ax, img: dict, extent_lim=None):
    d = img["data"]
    finite = d[np.isfinite(d)]
    lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
    ax.imshow(np.ma.masked_invalid(d), cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1,
              extent=_extent(img), interpolation="nearest")
    if extent_lim is not None and _extent(img) is not None:
        ax.set_xlim(extent_lim[0], extent_lim[1])
        ax.set_ylim(extent_lim[2], extent_lim[3])
    ax.set_xticks([])
    ax.set_yticks([])


def grey_png_uri(fig, dpi: int, levels: int = 64) -> str:
    """The figure (grey images, black text on white) as a greyscale PNG of ``levels`` grey values, as a data URI (the
    figure is closed): about a third of the RGBA PNG's bytes for these noisy images (the committed examples stay small)."""
    return figure_uri(fig, dpi=dpi, colors=levels, grey=True)


def image_grid(table: pd.DataFrame, swept: list[str], scenario, run_dir: Path, max_rows: int = 8,
               dpi: int = 64):
    """(html, png bytes) of the phase images: rows = swept points, columns = truth + methods; or None."""
    t = _ok_rows(table)
    if t.empty or "reconstructor" not in t:
        return None
    methods = method_order(t, scenario)
    keys = _point_keys(t, swept)
    points = t.sort_values("point_index")["point_index"].drop_duplicates().tolist()[:max_rows]
    images = {}
    for _, r in t[t["point_index"].isin(points)].iterrows():
        img = load_image(run_dir, r)
        if img is not None:
            images[(r["point_index"], str(r["reconstructor"]))] = (img, r)
    if not images:
        return None
    scan = [k for k, (img, r) in images.items()
            if r.get("reconstructor_name") in SCAN_GRID and img["sampling_A"] is not None]
    ref = images[scan[0]][0] if scan else None
    gt = truth_image(scenario, ref) if scenario is not None else None
    lim = _extent(gt) if gt is not None and gt["sampling_A"] is not None and ref is not None else None
    cols = (["truth"] if gt is not None else []) + methods
    plt = pyplot()
    ny, nx = (ref or next(iter(images.values()))[0])["data"].shape
    w = 2.3
    h = float(np.clip(w * ny / max(nx, 1), 1.2, 3.2))  # tall scans: the NCC plot below stays on the first screen
    fs = 11
    fig, axs = plt.subplots(len(points), len(cols), figsize=(w * len(cols), (h + 0.5) * len(points)), squeeze=False)
    for i, p in enumerate(points):
        prow = t[t["point_index"] == p].iloc[0]
        for j, c in enumerate(cols):
            ax = axs[i][j]
            if c == "truth":
                _grey(ax, gt, lim)
                ax.set_title("truth σ·V_proj", fontsize=fs)
            elif (p, c) in images:
                img, r = images[(p, c)]
                _grey(ax, img, lim)
                ncc = r.get("ncc", np.nan)
                ax.set_title(f"{c}" + (f"  NCC {ncc:.2f}" if np.isfinite(ncc) else ""), fontsize=fs)
            else:
                ax.axis("off")
                ax.set_title(f"{c}: failed" if c in methods else "", fontsize=fs)
            if j == 0:
                label = ("\n".join(f"{_axis_name(k)} {_fmt_x(prow[k])}" for k in keys) if len(keys) > 1 else
                         f"{_axis_name(keys[0])}\n{_fmt_x(prow[keys[0]])}" if keys else str(p))
                ax.set_ylabel(label, fontsize=fs + 1)
    fig.tight_layout()
    uri = grey_png_uri(fig, dpi)  # 64 dpi: a 2.3-inch panel is 147 px, above the scans' 42–109 px
    where = ("each image over its own field of view in Å (same axes for all), the truth at the first scan-grid "
             "method's pixels" if lim is not None else "images in pixels (no EMD files: add "
             "<code>save: {reconstructions: emd}</code> to the scenario for the field of view and the truth at the "
             "reconstruction's pixels)")
    what = " × ".join(_axis_name(k) for k in keys) or "point"
    note = (f"<p>Reconstructed phase of every method (columns) at each {html.escape(what)} "
            f"(rows), repeat 0; grey scale per image (0.5–99.5 percentile); titles: NCC with σ·V_proj. {where}. "
            "The ADF image is intensity, not phase (read its NCC only).</p>")
    return note + img_tag(uri, "phase images side by side"), base64.b64decode(uri.split(",", 1)[1])


def _resolution_metric(table: pd.DataFrame) -> str | None:
    for c in ("fsc_gt_resolution_A", "resolution_A"):
        if c in table and pd.to_numeric(table[c], errors="coerce").notna().any():
            return c
    return None


def metric_plots(table: pd.DataFrame, swept: list[str], scenario, run_dir: Path) -> str | None:
    """NCC (and resolution) vs the swept dose, one line per method: the core's static metric panels."""
    from tembench.metrics import catalog_for, catalog_for_spec
    from tembench.registry import get_registry

    if "ncc" not in table:
        return None
    registry = get_registry()
    catalog = catalog_for_spec(scenario.spec, registry) if scenario is not None else catalog_for(registry)
    lay = sweep_layout(table, swept)
    d = prepared(table, swept, lay)
    if d.empty:
        return None
    figdir = Path(run_dir) / "figures"
    imgs = []
    for metric in [m for m in ("ncc", _resolution_metric(table)) if m]:
        png = plot_metric(d, metric, catalog.get(metric), lay, figdir / f"friedrich_{metric}_vs_sweep.png")
        if png is not None:
            uri = "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode()
            imgs.append(img_tag(uri, f"{metric} vs sweep"))
    if not imgs:
        return None
    return ("<p>NCC with the ground-truth phase and resolution vs the swept parameter, one line per method "
            "(the same data as the Results panels, as static figures).</p>"
            + "<div style='display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start'>"
            + "".join(f"<div style='flex:1 1 480px;min-width:0'>{i}</div>" for i in imgs) + "</div>")


def frames_per_scan(table: pd.DataFrame, run_dir: Path) -> int | None:
    """Probe positions of the scan: the pixel count of a scan-grid method's image (its EMD file, else its preview
    when the runner kept it whole, i.e. not above PREVIEW_MAX_PIXELS on a side)."""
    from tembench.runner import PREVIEW_MAX_PIXELS

    t = _ok_rows(table)
    for _, r in t[t["reconstructor_name"].isin(SCAN_GRID)].iterrows():
        img = load_image(run_dir, r)
        if img is not None and (img["sampling_A"] is not None or max(img["data"].shape) <= PREVIEW_MAX_PIXELS):
            return int(np.prod(img["data"].shape))
    return None


def methods_table(table: pd.DataFrame, swept: list[str], run_dir: Path, scenario=None) -> pd.DataFrame:
    """Table 5.1 of one run: per method NCC and resolution at each swept value, time per frame (median over the
    points), frames/s and peak memory of the reconstruction (max over the points)."""
    t = _ok_rows(table)
    keys = _point_keys(t, swept)
    if t.empty or "ncc" not in t:
        return pd.DataFrame()
    res = _resolution_metric(t)
    # a swept scan step changes the frames per scan from point to point: no single time per frame then
    n_frames = None if any(k.endswith("scan_step_A") for k in keys) else frames_per_scan(table, run_dir)
    rows = []
    for m in method_order(t, scenario):
        g = t[t["reconstructor"].astype(str) == m]
        g = g.sort_values(keys[::-1], key=lambda v: pd.to_numeric(v, errors="coerce")) if keys else g
        row = {"method": m}
        for _, r in g.iterrows():
            lab = _point_label(r, keys, short=True) if keys else str(r["point_index"])
            row[f"NCC {lab}"] = r["ncc"]
        if res:
            for _, r in g.iterrows():
                lab = _point_label(r, keys, short=True) if keys else str(r["point_index"])
                row[f"res {lab} (Å)"] = r[res]
        tr = pd.to_numeric(g.get("time_reconstruct_s"), errors="coerce").median()
        row["recon (s)"] = tr
        if n_frames:
            row["µs / frame"] = 1e6 * tr / n_frames
            row["frames/s"] = n_frames / tr if tr > 0 else np.nan
        if "peak_memory_reconstruct_MB" in g:
            row["peak mem (MB)"] = pd.to_numeric(g["peak_memory_reconstruct_MB"], errors="coerce").max()
        rows.append(row)
    return pd.DataFrame(rows)


def phase_sections(table: pd.DataFrame, swept: list[str], scenario, run_dir: Path) -> list[dict]:
    run_dir = Path(run_dir)
    out = []
    grid = image_grid(table, swept, scenario, run_dir)
    if grid:
        figdir = run_dir / "figures"
        figdir.mkdir(exist_ok=True)
        (figdir / "friedrich_phase_images.png").write_bytes(grid[1])
        out.append({"title": "Friedrich 2023: phase images side by side", "html": grid[0],
                    "markdown": "![phase images](figures/friedrich_phase_images.png)"})
    plots = metric_plots(table, swept, scenario, run_dir)
    if plots:
        names = [p.name for p in sorted((run_dir / "figures").glob("friedrich_*_vs_sweep.png"))]
        lay = sweep_layout(table, swept)
        xname = _axis_name(lay.x) if lay.x and lay.x in swept else "dose"
        out.append({"title": f"Friedrich 2023: NCC vs {xname.split(' (')[0]}", "html": plots,
                    "markdown": "\n\n".join(f"![{n}](figures/{n})" for n in names)})
    tab = methods_table(table, swept, run_dir, scenario)
    if not tab.empty:
        res = _resolution_metric(table)
        what = {"fsc_gt_resolution_A": "FRC with the truth (fsc_gt_resolution_A)",
                "resolution_A": "blind, from the power spectrum's noise floor (spectral_resolution)"}.get(res, "–")
        what = f"and resolution ({what}) " if res else ""
        note = (f"<p>Table 5.1 measured on one data set: NCC with σ·V_proj {what}at each swept value; "
                "reconstruction time (median over the points) per probe position (frame), its inverse, and the "
                "reconstruction's peak traced memory (max over the points). Times are wall times on the run's "
                "machine under its load: compare methods within one run only.</p>")
        fmt = {c: _fmt_num for c in tab.columns if c != "method"}
        out.append({"title": "Friedrich 2023: methods (Table 5.1)",
                    "html": note + tab.to_html(index=False, border=0, formatters=fmt),
                    "markdown": tab.to_markdown(index=False, floatfmt=".3g")})
    for sec in out:   # right after the verdict: the images beside the truth and NCC vs dose come first
        sec["placement"] = "top"
    return out
