"""Virtual detectors, plugin registration and a run through the scenario machinery."""

from __future__ import annotations

import numpy as np
import pytest

from tembench.builtin.noise import PoissonDose
from tembench.builtin.noise_eer import ElectronEventsConversion
from tembench.errors import TembenchError
from tembench.registry import Registry
from tembench_pelz2022 import plugin
from tembench_pelz2022.virtual import VirtualDetector

# the synthetic data of conftest.py (not imported: another conftest module may own that name)
ENERGY_KEV, SAMPLING_A, SEMIANGLE_MRAD = 200.0, 0.25, 25.0


def test_virtual_detectors_partition_the_electrons(focused):
    m = focused.measurement
    a = SEMIANGLE_MRAD
    imgs = {"bf": VirtualDetector().reconstruct(m, VirtualDetector.Params(detector="bf"), np),
            "adf": VirtualDetector().reconstruct(m, VirtualDetector.Params(detector="adf", outer_mrad=2 * a), np),
            "haadf": VirtualDetector().reconstruct(m, VirtualDetector.Params(detector="haadf", inner_mrad=2 * a), np)}
    total = m.data.sum(axis=(2, 3))
    # bf [0, α) + adf [α, 2α) + outer [2α, detector edge] = every electron on the detector
    assert np.allclose(imgs["bf"].data + imgs["adf"].data + imgs["haadf"].data, total, rtol=1e-5)
    assert imgs["adf"].extras["inner_mrad"] == SEMIANGLE_MRAD
    assert imgs["bf"].quantity == "intensity"
    # a weak phase object scatters little: BF holds almost all electrons, ADF shows the atoms
    assert imgs["bf"].data.mean() > 0.95
    abf = VirtualDetector().reconstruct(m, VirtualDetector.Params(detector="abf", score_as_phase=True), np)
    assert abf.quantity == "phase_rad"


def test_virtual_detector_eer_equals_dense_and_rejects_impossible_annulus(focused):
    rng = np.random.default_rng(0)
    counted = PoissonDose().apply(focused.measurement, PoissonDose.Params(electrons_per_pattern=40), rng)
    eer = ElectronEventsConversion().apply(counted, ElectronEventsConversion.Params(), rng)
    for det in ("bf", "abf", "adf"):
        p = VirtualDetector.Params(detector=det)
        assert np.array_equal(VirtualDetector().reconstruct(counted, p, np).data,
                              VirtualDetector().reconstruct(eer, p, np).data)
    with pytest.raises(TembenchError, match="only reaches"):
        VirtualDetector().reconstruct(eer, VirtualDetector.Params(inner_mrad=500.0, outer_mrad=600.0), np)


def test_plugin_registers_its_reconstructors():
    reg = Registry(load_entry_points=False)
    reg.register(plugin, name="pelz2022")
    names = set(reg.components("reconstructor"))
    assert {"ssb", "dpc", "icom", "virtual_detector"} <= names
    for n in ("ssb", "dpc", "icom", "virtual_detector"):
        cls = reg.get("reconstructor", n)
        assert set(cls.accepts) == {"4dstem", "eer"} and cls.produces == "image"
    assert "electron_events" in reg.components("noise_model")
