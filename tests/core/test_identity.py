"""A run's identity follows everything that can change a number.

Editing a module that a component imports (not only the file defining its class), a data file a
package reads, the numeric libraries or the FFT backend must give new stage keys and a new run
id, so stale cached stages are never reused and a resumed folder never mixes rows of two set-ups.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
from pathlib import Path

import pytest

import tembench
from tembench import identity
from tembench.registry import Registry
from tembench.runner import run_id_for, stage_keys
from tembench.scenario import parse_scenario

PLUGIN = {
    "__init__.py": "",
    "helper.py": "SCALE = 2.0\n",
    "data/table.json": '{"a": 1}\n',
    "plugin.py": textwrap.dedent('''
        import json
        from pathlib import Path

        from tembench import Params, Reconstruction, Reconstructor, hookimpl

        from .helper import SCALE

        TABLE = json.loads((Path(__file__).parent / "data" / "table.json").read_text())


        class Scaled(Reconstructor):
            """Scales the data by a helper constant (a stand-in for a method built from several modules)."""

            name = "fp_scaled"
            accepts = ("*",)
            produces = "image"

            class Params(Params):
                pass

            def reconstruct(self, measurement, params, xp):
                return Reconstruction(kind="image", data=measurement.data * SCALE * TABLE["a"])


        @hookimpl
        def tembench_register_reconstructors():
            return [Scaled]
    '''),
}

SCENARIO = """
name: fp
seed: 3
sample: {name: crystal, params: {material: Si, repeat: [1, 1, 1]}}
forward: {name: phase_object, params: {sampling_A: 0.5}}
reconstructors: [fp_scaled]
"""


@pytest.fixture
def plugin_pkg(tmp_path, monkeypatch):
    root = tmp_path / "site"
    pkg = root / "tbfp_plugin"
    for rel, text in PLUGIN.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    monkeypatch.syspath_prepend(str(root))
    import importlib

    module = importlib.import_module("tbfp_plugin.plugin")
    reg = Registry(load_entry_points=False)
    reg.register(module, name="tbfp")
    identity.clear_caches()
    yield pkg, reg
    identity.clear_caches()
    for name in [m for m in sys.modules if m.startswith("tbfp_plugin")]:
        del sys.modules[name]


def _ids(reg):
    identity.clear_caches()
    sc = parse_scenario(SCENARIO, registry=reg)
    return run_id_for(sc, reg), stage_keys(sc.points[0].spec, reg, 0).recon["fp_scaled"]


@pytest.mark.parametrize("edit", ["helper.py", "data/table.json", "plugin.py"])
def test_editing_any_module_or_data_file_of_the_package_changes_keys(plugin_pkg, edit):
    pkg, reg = plugin_pkg
    before = _ids(reg)
    path = pkg / edit
    path.write_text(path.read_text() + ("\n" if edit.endswith(".json") else "# edited\n"))
    after = _ids(reg)
    assert after[0] != before[0], "run id must change"
    assert after[1] != before[1], "the reconstruction's stage key must change"


def test_files_that_cannot_change_a_number_do_not_change_keys(plugin_pkg):
    pkg, reg = plugin_pkg
    before = _ids(reg)
    (pkg / "NOTES.md").write_text("a note\n")
    (pkg / "__pycache__").mkdir(exist_ok=True)
    (pkg / "__pycache__" / "x.py").write_text("stale")
    assert _ids(reg) == before


def test_same_code_same_identity(plugin_pkg):
    _, reg = plugin_pkg
    assert _ids(reg) == _ids(reg)


def test_core_fingerprint_covers_physics_and_data_tables_not_presentation(tmp_path):
    """The core hash includes every module and data table under platform/tembench (a copy is edited)."""
    copy = tmp_path / "tembench"
    shutil.copytree(Path(tembench.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    base = identity._hash_files(copy, identity.PRESENTATION_ONLY)
    for rel in ("physics/potentials.py", "physics/data/kirkland.json", "builtin/noise.py", "runner.py"):
        target = copy / rel
        original = target.read_bytes()
        target.write_bytes(original + b"\n")
        assert identity._hash_files(copy, identity.PRESENTATION_ONLY) != base, rel
        target.write_bytes(original)
    for rel in identity.PRESENTATION_ONLY:
        (copy / rel).write_text((copy / rel).read_text() + "\n# restyled\n")
    assert identity._hash_files(copy, identity.PRESENTATION_ONLY) == base


def test_builtin_and_plugin_fingerprints_include_the_core(plugin_pkg, monkeypatch):
    _, reg = plugin_pkg
    cls = reg.get("reconstructor", "fp_scaled")
    wiener = reg.get("reconstructor", "weak_phase_wiener")
    fp_plugin, fp_builtin = identity.component_fingerprint(cls), identity.component_fingerprint(wiener)
    monkeypatch.setattr(identity, "core_fingerprint", lambda: "0" * 16)  # as if a core module had changed
    identity.component_fingerprint.cache_clear()
    assert identity.component_fingerprint(cls) != fp_plugin
    assert identity.component_fingerprint(wiener) != fp_builtin


def test_fft_backend_is_part_of_the_run_id(plugin_pkg, monkeypatch):
    _, reg = plugin_pkg
    monkeypatch.setenv("TEMBENCH_FFT", "scipy")
    scipy_id = _ids(reg)
    from tembench import backend

    if backend.pyfftw_available():
        monkeypatch.setenv("TEMBENCH_FFT", "pyfftw")
        assert _ids(reg) != scipy_id
    monkeypatch.setenv("TEMBENCH_FFT_WORKERS", "2")
    assert _ids(reg)[0] != scipy_id[0]


def test_numeric_library_versions_are_part_of_the_run_id(plugin_pkg, monkeypatch):
    _, reg = plugin_pkg
    before = _ids(reg)
    versions = dict(identity._library_versions())
    versions["numpy"] = versions.get("numpy", "0") + ".post1"
    monkeypatch.setattr(identity, "_library_versions", lambda: versions)
    sc = parse_scenario(SCENARIO, registry=reg)
    assert run_id_for(sc, reg) != before[0]
    assert stage_keys(sc.points[0].spec, reg, 0).sample != stage_keys(sc.points[0].spec, reg, 0,
                                                                       env={"other": 1}).sample


def test_manifest_records_the_whole_identity(registry, scenario_file, tmp_path):
    import json

    from tembench.runner import run_scenario
    from tembench.scenario import load_scenario

    res = run_scenario(load_scenario(scenario_file(), registry), out=tmp_path, progress=False, report=False)
    ident = json.loads((res.run_dir / "manifest.json").read_text())["identity"]
    env = ident["environment"]
    assert {"numpy", "scipy", "numba"} <= set(env["libraries"])
    assert env["fft"]["library"] in ("pyfftw", "scipy") and "deterministic" in env["fft"]
    assert set(ident["packages"]) >= {"dummy_plugin", "tembench"}
    assert res.table["fft_library"].nunique() == 1 and res.table["deterministic"].all()


def test_code_reused_from_another_plugin_is_part_of_the_identity(tmp_path, monkeypatch):
    """A component naming another package in ``depends_on`` (riCOM reuses the Pelz COM code) changes its
    fingerprint when that package changes; without ``depends_on`` it would not."""
    root = tmp_path / "site2"
    for pkg, text in {"tbdep_lib": "K = 1\n", "tbdep_user": ""}.items():
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text(text)
    (root / "tbdep_user" / "comp.py").write_text(textwrap.dedent('''
        class WithDep:
            version = "1"
            depends_on = ("tbdep_lib",)


        class WithoutDep:
            version = "1"
    '''))
    monkeypatch.syspath_prepend(str(root))
    import importlib

    comp = importlib.import_module("tbdep_user.comp")
    importlib.import_module("tbdep_lib")
    try:
        identity.clear_caches()
        before = identity.component_fingerprint(comp.WithDep), identity.component_fingerprint(comp.WithoutDep)
        (root / "tbdep_lib" / "__init__.py").write_text("K = 2\n")
        identity.clear_caches()
        after = identity.component_fingerprint(comp.WithDep), identity.component_fingerprint(comp.WithoutDep)
        assert after[0] != before[0] and after[1] == before[1]
        from tembench.registry import get_registry

        ricom = get_registry().get("reconstructor", "ricom")
        assert "tembench_pelz2022" in ricom.depends_on
    finally:
        identity.clear_caches()
        for name in [m for m in sys.modules if m.startswith("tbdep_")]:
            del sys.modules[name]
