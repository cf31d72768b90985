"""Fixtures of the Ren 2020 tests; their HRTEM tilt series simulation is ``ren_sim.simulate``."""

from __future__ import annotations

import numpy as np
import pytest
from ren_sim import simulate

from tembench.builtin.samples_ren import SiSiO2Needle
from tembench.types import Sample


@pytest.fixture(scope="session")
def toy_sample():
    """Six atoms (Si, O) in a 12 Å cube: a 24³-voxel problem."""
    pos = np.array([[6.0, 6.0, 6.0], [4.4, 6.2, 6.9], [7.5, 5.1, 4.8], [6.3, 7.9, 5.2], [5.1, 4.3, 7.4],
                    [7.9, 6.6, 7.6]])
    return Sample(positions_A=pos, numbers=[14, 8, 8, 14, 8, 14], cell_A=[12.0, 12.0, 12.0], name="toy")


@pytest.fixture(scope="session")
def toy_series(toy_sample):
    """Noise-free 8 tilts (−90°…67.5°) × 2 defocus of the toy sample, simulated on a 2× finer grid."""
    return simulate(toy_sample, tilt_range_deg=(-90.0, 67.5), n_tilts=8, defocus_values_A=[200.0, 1000.0])


@pytest.fixture(scope="session")
def small_needle():
    """Scaled-down Ren needle (r = 5 Å core, 3 Å shell): ≈ 170 atoms in a 22 Å cube."""
    p = SiSiO2Needle.Params(core_radius_A=5, shell_thickness_A=3, core_length_A=10, padding_A=3, relax_iterations=80)
    return SiSiO2Needle().build(p, np.random.default_rng(3))
