"""Fourier shell / ring correlation of a reconstruction: against ground truth, and between half sets."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from tembench import Params, Quantifier, hookimpl
from tembench.errors import TembenchError
from tembench.metrics import Metric
from tembench.builtin.quantifiers import _overlap, _periodic_at, _truth_sampling, ground_truth_like

HALF_SETS = "half_sets"  # reconstruction.extras key the runner fills with [A, B]
_HALF_CRITERIA = {"onebit": "onebit", "halfbit": "halfbit", "0.143": "0143", "0.5": "05"}


def _truth_volume_at(rec: np.ndarray, sample, sampling_A, origin_A, parametrization: str):
    """(reconstruction crop, ground-truth potential at exactly its voxels) for any voxel shape and origin.

    The truth is built on cubic voxels of the finest reconstruction step (``Sample.potential_volume``:
    voxel i at i·s), low-passed per axis to the reconstruction's Nyquist frequency (so a coarser axis
    does not alias) and evaluated at origin + i·sampling by cubic-spline interpolation.
    """
    from scipy.ndimage import map_coordinates

    s_gt = float(min(sampling_A))
    gt = np.asarray(sample.potential_volume(s_gt, parametrization=parametrization), np.float64)
    spec = np.fft.fftn(gt)
    for axis, (n, s_rec) in enumerate(zip(gt.shape, sampling_A)):
        f = np.abs(np.fft.fftfreq(n, d=s_gt))
        cut = f > 0.5 / s_rec + 1e-12
        if cut.any():
            shp = [1] * 3
            shp[axis] = n
            spec = spec * (~cut).reshape(shp)
    gt = np.fft.ifftn(spec).real
    sl, coords = [], []
    for n_rec, n_gt, s_rec, o in zip(rec.shape, gt.shape, sampling_A, origin_A):
        p = o + s_rec * np.arange(n_rec)
        inside = np.flatnonzero((p >= -0.5 * s_gt) & (p < (n_gt - 0.5) * s_gt))
        if not len(inside):
            raise TembenchError("fsc: reconstruction and ground-truth volume do not overlap")
        sl.append(slice(inside[0], inside[-1] + 1))
        coords.append(p[inside[0]:inside[-1] + 1] / s_gt)
    grid = np.meshgrid(*coords, indexing="ij")
    truth = map_coordinates(gt, grid, order=3, mode="grid-wrap")
    return rec[tuple(sl)], truth


def truth_on_reconstruction_grid(reconstruction, sample, energy_keV, parametrization: str = "lobato"):
    """(reconstruction data crop, ground truth at the same pixels) — the pairing ``cross_correlation`` uses.

    Images: the sample's projected potential (× σ for phase) placed at the reconstruction's pixels
    (cropped when on the truth's grid, else its periodic Fourier series evaluated there). Volumes:
    the potential in V, cropped at the rounded origin for cubic on-grid voxels, else resampled.
    """
    rec = np.asarray(reconstruction.data, np.float64)
    s_rec = tuple(reconstruction.sampling_A)
    if reconstruction.kind == "image":
        gt = np.asarray(ground_truth_like(reconstruction, sample, energy_keV, parametrization), np.float64)
        s_gt = _truth_sampling(sample, gt.shape)
        origin_px = [o / s for o, s in zip(reconstruction.origin_A, s_gt)]
        if np.allclose(s_rec, s_gt, rtol=1e-9, atol=0.0) and np.allclose(origin_px, np.round(origin_px), atol=1e-6):
            return _overlap(rec, gt, origin_px)
        return _periodic_at(rec, gt, s_gt, s_rec, reconstruction.origin_A)
    if reconstruction.quantity not in ("potential_V", "potential_au"):
        raise TembenchError(f"fsc: no ground truth for a volume of quantity {reconstruction.quantity!r}")
    origin_px = [o / s_rec[0] for o in reconstruction.origin_A]
    if np.allclose(s_rec, s_rec[0], rtol=1e-6, atol=0.0) and np.allclose(origin_px, np.round(origin_px), atol=1e-6):
        gt = np.asarray(ground_truth_like(reconstruction, sample, energy_keV, parametrization), np.float64)
        return _overlap(rec, gt, origin_px)
    return _truth_volume_at(rec, sample, s_rec, reconstruction.origin_A, parametrization)


def _check_half_sets(reconstruction, halves):
    if not isinstance(halves, (list, tuple)) or len(halves) != 2:
        raise TembenchError(f"fsc: reconstruction.extras['half_sets'] must hold two reconstructions [A, B], got "
                            f"{type(halves).__name__} of length {len(halves) if hasattr(halves, '__len__') else '?'}")
    a, b = halves
    for name, h in (("A", a), ("B", b)):
        if not hasattr(h, "data") or not hasattr(h, "sampling_A"):
            raise TembenchError(f"fsc: half set {name} is a {type(h).__name__}, not a Reconstruction")
        if h.kind != reconstruction.kind:
            raise TembenchError(f"fsc: half set {name} is a {h.kind!r} but the reconstruction is a "
                                f"{reconstruction.kind!r}")
    if np.shape(a.data) != np.shape(b.data):
        raise TembenchError(f"fsc: half sets have different shapes {np.shape(a.data)} (A) and {np.shape(b.data)} (B); "
                            "reconstruct both halves on the same grid")
    if not np.allclose(a.sampling_A, b.sampling_A, rtol=1e-6, atol=0.0):
        raise TembenchError(f"fsc: half sets have different samplings {a.sampling_A} (A) and {b.sampling_A} (B) Å")
    if not np.allclose(a.origin_A, b.origin_A, rtol=0.0, atol=1e-3 * min(a.sampling_A)):
        raise TembenchError(f"fsc: half sets have different origins {a.origin_A} (A) and {b.origin_A} (B) Å; "
                            "they must cover the same pixels")
    return a, b


def _crop(x: np.ndarray, border: int) -> np.ndarray:
    if not border:
        return x
    if any(n <= 2 * border for n in x.shape):
        raise TembenchError(f"fsc: border_px {border} leaves nothing of shape {x.shape}")
    return x[tuple(slice(border, -border) for _ in x.shape)]


class FourierShellCorrelation(Quantifier):
    """Fourier shell (volumes) / ring (images) correlation: vs ground truth and between half sets.

    Shells are in physical spatial frequency (1/Å, anisotropic sampling handled); see
    :mod:`tembench.analysis.fsc`. (a) Ground truth: the reconstruction against the sample's
    projected potential (images; × σ for phase) or potential (volumes) at the same pixels, as
    ``cross_correlation`` pairs them; resolution where the curve drops below ``gt_threshold``
    (default 0.5: for a noise-free reference this matches the half-set 0.143 criterion,
    Rosenthal & Henderson 2003) and where it drops below 0.143. (b) Half sets: when the runner
    put two independent half-data reconstructions in ``reconstruction.extras["half_sets"]``,
    their FSC with the one-bit and half-bit curves (van Heel & Schatz 2005) and the 0.143 and 0.5
    criteria. A resolution never crossed is reported at Nyquist (2 × coarsest pixel, Å) with its
    ``*_not_reached`` flag True; one below from the first shell at 1/k of that shell (the box).
    Resolution is the first crossing by default; crystals, whose spectra are empty between Bragg
    rings, want ``crossing: last`` and/or ``k_min_invA``. Curves are stored as artifacts.
    """

    name = "fsc"
    accepts = ("image", "volume")
    version = "1"
    metrics = {
        "fsc_gt_resolution_A": Metric("Å", "lower", (0.0, None), headline=True,
                                      description="resolution where the FSC/FRC vs ground truth drops below "
                                                  "gt_threshold (default 0.5); Nyquist when never crossed"),
        "fsc_gt_resolution_0143_A": Metric("Å", "lower", (0.0, None),
                                           description="resolution where the FSC/FRC vs ground truth drops below 0.143"),
        "fsc_half_resolution_A": Metric("Å", "lower", (0.0, None), headline=True,
                                        description="half-set FSC/FRC resolution at the scenario's criterion "
                                                    "(default ½-bit, van Heel & Schatz 2005)"),
        "fsc_half_resolution_*_A": Metric("Å", "lower", (0.0, None),
                                          description="half-set FSC/FRC resolution at the one-bit, half-bit, "
                                                      "0.143 or 0.5 criterion"),
        "fsc_*not_reached": Metric("", None, diagnostic=True,
                                   description="True when the curve never drops below the threshold (the "
                                               "resolution is then reported at Nyquist)"),
    }

    class Params(Params):
        ground_truth: bool = Field(True, description="compute the FSC against the sample's ground truth")
        gt_threshold: float = Field(0.5, gt=0, lt=1, description="fixed FSC threshold vs ground truth")
        criterion: Literal["halfbit", "onebit", "0.143", "0.5"] = Field(
            "halfbit", description="half-set criterion copied into fsc_half_resolution_A")
        mask_edge_A: float | None = Field(None, ge=0, description="Hann apodisation width at every box face (Å); "
                                                                   "0 or None = no mask")
        shell_width_invA: float | None = Field(None, gt=0, description="shell width Δk (1/Å); default the coarsest "
                                                                        "Fourier pixel")
        crossing: Literal["first", "last"] = Field(
            "first", description="resolution at the first drop below the threshold, or after the last shell above "
                                 "it (crystals: empty shells between Bragg rings)")
        k_min_invA: float = Field(0.0, ge=0, description="search crossings from this spatial frequency up (1/Å), "
                                                         "e.g. past CTF-suppressed low frequencies")
        border_px: int = Field(0, ge=0, description="pixels to ignore at every edge before the FFT")
        parametrization: str = "lobato"

    def score(self, reconstruction, measurement, sample, params):
        from tembench.analysis.fsc import fourier_shell_correlation

        kw = {"mask_edge_A": params.mask_edge_A or None, "shell_width_invA": params.shell_width_invA}
        rk = {"k_min_invA": params.k_min_invA, "crossing": params.crossing}
        out: dict = {}
        if params.ground_truth:
            energy = getattr(getattr(measurement, "geometry", None), "energy_keV", None)
            rec, gt = truth_on_reconstruction_grid(reconstruction, sample, energy, params.parametrization)
            rec, gt = _crop(rec, params.border_px), _crop(gt, params.border_px)
            c = fourier_shell_correlation(rec, gt, reconstruction.sampling_A, **kw)
            r, r143 = c.resolution(params.gt_threshold, **rk), c.resolution(0.143, **rk)
            out.update({"fsc_gt_resolution_A": r.resolution_A, "fsc_gt_not_reached": not r.reached,
                        "fsc_gt_resolution_0143_A": r143.resolution_A, "fsc_gt_0143_not_reached": not r143.reached,
                        "fsc_k_invA": c.k_invA, "fsc_gt_curve": c.fsc, "fsc_gt_n_voxels": c.n_voxels,
                        "fsc_gt_threshold": c.threshold(params.gt_threshold)})
        else:
            out.update({"fsc_gt_resolution_A": float("nan"), "fsc_gt_not_reached": None,
                        "fsc_gt_resolution_0143_A": float("nan"), "fsc_gt_0143_not_reached": None})
        halves = (reconstruction.extras or {}).get(HALF_SETS)
        if halves is not None:
            a, b = _check_half_sets(reconstruction, halves)
            c = fourier_shell_correlation(_crop(np.asarray(a.data, np.float64), params.border_px),
                                          _crop(np.asarray(b.data, np.float64), params.border_px), a.sampling_A, **kw)
            for crit, tag in _HALF_CRITERIA.items():
                r = c.resolution(crit, **rk)
                out[f"fsc_half_resolution_{tag}_A"] = r.resolution_A
                out[f"fsc_half_{tag}_not_reached"] = not r.reached
            tag = _HALF_CRITERIA[params.criterion]
            out["fsc_half_resolution_A"] = out[f"fsc_half_resolution_{tag}_A"]
            out["fsc_half_not_reached"] = out[f"fsc_half_{tag}_not_reached"]
            out.update({"fsc_half_k_invA": c.k_invA, "fsc_half_curve": c.fsc, "fsc_half_n_voxels": c.n_voxels,
                        "fsc_half_onebit": c.threshold("onebit"), "fsc_half_halfbit": c.threshold("halfbit")})
            if "fsc_k_invA" not in out:
                out["fsc_k_invA"] = c.k_invA
        else:
            for tag in ("", *(f"{t}_" for t in _HALF_CRITERIA.values())):
                out[f"fsc_half_resolution_{tag}A"] = float("nan")
                out[f"fsc_half_{tag}not_reached"] = None
        return out


# --- report --------------------------------------------------------------------------------
def _fsc_curves(table, run_dir, max_curves: int = 8):
    """[(label, key prefix, npz arrays)] of repeat-0 rows whose artifacts hold fsc curves."""
    from pathlib import Path

    if table is None or "artifacts" not in table:
        return []
    ok = table[table["artifacts"].notna()]
    if "status" in ok:
        ok = ok[ok["status"] == "ok"]
    if "repeat" in ok:
        ok = ok[ok["repeat"] == 0]
    found = []
    for _, row in ok.iterrows():
        path = Path(run_dir) / str(row["artifacts"])
        if not path.exists():
            continue
        with np.load(path) as npz:
            prefixes = sorted({k[: -len("fsc_k_invA")] for k in npz.files if k.endswith("fsc_k_invA")})
            for p in prefixes:
                arrays = {k[len(p):]: np.asarray(npz[k]) for k in npz.files if k.startswith(p) and "fsc_" in k}
                label = f"{row.get('reconstructor', '?')} p{row.get('point_index', '?')}"
                found.append((label, p.rstrip("."), arrays))
        if len(found) >= max_curves:
            break
    return found[:max_curves]


def plot_fsc_curves(curves, path) -> bool:
    """One panel per available curve type (vs ground truth, half sets); False when nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in ("gt", "half") if any(f"fsc_{p}_curve" in a for _, _, a in curves)]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 3.8), dpi=110, squeeze=False)
    for ax, p in zip(axes[0], panels):
        thr_drawn = False
        for i, (label, _, a) in enumerate(curves):
            if f"fsc_{p}_curve" not in a:
                continue
            k = a["fsc_half_k_invA"] if p == "half" and "fsc_half_k_invA" in a else a["fsc_k_invA"]
            line, = ax.plot(k, a[f"fsc_{p}_curve"], lw=1.3, label=label)
            if p == "half" and "fsc_half_halfbit" in a:
                ax.plot(k, a["fsc_half_halfbit"], ls="--", lw=0.8, color=line.get_color(),
                        label="½-bit" if not thr_drawn else None)
                ax.plot(k, a["fsc_half_onebit"], ls=":", lw=0.8, color=line.get_color(),
                        label="1-bit" if not thr_drawn else None)
                thr_drawn = True
            if p == "gt" and "fsc_gt_threshold" in a and not thr_drawn:
                ax.axhline(float(a["fsc_gt_threshold"][0]), ls="--", lw=0.8, color="0.4",
                           label=f"{float(a['fsc_gt_threshold'][0]):g}")
                thr_drawn = True
        ax.axhline(0.143, ls="-.", lw=0.8, color="0.6", label="0.143")
        ax.axhline(0.0, lw=0.5, color="0.8")
        ax.set_xlabel("spatial frequency k (1/Å)")
        ax.set_ylabel("FSC / FRC")
        ax.set_title("vs ground truth" if p == "gt" else "half set A vs B", fontsize=9)
        ax.set_ylim(-0.2, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.subplots_adjust(left=0.08 if len(panels) == 2 else 0.12, right=0.98, bottom=0.14, top=0.92, wspace=0.22)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def fsc_report_section(table, run_dir) -> list[dict[str, str]]:
    """The report section with FSC/FRC curves of repeat 0 (up to 8 rows), or [] when no row has them."""
    import base64
    import html
    from pathlib import Path

    curves = _fsc_curves(table, run_dir)
    if not curves:
        return []
    path = Path(run_dir) / "figures" / "fsc.png"
    if not plot_fsc_curves(curves, path):
        return []
    img = base64.b64encode(path.read_bytes()).decode()
    note = ("Fourier shell/ring correlation of repeat 0 (one line per reconstructor and point, up to 8). "
            "Half-set thresholds: dashed ½-bit, dotted 1-bit (van Heel & Schatz 2005); dash-dot 0.143.")
    return [{"title": "Fourier shell / ring correlation",
             "html": f"<p>{html.escape(note)}</p><img src=\"data:image/png;base64,{img}\" alt=\"fsc\">",
             "markdown": f"{note}\n\n![fsc](figures/{path.name})"}]


@hookimpl
def tembench_report_sections(table, scenario, run_dir):
    return fsc_report_section(table, run_dir)


@hookimpl
def tembench_register_quantifiers():
    return [FourierShellCorrelation]
