"""Fixtures of the You 2025 tests; the object and its scan are in ``you_sim``."""

from __future__ import annotations

import pytest
from you_sim import TwoSlice, scan_grid, simulate


@pytest.fixture(scope="session")
def two_slice():
    return TwoSlice()


@pytest.fixture(scope="session")
def dense_object():
    """Blobs over the whole scanned area and its surroundings: every probe position sees structure
    (over vacuum a position is not observable at all)."""
    return TwoSlice(seed=4, n_blobs=40, lo=2.5, hi=16.0)


@pytest.fixture(scope="session")
def clean_scan(two_slice):
    """(patterns (N, 48, 48), geometry, positions (ny, nx, 2)) on the nominal grid."""
    grid = scan_grid()
    patterns, geo = simulate(two_slice, grid)
    return patterns, geo, grid
