"""Generic crystal sample: counts, densities, orientation, shapes, errors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from tembench.builtin.samples import Crystal
from tembench.errors import TembenchError

A_SI, A_PT = 5.431, 3.924


def build(**kw):
    return Crystal().build(Crystal.Params(**kw), np.random.default_rng(0))


def nn_distance(s):
    d, _ = cKDTree(s.positions_A).query(s.positions_A, k=2)
    return d[:, 1]


def inside(s):
    return bool(np.all(s.positions_A >= 0) and np.all(s.positions_A < s.cell_A))


def test_periodic_silicon_unit_cell():
    s = build(material="Si", a_A=A_SI, repeat=(2, 2, 2))
    assert len(s) == 64 and np.allclose(s.cell_A, 2 * A_SI) and inside(s)
    # periodic nearest-neighbour distance of diamond = a√3/4
    d, _ = cKDTree(s.positions_A, boxsize=s.cell_A).query(s.positions_A, k=2)
    assert np.allclose(d[:, 1], A_SI * np.sqrt(3) / 4, atol=1e-6)


def test_zone_axis_112_supercell_is_periodic_fcc():
    s = build(material="Pt", a_A=A_PT, zone_axis=(1, 1, 2), repeat=(2, 2, 1))
    assert np.allclose(s.cell_A, A_PT * np.sqrt([2, 3, 6]) * [2, 2, 1], atol=1e-6)
    assert np.isclose(s.cell_A[2], A_PT * np.sqrt(6))  # [112] along the beam
    assert len(s) == round(np.prod(s.cell_A) * 4 / A_PT**3) and inside(s)
    d, _ = cKDTree(s.positions_A, boxsize=s.cell_A).query(s.positions_A, k=13)
    assert np.allclose(d[:, 1:], A_PT / np.sqrt(2), atol=1e-6)  # 12 nearest neighbours at a/√2


def test_sphere_count_density_and_radius():
    r = 12.0
    s = build(material="Pt", a_A=A_PT, shape="sphere", radius_A=r, padding_A=3.0)
    c = s.cell_A / 2
    assert np.all(np.linalg.norm(s.positions_A - c, axis=1) <= r + 1e-9)
    expected = 4 / 3 * np.pi * r**3 * 4 / A_PT**3
    assert abs(len(s) - expected) / expected < 0.05
    assert np.allclose(s.cell_A, 2 * r + 6)


def test_rotated_box_preserves_bonds_and_density():
    s = build(material="Si", a_A=A_SI, shape="box", size_A=(22.0, 22.0, 2 * A_SI * np.sqrt(2)), rotation_deg=30, zone_axis=(1, 1, 0))
    assert inside(s)
    assert np.allclose(nn_distance(s).min(), A_SI * np.sqrt(3) / 4, atol=1e-6)
    expected = 22 * 22 * 2 * A_SI * np.sqrt(2) * 8 / A_SI**3
    assert abs(len(s) - expected) / expected < 0.05


def test_needle_inside_and_volume():
    r, length = 15.0, 50.0
    s = build(material="Si", a_A=A_SI, shape="needle", radius_A=r, length_A=length, padding_A=2.0)
    p = s.positions_A - s.cell_A / 2
    y0 = length / 2 - r
    rho = np.hypot(p[:, 0], p[:, 2])
    assert np.all(np.where(p[:, 1] <= y0, rho, np.hypot(rho, p[:, 1] - y0)) <= r + 1e-9)
    vol = np.pi * r**2 * (length - r) + 2 / 3 * np.pi * r**3
    assert abs(len(s) - vol * 8 / A_SI**3) / (vol * 8 / A_SI**3) < 0.05


def test_rms_per_element_and_vacancies():
    s = build(material="MgO", crystalstructure="rocksalt", a_A=4.21, repeat=(3, 3, 3),
              rms_displacement_A={"Mg": 0.07, "O": 0.09}, vacancy_fraction=0.1)
    assert len(s) == 216 - round(0.1 * 216)
    assert np.all(s.rms_displacement_A[s.numbers == 12] == 0.07) and np.all(s.rms_displacement_A[s.numbers == 8] == 0.09)


def test_seeded_vacancies_are_reproducible():
    a = Crystal().build(Crystal.Params(vacancy_fraction=0.2, repeat=(2, 2, 2)), np.random.default_rng(5))
    b = Crystal().build(Crystal.Params(vacancy_fraction=0.2, repeat=(2, 2, 2)), np.random.default_rng(5))
    assert np.array_equal(a.positions_A, b.positions_A)


def test_hexagonal_cell_orthogonalised():
    s = build(material="Mg", cubic=False, zone_axis=(0, 0, 1))
    a = 3.21
    assert np.isclose(s.cell_A[0], a, atol=0.01) and np.isclose(s.cell_A[1], a * np.sqrt(3), atol=0.02)
    assert len(s) == 4


@pytest.mark.parametrize("kw, word", [
    (dict(shape="sphere"), "radius_A"),
    (dict(rotation_deg=10), "rotation_deg"),
    (dict(material="Xx"), "crystalstructure"),
    (dict(file="/nonexistent.cif"), "does not exist"),
    (dict(shape="needle", radius_A=10, length_A=5), "length_A"),
    (dict(zone_axis=(0, 0, 1), x_axis=(1, 1, 1)), "perpendicular"),
])
def test_bad_input_names_the_parameter(kw, word):
    with pytest.raises(TembenchError, match=word):
        build(**kw)


def test_registered():
    from tembench.registry import Registry

    assert Registry(load_entry_points=False).get("sample", "crystal") is Crystal
