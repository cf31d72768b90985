"""Synthetic weak-phase-object 4D-STEM shared by the Pelz 2022 tests (small: seconds in total)."""

from __future__ import annotations

import numpy as np
import pytest

from tembench_pelz2022 import synthetic

SAMPLING_A = 0.25
ENERGY_KEV = 200.0
SEMIANGLE_MRAD = 25.0


@pytest.fixture(scope="session")
def phase_object():
    rng = np.random.default_rng(7)
    return synthetic.gaussian_atoms_phase((64, 64), SAMPLING_A, 12, 0.4, 0.05, rng)


@pytest.fixture(scope="session")
def focused(phase_object):
    """64² scan (step 0.25 Å) × 64² detector (1.57 mrad/px), aberration-free probe."""
    return synthetic.simulate(phase_object, SAMPLING_A, 1, ENERGY_KEV, SEMIANGLE_MRAD)


@pytest.fixture(scope="session")
def defocused(phase_object):
    """The same object with the probe 80 Å underfocused (C10 = −80 Å)."""
    return synthetic.simulate(phase_object, SAMPLING_A, 1, ENERGY_KEV, SEMIANGLE_MRAD, {"C10": -80.0})


@pytest.fixture(scope="session")
def blurred_truth(phase_object):
    """|P|² ⋆ φ: what COM integration must recover."""
    return synthetic.probe_intensity_blur(phase_object, SAMPLING_A, ENERGY_KEV, SEMIANGLE_MRAD)
