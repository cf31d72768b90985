"""Friedrich 2023 samples: counts, columns, the edge dislocation's Burgers vector, twisted bilayers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from tembench.builtin import samples_friedrich as F

A = 3.924


def build(cls, **kw):
    return cls().build(cls.Params(**kw), np.random.default_rng(0))


def test_pt_bulk_counts_and_thickness():
    s = build(F.PtBulk, thickness_cells=7, lateral_cells=3)
    assert len(s) == 4 * 3 * 3 * 7 and np.isclose(s.cell_A[2], 7 * A)
    assert np.allclose(s.rms_displacement_A, 0.065)


def test_pt_nanoparticle_size_and_columns():
    s = build(F.PtNanoparticle, diameter_cells=6.0, padding_A=2.0)
    r = 3.0 * A - A / (2 * np.sqrt(2))   # whole atoms (radius a/2√2) inside the 6-cell sphere
    assert np.all(np.linalg.norm(s.positions_A - s.cell_A / 2, axis=1) <= r + 1e-9)
    assert abs(len(s) / (4 / 3 * np.pi * r**3 * 4 / A**3) - 1) < 0.08
    # [100] projection: columns on a square grid of a/2
    assert abs(s.metadata["n_columns"] / (np.pi * r**2 / (A / 2) ** 2) - 1) < 0.08


@pytest.fixture(scope="module")
def dislocation_pair():
    kw = dict(size_x_A=44.0, size_y_A=30.0, thickness_cells=1, rms_displacement_A=None)
    return build(F.PtEdgeDislocation, **kw), build(F.PtEdgeDislocation, dislocation=False, **kw)


def test_edge_dislocation_inserts_one_half_plane(dislocation_pair):
    disl, ref = dislocation_pair
    x0, y0 = disl.metadata["core_xy_A"]
    d111 = A / np.sqrt(3)
    lz = disl.cell_A[2]

    def band_count(s, above):
        x, y = s.positions_A[:, 0] - x0, s.positions_A[:, 1] - y0
        yb = (y > 0) & (y < d111) if above else (y < 0) & (y > -d111)
        return int(np.sum(yb & (np.abs(x) < 15.0)))

    # one extra (1-10) half-plane above the glide plane: one atom per in-plane row of spacing a√6/4
    rows = lz / (A * np.sqrt(6) / 4)
    extra = band_count(disl, True) - band_count(disl, False)
    assert extra == pytest.approx(rows, abs=1.0)
    assert band_count(ref, True) - band_count(ref, False) == pytest.approx(0, abs=1.0)


def test_edge_dislocation_matches_elastic_theory(dislocation_pair):
    disl, ref = dislocation_pair
    x0, y0 = disl.metadata["core_xy_A"]
    b = A / np.sqrt(2)
    nu = 0.38
    d = disl.positions_A - ref.positions_A          # same atom order, same lattice
    x, y = ref.positions_A[:, 0] - x0, ref.positions_A[:, 1] - y0
    # independent evaluation of Hirth & Lothe eqs 3-45 (u_y up to a constant)
    r2 = x**2 + y**2
    ux = b / (2 * np.pi) * (np.arctan2(y, x) + x * y / (2 * (1 - nu) * r2))
    uy = -b / (2 * np.pi) * ((1 - 2 * nu) / (4 * (1 - nu)) * np.log(r2) + (x**2 - y**2) / (4 * (1 - nu) * r2))
    far = r2 > 4.0
    assert np.allclose(d[far, 0], ux[far], atol=1e-6)
    assert np.allclose(d[far, 1] - d[far, 1].mean(), uy[far] - uy[far].mean(), atol=1e-6)
    # (the half-plane count above measures |b| = one in-plane atom spacing a/√2 physically)
    left = (x < -8) & (np.abs(y) < A)
    # the crystal stays fcc across the cut away from the core: 12 neighbours at a/√2 up to the
    # elastic strain (≈ b / 2πr ≲ 5 % at r > 8 Å)
    tree = cKDTree(disl.positions_A, boxsize=[1e9, 1e9, disl.cell_A[2]])
    sel = np.flatnonzero(left & (np.abs(y) < 2.5) & (np.abs(x) < 16))
    dist, _ = tree.query(disl.positions_A[sel], k=13)
    assert np.allclose(dist[:, 1:], A / np.sqrt(2), rtol=0.06)


def test_srtio3_and_mgo_stoichiometry():
    s = build(F.SrTiO3, repeat=(2, 2, 2))
    assert np.bincount(s.numbers)[[38, 22, 8]].tolist() == [8, 8, 24]
    s = build(F.SrTiO3, zone_axis=(1, 1, 0), repeat=(1, 1, 1))
    assert np.isclose(s.cell_A[2], 3.905 * np.sqrt(2))
    m = build(F.MgO, repeat=(2, 2, 2))
    assert np.bincount(m.numbers)[[12, 8]].tolist() == [32, 32]


def _layer_angles(s, label, bond):
    p = s.positions_A[s.labels == label]
    tree = cKDTree(p[:, :2], boxsize=s.cell_A[:2])
    pairs = tree.query_pairs(bond * 1.05, output_type="ndarray")
    d = p[pairs[:, 1], :2] - p[pairs[:, 0], :2]
    d -= s.cell_A[:2] * np.round(d / s.cell_A[:2])
    return np.degrees(np.arctan2(d[:, 1], d[:, 0])) % 60.0


@pytest.mark.parametrize("twist", [21.79, 9.43])
def test_twisted_bilayer_graphene_periodic_cell(twist):
    s = build(F.TwistedBilayer, material="graphene", twist_deg=twist, rms_displacement_A=None)
    assert s.metadata["twist_deg"] == pytest.approx(twist, abs=0.01)
    lx, ly = s.cell_A[:2]
    n_expected = 2 * 2 * lx * ly / (2.46**2 * np.sqrt(3) / 2)   # 2 layers × 2 atoms per hexagonal cell
    assert len(s) == round(n_expected)
    for label in ("layer1", "layer2"):
        p = s.positions_A[s.labels == label]
        tree = cKDTree(p[:, :2], boxsize=s.cell_A[:2])
        d, _ = tree.query(p[:, :2], k=4)
        assert np.allclose(d[:, 1:], 2.46 / np.sqrt(3), atol=1e-6)   # 3 C–C bonds everywhere, even across the boundary
    a1 = np.median(_layer_angles(s, "layer1", 1.42))
    a2 = np.median(_layer_angles(s, "layer2", 1.42))
    assert (a2 - a1) % 60 == pytest.approx(twist % 60, abs=0.05)


def test_mos2_bilayer_layers_and_finite_mode():
    s = build(F.TwistedBilayer, twist_deg=0.0)
    z = s.numbers
    assert np.sum(z == 42) * 2 == np.sum(z == 16)
    mo = s.positions_A[z == 42]
    assert np.ptp(mo[:, 2]) == pytest.approx(6.15, abs=1e-6)
    f = build(F.TwistedBilayer, periodic=False, size_A=(30.0, 30.0), twist_deg=7.0)
    assert f.metadata["twist_deg"] == 7.0 and np.all(f.positions_A[:, :2] < 30.0)
    assert abs(np.sum(f.numbers == 42) / (2 * 900 / (3.16**2 * np.sqrt(3) / 2)) - 1) < 0.05


def test_graphene_monolayer():
    g = build(F.Graphene, rms_displacement_A=None)
    assert len(g) == 4 and np.all(g.numbers == 6)
