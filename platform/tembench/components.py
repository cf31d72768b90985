"""Base classes of the five component kinds.

A component is a small class with a unique ``name``, a pydantic ``Params`` model that
validates and documents its parameters (units in the names, defaults, ranges) and one method:

=================  ===========================================================  ==============
kind               method                                                       declares
=================  ===========================================================  ==============
sample             ``build(params, rng) -> Sample``
forward_model      ``simulate(sample, params, xp) -> Measurement``              ``produces``
noise_model        ``apply(measurement, params, rng) -> Measurement``           ``accepts``, ``produces``
reconstructor      ``reconstruct(measurement, params, xp) -> Reconstruction``   ``accepts``, ``produces``
quantifier         ``score(reconstruction, measurement, sample, params)``       ``accepts``
=================  ===========================================================  ==============

``accepts`` lists measurement kinds (for quantifiers: reconstruction kinds ``image`` /
``volume``); ``"*"`` accepts anything. A noise model's ``produces`` of ``None`` means it
returns the kind it was given.

Two mechanisms reach beyond one (point, repeat, reconstructor) row:

* **Half sets** — the ``half_sets`` noise step (last in the chain) splits a measurement into two
  independent halves; the runner reconstructs each half with every reconstructor and a
  quantifier finds them in ``reconstruction.extras["half_sets"]`` (``[A, B]``). A
  ``split: positions`` half marks its patterns in ``measurement.extras["pattern_mask"]``; only
  reconstructors with ``supports_pattern_mask = True`` receive one.
* **Aggregates over repeats** — a quantifier with ``aggregates = True`` also gets
  :meth:`Quantifier.aggregate` called once all repeats of a (point, reconstructor) are finished,
  with the metrics its ``score`` returned for each repeat; the results go to the run's second
  table, ``aggregates.parquet`` (:func:`tembench.store.load_aggregates`).
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from tembench.types import Measurement, Reconstruction, Sample


class Params(BaseModel):
    """Base for component parameters: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class Component:
    kind: ClassVar[str] = ""
    method: ClassVar[str] = ""
    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    Params: ClassVar[type[BaseModel]] = Params
    #: importable modules the component needs beyond tembench's dependencies (an optional extra);
    #: without them it stays registered but is listed as unavailable and refused by validation
    requires: ClassVar[tuple[str, ...]] = ()
    #: how to install what ``requires`` names, e.g. 'pip install -e ".[nn]"'
    install_hint: ClassVar[str] = ""
    #: runs numba kernels from its first call (not only bitwise pairs that wait for numba to pay,
    #: :mod:`tembench._jit`): the preflight memory estimate then counts numba's own resident memory
    runs_numba_kernels: ClassVar[bool] = False

    @classmethod
    def missing_requirements(cls) -> list[str]:
        """The modules of ``requires`` that cannot be imported here (found without importing them)."""
        import importlib.util

        missing = []
        for mod in cls.requires:
            try:
                found = importlib.util.find_spec(mod) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                missing.append(mod)
        return missing

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when the component can run here, else one line: what is missing and how to install it."""
        missing = cls.missing_requirements()
        if not missing:
            return None
        hint = f"; install with: {cls.install_hint}" if cls.install_hint else ""
        return f"unavailable: needs {', '.join(missing)}{hint}"

    @classmethod
    def describe(cls) -> str:
        """First paragraph of the class docstring."""
        doc = inspect.getdoc(cls) or ""
        return doc.split("\n\n")[0].replace("\n", " ")

    @classmethod
    def parse_params(cls, params: dict[str, Any] | None) -> BaseModel:
        return cls.Params(**(params or {}))


class SampleModel(Component):
    kind = "sample"
    method = "build"

    def build(self, params: BaseModel, rng: np.random.Generator) -> Sample:  # pragma: no cover - abstract
        raise NotImplementedError


class ForwardModel(Component):
    kind = "forward_model"
    method = "simulate"
    produces: ClassVar[str] = ""

    def simulate(self, sample: Sample, params: BaseModel, xp) -> Measurement:  # pragma: no cover - abstract
        raise NotImplementedError


class NoiseModel(Component):
    kind = "noise_model"
    method = "apply"
    accepts: ClassVar[tuple[str, ...]] = ()
    produces: ClassVar[str | None] = None

    def apply(self, measurement: Measurement, params: BaseModel, rng: np.random.Generator) -> Measurement:  # pragma: no cover
        raise NotImplementedError


class Reconstructor(Component):
    kind = "reconstructor"
    method = "reconstruct"
    accepts: ClassVar[tuple[str, ...]] = ()
    produces: ClassVar[str] = "image"   # reconstruction kind: "image" or "volume"
    #: True if the reconstructor honours ``measurement.extras["pattern_mask"]`` (bool (scan_y, scan_x),
    #: False = pattern absent: ignore it), i.e. reconstructs from scattered probe positions. Only
    #: then does the runner give it the halves of a ``half_sets`` step with ``split: positions``.
    supports_pattern_mask: ClassVar[bool] = False

    def reconstruct(self, measurement: Measurement, params: BaseModel, xp) -> Reconstruction:  # pragma: no cover
        raise NotImplementedError


class Quantifier(Component):
    """Scores a reconstruction; optionally aggregates its scores over a point's repeats.

    ``score`` runs per (point, repeat, reconstructor). If the measurement was split by the
    ``half_sets`` step, ``reconstruction.extras["half_sets"]`` holds the reconstructions of the
    two independent halves ``[A, B]`` (absent otherwise).

    Set ``aggregates = True`` and implement :meth:`aggregate` for a metric over noise realisations
    (e.g. the precision of an estimate vs its Cramér–Rao bound).
    """

    kind = "quantifier"
    method = "score"
    accepts: ClassVar[tuple[str, ...]] = ("*",)
    metrics: ClassVar[dict] = {}  # column (or shell pattern) -> tembench.metrics.Metric: unit, direction, …
    #: True: the runner calls :meth:`aggregate` once every repeat of a (point, reconstructor) is done
    aggregates: ClassVar[bool] = False

    def score(self, reconstruction: Reconstruction, measurement: Measurement, sample: Sample,
              params: BaseModel) -> dict[str, Any]:  # pragma: no cover
        """Return a flat dict: scalars become table columns; arrays/lists are stored as artifacts."""
        raise NotImplementedError

    def aggregate(self, repeats: list[dict[str, Any]], sample: Sample, params: BaseModel) -> dict[str, Any]:
        """Metrics over the repeats of one (point, reconstructor); called only if ``aggregates`` is True.

        ``repeats`` holds, for every repeat that finished without error (ordered by repeat index),
        the dict this quantifier's :meth:`score` returned, read back from the run folder: scalars
        as JSON gives them back (float, int, bool, str, None; floats exact), arrays and lists as
        numpy arrays (exact; 0-d arrays as scalars). It runs in the runner's main process, also for
        repeats finished in an earlier (resumed) session, so fresh and resumed runs agree bit for
        bit. Return a flat dict like :meth:`score` (scalars → columns of ``aggregates.parquet``,
        arrays → artifacts). An exception is recorded in the aggregate row; the run goes on.
        """
        raise NotImplementedError(f"quantifier {self.name!r} sets aggregates = True but does not implement "
                                  "aggregate(repeats, sample, params)")


BASES: dict[str, type[Component]] = {
    "sample": SampleModel,
    "forward_model": ForwardModel,
    "noise_model": NoiseModel,
    "reconstructor": Reconstructor,
    "quantifier": Quantifier,
}


def accepts_kind(accepts: tuple[str, ...], kind: str) -> bool:
    return "*" in accepts or kind in accepts
