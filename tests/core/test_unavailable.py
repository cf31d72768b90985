"""A component whose optional extra is missing stays registered, is listed as unavailable with its
install hint, and a scenario that uses it is refused by validation — before anything runs."""

from __future__ import annotations

import pytest

from tembench import NoiseModel
from tembench.errors import ScenarioError


class _NeedsMissing(NoiseModel):
    name = "needs_missing"
    accepts = ("*",)
    requires = ("numpy", "tembench_no_such_module_xyz")
    install_hint = 'pip install -e ".[imaginary]"'

    def apply(self, measurement, params, rng):  # pragma: no cover - never runs
        return measurement


def test_missing_requirements_are_found_without_importing():
    assert _NeedsMissing.missing_requirements() == ["tembench_no_such_module_xyz"]
    reason = _NeedsMissing.unavailable_reason()
    assert "tembench_no_such_module_xyz" in reason and ".[imaginary]" in reason
    assert NoiseModel.unavailable_reason() is None


def test_validation_refuses_an_unavailable_component(monkeypatch):
    from tembench.registry import get_registry
    from tembench.scenario import parse_scenario

    reg = get_registry()
    cls = reg.get("noise_model", "cnn_restore")
    assert set(cls.requires) == {"jax", "optax"}
    monkeypatch.setattr(cls, "requires", ("jax", "tembench_no_such_module_xyz"))
    text = """
name: t
sample: {name: crystal, params: {material: Si, repeat: [1, 1, 1]}}
forward: {name: phase_object, params: {sampling_A: 0.5}}
noise: [{name: cnn_restore}]
reconstructors: [direct_image]
"""
    with pytest.raises(ScenarioError, match=r"noise.0.name: noise model 'cnn_restore' is unavailable: needs "
                                            r"tembench_no_such_module_xyz; install with: pip install"):
        parse_scenario(text, check_resources=False)


def test_list_marks_unavailable_components(monkeypatch, capsys):
    from tembench.cli import main
    from tembench.registry import get_registry

    cls = get_registry().get("noise_model", "cnn_restore")
    monkeypatch.setattr(cls, "requires", ("tembench_no_such_module_xyz",))
    assert main(["list", "--kind", "noise_model"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("cnn_restore"))
    assert "[unavailable: needs tembench_no_such_module_xyz; install with: pip install" in line
