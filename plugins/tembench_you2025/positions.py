"""Quantifiers of the You 2025 plugin that read what ``msp`` leaves in its reconstruction's extras.

* ``msp_positions`` — probe-position error before and after refinement, against the *true* positions.
  The truth never reaches the reconstructor: ``stem4d`` (``position_jitter_A > 0``) records the nominal
  grid in ``geometry.scan_positions_A`` (what msp gets) and the true positions in a provenance record
  (:func:`tembench.builtin.forward_multislice.true_scan_positions_A`), which quantifiers read.
* ``msp_state`` — stores msp's slices (real part, over the scanned area) and probe-mode amplitudes with
  their power fractions as row artifacts (the runner keeps only the projected image as a preview), for
  the report's slice and probe panels.

Both return nothing for reconstructions without msp's extras (ssb, icom, …), so they can sit in any scenario.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from tembench import Params, Quantifier
from tembench.builtin.forward_multislice import true_scan_positions_A
from tembench.metrics import Metric
from tembench_you2025.msp import remove_global_part


def _rms(d: np.ndarray) -> float:
    return float(np.sqrt((d**2).sum(axis=1).mean()))


def position_errors(nominal, refined, true, frame: str = "affine") -> dict[str, float]:
    """rms |p − p_true| (Å, 2D) of the nominal (before) and refined (after) positions, raw and with the global
    part (``frame``) of p − p_true removed — a common shift / affine scan distortion moves the object with the
    positions and is not what position refinement can measure (msp removes it from its offsets)."""
    nominal, refined, true = (np.asarray(a, np.float64).reshape(-1, 2) for a in (nominal, refined, true))
    before, after = nominal - true, refined - true
    return {"position_error_before_A": _rms(remove_global_part(before, nominal, frame)),
            "position_error_after_A": _rms(remove_global_part(after, nominal, frame)),
            "position_error_before_raw_A": _rms(before), "position_error_after_raw_A": _rms(after)}


class MSPPositions(Quantifier):
    """Probe-position error of msp before/after refinement vs the true (jittered) positions (Å, rms over the
    patterns used; 2D distance)."""

    name = "msp_positions"
    version = "1"
    accepts = ("image",)
    metrics = {
        "position_error_before_A": Metric("Å", "lower", (0.0, None), description="rms distance nominal − true "
                                          "position, global part (frame) removed"),
        "position_error_after_A": Metric("Å", "lower", (0.0, None), headline=True,
                                         description="rms distance refined − true position, global part removed"),
        "position_error_before_raw_A": Metric("Å", "lower", (0.0, None), diagnostic=True,
                                              description="rms distance nominal − true, nothing removed"),
        "position_error_after_raw_A": Metric("Å", "lower", (0.0, None), diagnostic=True,
                                             description="rms distance refined − true, nothing removed"),
    }

    class Params(Params):
        frame: str = Field("affine", pattern="^(affine|shift|none)$",
                           description="global part of the position errors removed before the rms (as msp's "
                                       "position_frame)")

    def score(self, reconstruction, measurement, sample, params):
        ex = reconstruction.extras
        if "positions_A" not in ex or "positions_nominal_A" not in ex:
            return {}
        true = true_scan_positions_A(measurement)
        nominal = np.asarray(ex["positions_nominal_A"], np.float64).reshape(-1, 2)
        if true is None:
            true_used = nominal  # no jitter simulated: the nominal grid is the truth
        else:
            true_all = true[0]  # one tilt (4dstem)
            idx = ex.get("pattern_indices")
            true_used = true_all if idx is None else true_all[np.asarray(idx)]
        return position_errors(nominal, ex["positions_A"], true_used, params.frame)


class MSPState(Quantifier):
    """Stores msp's slices and probe modes as artifacts for the report (no scalar but the mode power fractions)."""

    name = "msp_state"
    version = "1"
    accepts = ("image",)
    metrics = {"probe_power_mode0": Metric("", None, (0.0, 1.0), description="power fraction of the strongest "
                                           "probe mode"),
               "n_slices": Metric("", None, description="slices of the reconstruction")}

    class Params(Params):
        max_pixels: int = Field(256, ge=16, le=4096, description="down-sample stored images to at most this size")

    def score(self, reconstruction, measurement, sample, params):
        ex = reconstruction.extras
        if "slices_VA" not in ex or "probe_modes" not in ex:
            return {}
        v = np.asarray(ex["slices_VA"])
        s = np.asarray(reconstruction.sampling_A, float)
        fo = np.asarray(ex.get("field_origin_A", (0.0, 0.0)), float)
        o = np.asarray(reconstruction.origin_A, float)
        ny, nx = np.shape(reconstruction.data)
        i0 = np.clip(np.round((o - fo) / s).astype(int), 0, None)
        slices = v.real[:, i0[0]:i0[0] + ny, i0[1]:i0[1] + nx].astype(np.float32)
        step = int(np.ceil(max(slices.shape[1:]) / params.max_pixels))
        if step > 1:
            slices = slices[:, ::step, ::step]
        probe = np.asarray(ex["probe_modes"])
        power = (np.abs(probe) ** 2).sum(axis=(-2, -1))
        frac = power / power.sum()
        return {"slices_re_VA": slices, "probe_amplitude": np.abs(probe).astype(np.float32),
                "probe_power_fraction": frac.astype(np.float64), "probe_power_mode0": float(frac[0]),
                "n_slices": int(v.shape[0]), "slice_thickness_A": float(ex.get("slice_thickness_A", np.nan))}
