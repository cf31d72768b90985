"""cnn_restore without JAX: listed and importable, and a clear install hint when it runs (jax hidden here)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tembench.errors import TembenchError
from tembench.types import Geometry, Measurement


@pytest.fixture
def no_jax(monkeypatch):
    for name in list(sys.modules):
        if name == "jax" or name.startswith("jax."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "jax", None)  # `import jax` now raises ImportError


def test_apply_without_jax_names_the_extra(no_jax):
    from tembench_friedrich2023.restore import CNNRestore, restore_image

    m = Measurement("adf_image", np.ones((8, 8), np.float32), ("scan_y", "scan_x"),
                    Geometry(scan_step_A=(0.2, 0.2)))
    with pytest.raises(TembenchError, match=r'pip install -e "\.\[nn\]"'):
        CNNRestore().apply(m, CNNRestore.Params(), np.random.default_rng(0))
    with pytest.raises(TembenchError, match="jax"):
        restore_image(np.ones((8, 8)))
    # the identity needs no network, so a raw-vs-restored sweep's raw half still runs
    off = CNNRestore().apply(m, CNNRestore.Params(enabled=False), np.random.default_rng(0))
    assert off.data.tobytes() == m.data.tobytes()


def test_listed_without_jax(no_jax, capsys):
    from tembench.cli import main
    from tembench.registry import Registry, set_registry

    set_registry(Registry())
    try:
        assert main(["list", "--kind", "noise_model"]) == 0
    finally:
        set_registry(None)
    out = capsys.readouterr().out
    assert "cnn_restore" in out and '".[nn]"' in out
