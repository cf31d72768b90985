"""tembench: simulation-and-benchmark platform for TEM phase-contrast and 3D reconstruction."""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("tembench")

from tembench.components import (  # noqa: E402
    ForwardModel,
    NoiseModel,
    Params,
    Quantifier,
    Reconstructor,
    SampleModel,
)
from tembench.errors import TembenchError  # noqa: E402
from tembench.types import Geometry, Measurement, Reconstruction, Sample  # noqa: E402

__all__ = [
    "__version__",
    "hookimpl",
    "Params",
    "SampleModel",
    "ForwardModel",
    "NoiseModel",
    "Reconstructor",
    "Quantifier",
    "Sample",
    "Geometry",
    "Measurement",
    "Reconstruction",
    "TembenchError",
    "register_cache_type",
]


def __getattr__(name: str):
    # plugins register their own result dataclasses with the stage cache; imported on first use
    if name == "register_cache_type":
        from tembench.cache import register_cache_type

        return register_cache_type
    raise AttributeError(f"module 'tembench' has no attribute {name!r}")
