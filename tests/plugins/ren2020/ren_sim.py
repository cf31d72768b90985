"""The Ren 2020 tests' HRTEM tilt series simulated by the platform's forward model (fixtures in conftest.py;
imported by name ``ren_sim``, not ``conftest``, so that test files resolve it whatever else pytest collects)."""

from __future__ import annotations

import numpy as np

from tembench.builtin.forward_multislice import HRTEMTiltSeries


def simulate(sample, **params):
    base = dict(energy_keV=300, sampling_A=0.5, slice_thickness_A=1.0, defocus_values_A=[200, 450, 1000],
                simulation_factor=2)
    base.update(params)
    return HRTEMTiltSeries().simulate(sample, HRTEMTiltSeries.Params(**base), np)
