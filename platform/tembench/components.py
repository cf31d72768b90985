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

    def reconstruct(self, measurement: Measurement, params: BaseModel, xp) -> Reconstruction:  # pragma: no cover
        raise NotImplementedError


class Quantifier(Component):
    kind = "quantifier"
    method = "score"
    accepts: ClassVar[tuple[str, ...]] = ("*",)
    metrics: ClassVar[dict] = {}  # column (or shell pattern) -> tembench.metrics.Metric: unit, direction, …

    def score(self, reconstruction: Reconstruction, measurement: Measurement, sample: Sample,
              params: BaseModel) -> dict[str, Any]:  # pragma: no cover
        """Return a flat dict: scalars become table columns; arrays/lists are stored as artifacts."""
        raise NotImplementedError


BASES: dict[str, type[Component]] = {
    "sample": SampleModel,
    "forward_model": ForwardModel,
    "noise_model": NoiseModel,
    "reconstructor": Reconstructor,
    "quantifier": Quantifier,
}


def accepts_kind(accepts: tuple[str, ...], kind: str) -> bool:
    return "*" in accepts or kind in accepts
