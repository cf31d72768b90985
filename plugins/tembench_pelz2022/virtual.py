"""Virtual STEM detectors (BF, ABF, ADF, HAADF) from dense 4D-STEM or electron events — the baseline."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from tembench import Params, Reconstruction, Reconstructor
from tembench.errors import TembenchError
from tembench_pelz2022.common import (ACCEPTS, CHUNK_BYTES, BadPixels, clean_row_chunks, dense_pass, load_4d,
                                      scan_origin, scan_step)
from tembench_pelz2022.eer_ops import annular_mask, detector_response

# inner, outer in units of the convergence semiangle α (HAADF outer: the detector edge)
PRESETS = {"bf": (0.0, 1.0), "abf": (0.5, 1.0), "adf": (1.0, 3.0), "haadf": (3.0, np.inf)}


def detector_angles(kind: str, semiangle_mrad: float, inner_mrad: float | None, outer_mrad: float | None,
                    max_mrad: float) -> tuple[float, float]:
    lo, hi = PRESETS[kind]
    inner = lo * semiangle_mrad if inner_mrad is None else inner_mrad
    outer = hi * semiangle_mrad if outer_mrad is None else outer_mrad
    outer = min(outer, max_mrad * 1.0001)
    if not inner < outer:
        raise TembenchError(f"virtual_detector {kind!r}: inner {inner:.1f} mrad ≥ outer {outer:.1f} mrad; the "
                            f"detector only reaches {max_mrad:.1f} mrad. Give inner_mrad/outer_mrad or a larger detector.")
    return float(inner), float(outer)


def detector_image(x, mask: np.ndarray, bad: BadPixels | None = None, max_bytes: int = CHUNK_BYTES) -> np.ndarray:
    """Σ_k I(k, R)·w(k) per probe position: events as they are (O(C)); dense data a bounded number of scan
    rows at a time (a memory-mapped data set is read with pread, not paged into RAM), bad pixels repaired."""
    if not isinstance(x, np.ndarray):
        return detector_response(x, mask)
    sy, sx = x.shape[:2]
    out = None
    for r0, r1, block in clean_row_chunks(x, bad, max_bytes):
        part = detector_response(block, mask)
        if out is None:
            out = np.empty((sy, sx), dtype=part.dtype)
        out[r0:r1] = part
    return out


def checked_detector_image(x, grid, mask: np.ndarray, semiangle_mrad: float | None, policy: str, method: str,
                           max_bytes: int = CHUNK_BYTES):
    """(image, bad-pixel result): dense data read once — finite check, bad-pixel statistics and the detector
    sums in one chunked pass, a second only when bad pixels are repaired. Events: as is (no check)."""
    if not isinstance(x, np.ndarray):
        return detector_response(x, mask), None
    sy, sx = x.shape[:2]
    out = {}

    def consume(r0, r1, block):
        part = detector_response(block, mask)
        if "image" not in out:
            out["image"] = np.empty((sy, sx), dtype=part.dtype)
        out["image"][r0:r1] = part

    bad = dense_pass(x, grid, semiangle_mrad, policy, method, consume, max_bytes)
    return out["image"], bad


class VirtualDetector(Reconstructor):
    """Virtual annular detector image: Σ counts with inner ≤ θ < outer (O(C) on electron events).

    Presets in units of the semiangle α: bf 0–α, abf α/2–α, adf α–3α, haadf 3α–detector edge;
    ``inner_mrad``/``outer_mrad`` override. The image is the fraction of the probe's electrons
    (mean counts per pattern for counted data). ``score_as_phase`` labels it ``phase_rad`` so that
    phase quantifiers can correlate its contrast with σV (its values are not radians; use the
    affine-invariant NCC, not the RMSE).
    """
    runs_numba_kernels = True  # numba kernels from the first call (preflight counts numba's memory)

    name = "virtual_detector"
    accepts = ACCEPTS
    produces = "image"
    version = "2"

    class Params(Params):
        detector: Literal["bf", "abf", "adf", "haadf"] = Field("adf", description="preset annulus")
        inner_mrad: float | None = Field(None, ge=0, description="inner angle (mrad), overrides the preset")
        outer_mrad: float | None = Field(None, gt=0, description="outer angle (mrad), overrides the preset")
        score_as_phase: bool = Field(False, description="label the image quantity phase_rad for NCC scoring against σV")
        bad_pixels: Literal["repair", "refuse", "ignore"] = Field("repair", description="hot / negative / dead detector pixels (found over the whole scan, thresholds in docs/pelz2022.md): repair = replace by the mean of good neighbours in every frame and report in extras; refuse = error naming pixel and frame; ignore = no check")

    def reconstruct(self, measurement, params, xp):
        x, grid = load_4d(measurement, self.name, check=False)  # the finite check is made in the detector pass
        g = measurement.geometry
        if g.semiangle_mrad is None and (params.inner_mrad is None or params.outer_mrad is None):
            raise TembenchError("virtual_detector: Geometry.semiangle_mrad is missing; give inner_mrad and outer_mrad")
        max_mrad = float(np.max(grid.radius_mrad()))
        inner, outer = detector_angles(params.detector, g.semiangle_mrad or 0.0, params.inner_mrad,
                                       params.outer_mrad, max_mrad)
        mask = annular_mask(grid, inner, outer)
        image, bad = checked_detector_image(x, grid, mask, g.semiangle_mrad, params.bad_pixels, self.name)
        image = image.astype(np.float32)
        return Reconstruction(kind="image", data=image, sampling_A=scan_step(g, self.name),
                              quantity="phase_rad" if params.score_as_phase else "intensity",
                              origin_A=scan_origin(g), extras={"inner_mrad": inner, "outer_mrad": outer,
                                                               **(bad.report() if bad is not None else {})})
