"""stem4d position_jitter_A: the probes scan the jittered positions, the geometry keeps the nominal grid,
and the truth is only in the provenance (true_scan_positions_A)."""

from __future__ import annotations

import numpy as np

from tembench.builtin.forward_multislice import STEM4D, position_jitter_offsets, true_scan_positions_A
from tembench.registry import get_registry


def _sample():
    return get_registry().get("sample", "crystal")().build(
        get_registry().get("sample", "crystal").parse_params(
            {"material": "Si", "zone_axis": [0, 0, 1], "repeat": [1, 1, 1], "rms_displacement_A": None}),
        np.random.default_rng(0))


PARAMS = dict(energy_keV=200, sampling_A=0.2, semiangle_mrad=20, scan_step_A=1.5, window_gpts=24, detector_gpts=24,
              slice_thickness_A=2.0, scan_start_A=(1.0, 1.0), scan_end_A=(4.0, 4.0), detectors={})


def test_offsets_are_seeded_and_scaled():
    a = position_jitter_offsets(1, 4000, 0.3, 5)
    assert a.shape == (1, 4000, 2) and abs(a.std() - 0.3) < 0.02
    assert np.array_equal(a, position_jitter_offsets(1, 4000, 0.3, 5))
    assert not np.array_equal(a, position_jitter_offsets(1, 4000, 0.3, 6))
    assert not position_jitter_offsets(1, 5, 0.0, 5).any()


def test_jitter_moves_the_probes_not_the_recorded_grid():
    sample, f = _sample(), STEM4D()
    m0 = f.simulate(sample, STEM4D.parse_params(PARAMS), np)
    m1 = f.simulate(sample, STEM4D.parse_params({**PARAMS, "position_jitter_A": 0.3, "position_jitter_seed": 1}), np)
    assert true_scan_positions_A(m0) is None and m0.provenance == []
    np.testing.assert_array_equal(m0.geometry.scan_positions_A, m1.geometry.scan_positions_A)
    true = true_scan_positions_A(m1)
    assert true.shape == (1, len(m1.geometry.scan_positions_A), 2)
    np.testing.assert_allclose(true[0] - m1.geometry.scan_positions_A,
                               position_jitter_offsets(1, len(true[0]), 0.3, 1)[0])
    assert not np.allclose(m0.data, m1.data)               # the patterns come from the true positions
    assert "true_positions_A" not in m1.extras and not any("true" in k for k in m1.geometry.extra)
    # a scan at the true positions without jitter gives the same patterns
    m2 = f.simulate(sample, STEM4D.parse_params(PARAMS), np)
    np.testing.assert_array_equal(m0.data, m2.data)
