from __future__ import annotations

import math

import pytest

import dummy_plugin
from tembench.errors import KindMismatchError, ScenarioError
from tembench.scenario import expand_points, load_scenario, parse_scenario, stable_hash

BASE = dummy_plugin.SCENARIO


def test_grid_expansion(registry):
    sc = parse_scenario(BASE)
    assert len(sc.points) == 3
    assert [p.spec.noise[0].params["sigma"] for p in sc.points] == [0.0, 0.1, 0.2]
    assert sc.n_units == 6


def test_zip_and_mixed_expansion(registry):
    text = BASE.replace("""  grid:
    noise.0.sigma: [0.0, 0.1, 0.2]""", """  grid:
    noise.0.sigma: [0.0, 0.1]
    reconstructors.a.sleep_s: [0.0, 0.001, 0.002]
  zip:
    forward.n: [8, 16]
    forward.width_px: [1.0, 3.0]""")
    sc = parse_scenario(text)
    assert len(sc.points) == 2 * 3 * 2
    combos = {(p.values["forward.n"], p.values["forward.width_px"]) for p in sc.points}
    assert combos == {(8, 1.0), (16, 3.0)}
    p = sc.points[-1]
    assert p.spec.reconstructors[0].params["sleep_s"] == 0.002
    assert p.spec.reconstructors[1].params == {}
    assert len({p.point_id for p in sc.points}) == len(sc.points)


def test_zip_lengths_must_match(registry):
    text = BASE + "  zip:\n    forward.n: [8, 16]\n    forward.width_px: [1.0]\n"
    with pytest.raises(ScenarioError, match="same length"):
        parse_scenario(text)


def test_infinity_in_sweep(registry):
    text = BASE.replace("[0.0, 0.1, 0.2]", "[.inf, 0.1]").replace("dummy_noise, params", "dummy_noise, params")
    sc = parse_scenario(text)
    assert math.isinf(sc.points[0].values["noise.0.sigma"])


def test_malformed_yaml_names_line(registry, scenario_file):
    path = scenario_file("name: x\nsample: [unclosed\n")
    with pytest.raises(ScenarioError, match=r"scenario.yaml: malformed YAML at line \d+"):
        load_scenario(path)


def test_unknown_component_names_key_and_suggestion(registry, scenario_file):
    path = scenario_file(BASE.replace("forward: {name: dummy_image", "forward: {name: dummy_imag"))
    with pytest.raises(ScenarioError, match=r"forward.name: unknown forward model 'dummy_imag'. Did you mean 'dummy_image'"):
        load_scenario(path)


def test_unknown_top_level_key(registry):
    with pytest.raises(ScenarioError, match=r"reconstructor: unknown key"):
        parse_scenario(BASE + "reconstructor: oops\n")


def test_bad_param_type_and_range_name_the_path(registry):
    with pytest.raises(ScenarioError, match=r"forward.params.n: Input should be greater than or equal to 2"):
        parse_scenario(BASE.replace("params: {n: 16}", "params: {n: 1}"))
    with pytest.raises(ScenarioError, match=r"forward.params.n: Input should be a valid integer"):
        parse_scenario(BASE.replace("params: {n: 16}", "params: {n: many}"))
    # a bad value reached only through the sweep names the sweep point
    with pytest.raises(ScenarioError, match=r"noise.0.params.sigma: .*greater than or equal to 0.*sweep point"):
        parse_scenario(BASE.replace("[0.0, 0.1, 0.2]", "[0.0, -1.0]"))


def test_unknown_param_suggests(registry):
    with pytest.raises(ScenarioError, match=r"unknown parameter 'widht_px' \(did you mean 'width_px'\?\)"):
        parse_scenario(BASE.replace("params: {n: 16}", "params: {n: 16, widht_px: 2}"))


def test_bad_sweep_path(registry):
    with pytest.raises(ScenarioError, match="must start with one of"):
        parse_scenario(BASE.replace("noise.0.sigma", "nosie.0.sigma"))
    with pytest.raises(ScenarioError, match=r"no reconstructors entry 'c'"):
        parse_scenario(BASE.replace("noise.0.sigma", "reconstructors.c.sleep_s"))


def test_kind_mismatch(registry):
    text = BASE.replace("noise: [{name: dummy_noise, params: {sigma: 0.1}}]",
                        "noise: [{name: dummy_noise, params: {sigma: 0.1}}, {name: poisson_dose}]")
    parse_scenario(text)  # poisson_dose accepts anything
    text = BASE.replace("forward: {name: dummy_image, params: {n: 16}}", "forward: {name: phase_object}")
    with pytest.raises(KindMismatchError, match=r"noise.0 \('dummy_noise'\) accepts measurement kinds \['dummy_image'\]"):
        parse_scenario(text)


def test_duplicate_reconstructor_labels(registry):
    text = BASE.replace("{name: dummy_identity, label: b}", "{name: dummy_identity, label: a}")
    with pytest.raises(ScenarioError, match="distinct `label`"):
        parse_scenario(text)


def test_gpu_without_cupy_is_a_clear_error(registry):
    pytest.importorskip("numpy")
    from tembench.backend import cupy_available

    if cupy_available():
        pytest.skip("cupy present")
    with pytest.raises(ScenarioError, match="cupy is not installed"):
        parse_scenario(BASE + "device: gpu\n")


def test_stable_hash_ignores_order_and_float_format():
    assert stable_hash({"a": 1.0, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1.0})
    assert stable_hash({"a": float("inf")}) != stable_hash({"a": 1e308})


def test_expand_without_sweep_is_one_point(registry):
    sc = parse_scenario(BASE.split("sweep:")[0])
    assert len(sc.points) == 1 and sc.points[0].values == {}
    assert len(expand_points(sc.spec)) == 1
