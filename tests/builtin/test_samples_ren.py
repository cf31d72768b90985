"""Amorphous SiO2 network statistics and the Ren 2020 Si/SiO2 needle."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from tembench.builtin.samples_ren import SiSiO2Needle
from tembench.structures.amorphous import Region, amorphous_sio2
from tembench.structures.crystal import needle_distance

L_BOX = 22.0


@pytest.fixture(scope="module")
def asio2():
    reg = Region(lo=(0, 0, 0), hi=(L_BOX,) * 3, periodic=True)
    x, z, _ = amorphous_sio2(reg, np.random.default_rng(1))
    return x, z


def _si_o_pairs(x, z, box, cutoff=2.0):
    tree = cKDTree(np.mod(x, box), boxsize=box)
    p = tree.query_pairs(cutoff, output_type="ndarray")
    p = p[z[p[:, 0]] != z[p[:, 1]]]
    d = x[p[:, 1]] - x[p[:, 0]]
    d -= box * np.round(d / box)
    return p, np.linalg.norm(d, axis=1)


def test_asio2_bond_lengths_coordination_density(asio2):
    x, z = asio2
    box = np.full(3, L_BOX)
    pairs, r = _si_o_pairs(x, z, box)
    # Si–O bond ≈ 1.6 Å (a-SiO2: 1.61 Å); our relaxed network: mean 1.65, sd 0.04
    assert 1.58 < r.mean() < 1.68 and r.std() < 0.06
    coord = np.bincount(pairs.ravel(), minlength=len(z))
    assert np.all(coord[z == 14] == 4)                      # every Si is SiO4
    o_coord = coord[z == 8]
    assert np.all(o_coord >= 1) and np.mean(o_coord == 2) > 0.8  # mostly bridging O
    mass = (z == 14).sum() * 28.0855 + (z == 8).sum() * 15.9994
    density = mass / 6.02214076e23 / (L_BOX**3 * 1e-24)
    assert abs(density - 2.2) < 0.1


def test_asio2_angles_and_minimum_distances(asio2):
    x, z = asio2
    box = np.full(3, L_BOX)
    tree = cKDTree(np.mod(x, box), boxsize=box)
    # minimum distances (a-SiO2 ≈ Si–Si 3.0, O–O 2.6, Si–O 1.6 Å; our network's tails reach lower)
    si = np.flatnonzero(z == 14)
    close = tree.query_pairs(2.4, output_type="ndarray")
    zz = z[close]
    assert not np.any((zz[:, 0] == 14) & (zz[:, 1] == 14))
    oo = close[(zz[:, 0] == 8) & (zz[:, 1] == 8)]
    d_oo = np.linalg.norm((x[oo[:, 1]] - x[oo[:, 0]] + box / 2) % box - box / 2, axis=1)
    assert d_oo.min() > 2.1 and np.sum(d_oo < 2.3) < 0.05 * np.sum(z == 8)  # few strained tetrahedra
    assert tree.query(x, k=2)[0][:, 1].min() > 1.45
    pairs, _ = _si_o_pairs(x, z, box)
    nbrs = {s: [] for s in si}
    for a, b in pairs:
        s, o = (a, b) if z[a] == 14 else (b, a)
        nbrs[s].append(o)
    angles = []
    for s, os in nbrs.items():
        v = x[os] - x[s]
        v -= box * np.round(v / box)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        c = v @ v.T
        angles.extend(np.degrees(np.arccos(np.clip(c[np.triu_indices(len(os), 1)], -1, 1))))
    angles = np.asarray(angles)
    assert abs(angles.mean() - 109.47) < 2.0 and angles.std() < 14.0  # tetrahedral on average


def small_needle(**kw):
    base = dict(core_radius_A=10.0, shell_thickness_A=6.0, core_length_A=24.0, padding_A=3.0)
    base.update(kw)
    return SiSiO2Needle().build(SiSiO2Needle.Params(**base), np.random.default_rng(0))


def test_needle_geometry_labels_and_core_shell_distance():
    s = small_needle()
    core, shell = s.positions_A[s.labels == "core"], s.positions_A[s.labels == "shell"]
    assert len(core) > 100 and len(shell) > 100
    assert np.all(s.positions_A >= 0) and np.all(s.positions_A < s.cell_A)
    assert set(np.unique(s.numbers[s.labels == "core"])) == {14}
    assert set(np.unique(s.numbers[s.labels == "shell"])) == {8, 14}
    centre = np.array([s.cell_A[0] / 2, 3.0 + 24.0 / 2, s.cell_A[2] / 2])  # needle frame origin
    dc = needle_distance(core - centre, 10.0, 24.0)
    ds = needle_distance(shell - centre, 10.0, 24.0)
    assert dc.max() <= 1e-6
    # the shell fills its layer and the gaps between surface atoms; outer O may stick out by one bond
    assert np.all(ds > -2.5) and np.all(ds < 6.0 + 2.2)
    dmin = cKDTree(core).query(shell)[0].min()
    assert dmin >= 1.2                                      # Ren 2020 minimum core–shell distance
    # core density is diamond Si
    vol = np.pi * 10**2 * (24 - 10) + 2 / 3 * np.pi * 10**3
    assert abs(len(core) / vol - 8 / 5.431**3) / (8 / 5.431**3) < 0.08


def test_needle_vacancies_and_tungsten():
    full = small_needle()
    vac = small_needle(vacancies=True)
    assert len(full) - len(vac) == round(0.05 * len(full))
    w = small_needle(substitute_si_with="W")
    assert not np.any(w.numbers == 14) and np.sum(w.numbers == 74) == np.sum(full.numbers == 14)
    wc = small_needle(substitute_si_with="W", substitution_region="core", substitution_fraction=0.5)
    n_core = np.sum(full.labels == "core")
    assert np.sum(wc.numbers == 74) == round(0.5 * n_core)


def test_needle_bad_geometry():
    with pytest.raises(Exception, match="core_length_A"):
        SiSiO2Needle.Params(core_radius_A=20, core_length_A=10)
