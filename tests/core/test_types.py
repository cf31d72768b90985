from __future__ import annotations

import numpy as np
import pytest

from tembench.errors import TembenchError
from tembench.types import Measurement, Reconstruction, Sample


def test_sample_ase_round_trip():
    s = Sample(positions_A=[[1, 2, 3], [4, 5, 6]], numbers=[14, 8], cell_A=[10, 11, 12], name="x",
               rms_displacement_A=0.05, labels=["core", "shell"])
    atoms = s.to_ase()
    back = Sample.from_ase(atoms)
    np.testing.assert_allclose(back.positions_A, s.positions_A)
    np.testing.assert_array_equal(back.numbers, s.numbers)
    np.testing.assert_allclose(back.cell_A, s.cell_A)
    np.testing.assert_allclose(back.rms_displacement_A, [0.05, 0.05])
    assert list(back.labels) == ["core", "shell"]
    assert back.symbols == ["Si", "O"] and back.elements == [8, 14]


def test_sample_rejects_bad_input():
    from ase.build import bulk

    with pytest.raises(TembenchError, match="orthorhombic"):
        Sample.from_ase(bulk("Si"))  # primitive fcc cell
    with pytest.raises(TembenchError, match="unknown atomic numbers"):
        Sample(positions_A=[[0, 0, 0]], numbers=[0], cell_A=[1, 1, 1])
    with pytest.raises(TembenchError, match="cell lengths"):
        Sample(positions_A=[[0, 0, 0]], numbers=[1], cell_A=[1, 0, 1])
    with pytest.raises(TembenchError, match="2 positions but 1"):
        Sample(positions_A=[[0, 0, 0], [1, 1, 1]], numbers=[1], cell_A=[1, 1, 1])


def test_measurement_and_reconstruction_shapes():
    with pytest.raises(TembenchError, match="axes"):
        Measurement(kind="x", data=np.zeros((2, 2)), axes=("y",))
    with pytest.raises(TembenchError, match="3-D"):
        Reconstruction(kind="volume", data=np.zeros((2, 2)), sampling_A=1, quantity="potential_V")
    r = Reconstruction(kind="volume", data=np.zeros((2, 2, 2)), sampling_A=0.5, quantity="potential_V")
    assert r.sampling_A == (0.5, 0.5, 0.5) and r.origin_A == (0.0, 0.0, 0.0)


def test_ground_truth_projected_potential_matches_volume():
    s = Sample(positions_A=[[5, 5, 5]], numbers=[14], cell_A=[10, 10, 10])
    proj = s.projected_potential(0.25)
    vol = s.potential_volume(0.25)
    assert proj.shape == (40, 40) and vol.shape[1:] == (40, 40)
    # the 3D potential integrated along z equals the projected potential (V·Å), away from the core
    np.testing.assert_allclose(vol.sum(axis=0) * 0.25, proj, rtol=0.05, atol=0.05 * proj.max())
