from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import dummy_plugin  # noqa: E402

from tembench.registry import Registry, set_registry  # noqa: E402


@pytest.fixture
def registry():
    """A registry with the built-ins and the dummy test plugin, installed as the process default."""
    reg = Registry(load_entry_points=False)
    reg.register(dummy_plugin, name="dummy_plugin")
    set_registry(reg)
    for k in dummy_plugin.CALLS:
        dummy_plugin.CALLS[k] = 0
    yield reg
    set_registry(None)


@pytest.fixture
def scenario_file(tmp_path):
    def make(text: str = dummy_plugin.SCENARIO, name: str = "scenario.yaml") -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p

    return make
