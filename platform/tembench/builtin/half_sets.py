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
half the patterns (half the total dose, each pattern at its full dose). With ``n_subsets: n`` > 2
(You 2025 Fig. 3e: 1/12, 1/20) the positions fall into n interleaved subsets — the cosets of the
lattice a·iy + ix ≡ 0 (mod n), with a chosen to spread each subset most evenly — and halves A and B
are subsets 0 and 1, each with 1/n of the patterns (``mask_b`` in the spec; n = 2 is the checkerboard). A half is the same grid
with ``extras["pattern_mask"]`` (bool, (scan_y, scan_x)) marking its patterns; only
reconstructors with ``supports_pattern_mask = True`` get it, others are refused before the run
(:func:`tembench.types.require_full_scan` refuses it inside a component).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

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
        n_subsets: int = Field(2, ge=2, le=1000, description="split: positions only — interleaved subsets of the "
                               "scan; halves A and B are two of them, each 1/n_subsets of the patterns (You 2025 "
                               "sub-sampling: 2, 12, 20)")

        @model_validator(mode="after")
        def _subsets(self):
            if self.n_subsets != 2 and self.split != "positions":
                raise ValueError(f"n_subsets {self.n_subsets} applies to split: positions only (split: dose halves "
                                 "the counts)")
            if self.n_subsets > 2:
                # refuse at validation, before anything runs, when the core cannot form half B (see _positions)
                m = Measurement(kind="4dstem", data=None, axes=SCAN_AXES + ("k_y", "k_x"),
                                extras={"events": _ScanShape((4, 3 * self.n_subsets))})
                try:
                    HalfSets._positions(m, self.n_subsets)
                except TembenchError as e:
                    raise ValueError(str(e)) from None
            return self

    def apply(self, measurement: Measurement, params: Params, rng: np.random.Generator) -> Measurement:
        m = measurement
        if has_half_sets(m):
            raise TembenchError("half_sets: the measurement is already split into half sets; use one half_sets step")
        if params.split == "dose":
            spec, info = self._dose(m, rng)
        else:
            spec, info = self._positions(m, params.n_subsets)
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
    def _positions(m: Measurement, n_subsets: int = 2):
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
        if n_subsets == 2:
            yy, xx = np.indices(shape)
            mask_a = (yy + xx) % 2 == 0
            return {"split": "positions", "mask_a": mask_a}, {"n_patterns_a": int(mask_a.sum()),
                                                               "n_patterns_b": int((~mask_a).sum())}
        labels = subset_labels(shape, n_subsets)
        mask_a, mask_b = labels == 0, labels == 1
        if not mask_a.any() or not mask_b.any():
            raise TembenchError(f"half_sets (split: positions): a scan of {shape} positions leaves a subset of "
                                f"n_subsets {n_subsets} empty; use fewer subsets or a larger scan")
        spec = {"split": "positions", "mask_a": mask_a, "mask_b": mask_b, "n_subsets": n_subsets}
        _check_mask_b_supported(m, spec)
        return spec, {"n_subsets": n_subsets, "n_patterns_a": int(mask_a.sum()), "n_patterns_b": int(mask_b.sum())}


def _lattice_step(n: int) -> int:
    """The a in 1 … n−1 whose lattice {a·iy + ix ≡ 0 (mod n)} has the longest shortest vector (the most even
    spread of one subset over the scan); the smallest such a."""
    if n <= 2:
        return 1
    r = int(np.ceil(np.sqrt(2.0 * n))) + 1
    dy, dx = np.meshgrid(np.arange(0, r + 1), np.arange(-n, n + 1), indexing="ij")
    best, best_len = 1, -1.0
    for a in range(1, n):
        on = ((a * dy + dx) % n == 0) & ((dy > 0) | (dx > 0))
        length = float(np.min(dy[on] ** 2 + dx[on] ** 2))
        if length > best_len + 1e-9:
            best, best_len = a, length
    return best


def subset_labels(shape, n_subsets: int) -> np.ndarray:
    """(scan_y, scan_x) int labels 0 … n−1 of interleaved subsets: (a·iy + ix) mod n (n = 2: the checkerboard)."""
    yy, xx = np.indices(tuple(int(v) for v in shape))
    return (_lattice_step(int(n_subsets)) * yy + xx) % int(n_subsets)


def _check_mask_b_supported(m: Measurement, spec: dict) -> None:
    """Half B of more than two subsets is ``mask_b``, not the complement of A: refuse if the core's
    half_measurement does not read it yet (it would hand B (n−1)/n of the patterns)."""
    from tembench.types import half_measurement

    probe = m.replace(data=None, extras={**{k: v for k, v in m.extras.items() if k != HALF_SETS}, HALF_SETS: spec})
    got = np.asarray(half_measurement(probe, 1).extras.get("pattern_mask"))
    if got.shape != spec["mask_b"].shape or not np.array_equal(got, spec["mask_b"]):
        raise TembenchError("half_sets: n_subsets > 2 needs tembench.types.half_measurement to take half B from "
                            "extras['half_sets']['mask_b'] (it takes the complement of A); use n_subsets: 2")


class _ScanShape:
    def __init__(self, scan_shape):
        self.scan_shape = scan_shape


def _infinite_dose(m: Measurement) -> bool:
    """True if a dose step ran with an infinite dose (the data stay noise-free intensities)."""
    n_e = m.geometry.extra.get("electrons_per_unit_intensity")
    dose = m.geometry.dose_e_per_A2
    return any(isinstance(v, (int, float)) and np.isinf(v) and v > 0 for v in (n_e, dose))


@hookimpl
def tembench_register_noise_models():
    return [HalfSets]
