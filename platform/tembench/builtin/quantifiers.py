"""Generic quantifiers that compare a reconstruction with the sample's ground truth."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from tembench import Params, Quantifier, hookimpl
from tembench.errors import TembenchError
from tembench.metrics import Metric
from tembench.physics import constants


def normalized_cross_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Friedrich 2023 eq 4.14: Pearson correlation of two arrays of equal shape (1 = identical up to affine)."""
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    x = x - x.mean()
    y = y - y.mean()
    denom = np.sqrt((x * x).sum()) * np.sqrt((y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


def ground_truth_like(reconstruction, sample, energy_keV: float | None, parametrization: str = "lobato") -> np.ndarray:
    """The sample's ground truth in the reconstruction's quantity, over the sample's cell on the grid of
    round(cell / sampling) pixels (pixel i at i·cell/n); ``CrossCorrelation.score`` places it at the
    reconstruction's pixels."""
    q = reconstruction.quantity
    if reconstruction.kind == "image":
        ny, nx = reconstruction.data.shape
        gt = sample.projected_potential(reconstruction.sampling_A, gpts=None, parametrization=parametrization)
        if q == "phase_rad":
            if energy_keV is None:
                raise TembenchError("ground truth phase needs the beam energy (geometry.energy_keV)")
            gt = gt * constants.interaction_constant(energy_keV)
        elif q not in ("projected_potential_VA", "intensity"):
            # "intensity" (ADF/BF images) is compared with V_proj as a structural proxy: NCC is
            # affine-invariant and incoherent Z-contrast rises monotonically with projected potential
            raise TembenchError(f"no ground truth for an image of quantity {q!r}")
    else:
        s = reconstruction.sampling_A
        if not np.allclose(s, s[0], rtol=1e-6, atol=0.0):
            # the ground-truth volume is built on cubic voxels: another voxel shape would pair different points
            raise TembenchError(f"cross_correlation: the ground-truth volume needs cubic voxels, got sampling_A {s} "
                                "(z, y, x) Å; resample the reconstruction onto cubic voxels first")
        gt = sample.potential_volume(s[0], parametrization=parametrization)
        if q not in ("potential_V", "potential_au"):
            raise TembenchError(f"no ground truth for a volume of quantity {q!r}")
    return gt


def _truth_sampling(sample, shape) -> tuple[float, float]:
    """Pixel size (y, x) Å of a ground-truth image of ``shape`` over the sample's periodic cell."""
    return float(sample.cell_A[1]) / shape[0], float(sample.cell_A[0]) / shape[1]


def _periodic_at(rec: np.ndarray, gt: np.ndarray, gt_sampling, rec_sampling, rec_origin):
    """The reconstruction's pixels that lie over the truth's cell, and the truth at exactly their positions.

    The truth is a band-limited periodic image on pixels i·s_gt over the cell (``projected_potential``);
    its Fourier series is evaluated at origin + i·s_rec, so a scan step that does not divide the cell
    or an origin between pixels is not rounded onto the nearest truth pixel (up to ½ pixel off).
    """
    sl, pts = [], []
    for n_a, n_b, s_b, s_a, o in zip(rec.shape, gt.shape, gt_sampling, rec_sampling, rec_origin):
        p = o + s_a * np.arange(n_a)
        inside = np.flatnonzero((p >= -0.5 * s_b) & (p < (n_b - 0.5) * s_b))
        if not len(inside):
            raise TembenchError("reconstruction and ground truth do not overlap")
        sl.append(slice(inside[0], inside[-1] + 1))
        pts.append(p[inside[0]:inside[-1] + 1])
    spec = np.fft.fft2(gt) / gt.size
    ky = np.fft.fftfreq(gt.shape[0], d=gt_sampling[0])
    kx = np.fft.fftfreq(gt.shape[1], d=gt_sampling[1])
    ey = np.exp(2j * np.pi * np.outer(pts[0], ky))
    ex = np.exp(2j * np.pi * np.outer(kx, pts[1]))
    return rec[tuple(sl)], (ey @ spec @ ex).real


def _overlap(a: np.ndarray, b: np.ndarray, origin_px) -> tuple[np.ndarray, np.ndarray]:
    """Crop the ground truth ``b`` at the reconstruction's origin to their common shape."""
    sl_a, sl_b = [], []
    for n_a, n_b, o in zip(a.shape, b.shape, origin_px):
        o = int(round(o))
        start_b = max(o, 0)
        start_a = start_b - o
        n = min(n_a - start_a, n_b - start_b)
        if n <= 0:
            raise TembenchError("reconstruction and ground truth do not overlap")
        sl_a.append(slice(start_a, start_a + n))
        sl_b.append(slice(start_b, start_b + n))
    return a[tuple(sl_a)], b[tuple(sl_b)]


class CrossCorrelation(Quantifier):
    """Normalised cross-correlation (Friedrich eq 4.14) and RMSE of a reconstruction vs the ground-truth potential/phase.

    The ground truth is the sample's projected potential in V·Å (images; times σ for phase images,
    in rad) or its potential in V (volumes), optionally low-pass filtered to the information limit
    (a Gaussian of FWHM ``lowpass_A``), compared where the reconstruction overlaps the sample's cell:
    pixel i of the reconstruction is at ``origin_A + i·sampling_A``. Images are compared at exactly
    those points (the periodic truth's Fourier series is evaluated there when the step does not
    divide the cell or the origin falls between pixels); volumes need cubic voxels and their origin
    is rounded to the nearest voxel. RMSE is computed after removing the mean (a constant phase is
    not measurable) and after a least-squares scale fit (``rmse_scaled``) as well.
    """

    name = "cross_correlation"
    accepts = ("image", "volume")
    version = "3"  # 3: volume truth without the (−1)^iz artefact of an even padded z length
    metrics = {
        "ncc": Metric("", "higher", (-1.0, 1.0), headline=True,
                      description="Pearson correlation with the ground truth (1 = identical up to an affine map)"),
        "rmse_scaled": Metric("rad | V·Å | V", "lower", (0.0, None), comparable=False,
                              description="RMSE after removing the mean and a least-squares scale fit, in the ground "
                                          "truth's units: rad for phase images, V·Å for potential and intensity "
                                          "images, V for volumes — so comparable only between methods returning the "
                                          "same quantity (e.g. two phase methods); relative to gt_std it equals "
                                          "sqrt(1 − ncc²)"),
        "rmse": Metric("reconstruction's units", "lower", (0.0, None), comparable=False,
                       description="RMSE after removing the mean, in the reconstruction's own units: comparable "
                                   "only between methods that return the same quantity on the same scale (a "
                                   "virtual detector's electron fractions are not a phase)"),
        "gt_std": Metric("rad | V·Å | V", None, (0.0, None), diagnostic=True,
                         description="standard deviation of the ground truth over the compared region (a property "
                                     "of the sample, the same for every method)"),
    }

    class Params(Params):
        lowpass_A: float | None = Field(None, gt=0, description="low-pass the ground truth to this resolution (Å), Gaussian")
        border_px: int = Field(0, ge=0, description="pixels to ignore at every edge")
        parametrization: str = "lobato"

    def score(self, reconstruction, measurement, sample, params):
        rec = np.asarray(reconstruction.data, np.float64)
        gt = np.asarray(ground_truth_like(reconstruction, sample, measurement.geometry.energy_keV,
                                          params.parametrization), np.float64)
        s_rec = reconstruction.sampling_A
        s_gt = _truth_sampling(sample, gt.shape) if reconstruction.kind == "image" else s_rec
        if params.lowpass_A:
            from scipy.ndimage import gaussian_filter

            sigma_px = [params.lowpass_A / (2.355 * s) for s in s_gt]
            gt = gaussian_filter(gt, sigma_px, mode="wrap")
        origin_px = [o / s for o, s in zip(reconstruction.origin_A, s_gt)]
        on_grid = np.allclose(s_rec, s_gt, rtol=1e-9, atol=0.0) and np.allclose(origin_px, np.round(origin_px),
                                                                                 rtol=0.0, atol=1e-6)
        if on_grid or reconstruction.kind != "image":
            rec, gt = _overlap(rec, gt, origin_px)
        else:
            rec, gt = _periodic_at(rec, gt, s_gt, s_rec, reconstruction.origin_A)
        if params.border_px:
            b = params.border_px
            sl = tuple(slice(b, -b) for _ in rec.shape)
            rec, gt = rec[sl], gt[sl]
        r0, g0 = rec - rec.mean(), gt - gt.mean()
        scale = float((r0 * g0).sum() / max((r0 * r0).sum(), 1e-300))
        return {
            "ncc": normalized_cross_correlation(rec, gt),
            "rmse": float(np.sqrt(np.mean((r0 - g0) ** 2))),
            "rmse_scaled": float(np.sqrt(np.mean((scale * r0 - g0) ** 2))),
            "gt_std": float(g0.std()),
        }


class ImageStatistics(Quantifier):
    """Mean, standard deviation and contrast (std/mean) of a reconstruction, ignoring ground truth.

    For ADF images (``direct_image`` with ``normalize: false``) the mean is the fraction of the
    probe's electrons scattered onto the detector — the quantity atom counting is built on.
    """

    name = "image_statistics"
    accepts = ("image", "volume")
    version = "1"
    metrics = {
        "mean_value": Metric("reconstruction's units", comparable=False,
                             description="mean of the reconstruction (for ADF images: the scattered fraction)"),
        "std_value": Metric("reconstruction's units", comparable=False, description="standard deviation of the reconstruction"),
        "contrast": Metric("", comparable=False, description="std / mean"),
    }

    class Params(Params):
        border_px: int = Field(0, ge=0, description="pixels to ignore at every edge")

    def score(self, reconstruction, measurement, sample, params):
        d = np.asarray(reconstruction.data, np.float64)
        if params.border_px:
            b = params.border_px
            d = d[tuple(slice(b, -b) for _ in d.shape)]
        mean, std = float(d.mean()), float(d.std())
        return {"mean_value": mean, "std_value": std, "contrast": std / mean if mean else float("nan")}


@hookimpl
def tembench_register_quantifiers():
    return [CrossCorrelation, ImageStatistics]
