"""Pt@Al2O3 core–shell nanocube (You 2025)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from tembench.builtin.samples_you import PtAl2O3Nanocube

A_PT = 3.924


def build(**kw):
    base = dict(core_edge_A=3 * A_PT, shell_thickness_A=6.0, padding_A=2.0)
    base.update(kw)
    return PtAl2O3Nanocube().build(PtAl2O3Nanocube.Params(**base), np.random.default_rng(0))


@pytest.mark.parametrize("shell", ["corundum", "amorphous"])
def test_core_shell_geometry(shell):
    s = build(shell=shell)
    core = s.positions_A[s.labels == "core"]
    sh = s.positions_A[s.labels == "shell"]
    c = s.cell_A / 2
    assert np.all(s.numbers[s.labels == "core"] == 78) and len(core) == 4 * 27
    assert np.all(np.abs(core - c) < 3 * A_PT / 2)
    assert set(np.unique(s.numbers[s.labels == "shell"])) == {8, 13}
    outer = 3 * A_PT / 2 + 6.0
    assert np.all(np.abs(sh - c) < outer + 1e-9)
    assert cKDTree(core).query(sh)[0].min() >= 2.0


def test_amorphous_shell_density_and_min_distances():
    s = build(shell="amorphous", core_edge_A=2 * A_PT, shell_thickness_A=8.0)
    z = s.numbers[s.labels == "shell"]
    sh = s.positions_A[s.labels == "shell"]
    n_al, n_o = np.sum(z == 13), np.sum(z == 8)
    assert abs(n_al / n_o - 2 / 3) < 0.03
    vol = s.metadata["shell_volume_A3"]
    density = (n_al * 26.98 + n_o * 16.0) / 6.022e23 / (vol * 1e-24)
    assert density == pytest.approx(3.1, rel=0.08)   # minus the atoms within 2 Å of the Pt core
    tree = cKDTree(sh)
    pairs = tree.query_pairs(2.7, output_type="ndarray")
    d = np.linalg.norm(sh[pairs[:, 0]] - sh[pairs[:, 1]], axis=1)
    kinds = z[pairs[:, 0]] + z[pairs[:, 1]]       # 26 Al–Al, 21 Al–O, 16 O–O
    for k, dmin in [(26, 2.7), (21, 1.75), (16, 2.5)]:
        sel = d[kinds == k]
        assert sel.size == 0 or sel.min() > 0.85 * dmin
