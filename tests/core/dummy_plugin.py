"""Tiny, fast components used by the core tests (registered explicitly, as a plugin author would)."""

from __future__ import annotations

import os
import time

import numpy as np
from pydantic import Field

from tembench import (ForwardModel, Geometry, Measurement, NoiseModel, Params, Quantifier, Reconstruction,
                      Reconstructor, Sample, SampleModel, hookimpl)

CALLS: dict[str, int] = {"build": 0, "simulate": 0, "reconstruct": 0}


def _count(name: str) -> None:
    CALLS[name] += 1
    log = os.environ.get("TEMBENCH_TEST_CALL_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(name + "\n")


class DotSample(SampleModel):
    """One atom in a box."""

    name = "dummy_dot"

    class Params(Params):
        size_A: float = Field(8.0, gt=0)

    def build(self, params, rng):
        _count("build")
        c = params.size_A
        return Sample(positions_A=[[c / 2, c / 2, c / 2]], numbers=[14], cell_A=[c, c, c], name="dot")


class GaussianImage(ForwardModel):
    """A Gaussian blob image (no physics)."""

    name = "dummy_image"
    produces = "dummy_image"

    class Params(Params):
        n: int = Field(16, ge=2, le=4096)
        width_px: float = Field(2.0, gt=0)
        offset: float | None = Field(None, description="added to the image; None = nothing")

    def simulate(self, sample, params, xp):
        _count("simulate")
        y, x = np.mgrid[: params.n, : params.n] - params.n / 2
        img = 1.0 + np.exp(-(x**2 + y**2) / (2 * params.width_px**2)) + (params.offset or 0.0)
        return Measurement(kind="dummy_image", data=img.astype(np.float32), axes=("y", "x"),
                           geometry=Geometry(sampling_A=(1.0, 1.0)))


class AddNoise(NoiseModel):
    """Additive Gaussian noise."""

    name = "dummy_noise"
    accepts = ("dummy_image",)

    class Params(Params):
        sigma: float = Field(0.1, ge=0)

    def apply(self, measurement, params, rng):
        data = measurement.data + params.sigma * rng.standard_normal(measurement.data.shape).astype(np.float32)
        return measurement.replace(data=data)


class Identity(Reconstructor):
    """Returns the measurement as the reconstruction; can be told to sleep or fail."""

    name = "dummy_identity"
    accepts = ("dummy_image",)
    produces = "image"

    class Params(Params):
        sleep_s: float = Field(0.0, ge=0)
        fail: bool = False

    def reconstruct(self, measurement, params, xp):
        _count("reconstruct")
        block_at = os.environ.get("TEMBENCH_TEST_BLOCK_AT")  # kill tests: hang at this call, deterministically
        if block_at and CALLS["reconstruct"] >= int(block_at):
            while True:
                time.sleep(0.05)
        if params.sleep_s:
            time.sleep(params.sleep_s)
        if params.fail:
            raise RuntimeError("deliberate failure for testing")
        return Reconstruction(kind="image", data=measurement.data.copy(), sampling_A=1.0, quantity="intensity",
                              history={"cost": [3.0, 2.0, 1.0]})


class Mean(Quantifier):
    """Mean of the reconstruction and its sum of squares."""

    name = "dummy_mean"
    accepts = ("image",)

    class Params(Params):
        pass

    def score(self, reconstruction, measurement, sample, params):
        d = reconstruction.data
        return {"mean": float(d.mean()), "sumsq": float((d**2).sum()), "profile": d[d.shape[0] // 2]}


@hookimpl
def tembench_register_samples():
    return [DotSample]


@hookimpl
def tembench_register_forward_models():
    return [GaussianImage]


@hookimpl
def tembench_register_noise_models():
    return [AddNoise]


@hookimpl
def tembench_register_reconstructors():
    return [Identity]


@hookimpl
def tembench_register_quantifiers():
    return [Mean]


SCENARIO = """
name: dummy
seed: 7
repeats: 2
sample: dummy_dot
forward: {name: dummy_image, params: {n: 16}}
noise: [{name: dummy_noise, params: {sigma: 0.1}}]
reconstructors:
  - {name: dummy_identity, label: a}
  - {name: dummy_identity, label: b}
quantifiers: [dummy_mean]
sweep:
  grid:
    noise.0.sigma: [0.0, 0.1, 0.2]
"""
