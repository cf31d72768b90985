from __future__ import annotations

import sys
import textwrap

import pytest

import dummy_plugin
import tembench
from tembench import Params, Reconstructor, hookimpl
from tembench.errors import PluginError, ScenarioError
from tembench.registry import Registry


def test_builtins_registered_through_hooks():
    reg = Registry(load_entry_points=False)
    names = {p for p, _ in reg.pm.list_name_plugin()}
    assert "tembench.builtin.samples" in names
    assert "crystal" in reg.components("sample")
    assert "poisson_dose" in reg.components("noise_model")
    assert reg.origin("sample", "crystal") == "tembench.builtin.samples"


def test_explicit_registration(registry):
    assert registry.get("reconstructor", "dummy_identity") is dummy_plugin.Identity
    assert registry.origin("reconstructor", "dummy_identity") == "dummy_plugin"


def test_entry_point_discovery(tmp_path, monkeypatch):
    (tmp_path / "ep_tembench_plugin.py").write_text(textwrap.dedent('''
        from tembench import Reconstructor, Params, Reconstruction, hookimpl
        class EP(Reconstructor):
            """From an entry point."""
            name = "ep_recon"
            accepts = ("*",)
            class Params(Params):
                pass
            def reconstruct(self, measurement, params, xp):
                return Reconstruction(kind="image", data=measurement.data, sampling_A=1, quantity="x")
        @hookimpl
        def tembench_register_reconstructors():
            return [EP]
    '''))
    dist = tmp_path / "ep_tembench_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-tembench-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[tembench]\nep = ep_tembench_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    assert "ep_recon" in reg.components("reconstructor")
    assert reg.origin("reconstructor", "ep_recon") == "ep"


def test_broken_entry_point_warns_then_strict_raises(tmp_path, monkeypatch):
    (tmp_path / "broken_tembench_plugin.py").write_text("raise ImportError('no such thing')\n")
    dist = tmp_path / "broken_tembench_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-tembench-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[tembench]\nbroken = broken_tembench_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(UserWarning, match="broken"):
        reg = Registry()
    assert "broken" in reg.load_errors
    sys.modules.pop("broken_tembench_plugin", None)
    with pytest.raises(PluginError, match="'broken'"):
        Registry(strict=True)


def _plugin_with(cls):
    class Plugin:
        @hookimpl
        def tembench_register_reconstructors(self):
            return [cls]

    return Plugin()


def test_duplicate_name_names_both_plugins(registry):
    class Dup(dummy_plugin.Identity):
        """Same name again."""

    registry.register(_plugin_with(Dup), name="other_plugin")
    with pytest.raises(PluginError, match=r"duplicate reconstructor name 'dummy_identity'.*'dummy_plugin'.*'other_plugin'"):
        registry.components("reconstructor")


def test_missing_params_method_and_kinds_are_load_errors():
    class NoParams(Reconstructor):
        """x"""
        name = "np1"
        accepts = ("*",)

        def reconstruct(self, measurement, params, xp):
            return None

    class NoMethod(Reconstructor):
        """x"""
        name = "np2"
        accepts = ("*",)

        class Params(Params):
            pass

    class NoAccepts(Reconstructor):
        """x"""
        name = "np3"

        class Params(Params):
            pass

        def reconstruct(self, measurement, params, xp):
            return None

    for cls, msg in [(NoParams, "Params"), (NoMethod, "does not implement `reconstruct`"), (NoAccepts, "accepts")]:
        reg = Registry(load_entry_points=False)
        reg.register(_plugin_with(cls), name="bad_plugin")
        with pytest.raises(PluginError, match=msg) as info:
            reg.components("reconstructor")
        assert "bad_plugin" in str(info.value)


def test_unknown_hook_argument_rejected():
    class Bad:
        @hookimpl
        def tembench_register_samples(self, nonsense):
            return []

    reg = Registry(load_entry_points=False)
    with pytest.raises(PluginError, match="invalid"):
        reg.register(Bad(), name="bad_args")


def test_unknown_component_suggests_closest(registry):
    with pytest.raises(ScenarioError, match=r"Did you mean 'dummy_identity'"):
        registry.get("reconstructor", "dummy_identiy")


def test_public_api():
    for name in tembench.__all__:
        assert hasattr(tembench, name)
