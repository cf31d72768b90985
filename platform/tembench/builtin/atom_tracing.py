"""Atom-tracing quantifier (Ren 2020 §2.6, Table 1) for any volume reconstruction."""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from tembench import Params, Quantifier, hookimpl
from tembench._lazy import lazy_import
from tembench.errors import TembenchError
from tembench.metrics import Metric

# the tracer pulls in scipy.ndimage and scipy.optimize: load it when scoring
_tracing = lazy_import("tembench.analysis.atom_tracing")


class AtomTracing(Quantifier):
    """Atom tracing of a reconstructed volume scored against the sample's atoms: Ren 2020 Table 1.

    Traces atoms (DoG candidates, batched 3D Gaussian least squares with neighbour subtraction,
    re-detection, intensity/size removal and merging; ``tembench.analysis.atom_tracing``),
    classifies species with a K-component Gaussian mixture of the site intensities (K = number of
    elements in the sample; brighter → heavier), then matches traced sites one-to-one to the true
    atoms within ``match_radius_A`` (max pairs, then min squared distance) and reports, inside the
    region of interest: mean 3D position error (pm, eq 7) and per-axis RMS errors, % atoms found,
    % false positives (of the true atom count, as Ren's scoring code), % correct species among
    matched atoms, counts, and as artifacts the per-atom errors and the error/intensity histograms.

    Frames: voxel (iz, iy, ix) is at ``origin_A + i·sampling_A`` (z, y, x); sample positions are
    (x, y, z). ROI: ``"all"`` — true atoms inside the reconstructed box; a number — the box shrunk
    by that margin (Å) on every side, applied to true and traced positions; a label (e.g.
    ``"core"``) — true atoms with that ``Sample.labels`` value, and traced sites whose nearest
    true atom has it.
    """

    name = "atom_tracing"
    accepts = ("volume",)
    version = "2"  # 2: species split by our own EM (tembench.analysis.atom_tracing._mixture_1d), not scikit-learn's
    metrics = {
        "position_error_mean_pm": Metric("pm", "lower", (0.0, None), headline=True,
                                         description="mean 3D distance of matched traced atoms from the true ones "
                                                     "(Ren eq 7)"),
        "position_error_median_pm": Metric("pm", "lower", (0.0, None), description="median 3D position error"),
        "position_error_rms_pm": Metric("pm", "lower", (0.0, None), description="RMS 3D position error"),
        "rms_error_*_pm": Metric("pm", "lower", (0.0, None), description="RMS position error along one axis"),
        "pct_atoms_found": Metric("%", "higher", (0.0, 100.0), headline=True,
                                  description="true atoms matched by a traced atom within the match radius"),
        "pct_false_positives": Metric("%", "lower", (0.0, None), headline=True,
                                      description="traced atoms with no true atom, % of the true atom count"),
        "pct_correct_species": Metric("%", "higher", (0.0, 100.0), headline=True,
                                      description="matched atoms classified as the right element"),
        "trace_rounds": Metric("", None, (1.0, None), diagnostic=True, description="refinement rounds of the tracer"),
        "n_*": Metric("atoms", None, (0.0, None), diagnostic=True, description="counts of true / traced / matched atoms"),
    }

    class Params(Params):
        dog_sigmas_vox: tuple[float, float] = Field(
            (0.5, 1.0), description="difference-of-Gaussians widths σ1 < σ2 (voxels), Ren §2.6")
        intensity_threshold_frac: float = Field(
            0.1, ge=0, lt=1, description="remove sites with fitted peak below this fraction of the volume maximum")
        intensity_threshold: float | None = Field(
            None, description="absolute peak threshold (volume units, e.g. V); overrides the fraction")
        min_size_vox: float = Field(1.0, ge=0, description="remove sites with FWHM = 2.355σ below this (voxels)")
        merge_distance_vox: float = Field(2.25, gt=0, description="merge sites closer than this (voxels)")
        fit_radius_vox: float = Field(
            2.2, ge=1.0, le=5.0, description="Gaussian fit window radius around each site's voxel (voxels)")
        sigma_init_vox: float = Field(0.7, gt=0, description="starting Gaussian σ of new sites (voxels)")
        sigma_range_vox: tuple[float, float] = Field((0.25, 1.5), description="allowed fitted σ (voxels)")
        max_rounds: int = Field(12, ge=1, le=100, description="maximum refinement rounds")
        tol_sites: int = Field(2, ge=0, description="converged when fewer sites than this change in a round …")
        tol_rms_vox: float = Field(0.005, ge=0, description="… and the RMS position change is below this (voxels)")
        lm_iterations: int = Field(4, ge=1, le=50, description="Levenberg–Marquardt iterations per site per round")
        min_integrated_frac: float = Field(
            0.0, ge=0, lt=1, description="also remove sites with integrated intensity below this fraction of the "
                                         "median site's (0 = off: Ren's criteria only; ~0.25 rejects noise spikes)")
        background: Literal["zero", "median"] = Field(
            "zero", description="'median' subtracts the volume median first (volumes with an offset)")
        intensity_measure: Literal["integrated", "peak", "peak_sigma"] = Field(
            "integrated", description="site intensity for species: A·(2π)^1.5·σ³, A, or A·σ (Ren's code)")
        match_radius_A: float = Field(
            1.0, gt=0, description="max traced-to-true distance for a match (Å); Ren's scoring used 2 voxels = 1 Å")
        roi: str | float = Field(
            "all", description="'all', a Sample label (e.g. 'core') or an inward box margin in Å")
        hist_bins: int = Field(50, ge=5, le=1000, description="bins of the position-error histogram (0 … match radius)")

        @field_validator("dog_sigmas_vox", "sigma_range_vox")
        @classmethod
        def _increasing(cls, v):
            if not 0 < v[0] < v[1]:
                raise ValueError(f"need two widths 0 < first < second, got {v}")
            return v

        @field_validator("roi")
        @classmethod
        def _roi(cls, v):
            if isinstance(v, float) and v < 0:
                raise ValueError(f"a box margin must be ≥ 0 Å, got {v}")
            return v

    def score(self, reconstruction, measurement, sample, params):
        if reconstruction.kind != "volume":
            raise TembenchError(f"atom_tracing needs a volume reconstruction, got kind {reconstruction.kind!r}; "
                                "use a quantifier for images (e.g. cross_correlation) instead")
        if len(sample) == 0:
            raise TembenchError("atom_tracing: the sample has no atoms to score against")
        d = np.asarray(reconstruction.sampling_A, np.float64)
        origin = np.asarray(reconstruction.origin_A, np.float64)
        shape = np.asarray(np.shape(reconstruction.data))

        t0 = time.perf_counter()
        res = _tracing.trace_atoms(
            reconstruction.data, d, dog_sigmas_vox=params.dog_sigmas_vox,
            intensity_threshold_frac=params.intensity_threshold_frac, intensity_threshold=params.intensity_threshold,
            min_size_vox=params.min_size_vox, merge_distance_vox=params.merge_distance_vox,
            fit_radius_vox=params.fit_radius_vox, sigma_init_vox=params.sigma_init_vox,
            sigma_range_vox=params.sigma_range_vox, max_rounds=params.max_rounds, tol_sites=params.tol_sites,
            tol_rms_vox=params.tol_rms_vox, lm_iterations=params.lm_iterations, background=params.background,
            min_integrated_frac=params.min_integrated_frac)
        t_trace = time.perf_counter() - t0
        traced = res.positions_xyz_A(origin)

        # true atoms inside the reconstructed box (x, y, z)
        lo_zyx, hi_zyx = origin - 0.5 * d, origin + (shape - 0.5) * d
        lo, hi = lo_zyx[::-1], hi_zyx[::-1]
        true = sample.positions_A
        inside = np.all((true >= lo) & (true <= hi), axis=1)
        if not inside.any():
            raise TembenchError(
                f"atom_tracing: no sample atom lies inside the reconstructed box x∈[{lo[0]:.2f}, {hi[0]:.2f}], "
                f"y∈[{lo[1]:.2f}, {hi[1]:.2f}], z∈[{lo[2]:.2f}, {hi[2]:.2f}] Å; check Reconstruction.origin_A "
                "(z, y, x: position of voxel [0,0,0] in the sample frame) and sampling_A")
        t_idx = np.flatnonzero(inside)
        true_in, Z_in = true[t_idx], sample.numbers[t_idx]

        # species: K-component mixture on all traced sites, dimmest class → lightest element
        elements = np.array(sample.elements)
        k = len(elements)
        intensity = {"integrated": res.intensity, "peak": res.amplitude,
                     "peak_sigma": res.amplitude * res.sigma_A}[params.intensity_measure]
        species_Z = np.zeros(len(res), np.int64)
        thresholds = np.zeros(0)
        classified = len(res) > 0
        try:
            if len(res):
                labels, thresholds = _tracing.classify_species(intensity, k)
                species_Z = elements[labels]
        except TembenchError:
            classified = False           # too few sites for K classes: species score is undefined

        it, iq = _tracing.match_sites(true_in, traced, params.match_radius_A)

        # region of interest
        roi = params.roi
        if isinstance(roi, str) and roi == "all":
            roi_true = np.ones(len(true_in), bool)
            roi_traced = np.ones(len(traced), bool)
        elif isinstance(roi, (int, float)) and not isinstance(roi, bool):
            m = float(roi)
            roi_true = np.all((true_in >= lo + m) & (true_in <= hi - m), axis=1)
            roi_traced = np.all((traced >= lo + m) & (traced <= hi - m), axis=1)
        else:
            if sample.labels is None:
                raise TembenchError(f"atom_tracing: roi={roi!r} names a label but the sample has no labels; "
                                    "use roi='all' or a box margin in Å")
            lab = np.asarray(sample.labels).astype(str)[t_idx]
            if roi not in set(np.asarray(sample.labels).astype(str).tolist()):
                raise TembenchError(f"atom_tracing: roi label {roi!r} is not one of the sample's labels "
                                    f"{sorted(set(np.asarray(sample.labels).astype(str).tolist()))}")
            roi_true = lab == roi
            roi_traced = np.zeros(len(traced), bool)
            if len(traced):
                from scipy.spatial import cKDTree

                _, nn = cKDTree(true_in).query(traced)
                roi_traced = roi_true[nn]
        n_true = int(roi_true.sum())
        if n_true == 0:
            raise TembenchError(f"atom_tracing: the region of interest roi={roi!r} holds no true atoms inside "
                                "the reconstructed box; choose a smaller margin or another label")

        found = roi_true[it]
        it_f, iq_f = it[found], iq[found]
        matched_traced = np.zeros(len(traced), bool)
        matched_traced[iq] = True
        n_traced = int(roi_traced.sum())
        n_fp = int((roi_traced & ~matched_traced).sum())
        n_matched = len(it_f)

        disp_A = traced[iq_f] - true_in[it_f]                       # (x, y, z)
        err_pm = 100.0 * np.linalg.norm(disp_A, axis=1)
        rms_pm = 100.0 * np.sqrt(np.mean(disp_A ** 2, axis=0)) if n_matched else np.full(3, np.nan)
        correct = species_Z[iq_f] == Z_in[it_f]
        edges = np.linspace(0.0, 100.0 * params.match_radius_A, params.hist_bins + 1)
        i_edges = np.histogram_bin_edges(intensity, bins=64) if len(res) else np.zeros(2)

        nan = float("nan")
        return {
            "position_error_mean_pm": float(err_pm.mean()) if n_matched else nan,
            "position_error_median_pm": float(np.median(err_pm)) if n_matched else nan,
            "position_error_rms_pm": float(np.sqrt(np.mean(err_pm ** 2))) if n_matched else nan,
            "rms_error_x_pm": float(rms_pm[0]),
            "rms_error_y_pm": float(rms_pm[1]),
            "rms_error_z_pm": float(rms_pm[2]),
            "pct_atoms_found": 100.0 * n_matched / n_true,
            "pct_false_positives": 100.0 * n_fp / n_true,
            "pct_correct_species": (100.0 * float(correct.mean())) if (n_matched and classified) else nan,
            "n_true": n_true,
            "n_traced": n_traced,
            "n_matched": n_matched,
            "n_false_positives": n_fp,
            "n_missing": n_true - n_matched,
            "n_traced_volume": len(res),
            "n_species": k,
            "trace_rounds": res.n_rounds,
            "trace_converged": bool(res.converged),
            "trace_time_s": t_trace,
            # arrays → artifacts
            "position_error_pm": err_pm,
            "displacement_xyz_pm": 100.0 * disp_A,
            "position_error_hist": np.histogram(np.clip(err_pm, 0, edges[-1]), bins=edges)[0],
            "position_error_hist_edges_pm": edges,
            "site_intensity": intensity,
            "site_intensity_hist": np.histogram(intensity, bins=i_edges)[0] if len(res) else np.zeros(1, np.int64),
            "site_intensity_hist_edges": i_edges,
            "species_thresholds": np.asarray(thresholds, np.float64),
            "traced_positions_xyz_A": traced,
            "traced_Z": species_Z,
            "traced_in_roi": roi_traced,
            "matched_true_index": t_idx[it_f],
            "matched_traced_index": iq_f,
            "trace_history_n_sites": np.asarray(res.history["n_sites"]),
            "trace_history_rms_shift_vox": np.asarray(res.history["rms_shift_vox"]),
        }


@hookimpl
def tembench_register_quantifiers():
    return [AtomTracing]
