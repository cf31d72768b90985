"""Seeded scoring-rule bugs (issue 18 part 3): apply each one to a scratch copy, watch its test fail.

    python tests/mutation/seeded_bugs.py            # all bugs, ~1–2 min on 2 cores
    python tests/mutation/seeded_bugs.py 3 7        # only bugs 3 and 7 (0-based)
    python tests/mutation/seeded_bugs.py --tests tests/builtin/test_atom_tracing.py 0 3 6
                                                    # run other tests against the bugs instead

Each bug is a one-line change of a scoring rule, as a reviewer would make it. The script copies
``platform/`` to a temporary folder, applies the bug there (the checkout is never touched), runs
the named tests with that copy first on ``PYTHONPATH``, and reports whether they FAIL (caught) or
pass (missed). Exit status 1 if any bug is missed. Not collected by pytest (not a ``test_*`` file).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
T = "tests/builtin/test_scoring_rules.py::"
Q, QS = "platform/tembench/builtin/quantifiers.py", "platform/tembench/builtin/quantifiers_spectral.py"
AT, AN = "platform/tembench/builtin/atom_tracing.py", "platform/tembench/analysis/atom_tracing.py"

# (what, file, old, new, tests that must fail)
BUGS = [
    # --- the three kinds of issue 18
    ("wider matching radius: default 1.0 → 1.5 Å", AT,
     'match_radius_A: float = Field(\n            1.0,', 'match_radius_A: float = Field(\n            1.5,',
     [T + "test_default_match_radius_is_1A", T + "test_end_to_end_radius_and_pm_with_the_real_tracer"]),
    ("wider matching radius: 1.1 × the parameter in the matching call", AT,
     "match_sites(true_in, traced, params.match_radius_A)", "match_sites(true_in, traced, 1.1 * params.match_radius_A)",
     [T + "test_match_radius_just_inside_and_just_outside"]),
    ("matching radius read as voxels (× voxel size)", AT,
     "match_sites(true_in, traced, params.match_radius_A)",
     "match_sites(true_in, traced, params.match_radius_A * float(np.prod(d)) ** (1 / 3) / 0.5)",
     [T + "test_match_radius_just_inside_and_just_outside"]),
    ("ground-truth phase in mrad", Q,
     "gt = gt * constants.interaction_constant(energy_keV)", "gt = gt * constants.interaction_constant(energy_keV) * 1e3",
     [T + "test_phase_ground_truth_is_sigma_times_vproj_in_rad", T + "test_real_single_atom_sample_phase_in_rad_and_position"]),
    ("ground-truth phase with σ per V·m (no Å conversion)", Q,
     "gt = gt * constants.interaction_constant(energy_keV)", "gt = gt * constants.interaction_constant(energy_keV) * 1e10",
     [T + "test_phase_ground_truth_is_sigma_times_vproj_in_rad"]),
    ("ground-truth phase at a fixed 300 keV", Q,
     "gt = gt * constants.interaction_constant(energy_keV)", "gt = gt * constants.interaction_constant(300.0)",
     [T + "test_phase_ground_truth_is_sigma_times_vproj_in_rad"]),
    ("flipped cropping origin", Q, "o = int(round(o))", "o = -int(round(o))",
     [T + "test_crop_at_the_reconstruction_origin", T + "test_real_single_atom_sample_phase_in_rad_and_position"]),
    ("cropping origin with (y, x) swapped", Q,
     "origin_px = [o / s for o, s in zip(reconstruction.origin_A, s_gt)]",
     "origin_px = [o / s for o, s in zip(reconstruction.origin_A[::-1], s_gt)]",
     [T + "test_crop_at_the_reconstruction_origin", T + "test_volume_crop_origin_zyx"]),
    ("crop applied to the reconstruction instead of the truth", Q,
     "    return a[tuple(sl_a)], b[tuple(sl_b)]", "    return a[tuple(sl_b)], b[tuple(sl_a)]",
     [T + "test_crop_with_reconstruction_extending_before_the_truth"]),
    ("truth rounded onto its nearest pixels (step not dividing the cell, origin between pixels)", Q,
     "        if on_grid or reconstruction.kind != \"image\":", "        if True:",
     [T + "test_truth_at_the_exact_reconstruction_pixel_positions", T + "test_subpixel_origin_real_sample"]),
    ("flipped origin where the truth is evaluated between its pixels", Q,
     "p = o + s_a * np.arange(n_a)", "p = -o + s_a * np.arange(n_a)",
     [T + "test_truth_at_the_exact_reconstruction_pixel_positions", T + "test_subpixel_origin_real_sample"]),
    ("(y, x) origin swapped where the truth is evaluated between its pixels", Q,
     "zip(rec.shape, gt.shape, gt_sampling, rec_sampling, rec_origin)",
     "zip(rec.shape, gt.shape, gt_sampling, rec_sampling, rec_origin[::-1])",
     [T + "test_truth_at_the_exact_reconstruction_pixel_positions", T + "test_subpixel_origin_real_sample"]),
    # --- cross_correlation
    ("eq 4.14 without the mean of one array", Q, "    x = x - x.mean()\n", "",
     [T + "test_ncc_rmse_of_sine_vs_scaled_shifted_sine"]),
    ("RMSE without removing the mean", Q, "np.sqrt(np.mean((r0 - g0) ** 2))", "np.sqrt(np.mean((rec - gt) ** 2))",
     [T + "test_ncc_rmse_of_sine_vs_scaled_shifted_sine"]),
    ("scale fit inverted", Q, "scale = float((r0 * g0).sum() / max((r0 * r0).sum(), 1e-300))",
     "scale = float((g0 * g0).sum() / max((r0 * g0).sum(), 1e-300))",
     [T + "test_ncc_rmse_of_sine_vs_scaled_shifted_sine"]),
    ("border dropped at the start only", Q, "sl = tuple(slice(b, -b) for _ in rec.shape)",
     "sl = tuple(slice(b, None) for _ in rec.shape)", [T + "test_border_px_drops_that_many_pixels_at_every_edge"]),
    ("low-pass width as σ instead of FWHM", Q, "params.lowpass_A / (2.355 * s)", "params.lowpass_A / s",
     [T + "test_lowpass_is_a_gaussian_of_that_fwhm"]),
    ("volume truth at the wrong (anisotropic) voxel size accepted", Q,
     "if not np.allclose(s, s[0], rtol=1e-6, atol=0.0):", "if False:",
     [T + "test_volume_with_anisotropic_voxels_is_refused"]),
    # --- image_statistics
    ("sample std (ddof 1)", Q, "mean, std = float(d.mean()), float(d.std())",
     "mean, std = float(d.mean()), float(d.std(ddof=1))", [T + "test_image_statistics_known_moments_and_border"]),
    ("statistics border on the first axis only", Q, "d = d[tuple(slice(b, -b) for _ in d.shape)]",
     "d = d[slice(b, -b)]", [T + "test_image_statistics_known_moments_and_border"]),
    # --- spectral_resolution
    ("resolution reported in 1/Å", QS, '"resolution_A": 1.0 / kc if', '"resolution_A": kc if',
     [T + "test_spectral_cutoff_at_a_known_frequency_in_A"]),
    ("pixel sizes swapped between axes", QS,
     "sy, sx = (float(sampling_A[0]), float(sampling_A[1]))", "sx, sy = (float(sampling_A[0]), float(sampling_A[1]))",
     [T + "test_spectral_cutoff_uses_each_axis_sampling"]),
    ("rings up to the larger Nyquist", QS, "k_nyq = min(0.5 / sy, 0.5 / sx)", "k_nyq = max(0.5 / sy, 0.5 / sx)",
     [T + "test_spectral_cutoff_uses_each_axis_sampling"]),
    ("no Hann window although asked", QS, "    if window:\n        a = a * np.hanning", "    if False:\n        a = a * np.hanning",
     [T + "test_spectral_window_floor_threshold_and_band"]),
    ("noise floor as the band's mean", QS, "floor = float(np.median(psd[in_floor]))", "floor = float(np.mean(psd[in_floor]))",
     [T + "test_spectral_window_floor_threshold_and_band"]),
    ("threshold ignored (signal = above the floor)", QS, "(s >= threshold * floor)", "(s >= floor)",
     [T + "test_spectral_window_floor_threshold_and_band"]),
    # --- atom_tracing
    ("position error in Å, not pm", AT, "err_pm = 100.0 * np.linalg.norm(disp_A, axis=1)",
     "err_pm = np.linalg.norm(disp_A, axis=1)", [T + "test_position_errors_in_pm_per_axis"]),
    ("per-axis RMS in (z, y, x) order", AT, '"rms_error_x_pm": float(rms_pm[0]),', '"rms_error_x_pm": float(rms_pm[2]),',
     [T + "test_position_errors_in_pm_per_axis"]),
    ("false positives as % of traced sites", AT, '"pct_false_positives": 100.0 * n_fp / n_true,',
     '"pct_false_positives": 100.0 * n_fp / max(n_traced, 1),',
     [T + "test_false_positives_are_a_percentage_of_the_true_atoms"]),
    ("false positives counted outside the ROI box", AT,
     "roi_traced = np.all((traced >= lo + m) & (traced <= hi - m), axis=1)", "roi_traced = np.ones(len(traced), bool)",
     [T + "test_false_positives_are_a_percentage_of_the_true_atoms"]),
    ("correct species as % of all true atoms", AT,
     '"pct_correct_species": (100.0 * float(correct.mean()))', '"pct_correct_species": (100.0 * float(correct.sum()) / n_true)',
     [T + "test_species_known_mix_with_one_wrong"]),
    ("species order reversed (brighter → lighter)", AT, "species_Z = elements[labels]",
     "species_Z = elements[::-1][labels]", [T + "test_species_known_mix_with_one_wrong"]),
    ("integrated intensity without (2π)^3/2", AN, "return self.amplitude * _TWO_PI_3_2 * self.sigma_A ** 3",
     "return self.amplitude * self.sigma_A ** 3", [T + "test_site_intensity_measures"]),
    ("reconstructed box without the half-voxel rim", AT,
     "lo_zyx, hi_zyx = origin - 0.5 * d, origin + (shape - 0.5) * d", "lo_zyx, hi_zyx = origin, origin + (shape - 1) * d",
     [T + "test_true_atoms_outside_the_reconstructed_box_are_not_counted"]),
    ("matching not one-to-one (every pair within the radius kept)", AN, "single = n_edges[comp] == 1",
     "single = n_edges[comp] >= 1", [T + "test_one_to_one_when_two_traced_sites_compete_for_one_atom"]),
    ("matching nearest-first instead of most pairs", AN, "            a, b = linear_sum_assignment(cost)\n",
     "            a, b = _greedy(cost)\n", [T + "test_one_to_one_when_two_traced_sites_compete_for_one_atom"]),
]

_GREEDY = '''

def _greedy(cost):
    """Nearest pair first (a plausible but wrong matching rule)."""
    cost = cost.copy()
    a, b = [], []
    while np.isfinite(cost).any() and cost.min() < 1e300:
        i, j = np.unravel_index(np.argmin(cost), cost.shape)
        a.append(i), b.append(j)
        cost[i, :] = cost[:, j] = np.inf
    return np.array(a, np.int64), np.array(b, np.int64)
'''


def main(which: list[int], override: list[str] | None = None) -> int:
    missed = 0
    with tempfile.TemporaryDirectory(prefix="tembench_bugs_") as tmp:
        shutil.copytree(ROOT / "platform", Path(tmp) / "platform",
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        env = dict(os.environ, PYTHONPATH=str(Path(tmp) / "platform"), PYTHONDONTWRITEBYTECODE="1")
        for i in which:
            what, rel, old, new, tests = BUGS[i]
            tests = override or tests
            path = Path(tmp) / rel
            src = path.read_text()
            if src.count(old) != 1:
                print(f"[{i:2d}] SKIP  {what}: the line to change is not found exactly once in {rel}")
                missed += 1
                continue
            bugged = src.replace(old, new)
            if "_greedy(" in new:
                bugged += _GREEDY
            path.write_text(bugged)
            try:
                r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *tests],
                                   cwd=ROOT, env=env, capture_output=True, text=True)
            finally:
                path.write_text(src)
            failed = sorted({ln.split()[1].split("::")[-1] for ln in r.stdout.splitlines() if ln.startswith("FAILED ")})
            caught = r.returncode == 1 and bool(failed)
            missed += not caught
            status = "caught" if caught else f"MISSED (pytest exit {r.returncode})"
            print(f"[{i:2d}] {status:8s} {what}  ←  fails: {', '.join(failed) or '-'}", flush=True)
    print(f"{len(which) - missed}/{len(which)} seeded bugs caught")
    return 1 if missed else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    override = None
    if "--tests" in args:
        k = args.index("--tests")
        override = [a for a in args[k + 1:] if not a.isdigit()]
        args = args[:k] + [a for a in args[k + 1:] if a.isdigit()]
    sys.exit(main([int(a) for a in args] or list(range(len(BUGS))), override))
