"""Split a measurement into two independent half sets (for half-set FSC with any reconstructor).

The ``half_sets`` step goes last in a scenario's ``noise:`` chain. It keeps the full measurement
(the main reconstruction is still made from all of it) and records in ``extras["half_sets"]``
how to form halves A and B (see :func:`tembench.types.half_measurement`). The runner then
reconstructs each half with every reconstructor (each half cached as its own stage) and gives
quantifiers ``reconstruction.extras["half_sets"] = [reconstruction of A, reconstruction of B]``.

``split: dose`` — binomial thinning of counted data: A ~ Binomial(n, ½) per pixel, B = n − A.
For Poisson counts n ~ P(λ), A and B are independent Poisson variables of mean λ/2 each (exact),
so each half is the same acquisition at half the dose. Needs whole-number electron counts
(``poisson_dose`` earlier in the chain); works for every measurement kind, and for ``eer``
electron events (each event goes to A with probability ½). At an infinite dose
(``dose_e_per_A2: .inf``, the noise-free point of a dose sweep) both halves are the noise-free data.

``split: positions`` — You 2025's sub-sampling: the probe positions of a scan are split into two
disjoint sets by a checkerboard over the scan grid, so each half covers the field uniformly with
half the patterns (half the total dose, each pattern at its full dose). A half is the same grid
with ``extras["pattern_mask"]`` (bool, (scan_y, scan_x)) marking its patterns; only
reconstructors with ``supports_pattern_mask = True`` get it, others are refused before the run
(:func:`tembench.types.require_full_scan` refuses it inside a component).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from tembench import NoiseModel, Params, hookimpl
from tembench.errors import TembenchError
from tembench.types import HALF_SETS, Measurement, has_half_sets

#: elements per chunk of the binomial draw: bounds the int64 temporaries; fixed, so the draw is
#: the same on every machine
CHUNK_ELEMS = 1 << 22
SCAN_AXES = ("scan_y", "scan_x")


def _count_dtype(vmax: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32):
        if vmax <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def binomial_half(counts: np.ndarray, rng: np.random.Generator, chunk_elems: int = CHUNK_ELEMS) -> np.ndarray:
    """A ~ Binomial(counts, ½) per element, in the smallest unsigned dtype that holds max(counts).

    Reads ``counts`` (RAM or memory-mapped) chunk by chunk; the only full-size allocation is A.
    """
    data = np.asarray(counts)
    flat = data.reshape(-1)
    vmax = 0
    for start in range(0, flat.size, chunk_elems):
        c = flat[start:start + chunk_elems]
        if np.issubdtype(c.dtype, np.floating) and (not np.all(np.isfinite(c)) or np.any(c != np.rint(c))):
            raise TembenchError(
                "half_sets (split: dose): the data are not whole electron counts (e.g. a detector-noise step "
                "after `poisson_dose` made them continuous); binomial thinning needs counts. Use `split: "
                "positions` for 4D-STEM, or drop the continuous detector-noise step.")
        if c.size:
            if np.any(c < 0):
                raise TembenchError("half_sets (split: dose): negative counts; electron counts must be ≥ 0")
            vmax = max(vmax, int(c.max()))
    out = np.empty(data.shape, dtype=_count_dtype(vmax))
    out_flat = out.reshape(-1)
    for start in range(0, flat.size, chunk_elems):
        out_flat[start:start + chunk_elems] = rng.binomial(flat[start:start + chunk_elems].astype(np.int64), 0.5)
    return out


class HalfSets(NoiseModel):
    """Two independent half sets of the measurement (half-set FSC); goes last in the noise chain.

    ``split: dose`` thins counted data binomially (A ~ Bin(n, ½), B = n − A: two independent
    acquisitions at half the dose); ``split: positions`` splits a scan's probe positions by a
    checkerboard (You 2025's sub-sampling). The data passed on is the full measurement; the
    runner reconstructs each half too and hands quantifiers ``reconstruction.extras["half_sets"]``.
    """

    name = "half_sets"
    accepts = ("*",)
    version = "1"

    class Params(Params):
        split: Literal["dose", "positions"] = Field(
            "dose", description="dose: binomial thinning of counts (any counted data); positions: checkerboard "
                                "of the scan grid (4D-STEM; reconstructors must support scattered positions)")

    def apply(self, measurement: Measurement, params: Params, rng: np.random.Generator) -> Measurement:
        m = measurement
        if has_half_sets(m):
            raise TembenchError("half_sets: the measurement is already split into half sets; use one half_sets step")
        if params.split == "dose":
            spec, info = self._dose(m, rng)
        else:
            spec, info = self._positions(m)
        record = {"component": self.name, "split": params.split, **info}
        return m.replace(extras={**m.extras, HALF_SETS: spec}, provenance=[*m.provenance, record])

    @staticmethod
    def _dose(m: Measurement, rng: np.random.Generator):
        if not m.counted and _infinite_dose(m):
            # the noise-free limit of a dose sweep (`dose_e_per_A2: .inf`): both halves are the
            # noise-free data (half of infinity is infinity), so an FSC of them is 1
            return {"split": "dose", "noise_free": True}, {"noise_free": True}
        if not m.counted:
            raise TembenchError(
                f"half_sets (split: dose): measurement {m.kind!r} is not counted (intensities, not electrons). "
                "Put a dose/counting step (e.g. `poisson_dose` with a finite dose) before `half_sets` in the "
                "noise chain.")
        if m.data is None:
            events = m.extras.get("events")
            if events is None or not hasattr(events, "indices"):
                raise TembenchError(f"half_sets (split: dose): measurement {m.kind!r} has no data array and no "
                                    "electron events to split")
            n = events.n_events
            keep = np.empty(n, dtype=bool)
            for start in range(0, n, CHUNK_ELEMS):
                keep[start:start + CHUNK_ELEMS] = rng.random(min(CHUNK_ELEMS, n - start)) < 0.5
            return {"split": "dose", "events_a": keep}, {"n_events": n, "n_events_a": int(keep.sum())}
        a = binomial_half(m.data, rng)
        return {"split": "dose", "data_a": a}, {"dtype_a": str(a.dtype)}

    @staticmethod
    def _positions(m: Measurement):
        if not all(ax in m.axes for ax in SCAN_AXES):
            raise TembenchError(
                f"half_sets (split: positions) splits the probe positions of a scan, but measurement {m.kind!r} "
                f"has axes {m.axes} (no scan_y, scan_x). Use `split: dose` for images and tilt series.")
        if m.data is not None:
            shape = tuple(np.shape(m.data)[m.axes.index(ax)] for ax in SCAN_AXES)
        else:
            shape = tuple(m.extras["events"].scan_shape)
        if shape[0] * shape[1] < 2:
            raise TembenchError(f"half_sets (split: positions): a scan of {shape} positions cannot be split in two")
        yy, xx = np.indices(shape)
        mask_a = (yy + xx) % 2 == 0
        return {"split": "positions", "mask_a": mask_a}, {"n_patterns_a": int(mask_a.sum()),
                                                           "n_patterns_b": int((~mask_a).sum())}


def _infinite_dose(m: Measurement) -> bool:
    """True if a dose step ran with an infinite dose (the data stay noise-free intensities)."""
    n_e = m.geometry.extra.get("electrons_per_unit_intensity")
    dose = m.geometry.dose_e_per_A2
    return any(isinstance(v, (int, float)) and np.isinf(v) and v > 0 for v in (n_e, dose))


@hookimpl
def tembench_register_noise_models():
    return [HalfSets]
